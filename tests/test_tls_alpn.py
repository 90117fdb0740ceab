"""TLS-ALPN-01 (RFC 8737): the challenge certificate, the ClientHello ALPN parser, and the selection on the
real listening context: only a handshake that offers acme-tls/1 for a pending name gets the challenge."""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path

import pytest
from cryptography import x509

from inverse_cloud.certs.store import CertStore, TLSManager
from inverse_cloud.certs.tls_alpn import (
    ACME_TLS_ALPN,
    ID_PE_ACME_IDENTIFIER,
    acme_identifier_value,
    challenge_certificate,
    challenge_context,
    offered_alpn,
)

DOMAIN = "laptop.test"
KEY_AUTH = "evaGxfADs6pSRb2LAv9IZf17Dt3juxGJ-PCt92wr-oA.9jg46WB3rR_AHD-EBXdN7cBkH1WOu0tA3M9fm21mqTI"


def client_hello(alpn: list[str] | None, server_name: str = DOMAIN) -> bytes:
    """The ClientHello handshake message Python's own TLS client sends (record header stripped)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if alpn is not None:
        ctx.set_alpn_protocols(alpn)
    out = ssl.MemoryBIO()
    obj = ctx.wrap_bio(ssl.MemoryBIO(), out, server_hostname=server_name)
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    record = out.read()
    assert record[0] == 22
    return record[5:]


@pytest.mark.parametrize(("alpn", "expected"), [
    (["acme-tls/1"], ("acme-tls/1",)),
    (["h2", "http/1.1"], ("h2", "http/1.1")),
    (None, ()),
])
def test_offered_alpn_reads_what_a_real_client_offers(alpn, expected):
    hello = client_hello(alpn)
    assert offered_alpn(hello) == expected
    assert offered_alpn(hello[4:]) == expected     # without the handshake header too


@pytest.mark.parametrize("garbage", [b"", b"\x01", b"\x01\x00\x00\x05abcde", b"\x16\x03\x01" + b"\xff" * 60])
def test_offered_alpn_never_raises_on_garbage(garbage):
    assert offered_alpn(garbage) == ()


def test_truncated_client_hello_offers_nothing():
    hello = client_hello(["acme-tls/1"])
    for cut in range(0, len(hello), 7):
        assert offered_alpn(hello[:cut]) in ((), ("acme-tls/1",))


def test_challenge_certificate_follows_rfc8737():
    """SAN is the domain alone; id-pe-acmeIdentifier is critical and holds SHA-256 of the key authorization
    as a DER OCTET STRING (RFC 8737 section 3)."""
    cert_pem, _key = challenge_certificate(DOMAIN, KEY_AUTH)
    cert = x509.load_pem_x509_certificate(cert_pem)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == [DOMAIN]
    ext = cert.extensions.get_extension_for_oid(ID_PE_ACME_IDENTIFIER)
    assert ext.critical
    import hashlib

    assert ext.value.value == b"\x04\x20" + hashlib.sha256(KEY_AUTH.encode()).digest()
    assert acme_identifier_value(KEY_AUTH) == ext.value.value


@pytest.fixture
async def listener(tmp_path: Path):
    """A TLSManager serving its self-signed stand-in on a loopback asyncio TLS server."""
    tls = TLSManager(CertStore(tmp_path / "tls"), DOMAIN)
    tls.load()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=tls.listening_context)
    port = server.sockets[0].getsockname()[1]
    try:
        yield tls, port
    finally:
        server.close()
        await server.wait_closed()


async def handshake(port: int, alpn: list[str] | None, server_name: str = DOMAIN) -> tuple[x509.Certificate, str]:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if alpn is not None:
        ctx.set_alpn_protocols(alpn)
    _r, w = await asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname=server_name)
    sslobj = w.get_extra_info("ssl_object")
    der = sslobj.getpeercert(binary_form=True)
    chosen = sslobj.selected_alpn_protocol() or ""
    w.close()
    return x509.load_der_x509_certificate(der), chosen


def is_challenge(cert: x509.Certificate) -> bool:
    try:
        cert.extensions.get_extension_for_oid(ID_PE_ACME_IDENTIFIER)
    except x509.ExtensionNotFound:
        return False
    return True


async def test_only_acme_tls_handshakes_for_the_pending_name_get_the_challenge(listener):
    """1. A challenge is pending for laptop.test. 2. A CA-like client (SNI laptop.test, ALPN acme-tls/1 only)
    gets the challenge certificate and acme-tls/1 negotiated. 3. A phone at the same moment (SNI laptop.test,
    ALPN h2/http/1.1, or no ALPN) gets the real certificate. 4. acme-tls/1 for another name gets the real one.
    5. Once the challenge is removed, acme-tls/1 gets the real certificate and no protocol."""
    tls, port = listener
    real_serial = tls.info.serial
    tls.alpn.set(DOMAIN, await asyncio.to_thread(challenge_context, DOMAIN, KEY_AUTH))

    cert, chosen = await handshake(port, [ACME_TLS_ALPN])
    assert is_challenge(cert) and chosen == ACME_TLS_ALPN
    assert cert.extensions.get_extension_for_oid(ID_PE_ACME_IDENTIFIER).value.value == acme_identifier_value(KEY_AUTH)

    for phone_alpn in (["h2", "http/1.1"], ["http/1.1"], None):
        cert, chosen = await handshake(port, phone_alpn)
        assert cert.serial_number == real_serial and not is_challenge(cert), phone_alpn
        assert chosen == ("http/1.1" if phone_alpn else "")

    cert, _ = await handshake(port, [ACME_TLS_ALPN], server_name="other.test")
    assert cert.serial_number == real_serial
    assert tls.alpn.answered == 1

    tls.alpn.remove(DOMAIN)
    cert, chosen = await handshake(port, [ACME_TLS_ALPN])
    assert cert.serial_number == real_serial and chosen == ""


async def test_self_check_passes_through_our_listener_and_names_what_else_answers(listener, tmp_path):
    """The TLS-ALPN-01 self-check: our own listener answers its throwaway challenge (None) and the
    challenge is removed afterwards; a closed port is "connection refused"; another TLS server that does not
    speak acme-tls/1 is named as such."""
    from inverse_cloud.certs.probe import check_tls_alpn_path
    from inverse_cloud.certs.store import CertStore, TLSManager
    from tests.support import free_port

    tls, port = listener
    assert await check_tls_alpn_path(DOMAIN, tls.alpn, ("127.0.0.1", port), window_s=1) is None
    assert len(tls.alpn) == 0 and tls.alpn.answered == 1
    closed = free_port()
    why = await check_tls_alpn_path(DOMAIN, tls.alpn, ("127.0.0.1", closed), window_s=0.2)
    assert why == f"connecting to 127.0.0.1:{closed} failed (connection refused)"

    other = TLSManager(CertStore(tmp_path / "other"), DOMAIN)
    other.load()
    plain = other.current   # a context with no message callback: knows nothing of acme-tls/1

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=plain)
    try:
        oport = server.sockets[0].getsockname()[1]
        why = await check_tls_alpn_path(DOMAIN, tls.alpn, ("127.0.0.1", oport), window_s=0.2)
        assert why is not None and "acme-tls/1" in why, why
    finally:
        server.close()
        await server.wait_closed()


async def test_auto_prefers_http01_and_falls_back_to_tls_alpn01(listener, caplog):
    """choose_challenge with [acme] challenge = "auto": port 80 closed -> tls-alpn-01 with one INFO line
    naming the http-01 problem; "http-01" alone -> the problem, no method."""
    import logging

    from inverse_cloud.certs.probe import choose_challenge
    from inverse_cloud.config import loads
    from inverse_cloud.dav.web import ChallengeStore
    from tests.support import free_port

    caplog.set_level(logging.INFO)
    tls, port = listener
    closed = free_port()
    base = f'[server]\ndomain = "{DOMAIN}"\n[acme]\nself_check_address = "127.0.0.1:{closed}"\n' \
           f'tls_self_check_address = "127.0.0.1:{port}"\n'
    auto = loads(base + 'challenge = "auto"\n').acme
    assert await choose_challenge(auto, DOMAIN, ChallengeStore(), tls.alpn, 0.2) == ("tls-alpn-01", None)
    assert any(r.getMessage().startswith("using tls-alpn-01: public path http://laptop.test/ does not reach")
               for r in caplog.records)
    http_only = loads(base).acme
    method, why = await choose_challenge(http_only, DOMAIN, ChallengeStore(), tls.alpn, 0.2)
    assert method == "" and why == (f"public path http://{DOMAIN}/ does not reach this laptop (connecting to "
                                    f"127.0.0.1:{closed} failed (connection refused))")



async def test_http01_self_check_names_a_timeout_as_one():
    """The HTTP-01 self-check against a path that never answers (here a listener that accepts and stays silent;
    through a provider's firewall that drops port 80 the connect itself times out): the reason is "no answer
    from HOST:PORT within N s (timed out)", not an exception's class name."""
    from inverse_cloud.certs.probe import check_public_path
    from inverse_cloud.dav.web import ChallengeStore

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.read()   # never answers; returns when the client gives up
        finally:
            writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    try:
        port = server.sockets[0].getsockname()[1]
        why = await check_public_path(DOMAIN, ChallengeStore(), ("127.0.0.1", port), timeout_s=0.5, window_s=0.2)
    finally:
        server.close()
        await server.wait_closed()
    assert why == f"no answer from 127.0.0.1:{port} within 0.5 s (timed out)", why
