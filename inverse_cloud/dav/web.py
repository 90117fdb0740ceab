"""The two aiohttp applications: HTTPS (DAV) and HTTP (ACME challenges + redirect), and the small
shared pieces other components plug into:

* :class:`ChallengeStore`: HTTP-01 tokens the ACME client publishes (``set``/``remove``);
* :class:`PeerDirectory`: the real client address for connections the tunnel hands to our listeners
  over loopback (the tunnel registers its local source port before sending a byte);
* :class:`StorageGuard`: refuses ``/radicale/`` when a store that has held data is missing or empty.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from aiohttp import HttpVersion10, web
from aiohttp.abc import AbstractAccessLogger

from inverse_cloud.dav.environ import WRITE_METHODS
from inverse_cloud.dav.wsgi import NOTE_KEY, RadicaleBridge, WsgiResult
from inverse_cloud.fsutil import atomic_write
from inverse_cloud.log import printable

__all__ = [
    "AccessLogger",
    "FailedLoginDigest",
    "flush_failed_logins",
    "access_logger_class",
    "ChallengeStore",
    "PeerDirectory",
    "StorageGuard",
    "make_http_app",
    "make_https_app",
    "redirect_target",
]

log = logging.getLogger(__name__)

ACME_PREFIX = "/.well-known/acme-challenge/"
DAV_ROOT = "/radicale/"


class ChallengeStore:
    """In-memory HTTP-01 tokens: ``token -> key authorization``."""

    def __init__(self) -> None:
        self._tokens: dict[str, str] = {}

    def set(self, token: str, key_authorization: str) -> None:
        self._tokens[token] = key_authorization

    def remove(self, token: str) -> None:
        self._tokens.pop(token, None)

    def get(self, token: str) -> str | None:
        return self._tokens.get(token)

    def __len__(self) -> int:
        return len(self._tokens)


class PeerDirectory:
    """Maps a loopback source port (the tunnel's side of a hand-off connection) to the address the
    relay saw. Lookups fall back to the socket peer, so direct connections need no registration."""

    def __init__(self) -> None:
        self._by_port: dict[int, tuple[str, int]] = {}

    def register(self, local_port: int, origin: tuple[str, int]) -> None:
        self._by_port[local_port] = origin

    def unregister(self, local_port: int) -> None:
        self._by_port.pop(local_port, None)

    def resolve(self, peername: Any) -> tuple[str, int]:
        if not peername:
            return ("unknown", 0)
        host, port = peername[0], int(peername[1])
        return self._by_port.get(port, (host, port)) if host in ("127.0.0.1", "::1") else (host, port)

    def remote_of(self, request: web.Request) -> tuple[str, int]:
        peer = request.transport.get_extra_info("peername") if request.transport else None
        return self.resolve(peer)


class StorageGuard:
    """Refuse to serve DAV from a missing, empty or unreadable store once this installation has held
    data: Radicale would create an empty root and phones would delete their contacts
    ."""

    def __init__(self, storage_dir: Path, marker: Path) -> None:
        self.root = storage_dir / "collection-root"
        self.storage_dir = storage_dir
        self.marker = marker
        self._has_data = marker.exists()
        self._logged_at = 0.0

    def problem(self) -> str | None:
        if not self._has_data:
            return None
        try:
            entries = os.listdir(self.root)
        except FileNotFoundError:
            return f"storage folder {self.root} is missing"
        except OSError as exc:
            return f"storage folder {self.root} is unreadable ({exc.strerror})"
        if not [e for e in entries if not e.startswith(".")]:
            return f"storage folder {self.root} is empty"
        return None

    def gate(self, request: web.Request) -> web.Response | None:
        problem = self.problem()
        if problem is None:
            return None
        now = time.monotonic()
        if now - self._logged_at > 60:
            self._logged_at = now
            log.error("%s; refusing to serve /radicale/ because this installation has held data before "
                      "(restore the folder, or remove %s to start over with an empty store)", problem, self.marker)
        return web.Response(status=503, text=f"{problem}; the server refuses to serve an empty store\n",
                            headers={"Retry-After": "300"})

    def note_success(self, request: web.Request, result: WsgiResult) -> None:
        if self._has_data or result.status >= 300:
            return
        try:
            if any(not e.startswith(".") for e in os.listdir(self.root)):
                atomic_write(self.marker, b"this installation has stored DAV data\n", mode=0o600)
                self._has_data = True
        except OSError:
            pass


def redirect_target(domain: str, https_port: int, path_qs: str) -> str:
    """Where the HTTP listener sends everything that is not an ACME challenge (pure)."""
    if not path_qs.startswith("/") or path_qs.startswith("//"):
        path_qs = "/"
    port = "" if https_port == 443 else f":{https_port}"
    return f"https://{domain}{port}{path_qs}"


def make_http_app(challenges: ChallengeStore, domain: str, public_https_port: int = 443) -> web.Application:
    """Port 80: ACME tokens, and 308 to https://<configured domain>/... for everything else.
    Never DAV, never ``WWW-Authenticate``, never the Host the client sent."""

    async def handler(request: web.Request) -> web.StreamResponse:
        path = request.path
        if path.startswith(ACME_PREFIX) and request.method in ("GET", "HEAD"):
            token = path[len(ACME_PREFIX):]
            answer = challenges.get(token) if token and "/" not in token else None
            if answer is None:
                return web.Response(status=404, text="no such challenge\n")
            return web.Response(text=answer, content_type="application/octet-stream")
        target = redirect_target(domain, public_https_port, request.raw_path)
        return web.Response(status=308, headers={"Location": target}, text=f"see {target}\n")

    app = web.Application(client_max_size=64 * 1024)
    app.router.add_route("*", "/{tail:.*}", handler)
    return app


# RFC 6797: browsers that saw this once go straight to HTTPS for a year, so a plain-HTTP link or a typed
# domain never reaches the relay's port 80, where a fake phone page could ask for the password. No
# includeSubDomains: other hosts under the same parent domain are not ours to commit to HTTPS.
HSTS = "max-age=31536000"


async def _add_hsts(_request: web.Request, response: web.StreamResponse) -> None:
    response.headers["Strict-Transport-Security"] = HSTS


@web.middleware
async def refuse_ambiguous_requests(request: web.Request,
                                    handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                                    ) -> web.StreamResponse:
    """400 and close for requests whose meaning depends on who reads them:

    * an HTTP/0.9-style request line (no version): there are no headers to check, and the answer
      would go out as ``HTTP/0.9``;
    * more than one ``Authorization`` header: Radicale would get them joined by a comma and decide on
      its own which credential counts (or answer 500).
    """
    if request.version < HttpVersion10:
        request[NOTE_KEY] = "HTTP/0.9 request refused"
        return _refusal("HTTP/1.0 or later required\n")
    if len(request.headers.getall("Authorization", ())) > 1:
        request[NOTE_KEY] = "more than one Authorization header"
        return _refusal("more than one Authorization header\n")
    return await handler(request)


def _refusal(text: str) -> web.Response:
    resp = web.Response(status=400, text=text)
    resp.force_close()
    return resp


def make_https_app(bridge: RadicaleBridge,
                   home: Callable[[web.Request], Awaitable[web.StreamResponse]] | None = None
                   ) -> web.Application:
    """Port 443: Radicale under /radicale/, discovery redirects, the phone page at /."""

    async def well_known(request: web.Request) -> web.StreamResponse:
        # RFC 6764 section 5; DAVx5 and Thunderbird follow 301 and keep PROPFIND.
        raise web.HTTPMovedPermanently(DAV_ROOT)

    async def root(request: web.Request) -> web.StreamResponse:
        if request.method == "PROPFIND" or home is None or request.method not in ("GET", "HEAD"):
            raise web.HTTPMovedPermanently(DAV_ROOT)
        return await home(request)

    async def not_found(request: web.Request) -> web.StreamResponse:
        return web.Response(status=404, text="not found\n")

    app = web.Application(client_max_size=64 * 1024, middlewares=[refuse_ambiguous_requests])
    app.on_response_prepare.append(_add_hsts)
    app.router.add_route("*", "/.well-known/carddav", well_known)
    app.router.add_route("*", "/.well-known/caldav", well_known)
    app.router.add_route("*", "/", root)
    app.router.add_route("*", "/radicale", bridge.handle)
    app.router.add_route("*", "/radicale/{tail:.*}", bridge.handle)
    app.router.add_route("*", "/{tail:.*}", not_found)
    return app


def access_logger_class(peers: PeerDirectory) -> type[AbstractAccessLogger]:
    """An access logger that names the real client (the relay's view for tunnelled connections) and
    collapses repeated failed logins from one address (docs/test-matrix.md L4)."""

    class _Logger(AccessLogger):
        pass

    _Logger.peers = peers
    _Logger.failures = FailedLoginDigest()
    return _Logger


class FailedLoginDigest:
    """Failed logins per client address: the first in a window is logged in full, later ones in that
    window are only counted, and one summary line follows when the window closes. A password-guessing
    client then costs two lines a minute, not one per guess, and its address stays in the log. At most
    ``max_sources`` addresses are tracked; beyond that, lines are written one by one rather than lost."""

    def __init__(self, window_s: float = 60.0, max_sources: int = 4096,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.window_s, self.max_sources, self.clock = window_s, max_sources, clock
        self._open: dict[str, tuple[float, int]] = {}  # address -> (window start, failures not logged)

    def admit(self, address: str) -> tuple[bool, int]:
        """Count one failed login. Returns (write this one in full?, failures counted in the address's
        previous window that no summary has reported yet: write that summary first)."""
        now = self.clock()
        window = self._open.get(address)
        if window is not None and now - window[0] < self.window_s:
            self._open[address] = (window[0], window[1] + 1)
            return False, 0
        if window is None and len(self._open) >= self.max_sources:
            return True, 0
        self._open[address] = (now, 0)
        return True, window[1] if window else 0

    def window(self, address: str) -> tuple[float, int] | None:
        """(start, failures counted but not logged) of the address's open window."""
        return self._open.get(address)

    def drain(self) -> list[tuple[str, int]]:
        """End every window; the addresses with failures counted but not yet logged (at shutdown)."""
        pending = [(address, hidden) for address, (_, hidden) in self._open.items() if hidden]
        self._open.clear()
        return pending

    def close(self, address: str, start: float) -> int:
        """End the address's window if it is still the one that began at ``start``; the failures that were
        counted but not logged in it."""
        window = self._open.get(address)
        if window is None or window[0] != start:
            return 0
        del self._open[address]
        return window[1]


def log_collapsed(logger: logging.Logger, address: str, hidden: int, window_s: float) -> None:
    logger.warning("%s: %d more failed logins within %.0f s (collapsed into this line; the first is logged "
                   "above)", address, hidden, window_s)


def flush_failed_logins(logger_class: type[AbstractAccessLogger]) -> None:
    """Write the summary lines still pending (the server is stopping before their windows close)."""
    digest = getattr(logger_class, "failures", None)
    if isinstance(digest, FailedLoginDigest):
        for address, hidden in digest.drain():
            log_collapsed(logging.getLogger("aiohttp.access"), address, hidden, digest.window_s)


class AccessLogger(AbstractAccessLogger):
    """One line per request with the real client address (never credentials); repeated failed logins
    from one address are collapsed into a summary line per minute (:class:`FailedLoginDigest`)."""

    peers: PeerDirectory | None = None
    failures: FailedLoginDigest | None = None

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        if not self.logger.isEnabledFor(logging.INFO):
            return
        if request.method == "UNKNOWN" and not request.headers and response.status >= 400:
            # aiohttp's stand-in for a request it could not parse: log.py already wrote its one line.
            return
        # The protocol caches the peer address: it is still known after a refused request's forced close.
        peer = getattr(request.protocol, "peername", None)
        remote = self.peers.resolve(peer) if self.peers else (peer or ("-",))
        address = str(remote[0])
        # 429: a guessing address throttled (dav/throttle.py); collapsed like the failed logins it follows.
        if response.status in (401, 429) and "Authorization" in request.headers and self.failures is not None:
            full, unreported = self.failures.admit(address)
            if unreported:
                self._summary(address, unreported)
            if not full:
                window = self.failures.window(address)
                if window is not None and window[1] == 1:
                    self._schedule_summary(address, window[0])
                return
        note = request.get(NOTE_KEY)
        # Client strings are escaped here as well as by the formatter: this logger may have other handlers.
        self.logger.info('%s "%s %s" %s %s %.1fms "%s"%s', address, request.method, printable(request.path),
                         response.status, response.body_length, time * 1000,
                         printable(request.headers.get("User-Agent", "-")[:120]),
                         f" ({printable(note)})" if note else "")

    def _summary(self, address: str, hidden: int) -> None:
        assert self.failures is not None
        log_collapsed(self.logger, address, hidden, self.failures.window_s)

    def _schedule_summary(self, address: str, start: float) -> None:
        """When the address's window closes, write how many failed logins were not logged one by one."""
        import asyncio

        digest = self.failures
        assert digest is not None

        def close() -> None:
            if hidden := digest.close(address, start):
                self._summary(address, hidden)

        delay = max(0.0, start + digest.window_s - digest.clock())
        try:
            asyncio.get_running_loop().call_later(delay, close)
        except RuntimeError:  # no running loop (unit use): the address's next failure reports the count
            pass


def is_write(method: str) -> bool:
    return method in WRITE_METHODS
