"""The bridge from aiohttp to Radicale's WSGI application.

What Radicale's own server would give it and an embedding must supply (the checks on the request
itself live in :mod:`inverse_cloud.dav.environ`):

* the request body is read *before* Radicale runs, on the event loop, under a size limit (413 as soon
  as the limit is passed, without reading the rest) and a minimum-rate deadline (408 for a trickle),
  spooled to a temporary file past 256 KiB: a worker thread never waits on a slow client;
* Radicale runs in a dedicated, bounded thread pool; requests whose credentials are not known good
  may use only part of it, and each address only part of that, with a growing backoff after failed
  logins (:mod:`inverse_cloud.dav.throttle`), so a password-guessing flood cannot starve a phone;
* the failed-login delay is an ``asyncio.sleep`` here, not Radicale's ``time.sleep`` in a thread;
* spoofable headers (``X-Remote-User``, ``X-Script-Name``, ``X-Forwarded-*``, ...) never reach Radicale;
  ``REMOTE_ADDR`` is the real client (the relay's view, for tunnelled connections);
* inputs Radicale would answer with 500 (a Basic header that is not base64) are answered 401 here.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import io
import logging
import math
import os
import random
import re
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

from inverse_cloud.dav.environ import (
    WRITE_METHODS,
    XML_METHODS,
    BodyError,
    build_environ,
    read_body,
    server_address,
    valid_basic_auth,
    xml_problem,
)
from inverse_cloud.dav.throttle import AddressThrottle

__all__ = ["NOTE_KEY", "RadicaleBridge", "WsgiResult"]

log = logging.getLogger(__name__)

# A credential Radicale accepted skips the unverified queue for this long after its last success.
KNOWN_GOOD_S = 300.0

# After this long without a Radicale request, free memory is handed back to the OS (see _release_memory).
IDLE_TRIM_S = 2.0

# After a 413 the rest of the body is read and dropped, up to this many times the limit and this long.
REFUSED_BODY_DRAIN_FACTOR = 4
REFUSED_BODY_DRAIN_S = 2.0

# request[NOTE_KEY]: why a request was refused or what Radicale said about it. The access logger appends
# it to the request's line, so a bad request costs one log line, not two or three.
NOTE_KEY = web.RequestKey("inverse_cloud.note", str)
NOTE_MAX_CHARS = 200


class _RadicaleLogCapture(logging.Filter):
    """Collects what Radicale logs while a worker thread runs one request (its "Bad PUT request",
    "invalid path", "Failed login" lines), so it becomes part of that request's single log line."""

    def __init__(self) -> None:
        super().__init__()
        self.local = threading.local()

    def filter(self, record: logging.LogRecord) -> bool:
        notes: list[str] | None = getattr(self.local, "notes", None)
        if notes is None:
            return True
        message = record.getMessage()
        if message.startswith("Traceback"):
            # Radicale logs unexpected exceptions as a formatted traceback on the root logger: keep the
            # exception line for the request's log line, the whole traceback at debug level only.
            log.debug("Radicale: %s", message)
            message = message.strip().rsplit("\n", 1)[-1]
        # vobject quotes the line it could not parse: contact data stays out of the log.
        message = _QUOTED_LINE.sub(r"\1 (line not logged)", message)
        if len(notes) < 4:
            notes.append(message.split("\n", 1)[0][:NOTE_MAX_CHARS])
        return False


_QUOTED_LINE = re.compile(r"(Failed to parse line):.*")


_capture = _RadicaleLogCapture()
logging.getLogger("radicale").addFilter(_capture)
logging.getLogger().addFilter(_capture)  # Radicale's `logging.error(traceback.format_exc())`

@dataclass
class WsgiResult:
    status: int
    reason: str
    headers: list[tuple[str, str]]
    body: bytes
    notes: list[str] = field(default_factory=list)


def _run_wsgi(app: Callable[..., Iterable[bytes]], environ: dict[str, Any]) -> WsgiResult:
    """Runs in a worker thread: call the application and collect its whole answer."""
    captured: dict[str, Any] = {}

    def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Callable[..., Any]:
        captured["status"], captured["headers"] = status, headers
        return lambda _data: None

    body_file = environ["wsgi.input"]
    if environ["REQUEST_METHOD"] in XML_METHODS and environ.get("CONTENT_LENGTH", "0") != "0":
        problem = xml_problem(body_file)
        if problem is not None:
            body_file.close()
            return WsgiResult(400, "Bad Request", [("Content-Type", "text/plain; charset=utf-8")],
                              f"{problem}\n".encode(), [problem])
    notes: list[str] = []
    _capture.local.notes = notes
    try:
        chunks = app(environ, start_response)
        try:
            body = b"".join(chunks)
        finally:
            close = getattr(chunks, "close", None)
            if close is not None:
                close()
    finally:
        _capture.local.notes = None
        environ["wsgi.input"].close()
    code, _, reason = captured["status"].partition(" ")
    return WsgiResult(int(code), reason, captured["headers"], body, notes)


def is_storage_full(storage_dir: Path | None, notes: list[str], needed_bytes: int) -> bool:
    """Did a failed write fail for lack of space (ENOSPC/EDQUOT in Radicale's words, or a full disk)?"""
    words = (os.strerror(errno.ENOSPC), os.strerror(errno.EDQUOT), f"[Errno {errno.ENOSPC}]")
    if any(w in note for note in notes for w in words):
        return True
    if storage_dir is None:
        return False
    try:
        st = os.statvfs(storage_dir)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < needed_bytes + 64 * 1024 or st.f_favail == 0


def _malloc_trim() -> Callable[[], object] | None:
    """glibc's ``malloc_trim(0)``, or None where there is none (musl, macOS)."""
    try:
        import ctypes

        trim: Callable[[int], int] = ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None
    return lambda: trim(0)


class RadicaleBridge:
    """Serves ``/radicale/*`` from a WSGI app in a bounded thread pool."""

    def __init__(self, app: Callable[..., Iterable[bytes]], *, threads: int, max_body_bytes: int,
                 body_grace_s: float, body_min_rate_bps: int, auth_delay_s: float,
                 remote_of: Callable[[web.Request], tuple[str, int]],
                 on_response: Callable[[web.Request, WsgiResult], None] | None = None,
                 gate: Callable[[web.Request], web.Response | None] | None = None,
                 storage_dir: Path | None = None) -> None:
        self.app = app
        self.storage_dir = storage_dir
        self.threads = threads
        self.executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="radicale")
        # Requests whose credentials have not been seen to work may hold at most half the workers, and
        # each address only part of that (throttle.py).
        self._unverified = asyncio.Semaphore(max(1, threads // 2))
        self.throttle = AddressThrottle()
        # Credentials seen to work in the last KNOWN_GOOD_S: they skip the unverified queue. Kept across
        # SIGHUP (replace_app): it only picks the queue, Radicale still checks every request.
        self._known_good: dict[str, float] = {}
        self.max_body_bytes = max_body_bytes
        self.body_grace_s = body_grace_s
        self.body_min_rate_bps = body_min_rate_bps
        self.auth_delay_s = auth_delay_s
        self.remote_of = remote_of
        self.on_response = on_response
        self.gate = gate
        self.in_flight = 0
        self.active = 0  # requests inside handle(), body reading included
        self.closing = False
        self._idle = asyncio.Event()
        self._idle.set()
        self._trim = _malloc_trim()
        self._trim_timer: asyncio.TimerHandle | None = None
        self._last_done = 0.0

    def replace_app(self, app: Callable[..., Iterable[bytes]]) -> None:
        """Swap the WSGI app (SIGHUP); requests already running finish with the old one. The known-good
        cache stays: a reload must not put every phone back into the queue a guessing flood fills."""
        self.app = app

    def is_known_good(self, authorization: str) -> bool:
        key = self._credential_key(authorization)
        return key is not None and self._known_good.get(key, 0) > time.monotonic()

    def _credential_key(self, header: str | None) -> str | None:
        if not header:
            return None
        return hashlib.sha256(header.encode("utf-8", "surrogateescape")).hexdigest()

    async def handle(self, request: web.Request) -> web.StreamResponse:
        if self.closing:
            # Shutting down: requests already being handled finish; a new one on a kept-alive connection is
            # told to come back (the listener is closed: the retry finds the restarted server).
            resp = web.Response(status=503, text="server is restarting; try again shortly\n",
                                headers={"Retry-After": "5"})
            resp.force_close()
            return resp
        self.active += 1
        self._idle.clear()
        try:
            return await self._handle(request)
        finally:
            self.active -= 1
            if self.active == 0:
                self._idle.set()

    async def drain(self, timeout_s: float) -> int:
        """Refuse new requests; wait up to ``timeout_s`` for those being handled, body reading included.

        This must come before aiohttp's own shutdown: that stops reading from every connection, so a
        request whose body is still arriving would stall (and end in 408) instead of being stored.
        Returns how many requests were still running at the deadline.
        """
        self.closing = True
        if self.active:
            try:
                async with asyncio.timeout(timeout_s):
                    await self._idle.wait()
            except TimeoutError:
                pass
        return self.active

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        if self.gate is not None:
            refused = self.gate(request)
            if refused is not None:
                return refused
        auth = request.headers.get("Authorization", "")
        if not valid_basic_auth(auth):
            request[NOTE_KEY] = "malformed Basic credentials"
            await self._failure_delay()
            return web.Response(status=401, text="Malformed Basic credentials\n",
                                headers={"WWW-Authenticate": 'Basic realm="inverse-cloud"'})
        key = self._credential_key(auth)
        known = key is not None and self._known_good.get(key, 0) > time.monotonic()
        remote = self.remote_of(request)
        if not known:
            wait = self.throttle.retry_after(remote[0])
            if wait > 0:
                request[NOTE_KEY] = "too many failed or concurrent logins from this address"
                await self._failure_delay()
                resp = web.Response(status=429, text="too many login attempts; try again later\n",
                                    headers={"Retry-After": str(math.ceil(wait))})
                return resp
        try:
            body = await read_body(request, self.max_body_bytes, self.body_grace_s, self.body_min_rate_bps)
        except BodyError as exc:
            request[NOTE_KEY] = exc.reason
            resp = web.Response(status=exc.status, text=exc.reason + "\n")
            resp.force_close()
            try:
                await resp.prepare(request)
                await resp.write_eof()
                if exc.status == 413:
                    await self._discard_refused_body(request)
            except ConnectionError:
                pass  # the client is gone; aiohttp logs the request with this status all the same
            # Close now: aiohttp would otherwise "linger", reading and discarding the rest of the body for
            # lingering_time without a byte cap (a refused 100 MB upload read anyway, a trickler given time).
            request.protocol.force_close()
            return resp
        length = body.seek(0, io.SEEK_END)
        body.seek(0)
        environ = build_environ(request, body, length, remote, server_address(request.host))
        loop = asyncio.get_running_loop()
        self.in_flight += 1
        status = 500
        if not known:
            self.throttle.begin(remote[0])
        try:
            if known:
                result = await loop.run_in_executor(self.executor, _run_wsgi, self.app, environ)
            else:
                async with self._unverified:
                    result = await loop.run_in_executor(self.executor, _run_wsgi, self.app, environ)
            status = result.status
        except Exception:
            log.exception("Radicale failed on %s %s", request.method, request.path)
            body.close()
            return web.Response(status=500, text="Internal server error\n")
        finally:
            self.in_flight -= 1
            if not known:
                self.throttle.end(remote[0], failed=status == 401 and bool(auth), succeeded=status < 400)
            self._schedule_release()
        if key is not None:
            if result.status == 401:
                self._known_good.pop(key, None)
            elif result.status < 400:
                self._known_good[key] = time.monotonic() + KNOWN_GOOD_S
        if result.status == 401 and auth:
            await self._failure_delay()
        if result.status == 502 and request.method in ("MOVE", "COPY"):
            # Radicale's "remote destination not supported": a client's wrong Destination, not a gateway error.
            result = WsgiResult(403, "Forbidden", [("Content-Type", "text/plain; charset=utf-8")],
                                b"Destination is not on this server\n", result.notes)
            request[NOTE_KEY] = "Destination not on this server"
        elif result.status >= 500 and request.method in WRITE_METHODS and is_storage_full(
                self.storage_dir, result.notes, length):
            where = self.storage_dir or "the storage folder"
            log.error("storage %s: no space left on device; %s %s refused with 507 (free some space; the stored "
                      "data is intact)", where, request.method, request.path)
            result = WsgiResult(507, "Insufficient Storage", [("Content-Type", "text/plain; charset=utf-8")],
                                b"Insufficient Storage: the server's disk is full; nothing was changed\n")
        elif result.status >= 500:
            log.error("Radicale answered %d to %s %s: %s", result.status, request.method, request.path,
                      "; ".join(result.notes) or "no details")
        elif result.notes:
            request[NOTE_KEY] = "; ".join(result.notes)
        if self.on_response is not None:
            self.on_response(request, result)
        headers = [(k, v) for k, v in result.headers if k.lower() not in ("content-length", "connection")]
        resp = web.Response(status=result.status, reason=result.reason or None, body=result.body)
        for k, v in headers:
            resp.headers.add(k, v)
        return resp

    def _schedule_release(self) -> None:
        self._last_done = time.monotonic()
        if self._trim is not None and self._trim_timer is None:
            self._trim_timer = asyncio.get_running_loop().call_later(IDLE_TRIM_S, self._release_memory)

    def _release_memory(self) -> None:
        """Once the bridge has been idle for IDLE_TRIM_S: return free heap memory to the OS.

        A sync leaves several MiB of freed heap (parsed vCards, XML trees, response bodies) that glibc
        keeps mapped; ``malloc_trim`` releases it (dav_bench: RSS after a 1000-card sync 65 -> 60 MiB).
        It takes well under a millisecond, in a worker thread all the same.
        """
        self._trim_timer = None
        if self._trim is None:
            return
        idle_s = time.monotonic() - self._last_done
        if self.in_flight or idle_s < IDLE_TRIM_S:
            self._trim_timer = asyncio.get_running_loop().call_later(IDLE_TRIM_S - idle_s if not self.in_flight
                                                                     else IDLE_TRIM_S, self._release_memory)
            return
        try:
            asyncio.get_running_loop().run_in_executor(self.executor, self._trim)
        except RuntimeError:   # executor shut down: the server is stopping
            pass

    async def _discard_refused_body(self, request: web.Request) -> None:
        """After a 413: read and drop what the client still sends, up to 4x the limit for 2 s.

        A phone that writes its whole body before reading the answer must get to read the 413: closing
        with unread data resets the connection, and the phone would report a network error and retry.
        An upload declared bigger than the cap is not worth it and is cut at once.
        """
        cap = REFUSED_BODY_DRAIN_FACTOR * self.max_body_bytes
        declared = request.content_length
        if declared is not None and declared > cap:
            return
        dropped = 0
        try:
            async with asyncio.timeout(REFUSED_BODY_DRAIN_S):
                while dropped <= cap and (chunk := await request.content.readany()):
                    dropped += len(chunk)
        except TimeoutError:
            pass

    async def _failure_delay(self) -> None:
        if self.auth_delay_s > 0:
            await asyncio.sleep(self.auth_delay_s * (0.5 + random.random()))

    def close(self) -> None:
        self._trim = None   # a release timer still pending does nothing (close may run outside the loop)
        self.executor.shutdown(wait=True, cancel_futures=False)
