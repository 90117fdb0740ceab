"""What ``inverse-cloud status`` reports, gathered inside the running process.

* :class:`SyncTracker` remembers the last request per (user, client) from the Radicale bridge;
* :func:`collections_of` counts items per user and collection straight from the storage folder;
* :func:`collect` builds the status document from the components (any component with a ``status()``
  method is included as is: the tunnel and the certificate manager report that way);
* :func:`assess` decides healthy or degraded (pure: takes ``now``);
* :func:`format_text` renders the document for a terminal.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import datetime as dt
import hashlib
import os
import time
from collections import OrderedDict
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptography.hazmat.primitives import serialization

from inverse_cloud import __version__
from inverse_cloud.ops.ready import HEALTHY_TUNNEL_STATES, readiness, ready_line

if TYPE_CHECKING:   # types only: status reporting must not import the server at module level
    from aiohttp import web

    from inverse_cloud.config import Config
    from inverse_cloud.dav.server import DavServer
    from inverse_cloud.dav.wsgi import WsgiResult
    from inverse_cloud.supervisor import Component

__all__ = ["SyncTracker", "assess", "collect", "collections_of", "format_text", "snapshot", "spki_sha256"]

CERT_WARN_DAYS = 7
MAX_CLIENTS = 64


def _utc_iso(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def basic_user(header: str) -> str | None:
    """The user name in a ``Basic`` Authorization header (never the password), or None."""
    if not header.startswith("Basic "):
        return None
    try:
        decoded = base64.b64decode(header[6:].strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeError, ValueError):
        return None
    user, sep, _ = decoded.partition(":")
    return user if sep and user else None


class SyncTracker:
    """Last successful DAV request per (user, User-Agent), newest first, bounded."""

    def __init__(self, clock: Any = time.time) -> None:
        self._clock = clock
        self._clients: OrderedDict[tuple[str, str], dict[str, Any]] = OrderedDict()

    def note(self, request: web.Request, result: WsgiResult) -> None:
        """Response hook (see ``DavServer.response_hooks``): only authenticated successes count."""
        if result.status >= 400:
            return
        user = basic_user(request.headers.get("Authorization", ""))
        if user is None:
            return
        agent = request.headers.get("User-Agent", "-")[:120]
        key = (user, agent)
        entry = self._clients.pop(key, None) or {"user": user, "user_agent": agent, "requests": 0,
                                                 "writes": 0}
        entry["requests"] += 1
        if request.method in ("PUT", "DELETE", "MOVE", "PROPPATCH", "MKCOL", "MKCALENDAR"):
            entry["writes"] += 1
        entry["last_seen"] = _utc_iso(self._clock())
        entry["last_request"] = f"{request.method} {request.path}"[:200]
        self._clients[key] = entry
        while len(self._clients) > MAX_CLIENTS:
            self._clients.popitem(last=False)

    def snapshot(self) -> list[dict[str, Any]]:
        return [dict(v) for v in reversed(self._clients.values())]


def _collection_meta(path: Path) -> tuple[str, str]:
    """(type, display name) from a collection's ``.Radicale.props``."""
    import json

    try:
        props = json.loads((path / ".Radicale.props").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "collection", path.name
    tag = props.get("tag", "")
    kind = {"VADDRESSBOOK": "addressbook", "VCALENDAR": "calendar"}.get(tag, "collection")
    return kind, str(props.get("D:displayname", path.name))


def collections_of(storage_dir: Path) -> dict[str, list[dict[str, Any]]]:
    """``{user: [{"collection", "type", "name", "items"}]}`` read from Radicale's folder layout
    (``collection-root/<user>/<collection>/*.vcf|*.ics``). Blocking: call it in a thread."""
    root = storage_dir / "collection-root"
    out: dict[str, list[dict[str, Any]]] = {}
    try:
        users = sorted(e for e in os.listdir(root) if not e.startswith("."))
    except OSError:
        return out
    for user in users:
        udir = root / user
        if not udir.is_dir():
            continue
        colls = []
        for name in sorted(e for e in os.listdir(udir) if not e.startswith(".")):
            cdir = udir / name
            if not cdir.is_dir():
                continue
            kind, display = _collection_meta(cdir)
            items = sum(1 for e in os.listdir(cdir) if not e.startswith(".") and (cdir / e).is_file())
            colls.append({"collection": name, "type": kind, "name": display, "items": items})
        out[user] = colls
    return out


def spki_sha256(key_pem_path: Path) -> str:
    """SHA-256 of the public key (SubjectPublicKeyInfo) of a PEM private key, hex."""
    key = serialization.load_pem_private_key(key_pem_path.read_bytes(), password=None)
    der = key.public_key().public_bytes(serialization.Encoding.DER,
                                        serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).hexdigest()


def _component_statuses(components: Iterable[Component]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for component in components:
        status = getattr(component, "status", None)
        if callable(status):
            try:
                out[component.name] = status()
            except Exception as exc:  # boundary: one broken reporter must not hide the rest
                out[component.name] = {"state": "unknown", "last_error": f"status() failed: {exc}"}
    return out


def _pick(statuses: dict[str, Any], *words: str) -> dict[str, Any] | None:
    for name, value in statuses.items():
        if any(w in name for w in words) and isinstance(value, dict):
            return value
    return None


def snapshot(cfg: Config, server: DavServer | None, components: Iterable[Component], tracker: SyncTracker | None,
             started_at: float) -> dict[str, Any]:
    """The parts of the status document that need no file access (cheap; used for ``STATUS=``)."""
    statuses = _component_statuses(components)
    info = server.tls.info if server is not None else None
    served: dict[str, Any] | None = None
    if info is not None:
        served = {"serial": info.serial_hex, "not_before": info.not_before.strftime("%Y-%m-%dT%H:%M:%SZ"),
                  "not_after": info.not_after.strftime("%Y-%m-%dT%H:%M:%SZ"), "self_signed": info.self_signed,
                  "issuer": info.issuer, "names": list(info.names)}
    now = time.time()
    return {
        "version": __version__,
        "pid": os.getpid(),
        "started_at": _utc_iso(started_at),
        "uptime_s": round(now - started_at, 1),
        "now": _utc_iso(now),
        "domain": cfg.server.domain,
        "listeners": {
            "https": f"{cfg.server.https_listen[0]}:{getattr(server, 'https_port', 0)}",
            "http": f"{cfg.server.http_listen[0]}:{getattr(server, 'http_port', 0)}",
        },
        "relay": {"enabled": cfg.relay.enabled, "host": cfg.relay.host, "port": cfg.relay.port},
        "acme_enabled": cfg.acme.enabled,
        "tunnel": _pick(statuses, "tunnel", "relay"),
        "certificate": {"served": served, "key_sha256": "", "manager": _pick(statuses, "cert", "acme")},
        "storage": {"path": str(cfg.server.storage_dir),
                    "problem": server.guard.problem() if server is not None else None},
        "dav": {},
        "clients": tracker.snapshot() if tracker is not None else [],
        "components": statuses,
    }


async def collect(cfg: Config, server: DavServer | None, components: Iterable[Component],
                  tracker: SyncTracker | None, started_at: float) -> dict[str, Any]:
    """The status document of the running process (JSON-serialisable)."""
    doc = snapshot(cfg, server, components, tracker, started_at)
    loop = asyncio.get_running_loop()
    doc["dav"] = await loop.run_in_executor(None, collections_of, cfg.server.storage_dir)
    info = server.tls.info if server is not None else None
    if info is not None:
        try:
            doc["certificate"]["key_sha256"] = await loop.run_in_executor(None, spki_sha256,
                                                                          info.path / "privkey.pem")
        except (OSError, ValueError):
            pass
    doc["plaintext"] = plaintext_line(doc)
    now = dt.datetime.fromtimestamp(time.time(), dt.UTC).replace(tzinfo=None)
    doc["health"], doc["problems"], doc["notes"] = assess(doc, now)
    ready, because = readiness(doc)
    doc["ready_for_phones"], doc["ready_because"] = ready, because
    return doc


def _caa_pinned(doc: dict[str, Any]) -> bool | None:
    """True: CAA pins our account; False: it does not (the relay could get a certificate); None: unknown."""
    mgr = doc.get("certificate", {}).get("manager") or {}
    caa = mgr.get("caa")
    state = caa.get("state") if isinstance(caa, dict) else caa if isinstance(caa, str) else None
    if state == "ok":
        return True
    if state in ("missing", "too-permissive", "blocks-us"):
        return False
    return None


def plaintext_line(doc: dict[str, Any]) -> str:
    """The guarantee in one line: where TLS ends, and whether DNS stops the relay from getting a certificate."""
    fp = doc.get("certificate", {}).get("key_sha256", "")
    key = f" (key sha256:{fp[:16]}…, never leaves this laptop)" if fp else ""
    if doc.get("relay", {}).get("enabled"):
        line = f"plaintext only here: TLS ends in this process (pid {doc.get('pid')}){key}; the relay forwards " \
               "encrypted bytes"
        pinned = _caa_pinned(doc)
        if pinned is True:
            line += "; CAA pins our ACME account, so the relay cannot get a certificate of its own"
        elif pinned is False:
            line += "; WARNING: no CAA record pins our ACME account, so the relay could obtain a certificate " \
                    "(run `inverse-cloud doctor`)"
        return line
    return f"plaintext only here: TLS ends in this process (pid {doc.get('pid')}){key}; no relay configured"


def _parse_time(text: Any) -> dt.datetime | None:
    if not isinstance(text, str) or not text:
        return None
    try:
        value = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    return value.astimezone(dt.UTC).replace(tzinfo=None) if value.tzinfo else value


def assess(doc: dict[str, Any], now: dt.datetime) -> tuple[str, list[str], list[str]]:
    """``("healthy"|"degraded"|"local only", problems, notes)`` for a status document (pure; ``now`` naive
    UTC). "local only": nothing is broken, but no relay is configured, so phones cannot reach the server."""
    problems: list[str] = []
    notes: list[str] = []
    served = (doc.get("certificate") or {}).get("served")
    if served is None:
        problems.append("no certificate loaded")
    else:
        not_after = _parse_time(served.get("not_after"))
        if served.get("self_signed") and doc.get("acme_enabled"):
            problems.append("serving a self-signed certificate: no CA-issued certificate yet (phones will not "
                            "trust it)")
        elif served.get("self_signed"):
            notes.append("serving a self-signed certificate (ACME is off)")
        if not_after is not None:
            left = not_after - now
            not_before = _parse_time(served.get("not_before"))
            # Renewal is due at a third of the lifetime left; below a sixth (at most 7 days) it is overdue.
            # Short-lived certificates (6-day, or a test CA's minutes) scale with their lifetime.
            warn = dt.timedelta(days=CERT_WARN_DAYS)
            if not_before is not None and not_after > not_before:
                warn = min(warn, (not_after - not_before) / 6)
            if left.total_seconds() <= 0:
                problems.append(f"certificate expired at {served.get('not_after')}")
            elif left < warn and not served.get("self_signed"):
                problems.append(f"certificate expires in {left.total_seconds() / 86400:.1f} days "
                                f"({served.get('not_after')}) and was not renewed yet")
    mgr = (doc.get("certificate") or {}).get("manager") or {}
    if mgr.get("last_error"):
        notes.append(f"last ACME error: {mgr['last_error']}")
    if (doc.get("relay") or {}).get("enabled"):
        tunnel = doc.get("tunnel")
        if tunnel is None:
            problems.append("a relay is configured but no tunnel component reports its state")
        else:
            state = str(tunnel.get("state", "unknown"))
            if state.lower() not in HEALTHY_TUNNEL_STATES:
                err = f": {tunnel['last_error']}" if tunnel.get("last_error") else ""
                problems.append(f"tunnel is {state}{err}")
    storage = (doc.get("storage") or {}).get("problem")
    if storage:
        problems.append(f"storage: {storage}")
    for name, value in (doc.get("components") or {}).items():
        if isinstance(value, dict) and value.get("healthy") is False:
            problems.append(f"{name}: {value.get('last_error') or 'reports unhealthy'}")
    if problems:
        return "degraded", problems, notes
    if not (doc.get("relay") or {}).get("enabled"):
        # Nothing is broken, but phones cannot reach it: not "healthy" for anyone reading it at a glance.
        notes.append("no relay configured: phones outside this machine cannot reach it (`inverse-cloud setup` "
                     "adds a relay)")
        return "local only", problems, notes
    return "healthy", problems, notes


def _ago(iso: str | None, now: dt.datetime) -> str:
    when = _parse_time(iso)
    if when is None:
        return "never"
    s = max(0, int((now - when).total_seconds()))
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if s >= size:
            return f"{iso} ({s // size} {unit} ago)"
    return f"{iso} ({s} s ago)"


def format_text(doc: dict[str, Any]) -> str:
    """A terminal rendering of the status document."""
    now = _parse_time(doc.get("now")) or dt.datetime.now(dt.UTC).replace(tzinfo=None)
    lines = [f"inverse-cloud {doc.get('version')} for {doc.get('domain')}: {doc.get('health', '?').upper()} "
             f"(pid {doc.get('pid')}, up since {doc.get('started_at')})"]
    for p in doc.get("problems", []):
        lines.append(f"  ! {p}")
    for n in doc.get("notes", []):
        lines.append(f"  - {n}")
    relay = doc.get("relay") or {}
    tunnel = doc.get("tunnel")
    if not relay.get("enabled"):
        lines.append("tunnel:       none (no relay configured: local only, phones cannot reach this server)")
    elif tunnel is None:
        lines.append(f"tunnel:       no tunnel component reports (relay {relay.get('host')}:{relay.get('port')})")
    else:
        extra = []
        for key in ("connected_since", "since"):
            if tunnel.get(key):
                extra.append(f"since {tunnel[key]}")
                break
        reconnects = tunnel.get("reconnects")
        if isinstance(reconnects, list):
            extra.append(f"{len(reconnects)} reconnect(s) in the last day")
        elif reconnects is not None:
            extra.append(f"{reconnects} reconnect(s)")
        last = tunnel.get("last_reconnect")
        if isinstance(last, dict) and last.get("reason"):
            extra.append(f"last reconnect: {last['reason']} at {last.get('at')}")
        forwards = tunnel.get("forwards")
        if isinstance(forwards, list) and forwards and all(isinstance(f, dict) for f in forwards):
            extra.append("forwards " + ", ".join(
                f"{f.get('name')} relay:{f.get('relay_port')}->{f.get('local_port')}"
                f"{'' if f.get('bound', True) else ' (not bound)'}" for f in forwards))
        elif forwards:
            extra.append(f"forwards {forwards}")
        if tunnel.get("last_error") and str(tunnel.get("state", "")).lower() not in HEALTHY_TUNNEL_STATES:
            extra.append(f"last error: {tunnel['last_error']}")
        if tunnel.get("fallback"):
            extra.insert(0, f"fallback port: {relay.get('port')} not reachable from this network")
        port = tunnel.get("ssh_port") or relay.get("port")
        lines.append(f"tunnel:       {tunnel.get('state', 'unknown')} to {relay.get('host')}:{port}"
                     + (f" ({'; '.join(str(e) for e in extra)})" if extra else ""))
    cert = doc.get("certificate") or {}
    served = cert.get("served")
    if served:
        kind = "self-signed" if served.get("self_signed") else served.get("issuer", "")
        lines.append(f"certificate:  serial {served.get('serial')} valid until {served.get('not_after')} ({kind})")
    mgr = cert.get("manager") or {}
    if mgr:
        if mgr.get("next_renewal"):
            lines.append(f"              next renewal {mgr['next_renewal']}")
        lines.append(f"              last ACME error: {mgr.get('last_error') or 'none'}")
        caa = mgr.get("caa")
        if isinstance(caa, dict):
            detail = f" ({caa['detail']})" if caa.get("detail") else ""
            lines.append(f"              CAA: {caa.get('state')}{detail}")
            if caa.get("state") != "ok" and caa.get("record"):
                lines.append(f"              publish: {caa['record']}")
        elif caa is not None:
            lines.append(f"              CAA: {caa}")
    dav = doc.get("dav") or {}
    if not dav:
        lines.append("DAV:          no user has logged in yet")
    for user, colls in dav.items():
        parts = ", ".join(f"{c['collection']} ({c['type']}, {c['items']} items)" for c in colls) or "no collections"
        lines.append(f"DAV user {user}: {parts}")
    clients = doc.get("clients") or []
    if not clients:
        lines.append("last sync:    no client has synced since the server started")
    for c in clients[:10]:
        lines.append(f"last sync:    {c['user']} with {c['user_agent']!r}: {_ago(c.get('last_seen'), now)}, "
                     f"{c['requests']} request(s), {c['writes']} write(s)")
    lines.append(doc.get("plaintext", ""))
    lines.append(ready_line(*readiness(doc)))
    return "\n".join(lines)
