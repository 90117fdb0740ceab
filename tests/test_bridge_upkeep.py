"""The WSGI bridge's housekeeping, in this process with exact expectations: when the idle memory release runs
(on a fake clock) and in which thread, the release timer, what close() waits for, how much of a refused
upload is read and dropped, the credential cache's key and expiry, the gate seeing the request, and the log
capture in a thread that never ran a request."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import threading
from types import SimpleNamespace
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request

from inverse_cloud.dav import wsgi
from inverse_cloud.dav.wsgi import _RadicaleLogCapture
from tests.support import wait_for
from tests.test_bridge import BASIC_ALICE, Answering, _bridge, _client


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def monotonic(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch) -> FakeClock:
    """The bridge's clock (only wsgi.py's ``time``: the event loop keeps the real one)."""
    fake = FakeClock()
    monkeypatch.setattr(wsgi, "time", SimpleNamespace(monotonic=fake.monotonic))
    return fake


def _delay(handle: asyncio.TimerHandle | None) -> float:
    assert handle is not None
    return handle.when() - asyncio.get_running_loop().time()


async def test_release_waits_out_the_rest_of_the_idle_time_then_trims_in_a_radicale_worker(clock):
    """IDLE_TRIM_S = 2: idle 0.5 s -> a new check in the remaining 1.5 s, no trim; a request in flight -> a
    check in 2 s whatever the idle time; idle exactly 2 s -> one trim, in a thread of the bridge's own pool
    (named radicale...), and no timer left."""
    bridge = _bridge(Answering())
    threads: list[str] = []
    bridge._trim = lambda: threads.append(threading.current_thread().name)
    try:
        bridge._last_done = clock.now - 0.5
        bridge._release_memory()
        assert _delay(bridge._trim_timer) == pytest.approx(1.5, abs=0.25)
        bridge._trim_timer.cancel()  # type: ignore[union-attr]

        bridge.in_flight, bridge._last_done = 1, clock.now - 5.0
        bridge._release_memory()
        assert _delay(bridge._trim_timer) == pytest.approx(2.0, abs=0.25)
        bridge._trim_timer.cancel()  # type: ignore[union-attr]
        assert threads == []

        bridge.in_flight, bridge._last_done = 0, clock.now - wsgi.IDLE_TRIM_S
        bridge._release_memory()
        assert bridge._trim_timer is None
        await wait_for(lambda: threads, what="the trim")
        assert len(threads) == 1 and threads[0].startswith("radicale")
    finally:
        bridge.close()


async def test_a_finished_request_arms_one_release_timer_which_trims(monkeypatch):
    """_schedule_release notes when the request ended and arms one timer (a second call keeps it); the timer
    trims once the bridge has been idle for IDLE_TRIM_S. Without a trim function (not glibc) no timer."""
    monkeypatch.setattr(wsgi, "IDLE_TRIM_S", 0.05)
    bridge = _bridge(Answering())
    trims: list[int] = []
    bridge._trim = lambda: trims.append(1)
    try:
        before = wsgi.time.monotonic()
        bridge._schedule_release()
        assert before <= bridge._last_done <= wsgi.time.monotonic()
        first = bridge._trim_timer
        assert first is not None
        bridge._schedule_release()
        assert bridge._trim_timer is first
        await wait_for(lambda: trims == [1], what="the idle trim")
        assert bridge._trim_timer is None
    finally:
        bridge.close()
    plain = _bridge(Answering())
    plain._trim = None
    try:
        plain._schedule_release()
        assert plain._trim_timer is None
    finally:
        plain.close()


async def test_close_waits_for_running_work_runs_what_is_queued_and_disarms_the_release(clock):
    """close() with one request running in the single worker and one queued: it returns only after the
    running one is let go, and the queued one still runs (nothing is cancelled). After close, a release
    check that would otherwise wait again schedules nothing."""
    bridge = _bridge(Answering(), threads=1)
    go, ran = threading.Event(), []
    bridge.executor.submit(go.wait, 20)
    bridge.executor.submit(ran.append, "queued")
    closer = threading.Thread(target=bridge.close)
    closer.start()
    try:
        await wait_for(lambda: bridge.executor._shutdown, what="close() to begin")
        await asyncio.to_thread(closer.join, 0.5)
        assert closer.is_alive(), "close() returned while a request was still running"
    finally:
        go.set()
        await asyncio.to_thread(closer.join, 20)
    assert not closer.is_alive() and ran == ["queued"]
    bridge._last_done = clock.now
    bridge._release_memory()
    assert bridge._trim_timer is None


class Trickle:
    """A request body: ``chunks`` pieces of ``size`` bytes, then the end (or, ``endless``, never anything)."""

    def __init__(self, chunks: int, size: int = 10, endless: bool = False) -> None:
        self.left, self.size, self.endless, self.reads = chunks, size, endless, 0

    async def readany(self) -> bytes:
        if self.endless:
            await asyncio.Event().wait()
        self.reads += 1
        if self.left == 0:
            return b""
        self.left -= 1
        return b"x" * self.size


def _put(content_length: int | None, body: Trickle) -> web.Request:
    headers = {} if content_length is None else {"Content-Length": str(content_length)}
    return make_mocked_request("PUT", "/radicale/alice/c/x.vcf", headers=headers, payload=body)


@pytest.mark.parametrize(("declared", "reads"), [
    (41, 0),        # declared over 4 x 10 bytes: not read at all
    (40, 5),        # exactly the cap: read until more than 40 bytes are dropped (5 pieces of 10)
    (None, 5),      # no length (chunked): the same
])
async def test_a_refused_upload_is_drained_up_to_four_times_the_limit(declared, reads):
    bridge = _bridge(Answering(), max_body_bytes=10)
    body = Trickle(chunks=8)
    try:
        await asyncio.wait_for(bridge._discard_refused_body(_put(declared, body)), 10)
    finally:
        bridge.close()
    assert body.reads == reads


async def test_a_refused_upload_that_stalls_is_given_up_after_the_drain_time(monkeypatch):
    monkeypatch.setattr(wsgi, "REFUSED_BODY_DRAIN_S", 0.05)
    bridge = _bridge(Answering(), max_body_bytes=10)
    try:
        await asyncio.wait_for(bridge._discard_refused_body(_put(20, Trickle(0, endless=True))), 10)
    finally:
        bridge.close()


async def test_credential_keys_hash_the_whole_header_even_undecodable_bytes():
    """The key is the SHA-256 of the header's UTF-8 bytes; a header carrying bytes that are not UTF-8
    (aiohttp hands them over as surrogates) still gets a key, its own; an empty header has none."""
    bridge = _bridge(Answering())
    try:
        assert bridge._credential_key(BASIC_ALICE) == hashlib.sha256(BASIC_ALICE.encode()).hexdigest()
        odd = bridge._credential_key("Basic \udcff\udcfe")
        assert odd == hashlib.sha256(b"Basic \xff\xfe").hexdigest()
        assert bridge._credential_key("") is None and bridge._credential_key(None) is None
    finally:
        bridge.close()


async def test_known_good_expires_at_its_time_and_unknown_is_never_good(clock):
    """On a clock at 0.5 s: a header never seen is not known good; one whose entry ends exactly now is not
    either (an entry is good strictly before its end)."""
    clock.now = 0.5
    bridge = _bridge(Answering())
    try:
        assert not bridge.is_known_good(BASIC_ALICE)
        key = bridge._credential_key(BASIC_ALICE)
        assert key is not None
        bridge._known_good[key] = 0.5
        assert not bridge.is_known_good(BASIC_ALICE)
        bridge._known_good[key] = 0.6
        assert bridge.is_known_good(BASIC_ALICE)
    finally:
        bridge.close()


async def test_the_gate_decides_on_the_request_itself():
    """A gate refusing one path by looking at the request: that path gets its answer and Radicale is not
    called; another path goes through."""
    def gate(request: web.Request) -> web.Response | None:
        return web.Response(status=403, text="not here\n") if request.path.endswith("/blocked") else None

    app = Answering()
    bridge = _bridge(app, gate=gate)
    client = await _client(bridge)
    try:
        r = await client.get("/radicale/blocked", headers={"Authorization": BASIC_ALICE})
        assert r.status == 403 and await r.text() == "not here\n" and app.calls == 0
        r = await client.get("/radicale/", headers={"Authorization": BASIC_ALICE})
        assert r.status == 200 and app.calls == 1
    finally:
        await client.close()
        bridge.close()


def test_log_capture_in_a_thread_that_never_ran_a_request_passes_records_through():
    """The capture's notes are per thread: set in this one, a fresh thread sees none and lets Radicale's
    records through (True) instead of failing."""
    capture = _RadicaleLogCapture()
    capture.local.notes = []
    seen: list[Any] = []

    def other() -> None:
        seen.append(capture.filter(logging.LogRecord("radicale", logging.WARNING, __file__, 1, "hi", None, None)))

    t = threading.Thread(target=other)
    t.start()
    t.join(10)
    assert seen == [True] and capture.local.notes == []
