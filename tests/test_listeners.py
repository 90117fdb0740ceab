"""The listening sockets: the connection cap of ``CappedSite`` (connection N+1 is closed at once, one
WARNING per interval with the count refused since the last one, service again below the cap) and
``bind_socket``: an IPv6 socket that is v6-only and non-blocking, one-line refusals; the TLS handshake deadline."""

from __future__ import annotations

import asyncio
import logging
import socket

import pytest
from aiohttp import web

from inverse_cloud.dav import listeners as listeners_mod
from inverse_cloud.dav.listeners import CappedSite, bind_socket
from inverse_cloud.errors import StartupError
from tests.support import wait_for


class FakeTime:
    """Stands in for the ``time`` module inside listeners: a monotonic clock the test moves."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


async def _hello(_request: web.Request) -> web.Response:
    return web.Response(text="hello")


async def get(port: int) -> bytes:
    """One GET / on a new connection; what the server sent before closing (b'' if it closed at once)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        return await asyncio.wait_for(reader.read(), 10)
    except ConnectionResetError:
        return b""
    finally:
        writer.close()


def cap_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "inverse_cloud.dav.listeners" and r.levelno == logging.WARNING]


async def test_connection_over_the_cap_is_closed_and_warned_once_per_interval(monkeypatch, caplog):
    """max_connections = 2, two connections held open: a third and a fourth are closed without an answer,
    with one WARNING naming the cap and the count refused (1); after the interval (60 s, on a fake clock)
    the next refusal warns again with the count since the last warning (2); once a held connection closes,
    a new one is served."""
    clock = FakeTime()
    monkeypatch.setattr(listeners_mod, "time", clock)
    caplog.set_level(logging.INFO)
    app = web.Application()
    app.router.add_get("/", _hello)
    runner = web.AppRunner(app, handle_signals=False)
    await runner.setup()
    sock = bind_socket("127.0.0.1", 0, "[server] https_listen")
    site = CappedSite(runner, sock, ssl_context=None, handshake_timeout_s=5, max_connections=2)
    await site.start()
    held: list[asyncio.StreamWriter] = []
    try:
        for _ in range(2):
            _, writer = await asyncio.open_connection("127.0.0.1", site.port)
            held.append(writer)
        assert runner.server is not None
        await wait_for(lambda: len(runner.server.connections) == 2, what="two connections open")
        assert await get(site.port) == b""
        assert await get(site.port) == b""
        warnings = cap_warnings(caplog)
        assert warnings == [f"http://127.0.0.1:{site.port}: 2 connections open (the cap, [server] max_connections); "
                            "refused 1 since the last warning"]
        clock.now += 61
        assert await get(site.port) == b""
        assert len(cap_warnings(caplog)) == 2 and cap_warnings(caplog)[1].endswith("refused 2 since the last warning")
        held.pop().close()
        await wait_for(lambda: len(runner.server.connections) == 1, what="one connection closed")
        answer = await get(site.port)
        assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(b"hello"), answer[:80]
    finally:
        for w in held:
            w.close()
        await runner.cleanup()


def test_bind_socket_in_use_names_port_and_option():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(StartupError, match=rf"port {port} on 127.0.0.1 is already in use; .* change "
                                               r"\[server\] https_listen"):
            bind_socket("127.0.0.1", port, "[server] https_listen")



async def test_ipv6_listener_is_v6_only_non_blocking_and_named(tmp_path):
    """bind_socket('::1', 0): an AF_INET6 socket with IPV6_V6ONLY set (IPv4 stays for its own listener), not
    blocking (it goes to the event loop); a CappedSite on it is named http://::1:<port>."""
    sock = bind_socket("::1", 0, "[server] https_listen")
    try:
        assert sock.family == socket.AF_INET6 and sock.type == socket.SOCK_STREAM
        assert sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 1
        assert sock.getblocking() is False
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1
        runner = web.AppRunner(web.Application(), handle_signals=False)
        await runner.setup()
        site = CappedSite(runner, sock, ssl_context=None, handshake_timeout_s=5, max_connections=4)
        assert site.name == f"http://::1:{sock.getsockname()[1]}" and site.port == sock.getsockname()[1]
        await runner.cleanup()
    finally:
        sock.close()


def test_bind_refusals_are_one_line_each(monkeypatch):
    """Not allowed (EACCES), an address this machine does not have, a name that does not resolve: each one
    StartupError line naming host, port and the option to change."""
    import errno

    with pytest.raises(StartupError) as caught:
        bind_socket("192.0.2.1", 4443, "[server] https_listen")       # TEST-NET: not an address of ours
    assert str(caught.value) == ("cannot listen on 192.0.2.1:4443 ([server] https_listen): Cannot assign requested "
                                 "address")

    class Refusing(socket.socket):
        def bind(self, address):
            raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(listeners_mod.socket, "socket", Refusing)
    with pytest.raises(StartupError) as caught:
        bind_socket("127.0.0.1", 443, "[server] https_listen")
    assert str(caught.value) == ("not allowed to listen on 127.0.0.1:443 (ports below 1024 need privileges); change "
                                 "[server] https_listen")
    monkeypatch.undo()

    def no_such_name(*args, **kwargs):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(listeners_mod.socket, "getaddrinfo", no_such_name)
    with pytest.raises(StartupError) as caught:
        bind_socket("laptop.invalid", 8443, "[server] https_listen")
    assert str(caught.value) == ("cannot listen on laptop.invalid:8443 ([server] https_listen): Name or service not "
                                 "known")


async def test_tls_site_closes_a_silent_connection_at_the_handshake_deadline(tmp_path):
    """handshake_timeout_s = 0.5 on a TLS site named https://...: a client that connects and sends nothing
    is closed by the deadline (asyncio's own default would wait 60 s; the test gives it 10)."""
    import ssl

    from inverse_cloud.certs.store import CertStore

    d = CertStore(tmp_path / "tls").ensure_self_signed("laptop.test")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(d / "fullchain.pem", d / "privkey.pem")
    runner = web.AppRunner(web.Application(), handle_signals=False)
    await runner.setup()
    sock = bind_socket("127.0.0.1", 0, "[server] https_listen")
    site = CappedSite(runner, sock, ssl_context=ctx, handshake_timeout_s=0.5, max_connections=4)
    await site.start()
    try:
        assert site.name == f"https://127.0.0.1:{site.port}"
        reader, writer = await asyncio.open_connection("127.0.0.1", site.port)
        try:
            assert await asyncio.wait_for(reader.read(), 10) == b""
        except ConnectionResetError:
            pass   # closed: a reset is a close too
        writer.close()
    finally:
        await runner.cleanup()


async def test_the_cap_warning_waits_more_than_the_interval(monkeypatch, caplog):
    """A refusal exactly 60 s after the last warning is counted, not warned about; one later is warned."""
    clock = FakeTime()
    monkeypatch.setattr(listeners_mod, "time", clock)
    caplog.set_level(logging.INFO)
    runner = web.AppRunner(web.Application(), handle_signals=False)
    await runner.setup()
    sock = bind_socket("127.0.0.1", 0, "[server] http_listen")
    site = CappedSite(runner, sock, ssl_context=None, handshake_timeout_s=5, max_connections=4)
    await site.start()
    held = []
    try:
        for _ in range(4):
            held.append((await asyncio.open_connection("127.0.0.1", site.port))[1])
        assert runner.server is not None
        await wait_for(lambda: len(runner.server.connections) == 4, what="four connections open")
        assert await get(site.port) == b""
        clock.now += 60
        assert await get(site.port) == b""
        assert len(cap_warnings(caplog)) == 1
        clock.now += 0.5
        assert await get(site.port) == b""
        assert len(cap_warnings(caplog)) == 2 and cap_warnings(caplog)[1].endswith("refused 2 since the last warning")
    finally:
        for w in held:
            w.close()
        await runner.cleanup()
