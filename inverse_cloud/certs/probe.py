"""Network probes the certificate manager relies on: the public-path self-checks (fetch our own HTTP-01 probe,
or complete a TLS-ALPN-01 handshake with our own probe challenge, the way the CA will)
and the served-certificate check (a fresh TLS handshake to our own listener)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import ssl

import aiohttp
from cryptography import x509

from inverse_cloud.certs.acme_base import ChallengeAnswers
from inverse_cloud.certs.tls_alpn import ACME_TLS_ALPN, ID_PE_ACME_IDENTIFIER, AlpnResponder, acme_identifier_value
from inverse_cloud.certs.tls_alpn import challenge_context as make_challenge_context
from inverse_cloud.config import AcmeConfig
from inverse_cloud.errors import CertStoreError

__all__ = ["check_public_path", "check_tls_alpn_path", "choose_challenge", "served_certificate_serial"]

log = logging.getLogger("inverse_cloud.certs.manager")

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
                except TimeoutError:   # aiohttp's connect and read timeouts too: a dropped port 80 lands here
                    why = f"no answer from {where} within {timeout_s:g} s (timed out)"
                except aiohttp.ClientError as exc:
                    why = f"no answer from {where} ({type(exc).__name__})"
                if not retry or loop.time() + 0.1 > deadline:
                    return why
                await asyncio.sleep(0.1)  # retry interval while the tunnel connects (bounded by window_s)
    finally:
        challenges.remove(token)


async def check_tls_alpn_path(domain: str, alpn: AlpnResponder, address: tuple[str, int] | None,
                              timeout_s: float = 5.0, window_s: float = 10.0) -> str | None:
    """Connect to ``<domain>:443`` the way a TLS-ALPN-01 validator will (SNI ``domain``, ALPN ``acme-tls/1``
    only) while a throwaway challenge is published; None when our own challenge certificate comes back,
    else the reason (one phrase). Connection refusals are retried for ``window_s``."""
    probe = "inverse-cloud-self-check-" + secrets.token_urlsafe(18) + "." + secrets.token_urlsafe(32)
    host, port = address or (domain, 443)
    where = f"{host}:{port}"
    loop = asyncio.get_running_loop()
    alpn.set(domain, await loop.run_in_executor(None, make_challenge_context, domain, probe))
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.check_hostname = False
    client.verify_mode = ssl.CERT_NONE   # the challenge certificate is self-signed by design
    client.set_alpn_protocols([ACME_TLS_ALPN])
    deadline = loop.time() + window_s
    try:
        while True:
            try:
                _reader, writer = await asyncio.wait_for(
                    asyncio.open_connection(host, port, ssl=client, server_hostname=domain), timeout_s)
            except ConnectionRefusedError:
                if loop.time() + 0.1 > deadline:
                    return f"connecting to {where} failed (connection refused)"
                await asyncio.sleep(0.1)  # retry interval while the tunnel connects (bounded by window_s)
                continue
            except ssl.SSLError as exc:
                return f"TLS handshake with {where} failed ({exc.reason or exc})"
            except TimeoutError:
                return f"no answer from {where} within {timeout_s:.0f} s"
            except OSError as exc:
                return f"connecting to {where} failed ({_os_reason(exc)})"
            try:
                sslobj = writer.get_extra_info("ssl_object")
                chosen = sslobj.selected_alpn_protocol() if sslobj is not None else None
                der = sslobj.getpeercert(binary_form=True) if sslobj is not None else None
            finally:
                writer.close()
                with contextlib.suppress(OSError, ssl.SSLError, TimeoutError):
                    await asyncio.wait_for(writer.wait_closed(), 2)
            if chosen != ACME_TLS_ALPN or not der:
                return f"{where} did not negotiate {ACME_TLS_ALPN} (something else answers TLS there)"
            try:
                ext = x509.load_der_x509_certificate(der).extensions.get_extension_for_oid(ID_PE_ACME_IDENTIFIER)
            except (ValueError, x509.ExtensionNotFound):
                return f"{where} answered {ACME_TLS_ALPN} without our challenge certificate"
            value = ext.value.value if isinstance(ext.value, x509.UnrecognizedExtension) else b""
            if value != acme_identifier_value(probe):
                return f"{where} answered with another challenge certificate (something else serves port 443)"
            return None
    finally:
        alpn.remove(domain)


async def choose_challenge(acme: AcmeConfig, domain: str, challenges: ChallengeAnswers, alpn: AlpnResponder,
                           window_s: float) -> tuple[str, str | None]:
    """The first of ``[acme] challenge``'s methods whose public path reaches this laptop (self-checked the
    way the CA will validate), or ("", why none does) as one phrase per method tried."""
    problems: list[str] = []
    for method in acme.challenge_methods:
        if method == "tls-alpn-01":
            where = f"https://{domain}/ (tls-alpn-01)"
            problem = await check_tls_alpn_path(domain, alpn, acme.tls_self_check_address, window_s=window_s)
        else:
            where = f"http://{domain}/"
            problem = await check_public_path(domain, challenges, acme.self_check_address, window_s=window_s)
        if problem is None:
            if problems:
                log.info("using %s: %s", method, "; ".join(problems))
            return method, None
        problems.append(f"public path {where} does not reach this laptop ({problem})")
    return "", "; ".join(problems)
