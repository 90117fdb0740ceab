"""Network probes the certificate manager relies on: the public-path self-check (fetch our own HTTP-01 probe
the way the CA will) and the served-certificate check (a fresh TLS handshake to our own listener)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import ssl

import aiohttp
from cryptography import x509

from inverse_cloud.certs.acme_base import ChallengeAnswers
from inverse_cloud.errors import CertStoreError

__all__ = ["check_public_path", "served_certificate_serial"]

ACME_PREFIX = "/.well-known/acme-challenge/"


def _connect_host(host: str) -> str:
    return {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)  # noqa: S104 (a listen address)


async def served_certificate_serial(host: str, port: int, server_name: str, timeout_s: float = 10.0) -> int:
    """The serial of the leaf a *fresh* TLS handshake to ``host:port`` presents (asyncio's TLS client)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # we compare serials; trust is the phone's business
    _reader, writer = await asyncio.wait_for(
        asyncio.open_connection(_connect_host(host), port, ssl=ctx, server_hostname=server_name), timeout_s)
    try:
        sslobj = writer.get_extra_info("ssl_object")
        der = sslobj.getpeercert(binary_form=True) if sslobj is not None else None
    finally:
        writer.close()
        with contextlib.suppress(OSError, ssl.SSLError, TimeoutError):
            await asyncio.wait_for(writer.wait_closed(), 2)
    if not der:
        raise CertStoreError(f"no certificate presented by {host}:{port}")
    return int(x509.load_der_x509_certificate(der).serial_number)


def _os_reason(exc: OSError) -> str:
    return os.strerror(exc.errno).lower() if exc.errno else (exc.strerror or str(exc))


async def check_public_path(domain: str, challenges: ChallengeAnswers, address: tuple[str, int] | None,
                            timeout_s: float = 5.0, window_s: float = 10.0) -> str | None:
    """Fetch ``http://<domain>/.well-known/acme-challenge/<probe>`` the way the CA will; None when our own
    probe comes back, else the reason (one phrase). Connection refusals are retried for ``window_s``
    (the tunnel may still be coming up); other answers are final.
    """
    token = "inverse-cloud-self-check-" + secrets.token_urlsafe(18)
    value = secrets.token_urlsafe(32)
    host, port = address or (domain, 80)
    url_host = f"[{host}]" if ":" in host else host
    url = f"http://{url_host}:{port}{ACME_PREFIX}{token}"
    where = f"{host}:{port}"
    challenges.set(token, value)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + window_s
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_s)) as session:
            while True:
                retry = False
                try:
                    async with session.get(url, headers={"Host": domain}, allow_redirects=False) as resp:
                        body = (await resp.content.read(4096)).decode("utf-8", "replace").strip()
                        if resp.status == 200 and body == value:
                            return None
                        why = (f"{where} answered HTTP {resp.status}" if resp.status != 200
                               else f"{where} answered with another token (something else serves port 80)")
                except aiohttp.ClientConnectorDNSError as exc:
                    why = f"{host} does not resolve ({_os_reason(exc.os_error)})"
                except aiohttp.ClientConnectorError as exc:
                    why = f"connecting to {where} failed ({_os_reason(exc.os_error)})"
                    retry = True
                except (TimeoutError, aiohttp.ClientError) as exc:
                    why = f"no answer from {where} ({type(exc).__name__})"
                if not retry or loop.time() + 0.1 > deadline:
                    return why
                await asyncio.sleep(0.1)  # retry interval while the tunnel connects (bounded by window_s)
    finally:
        challenges.remove(token)
