"""The bridge hands freed heap back to the OS once it has been idle (malloc_trim), never while a
request runs, and not at all after close(). Radicale is replaced by a WSGI app that can be held."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from inverse_cloud.dav import wsgi
from inverse_cloud.dav.web import PeerDirectory, make_https_app
from inverse_cloud.dav.wsgi import RadicaleBridge
from tests.support import wait_until


class GateApp:
    """Answers 200; while ``hold`` is set, each call waits until the test releases it."""

    def __init__(self) -> None:
        self.hold = threading.Event()
        self.release = threading.Event()

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if self.hold.is_set():
            self.release.wait(10)
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"ok"]


async def test_memory_is_released_after_idle_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """One request, then idle: one trim after IDLE_TRIM_S. A request held open keeps the bridge busy:
    no trim while it runs. After close() a pending timer does nothing."""
    monkeypatch.setattr(wsgi, "IDLE_TRIM_S", 0.05)
    app = GateApp()
    bridge = RadicaleBridge(app, threads=2, max_body_bytes=1024, body_grace_s=1.0, body_min_rate_bps=1024,
                            auth_delay_s=0.0, remote_of=PeerDirectory().remote_of)
    trims: list[float] = []
    bridge._trim = lambda: trims.append(time.monotonic())
    runner = web.AppRunner(make_https_app(bridge), handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    url = f"http://127.0.0.1:{port}/radicale/"
    try:
        async with aiohttp.ClientSession() as s:
            async with s.get(url) as r:
                assert r.status == 200
            await asyncio.to_thread(wait_until, lambda: len(trims) == 1, 5, "the idle trim")

            app.hold.set()
            held = asyncio.create_task(s.get(url))
            await asyncio.to_thread(wait_until, lambda: bridge.in_flight == 1, 5, "a request in flight")
            checks: list[int] = []
            release_memory = bridge._release_memory

            def counted() -> None:
                checks.append(bridge.in_flight)
                release_memory()

            bridge._release_memory = counted  # type: ignore[method-assign]  # the timer looks it up per call
            bridge._schedule_release()  # as if another request had just finished
            # Three idle checks come and go while the request is held (counted, not timed: under load a fixed
            # wait could end before the first check and pass without testing anything).
            await asyncio.to_thread(wait_until, lambda: len(checks) >= 3, 10, "three idle checks")
            assert all(n == 1 for n in checks[:3])
            assert len(trims) == 1, "trimmed while a request was running"
            app.release.set()
            async with await held as r:
                assert r.status == 200
            await asyncio.to_thread(wait_until, lambda: len(trims) == 2, 5, "the trim after the held request")
    finally:
        await runner.cleanup()
        bridge.close()
    bridge._release_memory()  # a timer firing after close
    assert len(trims) == 2
