"""The ACME client the certificate manager uses (RFC 8555; HTTP-01 or TLS-ALPN-01): :class:`AcmeDriver`.

Directory and renewal-information (ARI) look-ups are plain GETs done with aiohttp on the event loop.
Registering and ordering use certbot's synchronous ``acme`` library (inverse_cloud/certs/acme_issuer.py), which
is imported only when one of them is due, and whose every call runs in a small dedicated thread pool,
never on the event loop; the challenge tokens are published on the loop (``ChallengeStore`` belongs to the
HTTP listener). A server started with a valid certificate thus never loads ``acme``/``josepy``/``requests``
(several MiB) until its renewal is due.

Account: one key (ECDSA P-256, ES256) at ``[acme] account_dir``/account-key.pem, 0600 in a 0700 directory,
created once and never replaced by this code; the account URL per directory is stored next to it in
account.json. Registering is idempotent: a key the CA already knows gets its existing URL back (HTTP 200 +
Location, surfaced by ``acme`` as ``ConflictError``), so a crash between "registered" and "URL saved"
cannot create a second account. A CA that forgot the account (Pebble restarts empty) gets the same key
registered again, with a log line saying the CAA record must change.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import ssl
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, TypeVar

import aiohttp

from inverse_cloud import __version__
from inverse_cloud.certs.acme_base import (
    NETWORK_TIMEOUT_S,
    AccountStore,
    ChallengeAnswers,
    Issued,
    connection_reason,
    generate_key,
)
from inverse_cloud.certs.policy import AriWindow, parse_renewal_info, parse_retry_after
from inverse_cloud.config import AcmeConfig
from inverse_cloud.errors import AcmeError, RateLimited

if TYPE_CHECKING:

    from inverse_cloud.certs.acme_issuer import AcmeIssuer
    from inverse_cloud.certs.tls_alpn import AlpnResponder

__all__ = ["AccountStore", "AcmeDriver", "Issued", "generate_key"]

log = logging.getLogger(__name__)

T = TypeVar("T")

class AcmeDriver:
    """Talks to one ACME directory for one domain. Coroutines are safe to call one at a time.

    Reading the directory and renewal information (ARI) are plain unauthenticated GETs, done here with
    aiohttp; registering and ordering go through :class:`~inverse_cloud.certs.acme_issuer.AcmeIssuer` and the
    ``acme`` library, imported (in an ACME thread) the first time one is due."""

    def __init__(self, cfg: AcmeConfig, domain: str, *, user_agent: str = "") -> None:
        self.cfg = cfg
        self.domain = domain
        self.accounts = AccountStore(cfg.account_dir)
        self.user_agent = user_agent or f"inverse-cloud/{__version__} acme-python"
        self._executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix="acme")
        self._issuer: AcmeIssuer | None = None
        self._directory: dict[str, Any] | None = None
        self._tls: ssl.SSLContext | None = None

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def aclose(self) -> None:
        issuer, self._issuer = self._issuer, None
        if issuer is not None:
            await self._run(issuer.close)
        self._executor.shutdown(wait=False, cancel_futures=True)

    def _make_issuer(self) -> AcmeIssuer:
        from inverse_cloud.certs.acme_issuer import (
            AcmeIssuer,  # the acme library: only once an order or registration is due
        )

        return AcmeIssuer(self.cfg, self.domain, self.accounts, self.user_agent, self._run)

    async def _issuer_ready(self) -> AcmeIssuer:
        if self._issuer is None:
            self._issuer = await self._run(self._make_issuer)  # importing reads files: off the loop
        return self._issuer

    @property
    def bad_nonces(self) -> int:
        """How many badNonce answers the CA gave this driver (all retried)."""
        return self._issuer.bad_nonces if self._issuer is not None else 0

    async def ensure_account(self) -> str:
        """The account URL, registering the (persisted) key if this directory does not know it yet.

        :raises AcmeError: the CA cannot be reached or refuses.
        """
        return await (await self._issuer_ready()).ensure_account()

    async def issue(self, challenges: ChallengeAnswers, *, alpn: AlpnResponder | None = None, method: str = "http-01",
                    replaces: str = "") -> Issued:
        """Order, answer ``method`` (HTTP-01 through ``challenges``, a ChallengeStore; TLS-ALPN-01 through
        ``alpn``, the HTTPS listener's responder), finalize, download.

        :raises RateLimited: 429/503 with the CA's Retry-After; :raises AcmeError: anything else.
        """
        return await (await self._issuer_ready()).issue(challenges, alpn=alpn, method=method, replaces=replaces)

    # --- directory and ARI (no account, no acme library) ----------------------------------------------

    async def _get_json(self, url: str, step: str) -> tuple[dict[str, Any], Any]:
        where = self.cfg.directory
        if self._tls is None:
            bundle = self.cfg.ca_bundle
            self._tls = await self._run(lambda: ssl.create_default_context(cafile=str(bundle) if bundle else None))
        try:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=NETWORK_TIMEOUT_S),
                                             headers={"User-Agent": self.user_agent}) as session, \
                    session.get(url, ssl=self._tls if url.startswith("https:") else False) as response:
                status, headers, raw = response.status, response.headers, await response.read()
        except aiohttp.ClientConnectorCertificateError:
            raise AcmeError(f"cannot verify the TLS certificate of ACME server {where} "
                            "(for a private CA set [acme] ca_bundle)") from None
        except TimeoutError:
            raise AcmeError(f"cannot reach ACME server {where}: timed out ({step})") from None
        except (aiohttp.ClientError, OSError) as exc:
            raise AcmeError(f"cannot reach ACME server {where}: {connection_reason(exc)}") from None
        if status in (429, 503):
            raise RateLimited(f"ACME server {where} answered HTTP {status} at {step}",
                              parse_retry_after(headers.get("Retry-After"), dt.datetime.now(dt.UTC)))
        if status != 200:
            raise AcmeError(f"ACME server {where} answered HTTP {status} at {step}")
        try:
            doc = json.loads(raw)
        except ValueError:
            doc = None
        if not isinstance(doc, dict):
            raise AcmeError(f"ACME server {where} answered {step} with something that is not a JSON object")
        return doc, headers

    async def _directory_doc(self) -> dict[str, Any]:
        if self._directory is None:
            self._directory, _ = await self._get_json(self.cfg.directory, "directory")
        return self._directory

    async def supports_ari(self) -> bool:
        return isinstance((await self._directory_doc()).get("renewalInfo"), str)

    async def renewal_info(self, cert_id: str) -> tuple[AriWindow | None, float | None]:
        """The CA's suggested window for a certificate (None when the CA has no ARI) and how long to wait
        before asking again (the response's Retry-After, or None).

        :raises AcmeError: fetch failed; :raises ValueError: malformed answer. Callers never block renewal on it.
        """
        base = (await self._directory_doc()).get("renewalInfo")
        if not isinstance(base, str):
            return None, None
        doc, headers = await self._get_json(f"{base.rstrip('/')}/{cert_id}", "renewalInfo")
        return parse_renewal_info(doc), parse_retry_after(headers.get("Retry-After"), dt.datetime.now(dt.UTC))
