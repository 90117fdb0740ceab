"""What both halves of the ACME client share: the account key store, key generation, timeouts and the
result of an order. :mod:`inverse_cloud.certs.acme_client` (directory, ARI, the driver the manager uses) and
:mod:`inverse_cloud.certs.acme_issuer` (account and order over the ``acme`` library) both import it, and
neither imports the other at module level.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from inverse_cloud.errors import ConfigError
from inverse_cloud.fsutil import atomic_write, check_private, ensure_private_dir

if TYPE_CHECKING:
    from josepy import jwk

__all__ = ["FIRST_POLL_S", "MAX_POLL_S", "NETWORK_TIMEOUT_S", "NONCE_ATTEMPTS", "ORDER_DEADLINE_S", "AccountStore",
           "ChallengeAnswers", "Issued", "connection_reason", "generate_key"]

log = logging.getLogger("inverse_cloud.certs.acme_client")


class ChallengeAnswers(Protocol):
    """Where HTTP-01 answers are published: the HTTP listener's challenge store."""

    def set(self, token: str, key_authorization: str) -> None: ...

    def remove(self, token: str) -> None: ...

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
