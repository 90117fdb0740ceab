"""The link watcher on a real path: `inverse-cloud serve` in the laptop's network namespace (integration/netns.py),
joined by a veth pair to a real sshd relay (relay-setup's config) in a private namespace, product defaults
(keepalive 5 s x 3, relay ClientAlive 15 s x 3), a phone connecting to the relay's forwarded HTTPS port
every 0.5 s. Each test changes the laptop's network and checks what the server did: reconnected (and why,
from `status --json` and the log) or kept the link, and that a PROPFIND through the relay works afterwards.
Timings are printed, never asserted.

The relay user (``nmtunnel``) is this file's own: a takeover ends every other session of the tunnel user on
the machine, which must not hit another test's relay. It is removed at the end of the module.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from netns import LaptopNetns, laptop_netns
from relay_sandbox import private_netns
from relay_sshd import RelaySshd, configure, relay_sshd, sshd_available
from test_tunnel_faults import Phone, propfind, ssh_peers, tunnel_lines

from inverse_cloud.tunnel.netwatch import CHECK_BURST, CHECK_REFILL_S
from tests.support import ServeProcess, free_port, init_instance, wait_until

USER = "nmtunnel"
RELAY_ADDRESS, ADDRESS_A, ADDRESS_B = "10.99.7.1", "10.99.7.3", "10.99.7.4"


@pytest.fixture(scope="module", autouse=True)
def _relay_user() -> Iterator[None]:
    yield
    subprocess.run(["userdel", USER], capture_output=True, check=False, timeout=30)


def status(cfg: Path) -> dict:
    """The running server's status document (`inverse-cloud status --json`; the control socket is a path,
    reachable from any network namespace)."""
    out = subprocess.run([sys.executable, "-m", "inverse_cloud.cli", "status", "--json", "--config", str(cfg)],
                         capture_output=True, text=True, timeout=30, check=False)
    return json.loads(out.stdout)


def watcher_lines(srv: ServeProcess) -> list[str]:
    return [line for line in srv.log().splitlines() if "inverse_cloud.tunnel.watcher" in line]


@contextlib.contextmanager
def world(tmp_path: Path) -> Iterator[tuple[LaptopNetns, Path, RelaySshd, ServeProcess]]:
    """Relay side in a private namespace, the laptop (address A) in its own; serve up, both forwards bound,
    a PROPFIND through the relay working, the link watcher subscribed."""
    missing = sshd_available()
    assert missing is None, missing
    for tool in ("ip", "ss", "curl"):
        assert shutil.which(tool), f"{tool} missing: apt-get install -y iproute2 curl"
    with private_netns(), laptop_netns(RELAY_ADDRESS, ADDRESS_A, name_prefix="nm-laptop") as laptop:
        cfg = init_instance(tmp_path / "ic", relay=f"{USER}@{RELAY_ADDRESS}:{free_port()}")
        configure(cfg, "relay", connect_timeout_s=3)     # keepalive: the product default (5 s x 3)
        with relay_sshd(cfg, user=USER, client_alive_interval=15, client_alive_count_max=3,
                        listen_address=RELAY_ADDRESS) as relay, \
                ServeProcess(cfg, prefix=laptop.exec_prefix, ready_probe=laptop.tls_handshake_ok) as srv:
            relay.wait_forwards(30, on_timeout=lambda: dump(srv, relay))
            assert propfind(relay.https_port), dump(srv, relay)
            assert status(cfg)["tunnel"]["network_watch"]["netlink"] is True, dump(srv, relay)
            yield laptop, cfg, relay, srv


def dump(srv: ServeProcess, relay: RelaySshd) -> str:
    return srv.log()[-5000:] + "\n--- sshd ---\n" + relay.log()[-3000:]


def sync_works(srv: ServeProcess, relay: RelaySshd, what: str, t0: float) -> float:
    wait_until(lambda: propfind(relay.https_port), 40, f"a PROPFIND through the relay after {what}",
               interval_s=0.2, on_timeout=lambda: dump(srv, relay))
    took = time.monotonic() - t0
    print(f"\n[netwatch] {what}: PROPFIND through the relay works {took:.2f} s after the change")
    return took


@pytest.mark.slow
def test_address_change_reconnects_at_once(tmp_path):
    """While a phone polls, the laptop loses address A, gets B and a new default route. Expected: the
    watcher sees A gone (nothing can reach the connection any more: no probe), and the tunnel reconnects now
    from B ('reconnecting now (local address A gone: the connection cannot outlive it)'), without waiting for
    keepalives (no 'relay link lost (no answer to keepalives)' line); the relay's stale session is taken
    over; status names 'address change' as the last reconnect's reason; a PROPFIND through the relay and
    the phone work again."""
    with world(tmp_path) as (laptop, cfg, relay, srv):
        laptop.ip("route", "add", "default", "via", RELAY_ADDRESS)
        seen = len(tunnel_lines(srv))
        with Phone(relay.https_port) as phone:
            before = phone.counts()
            t0 = time.monotonic()
            laptop.change_address(ADDRESS_A, ADDRESS_B)
            laptop.ip("route", "replace", "default", "via", RELAY_ADDRESS)
            sync_works(srv, relay, "address change", t0)
            wait_until(lambda: phone.counts()[0] > before[0], 15, "the phone getting through again",
                       on_timeout=lambda: str(phone.counts()))
        new = tunnel_lines(srv)[seen:]
        print("[netwatch] log:\n  " + "\n  ".join(new))
        assert any(f"reconnecting now (local address {ADDRESS_A} gone: the connection cannot outlive it)" in line
                   for line in new), dump(srv, relay)
        assert not any("relay link lost" in line for line in new), new
        assert ADDRESS_B in ssh_peers(relay)
        tunnel = status(cfg)["tunnel"]
        assert tunnel["last_reconnect"]["reason"] == "address change", tunnel
        assert len(tunnel["reconnects"]) == 1, tunnel
        assert not any(" ERROR inverse_cloud" in line for line in new), new
        assert "Traceback" not in srv.log(), srv.log()[-4000:]


@pytest.mark.slow
def test_change_elsewhere_keeps_the_link(tmp_path):
    """A new interface (a veth pair) with its own address and a route to another network appear on the
    laptop, and a route to a third network is added via the relay's gateway: none of it changes the
    connection's address or the route to the relay. Expected: the watcher checks (status counts it) but
    sends no probe, the tunnel does not reconnect, the relay keeps the same session, and a PROPFIND through
    the relay works."""
    with world(tmp_path) as (laptop, cfg, relay, srv):
        holders = relay.holders()
        checks = status(cfg)["tunnel"]["network_watch"]["checks"]
        laptop.ip("link", "add", "nmside0", "type", "veth", "peer", "name", "nmside1")   # no dummy module here
        laptop.ip("addr", "add", "10.98.0.1/24", "dev", "nmside0")
        laptop.ip("link", "set", "nmside1", "up")
        laptop.ip("link", "set", "nmside0", "up")
        laptop.ip("route", "add", "10.55.0.0/24", "via", "10.98.0.254")
        laptop.ip("route", "add", "10.56.0.0/24", "via", RELAY_ADDRESS)
        wait_until(lambda: status(cfg)["tunnel"]["network_watch"]["checks"] > checks, 20, "the watcher's check",
                   interval_s=0.2, on_timeout=lambda: dump(srv, relay))
        assert propfind(relay.https_port), dump(srv, relay)
        tunnel = status(cfg)["tunnel"]
        assert tunnel["network_watch"]["probes"] == 0, tunnel
        assert tunnel["reconnects"] == [] and tunnel["last_reconnect"] is None, tunnel
        assert relay.holders() == holders
        assert not any("reconnecting now" in line for line in tunnel_lines(srv))


@pytest.mark.slow
@pytest.mark.parametrize("flap", ["link", "address"])
def test_flapping_network_gives_bounded_reconnects_and_a_working_tunnel(tmp_path, flap):
    """A flapping Wi-Fi while a phone polls: 10 flaps in 5 s, either the laptop's interface going down and
    up (link: the address stays, so the connection may survive), or the laptop's address replaced by a new
    one each time (address: roaming between access points; each flap kills the current connection's path).
    Expected: the number of reconnects stays within the watcher's check budget (a burst of CHECK_BURST, then
    one per CHECK_REFILL_S, plus the check after the last flap), the tunnel is up at the end from the final
    address, a PROPFIND through the relay and the phone work; no ERROR line, no traceback."""
    with world(tmp_path) as (laptop, cfg, relay, srv):
        with Phone(relay.https_port) as phone:
            t0 = time.monotonic()
            for i in range(10):
                if flap == "link":
                    laptop.ip("link", "set", laptop.laptop_if, "down")
                    time.sleep(0.25)            # the flapping itself, not a wait for a condition
                    laptop.ip("link", "set", laptop.laptop_if, "up")
                    time.sleep(0.25)            # the flapping pace
                else:
                    laptop.change_address(laptop.address, f"10.99.7.{4 + i}")   # a new one each time
                    time.sleep(0.5)             # the flapping pace, not a wait for a condition
            flapped_s = time.monotonic() - t0
            print(f"\n[netwatch] 10 {flap} flaps took {flapped_s:.2f} s")
            after_flaps = phone.counts()
            sync_works(srv, relay, f"the last {flap} flap", time.monotonic())
            wait_until(lambda: status(cfg)["tunnel"]["state"] == "up", 30, "tunnel up",
                       on_timeout=lambda: dump(srv, relay))
            wait_until(lambda: phone.counts()[0] > after_flaps[0], 15, "the phone getting through",
                       on_timeout=lambda: str(phone.counts()))
        tunnel = status(cfg)["tunnel"]
        bound = CHECK_BURST + math.ceil(flapped_s / CHECK_REFILL_S) + 1
        print(f"[netwatch] {flap} flapping: {len(tunnel['reconnects'])} reconnect(s) (bound {bound}), watcher "
              f"{tunnel['network_watch']}, last reconnect {tunnel['last_reconnect']}")
        print("[netwatch] log:\n  " + "\n  ".join(tunnel_lines(srv) + watcher_lines(srv)))
        assert len(tunnel["reconnects"]) <= bound, tunnel
        assert laptop.address in ssh_peers(relay), (laptop.address, ssh_peers(relay))
        assert not any(" ERROR inverse_cloud" in line for line in srv.log().splitlines()), srv.log()[-4000:]
        assert "Traceback" not in srv.log(), srv.log()[-4000:]


OUTAGE_S = 20.0
FREEZE_S = 60.0


@pytest.mark.slow
def test_outage_reconnects_when_the_network_is_back(tmp_path):
    """While a phone polls, the laptop's interface goes down for 20 s (the route to the relay goes with it),
    then comes back with its default route. Expected: the watcher sees the route gone and probes (no answer:
    'reconnecting now (no route to the relay; ...)'), retries fail while the network is down, and when it is
    back the network change makes the tunnel retry at once ('retrying now (network change)') instead of
    waiting out its backoff; never 'relay link lost (no answer to keepalives)'; status names 'route change';
    a PROPFIND through the relay and the phone work again."""
    with world(tmp_path) as (laptop, cfg, relay, srv):
        laptop.ip("route", "add", "default", "via", RELAY_ADDRESS)
        seen = len(tunnel_lines(srv))
        with Phone(relay.https_port) as phone:
            laptop.ip("link", "set", laptop.laptop_if, "down")
            time.sleep(OUTAGE_S)                  # the outage itself, not a wait for a condition
            mark = len(tunnel_lines(srv))
            t0 = time.monotonic()
            laptop.ip("link", "set", laptop.laptop_if, "up")
            laptop.ip("route", "replace", "default", "via", RELAY_ADDRESS)
            sync_works(srv, relay, "a 20 s outage", t0)
            after = phone.counts()
            wait_until(lambda: phone.counts()[0] > after[0], 15, "the phone getting through again",
                       on_timeout=lambda: str(phone.counts()))
        new = tunnel_lines(srv)[seen:]
        print("[netwatch] log:\n  " + "\n  ".join(new))
        assert any("reconnecting now (no route to the relay" in line for line in new), dump(srv, relay)
        assert any("retrying now (network change)" in line for line in tunnel_lines(srv)[mark:]), dump(srv, relay)
        assert not any("no answer to keepalives" in line for line in new), new
        tunnel = status(cfg)["tunnel"]
        assert tunnel["state"] == "up" and tunnel["last_reconnect"]["reason"] == "route change", tunnel
        assert "Traceback" not in srv.log(), srv.log()[-4000:]


@pytest.mark.slow
def test_freeze_is_noticed_on_resume_and_the_link_kept(tmp_path):
    """While a phone keeps connecting to the relay's port, serve is stopped (SIGSTOP) for 60 s, as in a
    suspend, then resumed. The monotonic clock ran on, so only the watcher's tick running far late shows the
    freeze. Expected: on resume the watcher probes the link at once ('resumed from suspend (or the process
    was frozen); the relay still answers: link kept'), no reconnect (the relay kept the session: ClientAlive
    never fires while something connects to its port), the backlog of channels the relay opened meanwhile
    is worked off (at most one refusal line for it), and a PROPFIND through the relay and the phone work."""
    with world(tmp_path) as (laptop, cfg, relay, srv):
        holders = relay.holders()
        mark = len(srv.log().splitlines())
        with Phone(relay.https_port) as phone:
            srv.signal(signal.SIGSTOP)
            try:
                time.sleep(FREEZE_S)              # the freeze itself, not a wait for a condition
            finally:
                srv.signal(signal.SIGCONT)
            t0 = time.monotonic()
            wait_until(lambda: any("the relay still answers: link kept" in line for line in watcher_lines(srv)),
                       30, "the watcher's probe after the freeze", on_timeout=lambda: dump(srv, relay))
            sync_works(srv, relay, "a 60 s freeze", t0)
            after = phone.counts()
            wait_until(lambda: phone.counts()[0] > after[0], 15, "the phone getting through again",
                       on_timeout=lambda: str(phone.counts()))
        new = srv.log().splitlines()[mark:]
        print("[netwatch] log:\n  " + "\n  ".join(line for line in new if "aiohttp.access" not in line))
        tunnel = status(cfg)["tunnel"]
        assert tunnel["reconnects"] == [] and tunnel["network_watch"]["probes"] >= 1, tunnel
        assert relay.holders() == holders
        assert sum("refusing tunnel connections" in line for line in new) <= 1, new
        assert not any(" ERROR " in line for line in new), new
        assert "Traceback" not in srv.log(), srv.log()[-4000:]


@pytest.mark.slow
def test_relay_sshd_restart_reconnects(tmp_path):
    """The relay's sshd is restarted (its listener and every session). Expected: the tunnel sees the relay
    close the connection, reconnects at once (the link had been up), status names 'relay closed', and a
    PROPFIND through the relay works."""
    with world(tmp_path) as (_laptop, cfg, relay, srv):
        t0 = time.monotonic()
        relay.restart()
        wait_until(lambda: status(cfg)["tunnel"]["reconnects"], 40, "a reconnect", interval_s=0.2,
                   on_timeout=lambda: dump(srv, relay))
        sync_works(srv, relay, "an sshd restart", t0)
        tunnel = status(cfg)["tunnel"]
        assert tunnel["last_reconnect"]["reason"] == "relay closed", tunnel
        assert "Traceback" not in srv.log(), srv.log()[-4000:]
