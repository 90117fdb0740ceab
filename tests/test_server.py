"""The DAV server component in-process: its shutdown drain (a request still running when ``aclose()``
starts is waited for up to ``shutdown_timeout_s``; past that one WARNING says how many were cut)."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Iterable
from typing import Any

import aiohttp
import pytest

from inverse_cloud import config
from inverse_cloud.dav import users
from inverse_cloud.dav.server import DavServer
from tests.support import free_port

BASIC_ALICE = "Basic YWxpY2U6Y29ycmVjdCBob3JzZQ=="  # alice:correct horse


class BlockingApp:
    """A WSGI app whose requests wait until the test releases them."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        self.entered.set()
        self.release.wait(60)
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"done"]


async def wait_for(pred, what: str, timeout_s: float = 20.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not pred():
        if loop.time() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


@pytest.fixture
def cfg(tmp_path):
    def make(shutdown_timeout_s: float) -> config.Config:
        text = (f'[server]\ndomain = "laptop.test"\ndata_dir = "{tmp_path}/data"\nstate_dir = "{tmp_path}/state"\n'
                f'https_listen = "127.0.0.1:{free_port()}"\nhttp_listen = "127.0.0.1:{free_port()}"\n'
                f"shutdown_timeout_s = {shutdown_timeout_s}\n")
        c = config.loads(text, tmp_path / "config.toml")
        users.add_user(c.server.htpasswd_path, "alice", "correct horse")
        return c

    return make


def server_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "inverse_cloud.dav.server"]


async def _start_blocked_request(srv: DavServer, app: BlockingApp) -> asyncio.Task[tuple[int, str]]:
    async def propfind() -> tuple[int, str]:
        async with aiohttp.ClientSession() as s:
            async with s.request("PROPFIND", f"https://127.0.0.1:{srv.https_port}/radicale/alice/",
                                 headers={"Authorization": BASIC_ALICE}, ssl=False) as r:
                return r.status, await r.text()

    assert srv.bridge is not None
    srv.bridge.replace_app(app)
    task = asyncio.ensure_future(propfind())
    await wait_for(app.entered.is_set, "the request inside the app")
    return task


async def test_request_running_at_shutdown_is_waited_for(cfg, caplog):
    """A request is inside the app when aclose() starts: one INFO 'draining 1 in-flight request(s)', the
    request is released while aclose() waits, it gets its 200, and no 'still running' WARNING follows."""
    caplog.set_level(logging.INFO)
    srv = DavServer(cfg(shutdown_timeout_s=30))
    await srv.start()
    app = BlockingApp()
    request = await _start_blocked_request(srv, app)
    closing = asyncio.ensure_future(srv.aclose())
    await wait_for(lambda: any("draining 1 in-flight request(s)" in m for m in server_lines(caplog)),
                   "the draining line")
    assert not closing.done()
    app.release.set()
    assert await asyncio.wait_for(request, 20) == (200, "done")
    await asyncio.wait_for(closing, 30)
    assert not any("still running" in m for m in server_lines(caplog))


async def test_drain_timeout_is_one_warning_with_the_count(cfg, caplog):
    """A request still inside the app after shutdown_timeout_s (1 s): one WARNING '1 request(s) still
    running after 1 s; closing their connections'; the app is then released so aclose() can end."""
    caplog.set_level(logging.INFO)
    srv = DavServer(cfg(shutdown_timeout_s=1))
    await srv.start()
    app = BlockingApp()
    request = await _start_blocked_request(srv, app)
    closing = asyncio.ensure_future(srv.aclose())
    try:
        await wait_for(lambda: any("still running" in m for m in server_lines(caplog)), "the drain timeout line")
    finally:
        app.release.set()
        await asyncio.wait_for(closing, 30)
        await asyncio.gather(request, return_exceptions=True)
    warnings = [r.getMessage() for r in caplog.records
                if r.name == "inverse_cloud.dav.server" and r.levelno == logging.WARNING]
    assert warnings == ["1 request(s) still running after 1 s; closing their connections"]


async def test_a_slow_reload_leaves_the_loop_answering(cfg, monkeypatch):
    """SIGHUP's new Radicale app takes long to build (the builder waits until the test releases it). While
    it is being built, alice's PROPFIND is answered by the old app and the HTTP listener answers too: the
    build runs in a worker thread, not on the event loop. Released, the reload ends and the new app serves."""
    from inverse_cloud.dav import server as server_module
    from inverse_cloud.supervisor import Supervisor

    srv = DavServer(cfg(shutdown_timeout_s=5))
    await srv.start()
    building, release, built = threading.Event(), threading.Event(), threading.Event()
    real_build = server_module.build_application

    def slow_build(c: config.Config) -> Any:
        building.set()
        release.wait(15)          # the test releases it; a blocked loop cannot, so this ends it regardless
        app = real_build(c)
        built.set()
        return app

    monkeypatch.setattr(server_module, "build_application", slow_build)
    supervisor = Supervisor()
    supervisor.add(srv)
    assert srv.bridge is not None
    old_app = srv.bridge.app
    try:
        reload = supervisor.reload()
        await wait_for(building.is_set, "the reload's build to start")
        async with aiohttp.ClientSession() as s:
            async with s.request("PROPFIND", f"https://127.0.0.1:{srv.https_port}/radicale/alice/",
                                 headers={"Authorization": BASIC_ALICE, "Depth": "0"}, ssl=False) as r:
                assert r.status == 207
            async with s.get(f"http://127.0.0.1:{srv.http_port}/x", allow_redirects=False) as r:
                assert r.status in (301, 308)
        assert not built.is_set(), "the requests were answered only after the build ended"
        assert srv.bridge.app is old_app
        release.set()
        await asyncio.wait_for(reload, 30)
        assert built.is_set() and srv.bridge.app is not old_app
    finally:
        release.set()
        await srv.aclose()
