"""The Radicale bridge in this process, piece by piece, with exact expectations: what a worker thread hands
back (status, reason, headers, the joined body, the iterable closed, Radicale's notes), how Radicale's log
lines become notes, the disk-full test's boundary, the known-good cache, the app swap, the 503 while
draining and the failed-login delay. (tests/test_web.py covers the bridge through the HTTP app.)"""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Callable, Iterable
from types import SimpleNamespace
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer, make_mocked_request

from inverse_cloud.dav import wsgi
from inverse_cloud.dav.web import PeerDirectory, make_https_app
from inverse_cloud.dav.wsgi import RadicaleBridge, WsgiResult, _capture, _run_wsgi, is_storage_full

BASIC_ALICE = "Basic YWxpY2U6Y29ycmVjdCBob3JzZQ=="  # alice:correct horse


class Chunks:
    """A WSGI answer in several pieces that records whether it was closed."""

    def __init__(self, *pieces: bytes) -> None:
        self.pieces = pieces
        self.closed = False

    def __iter__(self):
        return iter(self.pieces)

    def close(self) -> None:
        self.closed = True


def _environ(method: str = "GET", body: bytes = b"") -> dict[str, Any]:
    return {"REQUEST_METHOD": method, "CONTENT_LENGTH": str(len(body)), "wsgi.input": io.BytesIO(body)}


def test_run_wsgi_returns_the_whole_answer_and_closes_it():
    """Status code and reason split, headers as given, the pieces joined with nothing between them, the
    iterable's close() called, the input closed, and no capture left active for the thread."""
    answer = Chunks(b"ab", b"cd")

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        start_response("207 Multi-Status", [("Content-Type", "text/xml")])
        logging.getLogger("radicale").warning("a note from Radicale")
        return answer

    environ = _environ()
    result = _run_wsgi(app, environ)
    assert result == WsgiResult(207, "Multi-Status", [("Content-Type", "text/xml")], b"abcd",
                                ["a note from Radicale"])
    assert answer.closed and environ["wsgi.input"].closed
    assert _capture.local.notes is None


def test_run_wsgi_refuses_hostile_xml_with_an_exact_400():
    """A PROPFIND whose body is not well-formed XML never reaches the app: 400 'Bad Request', a plain-text
    body that is the problem and a newline, and the problem as the one note."""
    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        raise AssertionError("the app must not be called")

    result = _run_wsgi(app, _environ("PROPFIND", b"<a><b></a>"))
    assert result.status == 400 and result.reason == "Bad Request"
    assert result.headers == [("Content-Type", "text/plain; charset=utf-8")]
    assert result.notes and result.body == f"{result.notes[0]}\n".encode() and len(result.notes) == 1


def _record(message: str) -> logging.LogRecord:
    return logging.LogRecord("radicale", logging.WARNING, __file__, 1, message, None, None)


def test_log_capture_outside_a_request_lets_records_through():
    assert _capture.filter(_record("no request running")) is True


def test_log_capture_turns_radicale_lines_into_short_notes(caplog):
    """Inside a request: a traceback becomes its last line (the whole at debug level), a multi-line message
    its first line, a vobject parse error loses the quoted line, and at most four notes are kept."""
    notes: list[str] = []
    _capture.local.notes = notes
    caplog.set_level(logging.DEBUG, "inverse_cloud.dav.wsgi")
    try:
        tb = "Traceback (most recent call last):\n  File x\nValueError: bad\n"
        assert _capture.filter(_record(tb)) is False
        assert _capture.filter(_record("first line\nsecond line\nthird")) is False
        assert _capture.filter(_record("Failed to parse line: FN:Secret Person")) is False
        _capture.filter(_record("four"))
        _capture.filter(_record("five"))
    finally:
        _capture.local.notes = None
    assert notes == ["ValueError: bad", "first line", "Failed to parse line (line not logged)", "four"]
    assert [r.getMessage() for r in caplog.records if r.name == "inverse_cloud.dav.wsgi"] == [f"Radicale: {tb}"]


@pytest.mark.parametrize(("free", "files", "needed", "full"), [
    (10 * 4096 + 64 * 1024, 5, 10 * 4096, False),      # exactly the need plus the 64 KiB margin: fits
    (10 * 4096 + 64 * 1024 - 1, 5, 10 * 4096, True),  # one byte less: full
    (10 ** 9, 1, 0, False),                            # one inode left: fits
    (10 ** 9, 0, 0, True),                             # no inode left: full
])
def test_is_storage_full_boundaries(monkeypatch, tmp_path, free, files, needed, full):
    monkeypatch.setattr(os, "statvfs", lambda _p: SimpleNamespace(f_bavail=free, f_frsize=1, f_favail=files))
    assert is_storage_full(tmp_path, [], needed) is full


class Answering:
    """A WSGI app answering ``status`` (200 for alice's credentials, 401 otherwise, by default)."""

    def __init__(self, body: bytes = b"ok") -> None:
        self.body = body
        self.calls = 0

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        self.calls += 1
        good = environ.get("HTTP_AUTHORIZATION") == BASIC_ALICE
        start_response("200 OK" if good else "401 Unauthorized", [("Content-Type", "text/plain")])
        return [self.body]


def _bridge(app: Any, **kw: Any) -> RadicaleBridge:
    params: dict[str, Any] = dict(threads=2, max_body_bytes=64 * 1024, body_grace_s=1.0, body_min_rate_bps=1024,
                                  auth_delay_s=0.0, remote_of=PeerDirectory().remote_of)
    params.update(kw)
    return RadicaleBridge(app, **params)


async def _client(bridge: RadicaleBridge) -> TestClient:
    client = TestClient(TestServer(make_https_app(bridge)))
    await client.start_server()
    return client


async def test_known_good_follows_radicale_and_the_app_can_be_swapped():
    """Before any login nothing is known good; after alice's 200 her header is, another header and an
    empty one are not; a 401 for her header forgets it. replace_app: the next request is answered by the
    new app."""
    first, second = Answering(b"first"), Answering(b"second")
    bridge = _bridge(first)
    client = await _client(bridge)
    try:
        assert not bridge.is_known_good(BASIC_ALICE)
        r = await client.get("/radicale/", headers={"Authorization": BASIC_ALICE})
        assert r.status == 200 and await r.read() == b"first"
        assert bridge.is_known_good(BASIC_ALICE)
        assert not bridge.is_known_good("Basic Ym9iOng=") and not bridge.is_known_good("")
        bridge.replace_app(second)
        r = await client.get("/radicale/", headers={"Authorization": BASIC_ALICE})
        assert await r.read() == b"second" and second.calls == 1
        key = bridge._credential_key(BASIC_ALICE)
        assert key is not None
        bridge._known_good[key] = 0.0               # expired
        assert not bridge.is_known_good(BASIC_ALICE)
    finally:
        await client.close()
        bridge.close()


async def test_a_draining_bridge_answers_503_and_closes():
    """After drain() a new request gets exactly 503, 'server is restarting; try again shortly', Retry-After
    5, and the connection is closed; the app is not called."""
    app = Answering()
    bridge = _bridge(app)
    try:
        assert await bridge.drain(1.0) == 0 and bridge.closing is True
        resp = await bridge.handle(make_mocked_request("GET", "/radicale/"))
        assert isinstance(resp, web.Response)
        assert resp.status == 503 and resp.text == "server is restarting; try again shortly\n"
        assert resp.headers["Retry-After"] == "5" and resp.keep_alive is False
        assert app.calls == 0 and bridge.active == 0
    finally:
        bridge.close()


async def test_active_counts_every_request_being_handled():
    """Two requests inside handle() at once: active is 2, and back to 0 (idle set) when both are done."""
    import asyncio
    import threading

    entered, release = threading.Semaphore(0), threading.Event()

    def slow(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        entered.release()
        release.wait(20)
        start_response("200 OK", [])
        return [b""]

    bridge = _bridge(slow, threads=4)
    client = await _client(bridge)
    try:
        tasks = [asyncio.ensure_future(client.get("/radicale/", headers={"Authorization": BASIC_ALICE}))
                 for _ in range(2)]
        for _ in range(2):
            assert await asyncio.to_thread(entered.acquire, True, 20)
        assert bridge.active == 2
        release.set()
        for r in await asyncio.gather(*tasks):
            assert r.status == 200
        assert bridge.active == 0 and bridge._idle.is_set()
    finally:
        release.set()
        await client.close()
        bridge.close()


@pytest.mark.parametrize(("delay_s", "rand", "slept"), [(0.0, 0.3, None), (1.0, 0.25, 0.75), (2.0, 0.0, 1.0)])
async def test_failure_delay_is_half_to_one_and_a_half_times_the_setting(monkeypatch, delay_s, rand, slept):
    calls: list[float] = []

    async def fake_sleep(seconds: float) -> None:
        calls.append(seconds)

    monkeypatch.setattr(wsgi.asyncio, "sleep", fake_sleep)
    monkeypatch.setattr(wsgi.random, "random", lambda: rand)
    bridge = _bridge(Answering(), auth_delay_s=delay_s)
    try:
        await bridge._failure_delay()
    finally:
        bridge.close()
    assert calls == ([] if slept is None else [pytest.approx(slept)])
