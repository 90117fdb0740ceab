"""The link watcher wired into the Tunnel, against the in-process asyncssh relay of test_tunnel: a changed
path is probed (a real keepalive request), an answer keeps the link, no answer reconnects now with the
reason in status; a change elsewhere is ignored; a burst of changes gives a bounded number of checks; a
resume is probed; a change while the link is down retries at once. The path state is injected (the kernel
side is covered by tests/test_netwatch.py and the namespace tests in integration/)."""

from __future__ import annotations

import asyncio
import logging
import time

import asyncssh
import pytest

from inverse_cloud.config import loads
from inverse_cloud.tunnel import link as tunnel_mod
from inverse_cloud.tunnel import watcher as watcher_mod
from inverse_cloud.tunnel.link import Tunnel
from inverse_cloud.tunnel.netwatch import CheckBudget, PathState, Route
from inverse_cloud.tunnel.watcher import LinkWatcher
from tests.support import free_port
from tests.test_tunnel import EchoTarget, FakeRelay, _write_key, started, tunnel_lines, wait_for

ROUTE = Route(oif=1, gateway=None, prefsrc="127.0.0.1")
OTHER = Route(oif=7, gateway="10.0.0.1", prefsrc="10.0.0.2")


class FakePath:
    """The path state the watcher reads: ``state`` is returned for every read; ``reads`` counts them."""

    def __init__(self) -> None:
        self.state = PathState(local_present=True, route=ROUTE)
        self.reads = 0

    async def __call__(self, local: str, relay: str) -> PathState:
        assert local == relay == "127.0.0.1"
        self.reads += 1
        return self.state


@pytest.fixture
async def rig(tmp_path):
    host_key = asyncssh.generate_private_key("ssh-ed25519")
    tun, tko = asyncssh.generate_private_key("ssh-ed25519"), asyncssh.generate_private_key("ssh-ed25519")
    _write_key(tmp_path / "tun", tun)
    _write_key(tmp_path / "tko", tko)
    relay = FakeRelay(host_key, [tun, tko])
    await relay.start()
    target = EchoTarget()
    await target.start()

    def make(watcher: LinkWatcher, port: int | None = None) -> Tunnel:
        values = dict(host="127.0.0.1", port=port or relay.port, user="ictunnel", key_file=str(tmp_path / "tun"),
                      takeover_key_file=str(tmp_path / "tko"),
                      host_key=host_key.export_public_key().decode().strip(),
                      https_port=free_port(), http_port=free_port(), keepalive_interval_s=30,
                      keepalive_count_max=3, connect_timeout_s=5)
        relay_toml = "\n".join(f"{k} = {v!r}".replace("'", '"') for k, v in values.items())
        cfg = loads(f'[server]\ndomain = "laptop.test"\ndata_dir = "{tmp_path}/data"\n'
                    f'state_dir = "{tmp_path}/state"\n[relay]\n{relay_toml}\n', tmp_path / "config.toml")
        return Tunnel(cfg, target, watcher=watcher)

    yield make, relay
    await relay.aclose()
    await target.aclose()


def watcher_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "inverse_cloud.tunnel.watcher"
            and r.levelno >= logging.INFO]


async def up_with_baseline(t: Tunnel, path: FakePath) -> None:
    await wait_for(lambda: t.state == "up" and path.reads >= 1, what="up, baseline read")


async def test_changed_path_that_still_answers_keeps_the_link(rig, caplog):
    """The route to the relay changes; the probe (a real keepalive request to the relay) is answered: one
    INFO line 'route to the relay changed (...); the relay still answers: link kept', no reconnect."""
    caplog.set_level(logging.INFO)
    make, _ = rig
    path = FakePath()
    w = LinkWatcher(netlink=False, read_state=path)
    async with started(make(w)) as t:
        await up_with_baseline(t, path)
        path.state = PathState(True, OTHER)
        w.changed()
        await wait_for(lambda: any("link kept" in m for m in watcher_lines(caplog)), what="probe answered")
        assert w.probes == 1 and t.connections == 1 and t.state == "up"
        assert "route to the relay changed" in watcher_lines(caplog)[0]
        assert t.status()["last_reconnect"] is None


async def test_local_address_gone_reconnects_now_without_a_probe(rig, caplog, monkeypatch):
    """The connection's local address is gone: nothing can reach that connection any more, so the tunnel
    reconnects at once without spending the probe's deadline (INFO 'reconnecting now (local address
    127.0.0.1 gone: ...)', no probe sent, no 'relay link lost' warning), and status names 'address change'
    as the last reconnect's reason."""
    caplog.set_level(logging.INFO)

    async def must_not_probe(conn, timeout_s):
        raise AssertionError("probed a connection whose local address is gone")

    monkeypatch.setattr(watcher_mod, "probe", must_not_probe)
    make, _ = rig
    path = FakePath()
    w = LinkWatcher(netlink=False, read_state=path)
    async with started(make(w)) as t:
        await up_with_baseline(t, path)
        path.state = PathState(False, ROUTE)
        w.changed()
        await wait_for(lambda: t.connections == 2 and t.state == "up", what="reconnected")
        lines = tunnel_lines(caplog)
        assert sum("reconnecting now (local address 127.0.0.1 gone: " in m for m in lines) == 1, lines
        assert not any("relay link lost" in m for m in lines)
        assert w.probes == 0
        assert t.status()["last_reconnect"]["reason"] == "address change"
        assert len(t.status()["reconnects"]) == 1


async def test_changed_route_without_answer_reconnects_now_with_the_reason(rig, caplog, monkeypatch):
    """The route to the relay changes (the address stays) and the probe gets no answer: the tunnel
    reconnects at once ('reconnecting now (route to the relay changed (...); no answer to a probe within
    1 s)'), and status names 'route change'."""
    caplog.set_level(logging.INFO)

    async def dead(conn, timeout_s):
        return False

    monkeypatch.setattr(watcher_mod, "probe", dead)
    make, _ = rig
    path = FakePath()
    w = LinkWatcher(netlink=False, read_state=path)
    async with started(make(w)) as t:
        await up_with_baseline(t, path)
        path.state = PathState(True, OTHER)
        w.changed()
        await wait_for(lambda: t.connections == 2 and t.state == "up", what="reconnected")
        lines = tunnel_lines(caplog)
        assert sum("no answer to a probe within 1 s)" in m and "route to the relay changed" in m
                   for m in lines) == 1, lines
        assert w.probes == 1
        assert t.status()["last_reconnect"]["reason"] == "route change"


async def test_change_elsewhere_is_ignored(rig, monkeypatch):
    """A netlink change that leaves the connection's address and route as they were: the state is read,
    nothing is probed, the link stays."""
    async def must_not_probe(conn, timeout_s):
        raise AssertionError("probed a path that did not change")

    monkeypatch.setattr(watcher_mod, "probe", must_not_probe)
    make, _ = rig
    path = FakePath()
    w = LinkWatcher(netlink=False, read_state=path)
    async with started(make(w)) as t:
        await up_with_baseline(t, path)
        w.changed()
        await wait_for(lambda: w.checks == 1, what="the check")
        assert w.probes == 0 and t.connections == 1 and t.state == "up"


async def test_flapping_changes_give_bounded_checks_and_a_working_link(rig, monkeypatch):
    """Ten changes 0.25 s apart (a flapping Wi-Fi), each leaving a different path, every probe unanswered:
    checks (and so reconnects) stay within the budget's burst plus one per refill interval of elapsed
    time (without the budget each change would get its own check), a check follows the last change, and
    the link is up at the end."""
    async def dead(conn, timeout_s):
        return False

    monkeypatch.setattr(watcher_mod, "probe", dead)
    make, _ = rig
    path = FakePath()
    budget = CheckBudget(burst=2, refill_s=1.0, tokens=2.0)
    w = LinkWatcher(netlink=False, read_state=path, budget=budget)
    async with started(make(w)) as t:
        await up_with_baseline(t, path)
        t0 = time.monotonic()
        for i in range(10):
            path.state = PathState(True, Route(oif=i + 2, gateway=None, prefsrc="127.0.0.1"))
            w.changed()
            await asyncio.sleep(0.25)          # the flapping pace, not a wait for a condition
        reads_after_flaps = path.reads
        await wait_for(lambda: not w._event.is_set() and path.reads > reads_after_flaps and t.state == "up",
                       what="the check after the last change, link up")
        elapsed = time.monotonic() - t0
        assert w.checks <= budget.burst + elapsed / budget.refill_s + 1, (w.checks, elapsed)
        assert 1 <= t.connections - 1 <= w.checks
        assert t.state == "up"


async def test_resume_is_probed(rig, caplog):
    """The boot-time clock jumps 60 s ahead of the monotonic one (a suspend): the watcher probes the link;
    the relay answers, so it stays: 'resumed from suspend (or the process was frozen); ... link kept'."""
    caplog.set_level(logging.INFO)
    make, _ = rig
    path = FakePath()
    jump = [0.0]
    w = LinkWatcher(netlink=False, read_state=path, tick_s=0.05, boottime=lambda: time.monotonic() + jump[0])
    async with started(make(w)) as t:
        await up_with_baseline(t, path)
        jump[0] = 60.0
        await wait_for(lambda: any("resumed from suspend" in m and "link kept" in m for m in watcher_lines(caplog)),
                       what="resume probe")
        assert w.probes == 1 and t.connections == 1


async def test_change_while_down_retries_at_once(rig, caplog, monkeypatch):
    """No relay listening and a 60 s backoff: a network change makes the tunnel try again now (INFO
    'retrying now (network change)') instead of waiting out the backoff."""
    caplog.set_level(logging.INFO)
    monkeypatch.setattr(tunnel_mod, "retry_delay", lambda attempt, kind, rand: 60.0)
    make, _ = rig
    w = LinkWatcher(netlink=False, read_state=FakePath())
    async with started(make(w, port=free_port())) as t:
        await wait_for(lambda: t.attempts == 1 and t.state == "down", what="first attempt failed")
        w.changed()
        await wait_for(lambda: t.attempts == 2, what="second attempt")
        assert any("retrying now (network change)" in m for m in tunnel_lines(caplog))


async def test_netlink_watch_starts_and_stops(rig):
    """With netlink on (the default), the watcher subscribes on start (status shows network_watch.netlink true)
    and closes its socket on aclose."""
    make, _ = rig
    w = LinkWatcher()
    t = make(w)
    async with started(t):
        await wait_for(lambda: t.state == "up", what="up")
        assert t.status()["network_watch"] == {"netlink": True, "checks": 0, "probes": 0}
    assert w.watching is False


async def test_probe_answered_by_a_live_relay_not_by_a_closed_connection(rig):
    """probe(): a real keepalive request to the relay counts as answered; once the relay has closed the
    connection, asyncssh 'answers' pending and new requests itself: that is no answer."""
    make, relay = rig
    async with started(make(LinkWatcher(netlink=False, read_state=FakePath()))) as t:
        await wait_for(lambda: t.state == "up", what="up")
        conn = t._conn
        assert conn is not None and await watcher_mod.probe(conn, 5.0) is True
        relay.conns[-1].close()
        await wait_for(conn.is_closed, what="closed by the relay")
        assert await watcher_mod.probe(conn, 5.0) is False
