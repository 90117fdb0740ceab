"""Handing a forwarded connection to our listener (:mod:`inverse_cloud.tunnel.link` accepts it on the relay).

Each channel is connected to our HTTPS or HTTP listener over loopback TCP. The socket is bound first, so its
source port is known and registered with the DAV server's :class:`~inverse_cloud.dav.web.PeerDirectory`
(relay-seen client address -> REMOTE_ADDR, access log) before the first byte is sent. The admission cap is
checked before a descriptor is spent (:mod:`inverse_cloud.tunnel.admission`).
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable

import asyncssh

from inverse_cloud.config import Config
from inverse_cloud.tunnel.admission import ChannelAdmission
from inverse_cloud.tunnel.channels import ChannelEnd, ForwardTarget, LocalEnd

__all__ = ["PEER_LINGER_S", "LocalHandoff"]

# A forwarded connection's peer mapping outlives the connection a little, so that a request still being
# logged when the tunnel side closes is attributed to the relay-seen client.
PEER_LINGER_S = 5.0


def _connect_host(listen_host: str) -> str:
    return {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(listen_host, listen_host)  # noqa: S104


class LocalHandoff:
    """Connects each forwarded channel ("https" or "http") to our listener from a registered source port."""

    def __init__(self, cfg: Config, target: ForwardTarget, admission: ChannelAdmission) -> None:
        self.cfg = cfg
        self.target = target
        self.admission = admission
        self.active_channels = 0
        self._registered: dict[int, object] = {}

    def factory(self, name: str) -> Callable[[str, int], Awaitable[ChannelEnd]]:
        """The session factory asyncssh calls for each connection on the relay's ``name`` forward."""
        def factory(orig_host: str, orig_port: int) -> Awaitable[ChannelEnd]:
            return self.accept(name, orig_host, orig_port)

        return factory

    async def accept(self, name: str, orig_host: str, orig_port: int) -> ChannelEnd:
        """A connection arrived on the relay's port: connect to our listener from a known source port.

        :raises asyncssh.ChannelOpenError: over the admission cap, or our listener refused the connection.
        """
        loop = asyncio.get_running_loop()
        listen = self.cfg.server.https_listen if name == "https" else self.cfg.server.http_listen
        host = _connect_host(listen[0])
        port = self.target.https_port if name == "https" else self.target.http_port
        if (refused := self.admission.admit(orig_host)) is not None:   # before a descriptor is spent
            raise asyncssh.ChannelOpenError(asyncssh.OPEN_RESOURCE_SHORTAGE, refused)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        token = object()
        src_port = 0
        try:
            sock.setblocking(False)
            sock.bind((host, 0))
            src_port = sock.getsockname()[1]
            self._registered[src_port] = token
            self.target.peers.register(src_port, (orig_host, orig_port))
            await loop.sock_connect(sock, (host, port))
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            local = LocalEnd(lambda: self._release(src_port, token, host=orig_host))
            await loop.create_connection(lambda: local, sock=sock)
        except OSError as exc:
            sock.close()
            self._release(src_port, token, linger=False, host=orig_host)
            raise asyncssh.ChannelOpenError(asyncssh.OPEN_CONNECT_FAILED, f"local listener: {exc}") from None
        self.active_channels += 1
        proxied = name == "https" and self.cfg.relay.proxy_protocol   # the header names the phone: proxy_protocol.py
        return ChannelEnd(local, (lambda origin: self.target.peers.register(src_port, origin)) if proxied else None)

    def _release(self, src_port: int, token: object, linger: bool = True, host: str = "") -> None:
        self.admission.release(host)
        if linger:
            self.active_channels -= 1

        def drop() -> None:
            if self._registered.get(src_port) is token:
                del self._registered[src_port]
                self.target.peers.unregister(src_port)

        if linger:
            asyncio.get_running_loop().call_later(PEER_LINGER_S, drop)
        else:
            drop()
