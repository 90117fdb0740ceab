"""Password-guessing floods: per-address backoff and in-flight bound (dav/throttle.py) and the bridge that
applies them, with the real Radicale."""

from __future__ import annotations

import asyncio
import base64
import time

import aiohttp
import pytest
from aiohttp import web

from inverse_cloud.dav import throttle
from inverse_cloud.dav.throttle import AddressThrottle, backoff_s
from inverse_cloud.dav.web import make_https_app
from inverse_cloud.dav.wsgi import RadicaleBridge

ATTACKER, PHONE = "203.0.113.66", "198.51.100.7"


@pytest.mark.parametrize(("failures", "wait"), [(0, 0), (3, 0), (4, 1), (5, 2), (6, 4), (9, 32), (10, 60), (99, 60)])
def test_backoff_table(failures, wait):
    assert backoff_s(failures) == wait


def test_throttle_backs_off_forgives_on_success_and_forgets():
    now = [1000.0]
    t = AddressThrottle(clock=lambda: now[0])
    for _ in range(throttle.FREE_FAILURES + 2):
        t.begin(ATTACKER)
        t.end(ATTACKER, failed=True, succeeded=False)
    assert t.retry_after(ATTACKER) == 2.0
    assert t.retry_after(PHONE) == 0
    now[0] += 2.5
    assert t.retry_after(ATTACKER) == 0
    t.begin(ATTACKER)
    t.end(ATTACKER, failed=False, succeeded=True)
    assert t.retry_after(ATTACKER) == 0
    for _ in range(throttle.FREE_FAILURES + 1):
        t.begin(ATTACKER)
        t.end(ATTACKER, failed=True, succeeded=False)
    now[0] += throttle.FORGET_S + 1
    assert t.retry_after(ATTACKER) == 0


def test_throttle_bounds_in_flight_per_address():
    t = AddressThrottle()
    for _ in range(throttle.MAX_IN_FLIGHT):
        assert t.retry_after(ATTACKER) == 0
        t.begin(ATTACKER)
    assert t.retry_after(ATTACKER) > 0
    assert t.retry_after(PHONE) == 0
    t.end(ATTACKER, failed=False, succeeded=False)
    assert t.retry_after(ATTACKER) == 0


def _basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


async def test_fresh_valid_login_answers_quickly_under_a_guessing_flood(tmp_path):
    """60 concurrent loops guess alice's password (a new wrong password each time) from one address, with
    the real Radicale, 4 workers and the default 1 s failure delay. A phone at another address then logs in
    for the first time (its credentials not known good): it must be answered within a generous 10 s
    deadline (the issue measured 44.5 s; 2 s is the goal, printed). Then SIGHUP (replace_app): its
    credentials are still known good."""
    from inverse_cloud import config
    from inverse_cloud.dav import users
    from inverse_cloud.dav.radicale_app import build_application

    cfg = config.loads(f'[server]\ndomain = "laptop.test"\ndata_dir = "{tmp_path}"\nstate_dir = "{tmp_path}/s"\n')
    users.add_user(cfg.server.htpasswd_path, "alice", "correct horse")
    app = await asyncio.to_thread(build_application, cfg)

    def remote_of(request: web.Request) -> tuple[str, int]:
        return (ATTACKER, 1) if request.headers.get("User-Agent") == "guesser" else (PHONE, 2)

    bridge = RadicaleBridge(app, threads=4, max_body_bytes=64 * 1024, body_grace_s=1.0, body_min_rate_bps=1024,
                            auth_delay_s=1.0, remote_of=remote_of)
    runner = web.AppRunner(make_https_app(bridge), handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}/radicale/alice/"  # type: ignore[union-attr]
    statuses: dict[int, int] = {}
    stop = asyncio.Event()

    async def guess(session: aiohttp.ClientSession, n: int) -> None:
        i = 0
        while not stop.is_set():
            i += 1
            headers = {"Authorization": _basic("alice", f"guess-{n}-{i}"), "User-Agent": "guesser", "Depth": "0"}
            try:
                async with session.request("PROPFIND", url, headers=headers) as r:
                    statuses[r.status] = statuses.get(r.status, 0) + 1
            except aiohttp.ClientError:
                statuses[0] = statuses.get(0, 0) + 1

    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as attack, \
                aiohttp.ClientSession() as phone:
            tasks = [asyncio.create_task(guess(attack, n)) for n in range(60)]
            try:
                async with asyncio.timeout(60):
                    while statuses.get(401, 0) < 10:
                        await asyncio.sleep(0.05)  # poll interval while the flood gets going
                start = time.monotonic()
                async with asyncio.timeout(10):
                    async with phone.request("PROPFIND", url, headers={
                            "Authorization": _basic("alice", "correct horse"), "Depth": "0"}) as r:
                        status = r.status
                took = time.monotonic() - start
            finally:
                stop.set()
                await asyncio.gather(*tasks, return_exceptions=True)
    finally:
        await runner.cleanup()
        bridge.close()
    print(f"fresh valid login under 60 guessing loops: {took:.2f} s; guesses answered {statuses}")
    assert status == 207
    assert 5 * statuses.get(401, 0) < statuses.get(429, 0), statuses  # most guesses never reach bcrypt
    bridge.replace_app(app)
    assert bridge.is_known_good(_basic("alice", "correct horse"))


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _fail(t: AddressThrottle, address: str, n: int) -> None:
    for _ in range(n):
        t.begin(address)
        t.end(address, failed=True, succeeded=False)


def test_failures_are_forgotten_only_after_more_than_forget_s():
    """Five failures at t=0. At exactly FORGET_S they still count (one more makes six: 4 s); past it they are
    forgotten (three more make three: no wait)."""
    clock = Clock()
    t = AddressThrottle(clock)
    _fail(t, "a", 5)
    clock.now = throttle.FORGET_S
    assert t.retry_after("a") == 0.0
    _fail(t, "a", 1)
    assert t.retry_after("a") == 4.0
    clock.now = 2 * throttle.FORGET_S + 1
    assert t.retry_after("a") == 0.0
    _fail(t, "a", 3)
    assert t.retry_after("a") == 0.0


def test_retry_after_is_the_backoff_left_then_the_in_flight_limit():
    """Four failures at t=0 (1 s backoff): at 0.5 s, 0.5 s are left; at exactly 1 s with two requests in
    flight the in-flight limit answers (1 s), and with one ending, nothing."""
    clock = Clock()
    t = AddressThrottle(clock)
    _fail(t, "a", 4)
    clock.now = 0.5
    assert t.retry_after("a") == 0.5
    clock.now = 1.0
    t.begin("a")
    t.begin("a")
    assert t.retry_after("a") == 1.0
    t.end("a", failed=False, succeeded=False)
    assert t.retry_after("a") == 0.0


def test_one_request_ending_frees_one_slot():
    t = AddressThrottle(Clock())
    for _ in range(3):
        t.begin("a")
    t.end("a", failed=False, succeeded=False)
    assert t.retry_after("a") == 1.0          # two still in flight


def test_a_success_between_failures_resets_the_count_to_zero():
    t = AddressThrottle(Clock())
    for _ in range(3):
        t.begin("a")
    t.end("a", failed=True, succeeded=False)
    t.end("a", failed=False, succeeded=True)
    t.end("a", failed=True, succeeded=False)
    _fail(t, "a", 3)
    assert t.retry_after("a") == 1.0          # 1 + 3 failures since the success: the first step of the backoff


def test_addresses_are_pruned_only_when_the_table_is_full(monkeypatch):
    """MAX_TRACKED = 3: an old failed address stays while there is room; once the table is full, a new
    address prunes it (not one with a request in flight)."""
    monkeypatch.setattr(throttle, "MAX_TRACKED", 3)
    clock = Clock()
    t = AddressThrottle(clock)
    _fail(t, "old", 1)
    clock.now = throttle.FORGET_S + 1
    t.begin("busy")
    assert set(t._sources) == {"old", "busy"}
    t.begin("third")
    assert set(t._sources) == {"old", "busy", "third"}
    t.begin("fourth")
    assert set(t._sources) == {"busy", "third", "fourth"}


def test_a_full_table_keeps_addresses_whose_failures_are_recent_or_exactly_forget_s_old(monkeypatch):
    """MAX_TRACKED = 3, on a clock far from zero: one address failed exactly FORGET_S ago, one just now. A new
    address finds the table full and prunes, but neither is forgotten yet (forgetting needs *more* than
    FORGET_S), so all four are tracked and the recent one still has its failure."""
    monkeypatch.setattr(throttle, "MAX_TRACKED", 3)
    clock = Clock()
    t = AddressThrottle(clock)
    clock.now = 1000.0
    _fail(t, "edge", 1)
    clock.now = 1000.0 + throttle.FORGET_S
    _fail(t, "recent", 1)
    t.begin("busy")
    t.begin("fourth")
    assert set(t._sources) == {"edge", "recent", "busy", "fourth"}
    assert t._sources["recent"].failures == 1
