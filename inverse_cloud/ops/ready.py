"""One answer to "can a phone sync now?", shared by ``status``, ``doctor``, ``phone`` and the home page:
``ready for phones: yes`` or ``ready for phones: no, because ...`` (the first reason only: the one to fix
first). Pure: it reads a status document (see :mod:`inverse_cloud.ops.status`) and decides."""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from typing import Any

__all__ = ["HEALTHY_TUNNEL_STATES", "is_loopback", "readiness", "ready_line"]

HEALTHY_TUNNEL_STATES = frozenset({"up", "connected", "ready"})
NOT_RUNNING = "the server is not running (start it: systemctl --user start inverse-cloud, or inverse-cloud serve)"


def is_loopback(listen: str) -> bool:
    """Whether a listener address (``127.0.0.1:8443``, ``[::1]:8443``, ``localhost:8443``) is reachable
    from this machine only."""
    host = listen.rsplit(":", 1)[0].strip("[]")
    return host.startswith("127.") or host in ("::1", "localhost")


def _parse(text: Any) -> dt.datetime | None:
    if not isinstance(text, str) or not text:
        return None
    try:
        value = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    return value.astimezone(dt.UTC) if value.tzinfo else value.replace(tzinfo=dt.UTC)


def readiness(doc: Mapping[str, Any] | None, now: dt.datetime | None = None) -> tuple[bool, str]:
    """``(ready, because)`` for a status document; ``doc`` None means the server does not answer.
    ``now`` (aware UTC) defaults to the document's own ``now``."""
    if doc is None:
        return False, NOT_RUNNING
    relay = doc.get("relay") or {}
    if not relay.get("enabled"):
        https = str((doc.get("listeners") or {}).get("https", ""))
        where = ("it listens on this machine only" if is_loopback(https)
                 else "phones on this network would get a self-signed certificate")
        return False, f"no relay is configured (local only: {where}); `inverse-cloud setup` adds one"
    tunnel = doc.get("tunnel")
    if not tunnel:
        return False, "the tunnel to the relay has not started"
    state = str(tunnel.get("state", "unknown"))
    if state.lower() not in HEALTHY_TUNNEL_STATES:
        error = f" ({tunnel['last_error']})" if tunnel.get("last_error") else ""
        return False, f"the tunnel to the relay is {state}{error}"
    served = (doc.get("certificate") or {}).get("served")
    if not served:
        return False, "no certificate is loaded"
    if served.get("self_signed"):
        if not doc.get("acme_enabled"):
            return False, "the certificate is self-signed and ACME is off ([acme] enabled = false)"
        return False, "no certificate from the CA yet (a self-signed stand-in is served; phones will not trust it)"
    when = now or _parse(doc.get("now")) or dt.datetime.now(dt.UTC)
    not_after = _parse(served.get("not_after"))
    if not_after is not None and not_after <= when:
        return False, f"the certificate expired at {served.get('not_after')}"
    problem = (doc.get("storage") or {}).get("problem")
    if problem:
        return False, f"storage: {problem}"
    problems = doc.get("problems") or []
    if problems:
        return False, str(problems[0])
    return True, ""


def ready_line(ready: bool, because: str = "") -> str:
    return "ready for phones: yes" if ready else f"ready for phones: no, because {because}"
