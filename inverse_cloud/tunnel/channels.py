"""Moving bytes for the tunnel (:mod:`inverse_cloud.tunnel.link`): the SSH socket with ``TCP_QUICKACK`` re-armed
after every read, and the pipe between one forwarded SSH channel and the loopback TCP connection to our
listener (half-close and back-pressure both ways)."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable
from typing import Any, Protocol

import asyncssh

from inverse_cloud.tunnel.proxy_protocol import MAX_HEADER, ProxyHeaderError, parse_proxy_header

__all__ = ["ChannelEnd", "ForwardTarget", "LocalEnd", "PeerRegistry", "QuickAckConnector", "QuickAckProtocol",
           "quickack_supported"]


def quickack_supported() -> bool:
    return hasattr(socket, "TCP_QUICKACK")


# --- the SSH socket with TCP_QUICKACK re-armed after reads ------------------------------------------

class QuickAckProtocol(asyncio.Protocol):
    """Wraps asyncssh's connection protocol: after every read, set ``TCP_QUICKACK`` so the kernel ACKs at
    once instead of delaying (it leaves quick-ack mode on its own, hence after *every* read)."""

    def __init__(self, inner: asyncio.Protocol) -> None:
        self.inner = inner
        self._sock: Any = None
        self.rearms = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        sock = transport.get_extra_info("socket")
        if sock is not None and quickack_supported() and sock.family in (socket.AF_INET, socket.AF_INET6):
            self._sock = sock
        self.inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self._sock is not None:
            try:
                self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
                self.rearms += 1
            except OSError:
                self._sock = None
        self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self._sock = None
        self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()


class QuickAckConnector:
    """Passed as asyncssh's ``tunnel=``: opens the TCP connection itself so that the protocol can be
    wrapped in :class:`QuickAckProtocol` (asyncssh offers no other hook into its socket reads)."""

    def __init__(self) -> None:
        self.protocol: QuickAckProtocol | None = None

    async def create_connection(self, session_factory: Callable[[], Any], remote_host: str,
                                remote_port: int) -> tuple[Any, Any]:
        inner: list[Any] = []

        def factory() -> asyncio.Protocol:
            inner.append(session_factory())
            self.protocol = QuickAckProtocol(inner[0])
            return self.protocol

        transport, _ = await asyncio.get_running_loop().create_connection(factory, remote_host, remote_port)
        return transport, inner[0]

    def close(self) -> None:
        """asyncssh's tunnel protocol asks for it; the transport is closed by the connection."""

    async def wait_closed(self) -> None:
        """See :meth:`close`."""


# --- one forwarded connection: SSH channel <-> loopback TCP to our listener -------------------------

class LocalEnd(asyncio.Protocol):
    def __init__(self, on_close: Callable[[], None]) -> None:
        self.transport: asyncio.Transport | None = None
        self.peer: ChannelEnd | None = None
        self.eof = False
        self._on_close = on_close

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if self.peer is not None:
            self.peer.write(data)

    def eof_received(self) -> bool:
        self.eof = True
        if self.peer is None:
            return False
        self.peer.write_eof()
        return not self.peer.eof      # keep a half-closed connection open until both sides are done

    def pause_writing(self) -> None:
        if self.peer is not None:
            self.peer.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None:
            self.peer.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        peer, self.peer = self.peer, None
        if peer is not None:
            peer.close()
        self._on_close()

    def write(self, data: bytes) -> None:
        if self.transport is not None:
            self.transport.write(data)

    def write_eof(self) -> None:
        if self.transport is not None and self.transport.can_write_eof():
            self.transport.write_eof()

    def pause_reading(self) -> None:
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.transport is not None:
            self.transport.resume_reading()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


log = logging.getLogger("inverse_cloud.tunnel.link")


class ChannelEnd(asyncssh.SSHTCPSession[bytes]):
    """The SSH channel's side. With ``on_proxy_origin`` the channel must start with a PROXY protocol header
    (``[relay] proxy_protocol``): it is parsed and stripped, the client address it names is handed to
    ``on_proxy_origin`` *before* any byte reaches our listener, and a channel without one is closed."""

    def __init__(self, local: LocalEnd, on_proxy_origin: Callable[[tuple[str, int]], None] | None = None) -> None:
        self.chan: asyncssh.SSHTCPChannel[bytes] | None = None
        self.local: LocalEnd | None = local
        self.eof = False
        local.peer = self
        self._on_origin = on_proxy_origin
        self._header: bytearray | None = bytearray() if on_proxy_origin is not None else None

    def connection_made(self, chan: asyncssh.SSHTCPChannel[bytes]) -> None:
        self.chan = chan

    def data_received(self, data: bytes, datatype: asyncssh.DataType) -> None:
        if self._header is not None:
            rest = self._take_header(data)
            if not rest:
                return
            data = rest
        if self.local is not None:
            self.local.write(data)

    def _take_header(self, data: bytes) -> bytes:
        """Buffer until the PROXY header is complete; return what follows it (b"" while incomplete)."""
        assert self._header is not None and self._on_origin is not None
        self._header += data
        try:
            origin, used = parse_proxy_header(bytes(self._header))
            if not used and len(self._header) > MAX_HEADER:
                raise ProxyHeaderError("PROXY header too long")
        except ProxyHeaderError as exc:
            log.debug("forwarded connection closed: %s ([relay] proxy_protocol is on)", exc)
            self.refused = True
            self._header = None
            self.close()
            return b""
        if not used:
            return b""
        rest, self._header = bytes(self._header[used:]), None
        if origin is not None:
            self._on_origin(origin)
        return rest

    refused = False   # the channel was closed for want of a valid PROXY header

    def eof_received(self) -> bool:
        self.eof = True
        if self._header is not None:     # EOF before a complete PROXY header: nothing to hand over
            self.close()
            return False
        if self.local is None:
            return False
        self.local.write_eof()
        return not self.local.eof

    def pause_writing(self) -> None:
        if self.local is not None:
            self.local.pause_reading()

    def resume_writing(self) -> None:
        if self.local is not None:
            self.local.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.chan = None
        local, self.local = self.local, None
        if local is not None:
            local.close()

    def write(self, data: bytes) -> None:
        if self.chan is not None:
            self.chan.write(data)

    def write_eof(self) -> None:
        if self.chan is not None:
            self.chan.write_eof()

    def pause_reading(self) -> None:
        if self.chan is not None:
            self.chan.pause_reading()

    def resume_reading(self) -> None:
        if self.chan is not None:
            self.chan.resume_reading()

    def close(self) -> None:
        if self.chan is not None:
            self.chan.close()


class PeerRegistry(Protocol):
    def register(self, local_port: int, origin: tuple[str, int]) -> None: ...

    def unregister(self, local_port: int) -> None: ...


class ForwardTarget(Protocol):
    """What the tunnel forwards to: the DAV server component (after its ``start()``)."""

    @property
    def https_port(self) -> int: ...

    @property
    def http_port(self) -> int: ...

    @property
    def peers(self) -> PeerRegistry: ...
