"""The DAV server component: HTTPS (Radicale) and HTTP (ACME + redirect) listeners in this process."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

from inverse_cloud.certs.store import CertStore, TLSManager
from inverse_cloud.config import Config
from inverse_cloud.dav.listeners import CappedSite, bind_socket
from inverse_cloud.dav.radicale_app import build_application
from inverse_cloud.dav.web import (
    ChallengeStore,
    PeerDirectory,
    StorageGuard,
    access_logger_class,
    flush_failed_logins,
    make_http_app,
    make_https_app,
)
from inverse_cloud.dav.wsgi import RadicaleBridge, WsgiResult

__all__ = ["DavServer", "HomeHandler", "ResponseHook", "check_http_parser"]

# The page served at https://HOST/ for GET/HEAD (everything else there redirects to /radicale/).
HomeHandler = Callable[[web.Request], Awaitable[web.StreamResponse]]
# Told about every answer Radicale gave (status reporting keeps the last sync per client).
ResponseHook = Callable[[web.Request, WsgiResult], None]

log = logging.getLogger(__name__)


def check_http_parser() -> None:
    """Refuse to run on aiohttp's lenient pure-Python parser (CVE-2023-47627, CVE-2024-23829)."""
    from aiohttp import http_parser

    from inverse_cloud.errors import StartupError

    try:
        from aiohttp import _http_parser
    except ImportError:
        raise StartupError("aiohttp's C HTTP parser is not available (the pure-Python one is lenient "
                           "and had request-smuggling bugs); reinstall aiohttp from a wheel") from None
    if http_parser.HttpRequestParser is not getattr(_http_parser, "HttpRequestParser", None):
        raise StartupError("aiohttp is using its pure-Python HTTP parser (AIOHTTP_NO_EXTENSIONS set?); "
                           "unset AIOHTTP_NO_EXTENSIONS")
    check_versions()


# The floors of pyproject.toml's pins (a test keeps the two equal): the first releases with the fixes we
# rely on (aiohttp: idle-connection closing and the 2026 smuggling CVEs; asyncssh: Terrapin
# CVE-2023-48795 and the current line; Radicale: predefined_collections, cache_logins, validate_*
# hardening; acme: HTTP-01 without TLS-ALPN-01). pip enforces them at install; this catches a venv
# altered by hand or a distribution package shadowing ours.
MINIMUM_VERSIONS = {
    "aiohttp": (3, 14, 5), "asyncssh": (2, 24, 1), "radicale": (3, 9, 0), "acme": (5, 9, 0),
    "bcrypt": (4, 1), "cryptography": (44,), "dnspython": (2, 6), "segno": (1, 6), "pyrage": (1, 4, 0),
}


def _release(text: str) -> tuple[int, ...]:
    parts = []
    for piece in text.split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit()) if piece[:1].isdigit() else ""
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)


def check_versions() -> None:
    """:raises StartupError: an installed dependency is older than its pin's floor."""
    from importlib.metadata import PackageNotFoundError, version

    from inverse_cloud.errors import StartupError

    for name, minimum in MINIMUM_VERSIONS.items():
        try:
            text = version(name)
        except PackageNotFoundError:
            continue
        if _release(text) < minimum:
            floor = ".".join(map(str, minimum))
            raise StartupError(f"{name} {text} is older than {floor}, which has fixes inverse-cloud relies on; "
                               f"upgrade it (pip install -U '{name}>={floor}', or reinstall from requirements.lock)")


def raise_open_files_limit() -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE to the hard limit (capped at 2**20); returns (before, after).

    Every tunnelled connection costs two descriptors (the tunnel's loopback socket and the accepted one):
    at the usual soft limit of 1024, about 500 idle connections through the relay made accept() fail
    with EMFILE and took the service down. The caps ([server] max_connections, the tunnel's per-address
    cap) are what bound the use; this only makes room for them.
    """
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = 1 << 20 if hard == resource.RLIM_INFINITY else min(hard, 1 << 20)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            return soft, soft
        return soft, target
    return soft, soft


def limit_malloc_arenas(arenas: int = 1) -> bool:
    """Cap glibc's malloc arenas (``mallopt(M_ARENA_MAX)``, as ``MALLOC_ARENA_MAX`` would), before the
    first worker thread exists. glibc gives each thread that allocates under contention an arena of its
    own (up to 8 per core) and keeps their freed memory; with the Python GIL more arenas buy nothing.
    dav_bench --with-components, 1000 cards: RSS at the last response 82.9 -> 80.2 MiB, peak 82.8 -> 80.0
    (8 -> 2 arenas); one arena (the main heap, shared) gives RssAnon at ready 43.1 -> 42.3 MiB with relay and
    ACME configured (bench/memory_bench.py for the figure after a workload).
    An explicit MALLOC_ARENA_MAX in the environment wins. Returns True if the cap was set."""
    if "MALLOC_ARENA_MAX" in os.environ:
        return False
    try:
        import ctypes

        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(-8, arenas))  # M_ARENA_MAX (malloc.h)


class DavServer:
    """Owns both listeners, the Radicale bridge and the TLS manager."""

    name = "dav-server"

    def __init__(self, cfg: Config, *, public_https_port: int = 443, home_handler: HomeHandler | None = None,
                 response_hooks: Sequence[ResponseHook] = ()) -> None:
        self.cfg = cfg
        s = cfg.server
        self.challenges = ChallengeStore()
        self.peers = PeerDirectory()
        self.tls = TLSManager(CertStore(s.cert_dir), s.domain)
        self.guard = StorageGuard(s.storage_dir, s.data_dir / ".has-data")
        self.public_https_port = public_https_port
        self.bridge: RadicaleBridge | None = None
        self._runners: list[web.AppRunner] = []
        self._sites: list[CappedSite] = []
        self._access_log_class: type[AbstractAccessLogger] | None = None
        self.https_port = 0
        self.http_port = 0
        # The page at https://HOST/ (the phone page); None: / redirects to /radicale/.
        self.home_handler = home_handler
        # Called after every Radicale response (status reporting records the last sync per client).
        self.response_hooks: tuple[ResponseHook, ...] = tuple(response_hooks)
        self._reload_lock = asyncio.Lock()

    async def start(self) -> None:
        s = self.cfg.server
        check_http_parser()
        before, after = raise_open_files_limit()
        if after < 4 * s.max_connections + 64:
            log.warning("only %d file descriptors allowed (ulimit -n); each connection needs two: lower [server] "
                        "max_connections to %d or raise the limit (LimitNOFILE= in the unit)", after,
                        max(4, (after - 64) // 4))
        elif after != before:
            log.debug("open files limit raised from %d to %d", before, after)
        https_sock = bind_socket(*s.https_listen, "[server] https_listen")
        try:
            http_sock = bind_socket(*s.http_listen, "[server] http_listen")
        except BaseException:
            https_sock.close()
            raise
        loop = asyncio.get_running_loop()
        s.storage_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        limit_malloc_arenas()   # before the first thread below
        # Radicale's import and set-up read files: off the loop.
        app = await loop.run_in_executor(None, build_application, self.cfg)
        self.tls.load()
        self.bridge = RadicaleBridge(
            app, threads=s.radicale_threads, max_body_bytes=s.max_body_bytes, body_grace_s=s.body_grace_s,
            body_min_rate_bps=s.body_min_rate_bps, auth_delay_s=s.auth_delay_s,
            remote_of=self.peers.remote_of, on_response=self._on_response, gate=self.guard.gate,
            storage_dir=s.storage_dir)
        self._access_log_class = access_logger_class(self.peers)
        common: dict[str, Any] = dict(
            keepalive_timeout=s.idle_timeout_s, shutdown_timeout=s.shutdown_timeout_s,
            access_log_class=self._access_log_class, handle_signals=False,
            # Request bodies are read by the bridge under its own limits; this bounds everything else.
            max_line_size=8190, max_field_size=8190, max_headers=100, lingering_time=2.0,
        )
        https_runner = web.AppRunner(make_https_app(self.bridge, self.home_handler), **common)
        http_runner = web.AppRunner(make_http_app(self.challenges, s.domain, self.public_https_port), **common)
        for runner in (https_runner, http_runner):
            await runner.setup()
            self._runners.append(runner)
        https_site = CappedSite(https_runner, https_sock, ssl_context=self.tls.listening_context,
                                handshake_timeout_s=s.handshake_timeout_s, max_connections=s.max_connections)
        http_site = CappedSite(http_runner, http_sock, ssl_context=None,
                               handshake_timeout_s=s.handshake_timeout_s, max_connections=s.max_connections)
        for site in (https_site, http_site):
            await site.start()
            self._sites.append(site)
        self.https_port, self.http_port = https_site.port, http_site.port
        log.info("serving DAV on https://%s:%d/radicale/ and ACME/redirects on http://%s:%d/",
                 s.https_listen[0], self.https_port, s.http_listen[0], self.http_port)

    def _on_response(self, request: web.Request, result: WsgiResult) -> None:
        self.guard.note_success(request, result)
        for hook in self.response_hooks:
            try:
                hook(request, result)
            except Exception as exc:  # boundary: bookkeeping must never fail a request
                log.error("response hook failed: %s", exc, exc_info=True)

    async def reload(self) -> None:
        """SIGHUP: re-read the certificate pair, then build a new Radicale app (which reads the user file) in
        a worker thread, and swap it in. Requests keep being answered while it is built.

        :raises ConfigError: the new app cannot be built (a broken user file): the old one keeps serving.
        """
        self.tls.load()
        if self.bridge is None:
            return
        async with self._reload_lock:   # two quick SIGHUPs: the last app built is the one that serves
            app = await asyncio.get_running_loop().run_in_executor(None, build_application, self.cfg)
            self.bridge.replace_app(app)

    async def aclose(self) -> None:
        # Stop accepting on every listener first, then drain each server.
        for site in self._sites:
            await site.stop()
        timeout_s = self.cfg.server.shutdown_timeout_s
        if self.bridge is not None:
            if self.bridge.active:
                log.info("draining %d in-flight request(s) (up to %.0f s)", self.bridge.active, timeout_s)
            left = await self.bridge.drain(timeout_s)
            if left:
                log.warning("%d request(s) still running after %.0f s; closing their connections", left, timeout_s)
        for runner in self._runners:
            await runner.cleanup()
        self._runners.clear()
        self._sites.clear()
        if self._access_log_class is not None:
            flush_failed_logins(self._access_log_class)
        if self.bridge is not None:
            bridge = self.bridge
            await asyncio.get_running_loop().run_in_executor(None, bridge.close)
