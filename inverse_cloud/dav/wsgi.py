"""The bridge from aiohttp to Radicale's WSGI application.

What Radicale's own server would give it and an embedding must supply (reliability.md 1.8, 1.9):

* the request body is read *before* Radicale runs, on the event loop, under a size limit (413 as soon
  as the limit is passed, without reading the rest) and a minimum-rate deadline (408 for a trickle),
  spooled to a temporary file past 256 KiB: a worker thread never waits on a slow client;
* Radicale runs in a dedicated, bounded thread pool; requests whose credentials are not known good
  may use only part of it, so a password-guessing flood cannot starve a syncing phone;
* the failed-login delay is an ``asyncio.sleep`` here, not Radicale's ``time.sleep`` in a thread;
* spoofable headers (``X-Remote-User``, ``X-Script-Name``, ``X-Forwarded-*``, ...) never reach Radicale;
  ``REMOTE_ADDR`` is the real client (the relay's view, for tunnelled connections);
* inputs Radicale would answer with 500 (a Basic header that is not base64) are answered 401 here.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import errno
import hashlib
import io
import logging
import os
import random
import re
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any
from urllib.parse import unquote_to_bytes

from aiohttp import web

__all__ = ["NOTE_KEY", "BodyError", "RadicaleBridge", "WsgiResult", "build_environ", "read_body"]

log = logging.getLogger(__name__)

SCRIPT_NAME = "/radicale"
SPOOL_MAX_MEMORY = 256 * 1024

# Header names (WSGI form) a client must never be able to set: Radicale trusts them as a reverse
# proxy's word (landscape.md 0.4, reliability.md 1.8).
STRIPPED = frozenset({
    "HTTP_X_REMOTE_USER", "HTTP_X_SCRIPT_NAME", "HTTP_X_REMOTE_ADDR", "HTTP_X_FORWARDED_FOR",
    "HTTP_X_FORWARDED_HOST", "HTTP_X_FORWARDED_PROTO", "HTTP_X_FORWARDED_SERVER",
    "HTTP_X_FORWARDED_PORT", "HTTP_FORWARDED", "HTTP_X_REAL_IP", "HTTP_REMOTE_USER",
    "HTTP_CONTENT_TYPE", "HTTP_CONTENT_LENGTH", "HTTP_PROXY",
})

WRITE_METHODS = frozenset({"PUT", "DELETE", "MKCOL", "MKCALENDAR", "PROPPATCH", "MOVE", "COPY", "POST"})

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

# Methods whose body Radicale parses as XML. Checked in front of it (reliability.md B3): a DTD or entity
# declaration made Radicale answer 500 (defusedxml refuses them by raising), and deep nesting crashed the
# whole process (a C stack overflow, SIGSEGV). Both become 400 here; real clients never send either.
XML_METHODS = frozenset({"PROPFIND", "PROPPATCH", "REPORT", "MKCOL", "MKCALENDAR"})
MAX_XML_DEPTH = 64


class _XmlRefused(Exception):
    pass


def xml_problem(body: IO[bytes]) -> str | None:
    """Why an XML request body must not reach Radicale, or None. Streams through expat (C, no tree)."""
    import xml.parsers.expat

    parser = xml.parsers.expat.ParserCreate()
    depth = 0

    def start(_name: str, _attrs: Any) -> None:
        nonlocal depth
        depth += 1
        if depth > MAX_XML_DEPTH:
            raise _XmlRefused(f"XML nested deeper than {MAX_XML_DEPTH} levels")

    def end(_name: str) -> None:
        nonlocal depth
        depth -= 1

    def no_dtd(*_args: Any) -> None:
        raise _XmlRefused("XML with a DTD or entity declarations")

    parser.StartElementHandler = start
    parser.EndElementHandler = end
    parser.StartDoctypeDeclHandler = no_dtd
    parser.EntityDeclHandler = no_dtd
    try:
        while chunk := body.read(64 * 1024):
            parser.Parse(chunk, False)
        parser.Parse(b"", True)
    except _XmlRefused as exc:
        return str(exc)
    except xml.parsers.expat.ExpatError as exc:
        return f"malformed XML ({xml.parsers.expat.ErrorString(exc.code)}, line {exc.lineno})"
    finally:
        body.seek(0)
    return None


class BodyError(Exception):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


async def read_body(request: web.Request, max_bytes: int, grace_s: float, min_rate_bps: int,
                    clock: Callable[[], float] = time.monotonic) -> IO[bytes]:
    """Read the whole request body into a spooled temporary file.

    The body must keep up a minimum rate after a grace period (Apache ``mod_reqtimeout`` style):
    by ``grace_s + received / min_rate_bps`` seconds after the start, more must have arrived.

    :raises BodyError: 413 past ``max_bytes``; 408 for a body too slow; 400 for a truncated body.
    """
    declared = request.content_length
    if declared is not None and declared > max_bytes:
        raise BodyError(413, f"body of {declared} bytes is over the {max_bytes}-byte limit")
    spool: IO[bytes] = tempfile.SpooledTemporaryFile(max_size=SPOOL_MAX_MEMORY)  # noqa: SIM115
    start = clock()
    received = 0
    try:
        while True:
            remaining = start + grace_s + received / min_rate_bps - clock()
            if remaining <= 0:
                raise BodyError(408, f"request body too slow ({received} bytes in {clock() - start:.0f} s)")
            try:
                async with asyncio.timeout(remaining):
                    chunk = await request.content.readany()
            except TimeoutError:
                raise BodyError(408, f"request body too slow ({received} bytes in {clock() - start:.0f} s)"
                                ) from None
            except ConnectionError:
                # The client went away mid-body: its mistake, not a 500 of ours (nobody gets this answer).
                raise BodyError(400, f"connection closed by the client after {received} body bytes") from None
            if not chunk:
                break
            received += len(chunk)
            if received > max_bytes:
                raise BodyError(413, f"body over the {max_bytes}-byte limit")
            spool.write(chunk)
        if declared is not None and received != declared:
            raise BodyError(400, "request body shorter than Content-Length")
    except BaseException:
        spool.close()
        raise
    spool.seek(0)
    return spool


def build_environ(request: web.Request, body: IO[bytes], body_length: int,
                  remote: tuple[str, int], server: tuple[str, int]) -> dict[str, Any]:
    """The WSGI environ for a request under ``/radicale`` (pure: no I/O)."""
    raw_path = request.raw_path.split("?", 1)[0]
    path_info = raw_path[len(SCRIPT_NAME):] if raw_path.startswith(SCRIPT_NAME) else raw_path
    environ: dict[str, Any] = {
        "REQUEST_METHOD": request.method,
        "SCRIPT_NAME": SCRIPT_NAME,
        # PEP 3333: PATH_INFO is the percent-decoded path as latin-1 text.
        "PATH_INFO": unquote_to_bytes(path_info).decode("latin-1"),
        "QUERY_STRING": request.query_string,
        "SERVER_NAME": server[0],
        "SERVER_PORT": str(server[1]),
        "SERVER_PROTOCOL": f"HTTP/{request.version.major}.{request.version.minor}",
        "REMOTE_ADDR": remote[0],
        "REMOTE_PORT": str(remote[1]),
        "HTTPS": "on",
        "wsgi.version": (1, 0),
        "wsgi.url_scheme": "https",
        "wsgi.input": body,
        "wsgi.errors": sys.stderr,
        "wsgi.multithread": True,
        "wsgi.multiprocess": False,
        "wsgi.run_once": False,
    }
    if request.content_type and "Content-Type" in request.headers:
        environ["CONTENT_TYPE"] = request.headers["Content-Type"]
    if body_length or request.method in WRITE_METHODS:
        environ["CONTENT_LENGTH"] = str(body_length)
    for name, value in request.headers.items():
        key = "HTTP_" + name.upper().replace("-", "_")
        if key in STRIPPED:
            continue
        environ[key] = f"{environ[key]},{value}" if key in environ else value
    return environ


def server_address(host_header: str) -> tuple[str, int]:
    """SERVER_NAME/SERVER_PORT as the client addressed us: the Host header, whose port defaults to 443.

    Not the local listening port: behind the relay a phone talks to port 443 while we listen on another,
    and Radicale compares MOVE destinations with SERVER_PORT (a 502 for every MOVE otherwise).
    """
    host, sep, port = host_header.rpartition(":")
    if sep and port.isdigit() and not port.startswith("0") and int(port) < 65536 and "]" not in port:
        return host, int(port)
    return host_header, 443


def valid_basic_auth(header: str) -> bool:
    """False for a ``Basic`` credential Radicale would crash on (not base64, not UTF-8, no colon)."""
    if not header.startswith("Basic"):
        return True
    token = header[len("Basic"):].strip()
    try:
        decoded = base64.b64decode(token.encode("ascii"), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeError, ValueError):
        return False
    user = decoded.split(":", 1)[0]
    return ":" in decoded and 0 < len(user) <= 256


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
        # Requests whose credentials have not been seen to work may hold at most half the workers.
        self._unverified = asyncio.Semaphore(max(1, threads // 2))
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
        """Swap the WSGI app (SIGHUP); requests already running finish with the old one."""
        self.app = app
        self._known_good.clear()

    def _credential_key(self, request: web.Request) -> str | None:
        header = request.headers.get("Authorization")
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
        remote = self.remote_of(request)
        environ = build_environ(request, body, length, remote, server_address(request.host))
        key = self._credential_key(request)
        known = key is not None and self._known_good.get(key, 0) > time.monotonic()
        loop = asyncio.get_running_loop()
        self.in_flight += 1
        try:
            if known:
                result = await loop.run_in_executor(self.executor, _run_wsgi, self.app, environ)
            else:
                async with self._unverified:
                    result = await loop.run_in_executor(self.executor, _run_wsgi, self.app, environ)
        except Exception:
            log.exception("Radicale failed on %s %s", request.method, request.path)
            body.close()
            return web.Response(status=500, text="Internal server error\n")
        finally:
            self.in_flight -= 1
            self._schedule_release()
        if key is not None:
            if result.status == 401:
                self._known_good.pop(key, None)
            elif result.status < 400:
                self._known_good[key] = time.monotonic() + 300
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
