"""Small network probes for ``doctor``: DNS A/AAAA against a chosen server, one raw HTTP/1.1 request over
TCP or TLS to an exact address (the "public" path, whatever DNS says), and the SPKI hash of a certificate."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
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


def describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    return str(exc) or type(exc).__name__
