"""The control socket's verbs (see :mod:`inverse_cloud.ops.control`): what ``status`` and ``doctor`` ask a
running server."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Awaitable, Callable
from typing import Any

from inverse_cloud.dav.web import ChallengeStore

__all__ = ["PROBE_TTL_S", "probe_verb"]

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
