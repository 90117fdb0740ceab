"""The certificate store and the swap decision: a new pair is served only once proven; a corrupt or
mismatched pair is refused with one log line while the old certificate keeps being served (checked with
real handshakes against a listening socket); files are 0600 in 0700 directories; the TLS policy is
Mozilla intermediate (TLS 1.2+, AEAD only)."""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import stat
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from inverse_cloud.certs.store import CertStore, TLSManager, server_context
from inverse_cloud.errors import CertStoreError
from tests.support import ThrowawayCA, client_handshake, handshake_with_permissive_server, served_certificate_serial

DOMAIN = "laptop.test"


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


TestCA = ThrowawayCA


@pytest.fixture
def store(tmp_path) -> CertStore:
    return CertStore(tmp_path / "state" / "tls")


@pytest.fixture
async def listening(store) -> AsyncIterator[tuple[TLSManager, int]]:
    """A TLS listener on loopback that serves whatever the manager holds (as DavServer does)."""
    mgr = TLSManager(store, DOMAIN)
    assert mgr.load() is True

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    server = await asyncio.start_server(echo, "127.0.0.1", 0, ssl=mgr.listening_context,
                                        ssl_handshake_timeout=5)
    try:
        yield mgr, server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await server.wait_closed()


async def served_serial(port: int) -> int:
    return await asyncio.to_thread(served_certificate_serial, "127.0.0.1", port)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# --- the decision -----------------------------------------------------------------------------------

def test_first_load_serves_self_signed_and_writes_private_files(store, caplog):
    """No issued pair: a self-signed certificate is made (0600 key in 0700 dirs), logged as such."""
    mgr = TLSManager(store, DOMAIN)
    with caplog.at_level(logging.INFO, "inverse_cloud.certs.store"):
        assert mgr.load() is True
    assert mgr.info is not None and mgr.info.self_signed and mgr.info.names == (DOMAIN,)
    assert any("self-signed" in r.getMessage() for r in caplog.records)
    for d in (store.root, store.selfsigned_dir):
        assert mode(d) == 0o700, d
    assert mode(store.selfsigned_dir / "privkey.pem") == 0o600
    # Nothing changed on disk: a second load keeps it, and does not regenerate it.
    serial = mgr.info.serial
    assert mgr.load() is False
    assert TLSManager(store, DOMAIN).load() and TLSManager(store, DOMAIN).prepare(store.selfsigned_dir, True)[
        1].serial == serial


def test_saved_pair_is_versioned_private_and_atomic(store):
    ca = TestCA()
    chain, key, serial = ca.issue()
    version = store.save(chain, key)
    assert version.name == format(serial, "x")
    assert store.current_dir.resolve() == version.resolve()
    assert store.has_issued()
    assert mode(version) == 0o700 and mode(store.root / "live") == 0o700
    assert mode(version / "privkey.pem") == 0o600 and mode(version / "fullchain.pem") == 0o600
    assert not [p for p in store.root.iterdir() if p.name.startswith(".current")]


def test_store_refuses_unparsable_chain(store):
    with pytest.raises(CertStoreError):
        store.save(b"-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n", b"")
    assert not store.has_issued()


def test_prune_keeps_current_and_newest(store):
    ca = TestCA()
    versions = [store.save(*ca.issue()[:2]) for _ in range(5)]
    store.prune(keep=2)
    left = sorted(p.name for p in (store.root / "live").iterdir())
    assert versions[-1].name in left and len(left) <= 3


async def test_new_pair_is_swapped_in_for_new_handshakes(listening, store, caplog):
    """self-signed -> issued A -> issued B: each load() returns True and a fresh handshake shows the
    new serial; re-loading the same pair changes nothing."""
    mgr, port = listening
    first = mgr.info
    assert first is not None and await served_serial(port) == first.serial
    ca = TestCA()
    for _ in range(2):
        chain, key, serial = ca.issue()
        store.save(chain, key)
        assert mgr.load() is True
        assert mgr.info is not None and mgr.info.serial == serial and not mgr.info.self_signed
        assert await served_serial(port) == serial
    assert mgr.load() is False


async def test_open_connection_keeps_its_certificate_across_a_swap(listening, store):
    """A connection established before the swap keeps working; only new handshakes see the new pair."""
    mgr, port = listening

    def hold_open_then_check() -> tuple[int, int]:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
        with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, \
                ctx.wrap_socket(raw, server_hostname=DOMAIN) as s:
            before = x509.load_der_x509_certificate(s.getpeercert(True) or b"").serial_number
            chain, key, _ = TestCA().issue()
            store.save(chain, key)
            assert mgr.load() is True
            still = x509.load_der_x509_certificate(s.getpeercert(True) or b"").serial_number
        return before, still

    before, still = await asyncio.to_thread(hold_open_then_check)
    assert before == still
    assert await served_serial(port) != before


@pytest.mark.parametrize("damage", ["truncated chain", "garbage chain", "mismatched key", "missing key",
                                    "empty key"])
async def test_corrupt_pair_is_refused_and_old_one_served(listening, store, caplog, damage):
    """A pair on disk that cannot work is refused with one ERROR line; the certificate in memory keeps
    being served (handshakes still succeed with the same serial)."""
    mgr, port = listening
    ca = TestCA()
    chain, key, good_serial = ca.issue()
    store.save(chain, key)
    assert mgr.load() is True
    # A renewal writes a new version that turns out broken.
    chain2, key2, _ = ca.issue()
    version = store.save(chain2, key2)
    if damage == "truncated chain":
        (version / "fullchain.pem").write_bytes(chain2[: len(chain2) // 3])
    elif damage == "garbage chain":
        (version / "fullchain.pem").write_bytes(b"\x00garbage")
    elif damage == "mismatched key":
        (version / "privkey.pem").write_bytes(_pem_key(_key()))
    elif damage == "missing key":
        (version / "privkey.pem").unlink()
    else:
        (version / "privkey.pem").write_bytes(b"")
    caplog.clear()
    with caplog.at_level(logging.INFO, "inverse_cloud.certs.store"):
        assert mgr.load() is False
    errors = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(errors) == 1 and "refused" in errors[0].getMessage() and "\n" not in errors[0].getMessage()
    assert mgr.info is not None and mgr.info.serial == good_serial
    for _ in range(3):
        assert await served_serial(port) == good_serial


def test_first_load_with_a_bad_issued_pair_falls_back_to_self_signed(store, caplog):
    chain, key, _ = TestCA().issue()
    version = store.save(chain, key)
    (version / "privkey.pem").write_bytes(_pem_key(_key()))
    mgr = TLSManager(store, DOMAIN)
    assert mgr.load() is True
    assert mgr.info is not None and mgr.info.self_signed


def test_prepare_checks_key_matches(store, tmp_path):
    chain, _, _ = TestCA().issue()
    d = tmp_path / "pair"
    d.mkdir()
    (d / "fullchain.pem").write_bytes(chain)
    (d / "privkey.pem").write_bytes(_pem_key(_key()))
    with pytest.raises(CertStoreError, match="unusable"):
        TLSManager(store, DOMAIN).prepare(d, False)


# --- policy -----------------------------------------------------------------------------------------

def test_context_policy_is_mozilla_intermediate(store):
    d = store.ensure_self_signed(DOMAIN)
    ctx = server_context(d / "fullchain.pem", d / "privkey.pem")
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    ciphers = ctx.get_ciphers()
    assert ciphers and all(c["aead"] for c in ciphers), [c["name"] for c in ciphers if not c["aead"]]
    assert all("ECDHE" in c["name"] or c["protocol"] == "TLSv1.3" for c in ciphers)
    assert ctx.options & ssl.OP_NO_COMPRESSION and ctx.options & ssl.OP_NO_RENEGOTIATION


@pytest.mark.parametrize(("version", "name"), [(ssl.TLSVersion.TLSv1, "TLSv1"), (ssl.TLSVersion.TLSv1_1, "TLSv1.1")])
async def test_old_tls_versions_are_refused(listening, tmp_path, version, name):
    """A client that can only speak TLS 1.0/1.1 cannot complete a handshake; TLS 1.2 and 1.3 can. The
    control shows the local OpenSSL can do the old version, so the refusal is our server's."""
    _, port = listening
    with pytest.raises((ssl.SSLError, ConnectionError)):
        await asyncio.to_thread(client_handshake, port, version, version)
    assert await asyncio.to_thread(handshake_with_permissive_server, tmp_path / "permissive", version) == name
    tls12, tls13 = ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3
    assert await asyncio.to_thread(client_handshake, port, tls12, tls12) == "TLSv1.2"
    assert await asyncio.to_thread(client_handshake, port, tls12, tls13) == "TLSv1.3"


# --- the policy as an outside scanner sees it (testssl-style, with the openssl command) ---------------------

INTERMEDIATE_TLS12_ECDSA = {"ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-ECDSA-AES256-GCM-SHA384",
                            "ECDHE-ECDSA-CHACHA20-POLY1305"}
TLS13_SUITES = {"TLS_AES_128_GCM_SHA256", "TLS_AES_256_GCM_SHA384", "TLS_CHACHA20_POLY1305_SHA256"}


async def openssl_accepts(port: int, *args: str) -> bool:
    """Whether ``openssl s_client`` with these options completes a handshake with the listener."""
    proc = await asyncio.create_subprocess_exec(
        "openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-servername", DOMAIN, *args,
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), 20)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    return proc.returncode == 0 and b"Cipher is (NONE)" not in out and b"New, " in out


async def test_an_outside_scanner_sees_only_the_intermediate_profile(listening):
    """Every cipher suite OpenSSL knows, offered one at a time by `openssl s_client` (what testssl.sh does):
    with the (default) ECDSA certificate exactly Mozilla intermediate's three ECDHE-ECDSA AEAD suites for
    TLS 1.2 and the three TLS 1.3 suites complete a handshake; no CBC, RSA key exchange, DHE, export,
    NULL or anonymous suite does. (Debian's openssl command cannot offer TLS 1.0/1.1 any more, even at
    security level 0, so the old versions are checked by test_old_tls_versions_are_refused with a
    control instead.)"""
    _, port = listening
    listed = await asyncio.create_subprocess_exec(
        "openssl", "ciphers", "-s", "-tls1_2", "ALL:COMPLEMENTOFALL:@SECLEVEL=0",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await listed.communicate()
    assert listed.returncode == 0, err
    tls12 = [c for c in out.decode().strip().split(":") if not c.startswith("TLS_")]
    assert len(tls12) > 20 and INTERMEDIATE_TLS12_ECDSA <= set(tls12), tls12  # the scan offers plenty
    accepted = {c for c in tls12
                if await openssl_accepts(port, "-tls1_2", "-cipher", f"{c}:@SECLEVEL=0")}
    assert accepted == INTERMEDIATE_TLS12_ECDSA, sorted(accepted)
    for suite in TLS13_SUITES:
        assert await openssl_accepts(port, "-tls1_3", "-ciphersuites", suite), suite
