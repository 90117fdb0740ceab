"""The ACME client the certificate manager uses (RFC 8555, HTTP-01 only): :class:`AcmeDriver`.

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
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import aiohttp
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from inverse_cloud import __version__
from inverse_cloud.certs.policy import AriWindow, parse_renewal_info, parse_retry_after
from inverse_cloud.config import AcmeConfig
from inverse_cloud.errors import AcmeError, ConfigError, RateLimited
from inverse_cloud.fsutil import atomic_write, check_private, ensure_private_dir

if TYPE_CHECKING:
    from josepy import jwk

    from inverse_cloud.certs.acme_issuer import AcmeIssuer

__all__ = ["AccountStore", "AcmeDriver", "Issued", "generate_key"]

log = logging.getLogger(__name__)

T = TypeVar("T")

NETWORK_TIMEOUT_S = 30
ORDER_DEADLINE_S = 120.0
# Polling an authorization or order: 50 ms, doubling up to 2 s, unless the CA sends Retry-After (honoured).
# A CA that validates in a second gets ~5 polls; Pebble (no sleeps) answers on the first or second.
FIRST_POLL_S = 0.05
MAX_POLL_S = 2.0
NONCE_ATTEMPTS = 4   # the library retries badNonce once per POST; Pebble rejects 5% of nonces


def generate_key(key_type: str) -> bytes:
    """A fresh certificate key as PKCS#8 PEM (``[acme] key_type``)."""
    key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
    if key_type == "ecdsa-p256":
        key = ec.generate_private_key(ec.SECP256R1())
    elif key_type == "ecdsa-p384":
        key = ec.generate_private_key(ec.SECP384R1())
    elif key_type in ("rsa-2048", "rsa-3072"):
        key = rsa.generate_private_key(public_exponent=65537, key_size=int(key_type[4:]))
    else:
        raise ConfigError(f"[acme] key_type: unsupported {key_type!r}")
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


class AccountStore:
    """The account key and the account URL per ACME directory, under ``[acme] account_dir``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.key_path = root / "account-key.pem"
        self.meta_path = root / "account.json"

    def has_key(self) -> bool:
        return self.key_path.exists()

    def load_or_create_key(self) -> jwk.JWKEC:
        """The account key; created (0600, in 0700) only if none exists.

        :raises ConfigError: the key file is readable by others, or unreadable/corrupt (never replaced).
        """
        from josepy import jwk

        if self.key_path.exists():
            check_private(self.key_path, "ACME account key")
            try:
                key = serialization.load_pem_private_key(self.key_path.read_bytes(), password=None)
            except (OSError, ValueError) as exc:
                raise ConfigError(f"ACME account key {self.key_path} is unreadable ({exc}); restore it from a "
                                  "backup (a new key means a new account and a new CAA record)") from None
            if not isinstance(key, ec.EllipticCurvePrivateKey):
                raise ConfigError(f"ACME account key {self.key_path} is not an ECDSA key")
            return jwk.JWKEC(key=key)
        ensure_private_dir(self.root)
        key = ec.generate_private_key(ec.SECP256R1())
        atomic_write(self.key_path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                      serialization.NoEncryption()), mode=0o600)
        log.info("created ACME account key %s (back it up: the CAA record names the account it belongs to)",
                 self.key_path)
        return jwk.JWKEC(key=key)

    def _meta(self) -> dict[str, Any]:
        try:
            raw = json.loads(self.meta_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            log.warning("ACME account file %s unreadable (%s); the account URL will be looked up again",
                        self.meta_path, exc)
            return {}
        return raw if isinstance(raw, dict) else {}

    def account_uri(self, directory: str) -> str:
        accounts = self._meta().get("accounts")
        uri = accounts.get(directory, "") if isinstance(accounts, dict) else ""
        return uri if isinstance(uri, str) else ""

    def save_account_uri(self, directory: str, uri: str) -> None:
        meta = self._meta()
        accounts = meta.get("accounts") if isinstance(meta.get("accounts"), dict) else {}
        assert isinstance(accounts, dict)
        accounts[directory] = uri
        meta["accounts"] = accounts
        ensure_private_dir(self.root)
        atomic_write(self.meta_path, (json.dumps(meta, indent=1, sort_keys=True) + "\n").encode(), mode=0o600)


@dataclass(frozen=True)
class Issued:
    chain_pem: bytes
    key_pem: bytes
    order_uri: str


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

    async def issue(self, challenges: Any, *, replaces: str = "") -> Issued:
        """Order, answer HTTP-01 through ``challenges`` (a ChallengeStore), finalize, download.

        :raises RateLimited: 429/503 with the CA's Retry-After; :raises AcmeError: anything else.
        """
        return await (await self._issuer_ready()).issue(challenges, replaces=replaces)

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


def connection_reason(exc: BaseException) -> str:
    text = str(exc)
    for needle, reason in (("Connection refused", "connection refused"),
                           ("Name or service not known", "name does not resolve"),
                           ("NameResolutionError", "name does not resolve"),
                           ("Temporary failure in name resolution", "name does not resolve"),
                           ("Network is unreachable", "network unreachable"),
                           ("No route to host", "no route to host"),
                           ("RemoteDisconnected", "connection closed by the server"),
                           ("Connection reset", "connection reset")):
        if needle in text:
            return reason
    return type(exc).__name__
