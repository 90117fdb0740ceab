"""The local control socket: how ``inverse-cloud status`` and ``doctor`` ask the running process.

A Unix stream socket (mode 0600, in a 0700 directory; no TCP port), one JSON object per line each way::

    -> {"cmd": "status"}
    <- {"ok": true, "result": {...}}
    -> {"cmd": "nope"}
    <- {"ok": false, "error": "unknown command 'nope' (known: probe, status)"}

Only the user the server runs as may connect: the file mode keeps others out, and the peer's uid is
checked again with ``SO_PEERCRED`` (root, which can read any file anyway, is also allowed). Requests
and answers are small and bounded; a client that sends nothing is dropped after ``IDLE_TIMEOUT_S``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import stat
import struct
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from inverse_cloud.errors import InverseCloudError, StartupError
from inverse_cloud.fsutil import ensure_private_dir

__all__ = ["ControlError", "ControlServer", "NotRunning", "ask", "ask_async", "refuse_if_running"]

log = logging.getLogger(__name__)

MAX_LINE_BYTES = 64 * 1024
IDLE_TIMEOUT_S = 10.0

Handler = Callable[[dict[str, Any]], Awaitable[Any]]


class ControlError(InverseCloudError):
    """The running process answered with an error, or talking to it failed."""


class NotRunning(ControlError):
    """Nothing answers on the control socket: the server is not running (or runs with another config)."""


def _peer_uid(sock: socket.socket) -> int | None:
    try:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except (OSError, AttributeError):
        return None
    _pid, uid, _gid = struct.unpack("3i", creds)
    return int(uid)


async def refuse_if_running(path: Path) -> None:
    """Before ``serve`` binds anything: refuse when another server already answers on ``path``.

    :raises StartupError: naming the socket and how to stop the other one.
    """
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        return
    try:
        _reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(str(path)), 2)
    except (OSError, TimeoutError):
        return  # a stale file from a crash: ControlServer.start removes it
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    raise StartupError(f"another inverse-cloud is already running (it answers on {path}); "
                       "stop it first (systemctl --user stop inverse-cloud)")


class ControlServer:
    """Component: serves the control socket. Commands are registered with :meth:`register`."""

    name = "control-socket"

    def __init__(self, path: Path) -> None:
        self.path = path
        self._handlers: dict[str, Handler] = {}
        self._server: asyncio.AbstractServer | None = None

    def register(self, cmd: str, handler: Handler) -> None:
        """``handler(request_dict)`` returns a JSON-serialisable result or raises ControlError."""
        self._handlers[cmd] = handler

    async def _check_stale(self) -> None:
        """A socket file left by a crashed process is removed; a live one means another server runs."""
        if not self.path.exists() and not self.path.is_symlink():
            return
        if not stat.S_ISSOCK(self.path.lstat().st_mode):
            raise StartupError(f"control socket path {self.path} exists and is not a socket; remove it or set "
                               "[server] control_socket elsewhere")
        await refuse_if_running(self.path)
        self.path.unlink(missing_ok=True)

    async def start(self) -> None:
        ensure_private_dir(self.path.parent)
        await self._check_stale()
        old_umask = os.umask(0o177)  # the socket file is created 0600 from the start: no window
        try:
            self._server = await asyncio.start_unix_server(self._serve, path=str(self.path),
                                                           limit=MAX_LINE_BYTES)
        except OSError as exc:
            hint = " (Unix socket paths are limited to 107 bytes: set [server] control_socket to a shorter " \
                   "path)" if len(os.fsencode(self.path)) > 107 else ""
            raise StartupError(f"cannot create control socket {self.path}: {exc.strerror or exc}{hint}") from exc
        finally:
            os.umask(old_umask)
        os.chmod(self.path, 0o600)
        log.debug("control socket at %s", self.path)

    async def aclose(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            sock = writer.get_extra_info("socket")
            uid = _peer_uid(sock) if sock is not None else None
            if uid is not None and uid not in (os.getuid(), 0):
                log.warning("control socket: refused a connection from uid %d", uid)
                return
            for _ in range(100):  # a client gets at most 100 requests per connection
                try:
                    line = await asyncio.wait_for(reader.readline(), IDLE_TIMEOUT_S)
                except (TimeoutError, ValueError, ConnectionError):
                    return
                if not line:
                    return
                answer = await self._answer(line)
                writer.write(json.dumps(answer, default=str).encode("utf-8") + b"\n")
                await writer.drain()
        except ConnectionError:
            return
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def _answer(self, line: bytes) -> dict[str, Any]:
        try:
            request = json.loads(line)
            if not isinstance(request, dict) or not isinstance(request.get("cmd"), str):
                raise ValueError("expected an object with a \"cmd\" string")
        except ValueError as exc:
            return {"ok": False, "error": f"bad request: {exc}"}
        cmd = request["cmd"]
        handler = self._handlers.get(cmd)
        if handler is None:
            return {"ok": False, "error": f"unknown command {cmd!r} (known: {', '.join(sorted(self._handlers))})"}
        try:
            return {"ok": True, "result": await handler(request)}
        except ControlError as exc:
            return {"ok": False, "error": str(exc)}
        except Exception as exc:  # boundary: a failing command must not take the socket down
            log.error("control command %s failed: %s", cmd, exc, exc_info=True)
            return {"ok": False, "error": f"{cmd} failed: {type(exc).__name__}: {exc}"}


async def ask_async(path: Path, cmd: str, timeout_s: float = 10.0, **params: Any) -> Any:
    """Send one command to the running process and return its result.

    :raises NotRunning: nothing listens at ``path``.
    :raises ControlError: the process answered with an error, or did not answer in time.
    """
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_unix_connection(str(path), limit=16 * MAX_LINE_BYTES), timeout_s)
    except FileNotFoundError:
        raise NotRunning(f"inverse-cloud is not running (no control socket at {path})") from None
    except ConnectionRefusedError:
        raise NotRunning(f"inverse-cloud is not running (stale control socket at {path})") from None
    except PermissionError:
        raise ControlError(f"control socket {path}: permission denied (run as the user that runs the "
                           "server)") from None
    except (OSError, TimeoutError) as exc:
        raise ControlError(f"control socket {path}: {exc}") from None
    try:
        writer.write(json.dumps({"cmd": cmd, **params}).encode("utf-8") + b"\n")
        await writer.drain()
        line = await asyncio.wait_for(reader.readline(), timeout_s)
    except TimeoutError:
        raise ControlError(f"the running server did not answer {cmd!r} within {timeout_s:.0f} s") from None
    except (OSError, ValueError) as exc:
        raise ControlError(f"control socket {path}: {exc}") from None
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    if not line:
        raise ControlError(f"the running server closed the control socket without answering {cmd!r}")
    answer = json.loads(line)
    if not answer.get("ok"):
        raise ControlError(str(answer.get("error", "unknown error")))
    return answer.get("result")


def ask(path: Path, cmd: str, timeout_s: float = 10.0, **params: Any) -> Any:
    """Blocking form of :func:`ask_async` for the command line (not for use inside a running loop)."""
    return asyncio.run(ask_async(path, cmd, timeout_s, **params))
