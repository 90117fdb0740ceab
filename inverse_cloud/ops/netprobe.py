"""Small network probes for ``doctor``: DNS A/AAAA against a chosen server, one raw HTTP/1.1 request over
TCP or TLS to an exact address (the "public" path, whatever DNS says), and the SPKI hash of a certificate."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import socket
import ssl

from cryptography import x509
from cryptography.hazmat.primitives import serialization

__all__ = ["describe", "dns_addresses", "http_request", "spki_sha256_of_cert"]


def dns_addresses(host: str, server: tuple[str, int]) -> list[str]:
    import dns.exception
    import dns.resolver

    resolver = dns.resolver.Resolver(configure=False)
    resolver.nameservers = [server[0]]
    resolver.port = server[1]
    resolver.lifetime = 5.0
    out: list[str] = []
    for rtype in ("A", "AAAA"):
        try:
            answer = resolver.resolve(host, rtype, raise_on_no_answer=False)
        except dns.resolver.NXDOMAIN:
            return []
        except dns.exception.DNSException as exc:
            raise OSError(f"DNS query for {host} {rtype} at {server[0]}:{server[1]} failed: {exc}") from exc
        out += [rd.to_text() for rd in (answer.rrset or [])]
    return sorted(set(out))


async def http_request(addr: tuple[str, int], host: str, method: str, path: str, timeout_s: float,
                tls: ssl.SSLContext | None = None, headers: dict[str, str] | None = None
                ) -> tuple[int, dict[str, str], bytes, bytes | None]:
    """One HTTP/1.1 request with ``Connection: close``; returns (status, headers, body, peer cert DER)."""
    async with asyncio.timeout(timeout_s):
        reader, writer = await asyncio.open_connection(addr[0], addr[1], ssl=tls,
                                                       server_hostname=host if tls else None)
        try:
            der = None
            if tls is not None:
                sslobj = writer.get_extra_info("ssl_object")
                der = sslobj.getpeercert(binary_form=True) if sslobj else None
            extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
            writer.write(f"{method} {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: inverse-cloud-doctor\r\n"
                         f"Connection: close\r\nContent-Length: 0\r\n{extra}\r\n".encode("latin-1"))
            await writer.drain()
            raw = await reader.read(1 << 20)
            while len(raw) < (1 << 20):
                chunk = await reader.read(1 << 16)
                if not chunk:
                    break
                raw += chunk
        finally:
            writer.close()
            with contextlib.suppress(OSError, ssl.SSLError):
                await writer.wait_closed()
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    if not lines or not lines[0].startswith("HTTP/"):
        raise OSError(f"not an HTTP answer: {raw[:40]!r}")
    status = int(lines[0].split(" ", 2)[1])
    hdrs = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        hdrs[k.strip().lower()] = v.strip()
    return status, hdrs, body, der


def spki_sha256_of_cert(der: bytes) -> str:
    cert = x509.load_der_x509_certificate(der)
    return hashlib.sha256(cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)).hexdigest()


# getaddrinfo's failures (socket.EAI_*), in words: Python shows some of them as "unknown error -2".
_EAI_WORDS = {
    "EAI_NONAME": "no such name in DNS: no A/AAAA record, or a typo",
    "EAI_NODATA": "no such name in DNS: the name exists but has no address record",
    "EAI_AGAIN": "DNS did not answer: check this machine's network and resolver",
    "EAI_FAIL": "DNS failed to answer: check this machine's resolver",
    "EAI_ADDRFAMILY": "the name has no address of the needed family",
}


def describe(exc: BaseException) -> str:
    """A network failure as a phrase a person reads: "connection refused", "no such name in DNS: ...",
    never Python's "Connect call failed ('127.0.0.1', 22)" or "[Errno -2] ..."."""
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, socket.gaierror):
        for name, words in _EAI_WORDS.items():
            if exc.errno == getattr(socket, name, None):
                return words
        return f"name lookup failed: {exc.strerror or 'unknown reason'}"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, OSError) and exc.errno is not None:
        return os.strerror(exc.errno).lower()
    return str(exc) or type(exc).__name__
