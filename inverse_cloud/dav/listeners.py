"""Listening sockets for the aiohttp servers, with what ``TCPSite`` does not offer:
a TLS handshake deadline (asyncio's default is 60 s; Mozilla-style servers use 10-15 s) and a cap on
established connections (aiohttp has none; Radicale's own server caps at 8)."""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import ssl
import time
from typing import Any

from aiohttp import web
from aiohttp.web_runner import BaseSite

from inverse_cloud.errors import StartupError

__all__ = ["CappedSite", "bind_socket"]

log = logging.getLogger(__name__)


def bind_socket(host: str, port: int, option: str) -> socket.socket:
    """Bind a listening TCP socket.

    :raises StartupError: naming the address and the config option when it cannot be bound.
    """
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise StartupError(f"cannot listen on {host}:{port} ({option}): {exc.strerror}") from None
    family, _, _, _, addr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    try:
        sock.bind(addr)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise StartupError(f"port {port} on {host} is already in use; another program (or another "
                               f"inverse-cloud) listens there: stop it, or change {option}") from None
        if exc.errno == errno.EACCES:
            raise StartupError(f"not allowed to listen on {host}:{port} (ports below 1024 need privileges); "
                               f"change {option}") from None
        raise StartupError(f"cannot listen on {host}:{port} ({option}): {exc.strerror}") from None
    sock.listen(512)
    sock.setblocking(False)
    return sock


class _Refuse(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.close()


class CappedSite(BaseSite):
    """A site on a pre-bound socket, with a handshake deadline and a connection cap."""

    def __init__(self, runner: web.BaseRunner, sock: socket.socket, *, ssl_context: ssl.SSLContext | None,
                 handshake_timeout_s: float, max_connections: int) -> None:
        super().__init__(runner, ssl_context=ssl_context)
        self._sock = sock
        self._handshake_timeout_s = handshake_timeout_s
        self._max_connections = max_connections
        self._refused = 0
        self._last_warn = 0.0
        host, port = sock.getsockname()[:2]
        self._name = f"{'https' if ssl_context else 'http'}://{host}:{port}"

    @property
    def name(self) -> str:
        return self._name

    @property
    def port(self) -> int:
        return int(self._sock.getsockname()[1])

    def _factory(self) -> Any:
        server = self._runner.server
        assert server is not None
        if len(server.connections) >= self._max_connections:
            self._refused += 1
            now = time.monotonic()
            if now - self._last_warn > 60:
                log.warning("%s: %d connections open (the cap, [server] max_connections); refused %d since "
                            "the last warning", self._name, len(server.connections), self._refused)
                self._last_warn, self._refused = now, 0
            return _Refuse()
        return server()

    async def start(self) -> None:
        await super().start()
        loop = asyncio.get_running_loop()
        kwargs: dict[str, Any] = {}
        if self._ssl_context is not None:
            kwargs["ssl_handshake_timeout"] = self._handshake_timeout_s
        self._server = await loop.create_server(self._factory, sock=self._sock, ssl=self._ssl_context,
                                                backlog=self._backlog, **kwargs)
