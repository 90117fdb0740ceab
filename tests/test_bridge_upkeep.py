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
from inverse_cloud.dav.wsgi import RadicaleBridge, _RadicaleLogCapture
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


# --- the request path (_handle): exact answers, notes, accounting ---------------------------------------

REMOTE = ("203.0.113.5", 40000)


def _note(request: web.Request) -> str | None:
    return request.get(wsgi.NOTE_KEY)


async def test_malformed_credentials_get_an_exact_401_and_note():
    bridge = _bridge(Answering(), remote_of=lambda _r: REMOTE)
    request = make_mocked_request("GET", "/radicale/", headers={"Authorization": "Basic !!not base64!!"})
    try:
        resp = await bridge.handle(request)
    finally:
        bridge.close()
    assert isinstance(resp, web.Response)
    assert resp.status == 401 and resp.text == "Malformed Basic credentials\n"
    assert resp.headers["WWW-Authenticate"] == 'Basic realm="inverse-cloud"'
    assert _note(request) == "malformed Basic credentials"


async def test_a_throttled_address_gets_an_exact_429_with_the_wait_rounded_up():
    bridge = _bridge(Answering(), remote_of=lambda _r: REMOTE)
    bridge.throttle = SimpleNamespace(retry_after=lambda address: 2.5 if address == REMOTE[0] else 0.0)  # type: ignore[assignment]
    request = make_mocked_request("GET", "/radicale/", headers={"Authorization": BASIC_ALICE})
    try:
        resp = await bridge.handle(request)
    finally:
        bridge.close()
    assert isinstance(resp, web.Response)
    assert resp.status == 429 and resp.text == "too many login attempts; try again later\n"
    assert resp.headers["Retry-After"] == "3"
    assert _note(request) == "too many failed or concurrent logins from this address"


async def test_known_good_in_the_request_path_expires_strictly_before_its_end(clock):
    """A throttled address on a clock at 0.5 s: an unknown header is throttled (429), one whose known-good
    entry ends exactly now as well; one still inside its time skips the throttle (200)."""
    clock.now = 0.5
    app = Answering()
    bridge = _bridge(app, remote_of=lambda _r: REMOTE)
    bridge.throttle = SimpleNamespace(retry_after=lambda _a: 5.0, begin=lambda _a: None,  # type: ignore[assignment]
                                      end=lambda *_a, **_k: None)
    key = bridge._credential_key(BASIC_ALICE)
    assert key is not None

    async def status() -> int:
        return (await bridge.handle(make_mocked_request("GET", "/radicale/",
                                                        headers={"Authorization": BASIC_ALICE}))).status
    try:
        assert await status() == 429
        bridge._known_good[key] = 0.5
        assert await status() == 429
        bridge._known_good[key] = 0.6
        assert await status() == 200 and app.calls == 1
    finally:
        bridge.close()


@pytest.mark.parametrize(("status", "drained"), [(413, True), (408, False), (400, False)])
async def test_a_refused_body_is_answered_with_its_reason_and_only_a_413_is_drained(monkeypatch, status, drained):
    reason = f"refused with {status}"

    async def refuse(*_a: Any, **_k: Any) -> None:
        raise wsgi.BodyError(status, reason)

    monkeypatch.setattr(wsgi, "read_body", refuse)
    bridge = _bridge(Answering())
    seen: list[tuple[str, str | None]] = []

    async def discard(request: web.Request) -> None:
        seen.append((request.path, _note(request)))

    bridge._discard_refused_body = discard  # type: ignore[method-assign]
    client = await _client(bridge)
    try:
        r = await client.put("/radicale/alice/c/x.vcf", data=b"x" * 10, headers={"Authorization": BASIC_ALICE})
        assert r.status == status and await r.text() == reason + "\n"
    finally:
        await client.close()
        bridge.close()
    assert seen == ([("/radicale/alice/c/x.vcf", reason)] if drained else [])


async def test_radicale_gets_the_whole_body_in_a_bridge_worker_and_in_flight_counts_each_request():
    """Two PUTs at once, both held in the app: each sees its whole body from the first byte, runs in one of
    the bridge's radicale threads (known or not), and in_flight is 2 while both run, 0 after."""
    entered, release = threading.Semaphore(0), threading.Event()
    seen: list[tuple[bytes, str, int]] = []
    bridge: RadicaleBridge

    def app(environ: dict[str, Any], start_response: Any) -> Any:
        body = environ["wsgi.input"].read()
        seen.append((body, threading.current_thread().name, bridge.in_flight))
        entered.release()
        release.wait(20)
        start_response("200 OK" if environ.get("HTTP_AUTHORIZATION") == BASIC_ALICE else "401 Unauthorized", [])
        return [b""]

    bridge = _bridge(app, threads=4)
    client = await _client(bridge)
    try:
        tasks = [asyncio.ensure_future(client.put("/radicale/a.vcf", data=f"body {n}".encode(),
                                                  headers={"Authorization": BASIC_ALICE})) for n in (1, 2)]
        for _ in range(2):
            assert await asyncio.to_thread(entered.acquire, True, 20)
        assert bridge.in_flight == 2
        release.set()
        assert [r.status for r in await asyncio.gather(*tasks)] == [200, 200]
        assert bridge.in_flight == 0
        assert bridge.is_known_good(BASIC_ALICE)
        r = await client.put("/radicale/a.vcf", data=b"body 3", headers={"Authorization": BASIC_ALICE})
        assert r.status == 200                     # the known-good path this time
    finally:
        release.set()
        await client.close()
        bridge.close()
    assert sorted(b for b, _, _ in seen) == [b"body 1", b"body 2", b"body 3"]
    assert all(name.startswith("radicale") for _, name, _ in seen), seen


async def test_radicale_raising_is_an_exact_500_and_one_logged_line_naming_the_request(caplog):
    def app(environ: dict[str, Any], start_response: Any) -> Any:
        raise RuntimeError("storage exploded")

    bridge = _bridge(app)
    client = await _client(bridge)
    caplog.set_level(logging.ERROR, "inverse_cloud.dav.wsgi")
    try:
        r = await client.put("/radicale/alice/c/x.vcf", data=b"x", headers={"Authorization": BASIC_ALICE})
        assert r.status == 500 and await r.text() == "Internal server error\n"
    finally:
        await client.close()
        bridge.close()
    lines = [rec for rec in caplog.records if rec.name == "inverse_cloud.dav.wsgi"]
    assert [rec.getMessage() for rec in lines] == ["Radicale failed on PUT /radicale/alice/c/x.vcf"]
    assert lines[0].exc_info is not None and "storage exploded" in str(lines[0].exc_info[1])
    assert bridge.in_flight == 0


class Status:
    """A WSGI app answering ``status`` and logging ``note`` through Radicale's logger, if given."""

    def __init__(self, status: str, note: str | None = None) -> None:
        self.status, self.note = status, note

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Any:
        if self.note:
            logging.getLogger("radicale").warning(self.note)
        start_response(self.status, [("Content-Type", "text/xml")])
        return [b"<answer/>"]


class Ledger:
    """A throttle that admits everything and records how each request ended."""

    def __init__(self) -> None:
        self.ends: list[tuple[str, bool, bool]] = []

    def retry_after(self, _address: str) -> float:
        return 0.0

    def begin(self, _address: str) -> None:
        pass

    def end(self, address: str, *, failed: bool, succeeded: bool) -> None:
        self.ends.append((address, failed, succeeded))


@pytest.mark.parametrize(("status", "auth", "failed", "succeeded"), [
    ("401 Unauthorized", BASIC_ALICE, True, False),     # wrong credentials: a failure for the address
    ("401 Unauthorized", None, False, False),           # no credentials yet: the client's first try
    ("400 Bad Request", BASIC_ALICE, False, False),
    ("399 Odd", BASIC_ALICE, False, True),
    ("207 Multi-Status", BASIC_ALICE, False, True),
])
async def test_how_a_request_ended_is_told_to_the_throttle(status, auth, failed, succeeded):
    bridge = _bridge(Status(status), remote_of=lambda _r: REMOTE)
    ledger = Ledger()
    bridge.throttle = ledger  # type: ignore[assignment]
    headers = {} if auth is None else {"Authorization": auth}
    try:
        await bridge.handle(make_mocked_request("PROPFIND", "/radicale/alice/", headers=headers))
    finally:
        bridge.close()
    assert ledger.ends == [(REMOTE[0], failed, succeeded)]


async def test_radicale_raising_ends_the_request_as_neither_failed_nor_succeeded():
    def app(environ: dict[str, Any], start_response: Any) -> Any:
        raise RuntimeError("boom")

    bridge = _bridge(app, remote_of=lambda _r: REMOTE)
    ledger = Ledger()
    bridge.throttle = ledger  # type: ignore[assignment]
    try:
        resp = await bridge.handle(make_mocked_request("GET", "/radicale/", headers={"Authorization": BASIC_ALICE}))
    finally:
        bridge.close()
    assert resp.status == 500 and ledger.ends == [(REMOTE[0], False, False)]


@pytest.mark.parametrize(("status", "good"), [("200 OK", True), ("399 Odd", True), ("400 Bad Request", False),
                                              ("401 Unauthorized", False)])
async def test_only_an_answer_under_400_makes_credentials_known_good_and_a_401_forgets_them(status, good):
    bridge = _bridge(Status(status), remote_of=lambda _r: REMOTE)
    key = bridge._credential_key(BASIC_ALICE)
    assert key is not None
    if status.startswith("401"):
        bridge._known_good[key] = wsgi.time.monotonic() + 100   # known before: the 401 must drop it
    other = bridge._credential_key("Basic Ym9iOng=")
    assert other is not None
    bridge._known_good[other] = wsgi.time.monotonic() + 100
    try:
        await bridge.handle(make_mocked_request("GET", "/radicale/", headers={"Authorization": BASIC_ALICE}))
    finally:
        bridge.close()
    assert bridge.is_known_good(BASIC_ALICE) is good
    assert bridge.is_known_good("Basic Ym9iOng=")        # nobody else's entry is touched


@pytest.mark.parametrize("method", ["MOVE", "COPY"])
async def test_a_move_to_another_server_is_an_exact_403_keeping_radicales_notes(method):
    """Radicale answers 502 for a Destination on another host: that is the client's mistake, so 403
    Forbidden, a plain-text body, the note 'Destination not on this server'; what Radicale logged stays in
    the result the access log sees. A GET answered 502 stays 502."""
    seen: list[tuple[str | None, list[str]]] = []
    bridge = _bridge(Status("502 Bad Gateway", note="remote destination not supported"),
                     remote_of=lambda _r: REMOTE, on_response=lambda req, res: seen.append((_note(req), res.notes)))
    request = make_mocked_request(method, "/radicale/alice/c/x.vcf", headers={"Authorization": BASIC_ALICE})
    try:
        resp = await bridge.handle(request)
        assert isinstance(resp, web.Response)
        assert (resp.status, resp.reason) == (403, "Forbidden")
        assert resp.headers["Content-Type"] == "text/plain; charset=utf-8"
        assert resp.body == b"Destination is not on this server\n"
        assert seen == [("Destination not on this server", ["remote destination not supported"])]
        get = await bridge.handle(make_mocked_request("GET", "/radicale/", headers={"Authorization": BASIC_ALICE}))
        assert get.status == 502
    finally:
        bridge.close()


async def test_a_failed_write_on_a_full_disk_is_an_exact_507_checked_with_the_writes_size(monkeypatch, tmp_path):
    asked: list[tuple[Any, list[str], int]] = []

    def full(storage_dir: Any, notes: list[str], needed: int) -> bool:
        asked.append((storage_dir, notes, needed))
        return True

    monkeypatch.setattr(wsgi, "is_storage_full", full)
    bridge = _bridge(Status("500 Internal Server Error", note="[Errno 28] No space left on device"),
                     storage_dir=tmp_path)
    client = await _client(bridge)
    try:
        r = await client.put("/radicale/alice/c/x.vcf", data=b"x" * 123, headers={"Authorization": BASIC_ALICE})
        assert r.status == 507 and r.reason == "Insufficient Storage"
        assert await r.text() == "Insufficient Storage: the server's disk is full; nothing was changed\n"
    finally:
        await client.close()
        bridge.close()
    assert asked == [(tmp_path, ["[Errno 28] No space left on device"], 123)]


@pytest.mark.parametrize(("storage_dir", "where"), [("dir", None), (None, "the storage folder")])
async def test_the_disk_full_line_names_the_folder_and_the_request(monkeypatch, tmp_path, caplog, storage_dir, where):
    monkeypatch.setattr(wsgi, "is_storage_full", lambda *_a: True)
    folder = tmp_path if storage_dir else None
    bridge = _bridge(Status("500 Internal Server Error"), remote_of=lambda _r: REMOTE, storage_dir=folder)
    caplog.set_level(logging.ERROR, "inverse_cloud.dav.wsgi")
    try:
        resp = await bridge.handle(make_mocked_request("PUT", "/radicale/alice/c/x.vcf",
                                                       headers={"Authorization": BASIC_ALICE}))
    finally:
        bridge.close()
    assert isinstance(resp, web.Response)
    assert (resp.status, resp.reason) == (507, "Insufficient Storage")
    assert resp.headers["Content-Type"] == "text/plain; charset=utf-8"
    assert [r.getMessage() for r in caplog.records if r.name == "inverse_cloud.dav.wsgi"] == [
        f"storage {where or tmp_path}: no space left on device; PUT /radicale/alice/c/x.vcf refused with 507 (free "
        "some space; the stored data is intact)"]


@pytest.mark.parametrize(("notes", "details"), [(["first", "second"], "first; second"), ([], "no details")])
async def test_a_radicale_5xx_is_one_error_line_with_its_notes(caplog, notes, details):
    def app(environ: dict[str, Any], start_response: Any) -> Any:
        for note in notes:
            logging.getLogger("radicale").warning(note)
        start_response("503 Service Unavailable", [])
        return [b""]

    bridge = _bridge(app, remote_of=lambda _r: REMOTE)
    caplog.set_level(logging.ERROR, "inverse_cloud.dav.wsgi")
    try:
        resp = await bridge.handle(make_mocked_request("GET", "/radicale/x", headers={"Authorization": BASIC_ALICE}))
    finally:
        bridge.close()
    assert resp.status == 503
    assert [r.getMessage() for r in caplog.records if r.name == "inverse_cloud.dav.wsgi"] == [
        f"Radicale answered 503 to GET /radicale/x: {details}"]


async def test_radicales_notes_join_the_requests_note_and_its_answer_keeps_only_safe_headers():
    """A 207 with two notes: the request's note is both, joined by '; '; on_response gets that request; the
    answer carries Radicale's headers except Content-Length and Connection (in whatever case it wrote them),
    which are aiohttp's to set."""
    def app(environ: dict[str, Any], start_response: Any) -> Any:
        logging.getLogger("radicale").warning("one")
        logging.getLogger("radicale").warning("two")
        start_response("207 Multi-Status", [("content-LENGTH", "999"), ("CONNECTION", "close"),
                                            ("Content-Type", "text/xml"), ("X-Kept", "yes")])
        return [b"<multistatus/>"]

    got: list[web.Request] = []
    bridge = _bridge(app, remote_of=lambda _r: REMOTE, on_response=lambda req, _res: got.append(req))
    request = make_mocked_request("PROPFIND", "/radicale/alice/", headers={"Authorization": BASIC_ALICE})
    try:
        resp = await bridge.handle(request)
    finally:
        bridge.close()
    assert isinstance(resp, web.Response)
    assert resp.status == 207 and resp.body == b"<multistatus/>"
    assert _note(request) == "one; two" and got == [request]
    assert sorted(k.lower() for k in resp.headers) == ["content-type", "x-kept"]


def test_malloc_trim_is_glibcs_and_absent_without_it(monkeypatch):
    """On this glibc machine the release is glibc's malloc_trim (it answers 0 or 1); where the C library
    cannot be loaded there is none."""
    trim = wsgi._malloc_trim()
    assert trim is not None and trim() in (0, 1)
    import ctypes

    def missing(_name: str) -> None:
        raise OSError("libc.so.6: cannot open shared object file")

    monkeypatch.setattr(ctypes, "CDLL", missing)
    assert wsgi._malloc_trim() is None


@pytest.mark.parametrize("threads", [2, 3])
async def test_unverified_requests_hold_at_most_half_the_workers(threads):
    """threads=2 or 3: one request with credentials not yet seen to work takes the only unverified slot (half
    the workers, rounded down); the pool has exactly ``threads`` workers named radicale-*."""
    entered, release = threading.Semaphore(0), threading.Event()

    def app(environ: dict[str, Any], start_response: Any) -> Any:
        entered.release()
        release.wait(20)
        start_response("200 OK", [])
        return [b""]

    bridge = _bridge(app, threads=threads)
    assert bridge.threads == threads and bridge.executor._max_workers == threads
    client = await _client(bridge)
    try:
        task = asyncio.ensure_future(client.get("/radicale/", headers={"Authorization": BASIC_ALICE}))
        assert await asyncio.to_thread(entered.acquire, True, 20)
        assert bridge._unverified.locked()
        release.set()
        assert (await task).status == 200
        assert not bridge._unverified.locked()
    finally:
        release.set()
        await client.close()
        bridge.close()


async def test_a_fresh_bridge_counts_as_idle_since_the_clock_began(clock):
    """Before any request: the bridge has glibc's trim, and a release check at 2.5 s on the monotonic clock
    finds it idle for 2.5 s (more than IDLE_TRIM_S): it trims at once."""
    clock.now = 2.5
    bridge = _bridge(Answering())
    assert bridge._trim is not None
    trims: list[int] = []
    bridge._trim = lambda: trims.append(1)
    try:
        bridge._release_memory()
        assert bridge._trim_timer is None
        await wait_for(lambda: trims == [1], what="the trim")
    finally:
        bridge.close()


async def test_radicales_own_reason_phrase_is_kept():
    bridge = _bridge(Status("299 Quite Fine"), remote_of=lambda _r: REMOTE)
    try:
        resp = await bridge.handle(make_mocked_request("GET", "/radicale/", headers={"Authorization": BASIC_ALICE}))
    finally:
        bridge.close()
    assert (resp.status, resp.reason) == (299, "Quite Fine")
