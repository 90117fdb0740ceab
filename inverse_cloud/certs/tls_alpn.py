"""TLS-ALPN-01 (RFC 8737): validation on the HTTPS port alone, so the relay needs no public port 80.

The CA connects to port 443 with SNI = the domain and ALPN offering only ``acme-tls/1``, and expects a
self-signed certificate for the domain carrying the critical ``id-pe-acmeIdentifier`` extension whose value
is SHA-256 of the key authorization (RFC 8737 section 3). Phones keep connecting to the same listener at the
same time and must keep getting the real certificate.

Python's ``ssl`` runs ``sni_callback`` before ALPN is negotiated (so switching ``SSLObject.context`` there
also switches the ALPN choice), but it does not show the callback which protocols the client offered. The
listening context's message callback sees the raw ClientHello first (OpenSSL reports each handshake message
before it processes it): :meth:`AlpnResponder.note_message` parses the offered ALPN list from it and marks
connections that offer ``acme-tls/1``. The SNI callback then hands only those connections, and only for a
name with a pending challenge, the challenge context. ``ssl`` exposes the message callback as the
underscored ``SSLContext._msg_callback`` (CPython 3.8+); its C side returns early once the connection's
context has been switched, so ordinary connections pay for one Python call per ClientHello record at most.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ssl
import tempfile
import weakref
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID, ObjectIdentifier

__all__ = ["ACME_TLS_ALPN", "ID_PE_ACME_IDENTIFIER", "AlpnResponder", "acme_identifier_value",
           "challenge_certificate", "challenge_context", "offered_alpn"]

ACME_TLS_ALPN = "acme-tls/1"
ID_PE_ACME_IDENTIFIER = ObjectIdentifier("1.3.6.1.5.5.7.1.31")   # RFC 8737 section 6.1
_HANDSHAKE = 22        # TLS record content type
_CLIENT_HELLO = 1      # handshake message type
_EXT_ALPN = 16         # RFC 7301


def acme_identifier_value(key_authorization: str) -> bytes:
    """The DER encoding of the extension's value: an OCTET STRING holding SHA-256(key authorization)."""
    return b"\x04\x20" + hashlib.sha256(key_authorization.encode("ascii")).digest()


def challenge_certificate(domain: str, key_authorization: str) -> tuple[bytes, bytes]:
    """A self-signed certificate answering a TLS-ALPN-01 challenge for ``domain`` (PEM cert, PEM key)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "inverse-cloud tls-alpn-01 challenge")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=7))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(domain)]), critical=False)
        .add_extension(x509.UnrecognizedExtension(ID_PE_ACME_IDENTIFIER, acme_identifier_value(key_authorization)),
                       critical=True)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def challenge_context(domain: str, key_authorization: str) -> ssl.SSLContext:
    """A server context that negotiates only ``acme-tls/1`` and presents the challenge certificate.
    Blocking (key generation, a temporary file): call it off the event loop."""
    cert_pem, key_pem = challenge_certificate(domain, key_authorization)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2   # RFC 8737 section 4: TLS 1.2 or later
    ctx.set_alpn_protocols([ACME_TLS_ALPN])
    # load_cert_chain reads files only; the throwaway pair lives for the call in a private directory.
    with tempfile.TemporaryDirectory(prefix="ic-tls-alpn-") as d:
        path = Path(d) / "pair.pem"
        path.touch(mode=0o600)
        path.write_bytes(key_pem + cert_pem)
        ctx.load_cert_chain(str(path))
    return ctx


def offered_alpn(client_hello: bytes) -> tuple[str, ...]:
    """The ALPN protocol names a ClientHello handshake message offers (header included or not); () when it
    offers none or does not parse. Pure; never raises."""
    b = client_hello
    if len(b) >= 4 and b[0] == _CLIENT_HELLO and int.from_bytes(b[1:4], "big") == len(b) - 4:
        b = b[4:]
    try:
        i = 2 + 32                                        # legacy_version, random
        i += 1 + b[i]                                     # session id
        i += 2 + int.from_bytes(b[i:i + 2], "big")        # cipher suites
        i += 1 + b[i]                                     # compression methods
        end = i + 2 + int.from_bytes(b[i:i + 2], "big")
        i += 2
        if end > len(b):
            return ()
        while i + 4 <= end:
            typ, size = int.from_bytes(b[i:i + 2], "big"), int.from_bytes(b[i + 2:i + 4], "big")
            i += 4
            if typ == _EXT_ALPN:
                return _alpn_names(b[i:i + size])
            i += size
    except IndexError:
        return ()
    return ()


def _alpn_names(ext: bytes) -> tuple[str, ...]:
    if len(ext) < 2 or int.from_bytes(ext[:2], "big") != len(ext) - 2:
        return ()
    names: list[str] = []
    i = 2
    while i < len(ext):
        n = ext[i]
        if n == 0 or i + 1 + n > len(ext):
            return ()
        names.append(ext[i + 1:i + 1 + n].decode("ascii", "replace"))
        i += 1 + n
    return tuple(names)


class AlpnResponder:
    """Pending TLS-ALPN-01 answers (``domain -> challenge context``) and the connections that offered
    ``acme-tls/1``. Fed by the listening context's message callback, asked by its SNI callback."""

    def __init__(self) -> None:
        self._contexts: dict[str, ssl.SSLContext] = {}
        self._offering: weakref.WeakSet[Any] = weakref.WeakSet()
        self.answered = 0   # handshakes handed a challenge certificate (for tests and status)

    def set(self, domain: str, context: ssl.SSLContext) -> None:
        self._contexts[domain.lower().rstrip(".")] = context

    def remove(self, domain: str) -> None:
        self._contexts.pop(domain.lower().rstrip("."), None)

    def __len__(self) -> int:
        return len(self._contexts)

    def note_message(self, conn: Any, direction: str, _version: Any, content_type: Any, msg_type: Any,
                     data: bytes) -> None:
        """``SSLContext._msg_callback``: remember connections whose ClientHello offers ``acme-tls/1``."""
        if not self._contexts or direction != "read" or content_type != _HANDSHAKE or msg_type != _CLIENT_HELLO:
            return
        if ACME_TLS_ALPN in offered_alpn(data):
            self._offering.add(conn)

    def context_for(self, conn: Any, server_name: str | None) -> ssl.SSLContext | None:
        """The challenge context for this handshake, or None (serve the real certificate)."""
        if not self._contexts or server_name is None or conn not in self._offering:
            return None
        ctx = self._contexts.get(server_name.lower().rstrip("."))
        if ctx is not None:
            self.answered += 1
        return ctx

    def install(self, listening: ssl.SSLContext) -> None:
        """Hook the message callback into the listening context (the one every connection starts on)."""
        listening._msg_callback = self.note_message  # type: ignore[attr-defined]
