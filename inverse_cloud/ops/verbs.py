"""The control socket's verbs (see :mod:`inverse_cloud.ops.control`): what ``status``, ``doctor`` and ``cert``
ask a running server."""

from __future__ import annotations

import asyncio
import datetime as dt
import secrets
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from inverse_cloud.dav.web import ChallengeStore

__all__ = ["PROBE_TTL_S", "RenewTarget", "cert_renew_verb", "probe_verb"]

# How long a doctor probe token is served on the HTTP listener.
PROBE_TTL_S = 60.0


def probe_verb(challenges: ChallengeStore) -> Callable[[dict[str, Any]], Awaitable[Any]]:
    """doctor's "does public HTTP reach this process" test: a random token served for a minute.

    The token and its answer are chosen here, so the socket cannot be used to publish content."""

    async def probe(_request: dict[str, Any]) -> Any:
        token = "inverse-cloud-probe-" + secrets.token_urlsafe(18)
        value = secrets.token_urlsafe(32)
        challenges.set(token, value)
        asyncio.get_running_loop().call_later(PROBE_TTL_S, challenges.remove, token)
        return {"token": token, "value": value, "expires_in_s": PROBE_TTL_S}

    return probe


class RenewTarget(Protocol):
    """What ``cert renew`` needs of the certificate manager."""

    def request_check(self, force: bool = False) -> None: ...


def cert_renew_verb(manager: RenewTarget) -> Callable[[dict[str, Any]], Awaitable[Any]]:
    """``cert renew [--force]``: ask the manager to check now (it skips its own backoff, never the CA's
    Retry-After). Returns at once; the command then watches the renewal state file for the result."""

    async def renew(request: dict[str, Any]) -> Any:
        requested = dt.datetime.now(dt.UTC)
        manager.request_check(bool(request.get("force")))
        return {"requested_at": requested.isoformat()}

    return renew
