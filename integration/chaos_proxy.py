"""A TCP proxy that can break the link on command, and optionally record what it carries.

Runs its own asyncio loop in a thread, so synchronous tests drive it directly::

    with ChaosProxy(target_port=sshd_port) as proxy:      # listens on 127.0.0.1:proxy.port
        proxy.set_mode("freeze")   # existing and new connections stop moving bytes (nothing closed)
        proxy.set_mode("pass")     # everything flows again (held bytes are delivered)
        proxy.reset()              # RST every open connection, both sides (SO_LINGER 0)
        proxy.set_mode("refuse")   # new connections are reset at once; open ones keep flowing
        proxy.set_mode("cut")      # network change: open connections are dead for good (frozen,
                                   # never resumed), new ones flow
        proxy.set_mode("rebind")   # like cut, and new connections go out from another source address
        proxy.set_mode("outage")   # like cut, but new connections are held too until "pass" (a network
                                   # change with an outage: the old path never comes back)

With ``record=True`` every connection's bytes are kept per direction (``captures``): used as the relay
operator's view in the "relay never sees plaintext" test.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import threading
from dataclasses import dataclass, field
from typing import Any

__all__ = ["ChaosProxy", "Capture"]

MODES = ("pass", "freeze", "refuse", "cut", "rebind", "outage")


@dataclass
class Capture:
    """What one proxied connection carried: client->server and server->client bytes."""

    upstream: bytearray = field(default_factory=bytearray)
    downstream: bytearray = field(default_factory=bytearray)


class _Conn:
    def __init__(self) -> None:
        self.flow = asyncio.Event()
        self.dead = False
        self.writers: list[asyncio.StreamWriter] = []
        self.capture = Capture()


def _rst(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
    writer.transport.abort()


class ChaosProxy:
    def __init__(self, target_port: int, target_host: str = "127.0.0.1", *, listen_host: str = "127.0.0.1",
                 record: bool = False, rebind_source: str = "127.0.0.4") -> None:
        self.target = (target_host, target_port)
        self.listen_host = listen_host
        self.record = record
        self.rebind_source = rebind_source
        self.mode = "pass"
        self.port = 0
        self.captures: list[Capture] = []
        self.accepted = 0
        self._conns: set[_Conn] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self._ready = threading.Event()
        self._stopped: asyncio.Event | None = None
        self._armed = False

    # -- control (from any thread) --

    def start(self) -> ChaosProxy:
        self._thread = threading.Thread(target=self._main, name="chaos-proxy", daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("chaos proxy did not start")
        return self

    def stop(self) -> None:
        if self._loop is not None and self._stopped is not None:
            self._loop.call_soon_threadsafe(self._stopped.set)
        if self._thread is not None:
            self._thread.join(10)

    def __enter__(self) -> ChaosProxy:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def _call(self, fn: Any, *args: Any) -> Any:
        assert self._loop is not None
        done = threading.Event()
        result: list[Any] = []

        def run() -> None:
            result.append(fn(*args))
            done.set()

        self._loop.call_soon_threadsafe(run)
        if not done.wait(10):
            raise RuntimeError("chaos proxy loop does not answer")
        return result[0]

    def set_mode(self, mode: str) -> None:
        if mode not in MODES:
            raise ValueError(mode)
        self._call(self._set_mode, mode)

    def reset(self) -> int:
        """RST every open connection now; returns how many."""
        return int(self._call(self._reset))

    def reset_on_next_response(self) -> None:
        """F15: the next bytes flowing back to a client are not delivered; that connection is reset at both
        ends instead (the server has answered -- committed -- but the client never sees the answer)."""
        self._call(lambda: setattr(self, "_armed", True))

    def open_connections(self) -> int:
        return int(self._call(lambda: len(self._conns)))

    # -- loop side --

    def _set_mode(self, mode: str) -> None:
        self.mode = mode
        for c in list(self._conns):
            if mode in ("cut", "rebind", "outage"):
                c.dead = True
                c.flow.clear()
            elif mode == "freeze":
                c.flow.clear()
            elif not c.dead:
                c.flow.set()

    def _reset(self) -> int:
        n = 0
        for c in list(self._conns):
            for w in c.writers:
                _rst(w)
            n += 1
        self._conns.clear()
        return n

    def _main(self) -> None:
        asyncio.run(self._serve())

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopped = asyncio.Event()
        self._server = await asyncio.start_server(self._handle, self.listen_host, 0)
        self.port = self._server.sockets[0].getsockname()[1]
        self._ready.set()
        await self._stopped.wait()
        self._server.close()
        for c in list(self._conns):
            for w in c.writers:
                _rst(w)
        await self._server.wait_closed()

    async def _handle(self, cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        try:
            await self._proxy(cr, cw)
        except asyncio.CancelledError:   # proxy stopping: its sockets are reset by _serve
            pass

    async def _proxy(self, cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        self.accepted += 1
        if self.mode == "refuse":
            _rst(cw)
            return
        c = _Conn()
        c.writers.append(cw)
        self._conns.add(c)
        if self.record:
            self.captures.append(c.capture)
        if self.mode not in ("freeze", "outage"):
            c.flow.set()
        await c.flow.wait()     # a connection made while frozen waits, like SYN retries
        local = (self.rebind_source, 0) if self.mode == "rebind" else None
        try:
            sr, sw = await asyncio.open_connection(*self.target, local_addr=local)
        except OSError:
            self._conns.discard(c)
            _rst(cw)
            return
        c.writers.append(sw)
        try:
            await asyncio.gather(self._pump(c, cr, sw, c.capture.upstream),
                                 self._pump(c, sr, cw, c.capture.downstream, downstream=True))
        finally:
            self._conns.discard(c)
            for w in (cw, sw):
                w.close()

    async def _pump(self, c: _Conn, r: asyncio.StreamReader, w: asyncio.StreamWriter, rec: bytearray,
                    downstream: bool = False) -> None:
        try:
            while True:
                data = await r.read(65536)
                await c.flow.wait()          # held while frozen; a dead connection never moves again
                if downstream and data and self._armed:
                    self._armed = False
                    for writer in c.writers:
                        _rst(writer)
                    self._conns.discard(c)
                    return
                if not data:
                    if w.can_write_eof():
                        w.write_eof()
                    return
                if self.record:
                    rec.extend(data)
                w.write(data)
                await w.drain()
        except (ConnectionError, OSError):
            return
