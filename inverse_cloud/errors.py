"""Exception tree. Every error a user can see derives from :class:`InverseCloudError` and carries
one readable line (``str(exc)``): what failed, where, and what to do.

    InverseCloudError
    ├── ConfigError            bad config file, bad flag, bad permissions on a key file
    ├── StartupError           a listener could not bind, a dependency is unsafe (serve never started)
    ├── CertStoreError         a certificate/key pair on disk is unreadable or does not match
    ├── TunnelError            SSH link to the relay
    │   ├── HostKeyMismatch    relay presented another host key than the pinned one (not retryable)
    │   ├── AuthRejected       relay refused our key (not retryable)
    │   └── ForwardRefused     relay refused a reverse listen (stale session or permitlisten)
    ├── AcmeError              ACME CA talks
    │   └── RateLimited        CA said 429 / rateLimited; carries retry_after
    └── UserError              bad user name, user exists / missing (user add/remove/passwd)
"""

from __future__ import annotations

__all__ = [
    "AcmeError",
    "AuthRejected",
    "CertStoreError",
    "ConfigError",
    "ForwardRefused",
    "HostKeyMismatch",
    "InverseCloudError",
    "RateLimited",
    "StartupError",
    "TunnelError",
    "UserError",
]


class InverseCloudError(Exception):
    """Base of every error meant for a human: ``str(exc)`` is the one line they see."""


class ConfigError(InverseCloudError):
    """The configuration (file, flags or file permissions) is wrong."""


class StartupError(InverseCloudError):
    """``serve`` could not start (port in use, unsafe dependency)."""


class CertStoreError(InverseCloudError):
    """A certificate or key on disk cannot be used."""


class TunnelError(InverseCloudError):
    """The SSH link to the relay failed. ``retryable`` says whether trying again can help."""

    retryable = True


class HostKeyMismatch(TunnelError):
    retryable = False


class AuthRejected(TunnelError):
    retryable = False


class ForwardRefused(TunnelError):
    """The relay refused ``tcpip-forward`` for one port."""


class AcmeError(InverseCloudError):
    """Talking to the ACME CA failed."""


class RateLimited(AcmeError):
    def __init__(self, message: str, retry_after_s: float | None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class UserError(InverseCloudError):
    """A DAV user operation cannot be done."""
