"""Descriptor exhaustion through a real OpenSSH relay, in the test world (integration/world.py): an attacker on
the internet holds 2,000 idle TCP connections to the relay's public 443, renewing each one as it is closed,
while a legitimate phone from another address syncs through the same public address.

Every hop is the real one: the relay's sshd (Debian's stock config plus what relay-setup's setup.sh adds)
and its DNAT of 443 onto the tunnel's forwarded port, the laptop behind its NAT router reaching the relay by
name, the phone's curl resolving the domain through the world's DNS. Each connection the relay accepts
becomes a channel to the laptop; the laptop's channel admission (tunnel/admission.py: 32 per relay-seen
address, ``max_connections`` in all) refuses the rest before a descriptor is spent.

What is asserted is behaviour and bounds, never a timing: the phone's PROPFIND and PUT on new connections
answer during the attack (polled with a generous deadline; the seconds are printed), the laptop's descriptor
count stays under a bound derived from the caps, the log stays under a bound derived from its rate limits,
and right after the attack the next request succeeds at its first try with no 'Too many open files' line.
With the admission cap disabled (admit() always True) this test fails: the attacker held all 2,000, the
laptop reached 4,017 descriptors (from 16) and the phone's syncs took up to 8 s; with the cap the attacker
never holds more than a few hundred at once (each refused channel closes its connection at the relay).

The relay side is set up as ``relay-setup --apply`` does it (its setup.sh, run as root on the relay) for the
default tunnel login; the laptop's key and host-key pin come from relay-setup itself. What the test adds to
the world (the A record, the attacker's second address on the phone host) is removed at the end.
"""

from __future__ import annotations

import contextlib
import errno
import math
import os
import re
import selectors
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from relay_sshd import configure
from world import DOMAIN, HOSTS, RELAY_NAME

from inverse_cloud.log import RepeatLimiter
from inverse_cloud.tunnel.admission import PER_ADDRESS_CHANNELS, WARN_INTERVAL_S
from tests.support import init_instance, wait_until

PASSWORD = "correct horse"
ATTACKER = "198.51.100.31"          # a second address on the phone host's link: the attacker's
CONNECTIONS = 2000
ATTACK_S = 40.0                     # how long the attack is held
RENEW_PER_S = 200                   # the attacker's reconnect pace (a bound, so that 2 cores stay usable)
REPO = Path(__file__).resolve().parent.parent


class Attacker:
    """``CONNECTIONS`` idle TCP connections to ``target`` from ``source``, in a thread inside the phone
    host's network namespace; each one closed by the far side is opened again (at most RENEW_PER_S a
    second). Nothing is ever sent on them."""

    def __init__(self, world, source: str, target: tuple[str, int]) -> None:
        self.world, self.source, self.target = world, source, target
        self.stop = threading.Event()
        self.opened = self.closed = self.failed = 0
        self.peak = 0
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._in_namespace, name="attacker", daemon=True)

    def __enter__(self) -> Attacker:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self._thread.join(60)
        assert not self._thread.is_alive(), "the attacker thread did not stop"

    def _in_namespace(self) -> None:
        try:
            self.world.call("phone", self._run)
        except BaseException as exc:  # reported by the test
            self.error = exc

    def _open(self, sel: selectors.DefaultSelector) -> None:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setblocking(False)
        s.bind((self.source, 0))
        rc = s.connect_ex(self.target)
        if rc not in (0, errno.EINPROGRESS):
            s.close()
            self.failed += 1
            return
        sel.register(s, selectors.EVENT_READ)
        self.opened += 1

    def _run(self) -> None:
        sel = selectors.DefaultSelector()
        budget, last = float(RENEW_PER_S), time.monotonic()
        try:
            while not self.stop.is_set():
                now = time.monotonic()
                budget = min(float(RENEW_PER_S), budget + (now - last) * RENEW_PER_S)
                last = now
                while len(sel.get_map()) < CONNECTIONS and budget >= 1:
                    self._open(sel)
                    budget -= 1
                self.peak = max(self.peak, len(sel.get_map()))
                for key, _ in sel.select(timeout=0.05):
                    s = key.fileobj
                    assert isinstance(s, socket.socket)
                    try:
                        data = s.recv(4096)
                    except OSError:
                        data = b""
                    if not data:                  # closed (or reset) by the far side: renew it
                        sel.unregister(s)
                        s.close()
                        self.closed += 1
        finally:
            for key in list(sel.get_map().values()):
                key.fileobj.close()  # type: ignore[union-attr]
            sel.close()


def curl(world, *args: str, max_time: float = 20) -> tuple[str, float]:
    """curl on the phone host, through the world's DNS to the relay's public 443; (HTTP code, seconds)."""
    out = world.run("phone", "curl", "-s", "-k", "-o", "/dev/null", "-w", "%{http_code} %{time_total}",
                    "--max-time", str(max_time), "-u", f"alice:{PASSWORD}", *args, timeout=max_time + 30)
    code, _, secs = out.stdout.strip().partition(" ")
    return code, float(secs or 0)


def propfind(world) -> tuple[str, float]:
    return curl(world, "-X", "PROPFIND", "-H", "Depth: 1", f"https://{DOMAIN}/radicale/alice/")


def put(world, uid: str, card_file: Path) -> tuple[str, float]:
    return curl(world, "-T", str(card_file), "-H", "Content-Type: text/vcard",
                f"https://{DOMAIN}/radicale/alice/contacts/{uid}.vcf")


def descriptors(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


# For bench/descriptors_bench.py's reference run only: serve with the tunnel's admission cap switched off
# (every channel admitted), as before the cap existed.
WITHOUT_CAP = ("import sys; from inverse_cloud.tunnel import admission; "
               "admission.ChannelAdmission.admit = lambda self, address: None; "
               "from inverse_cloud.cli import main; sys.exit(main(sys.argv[1:]))")


@contextlib.contextmanager
def laptop_serving(world, tmp_path: Path, *, wrap: tuple[str, ...] = (), cap: bool = True
                   ) -> Iterator[tuple[Path, subprocess.Popen[bytes], Path]]:
    """An instance on the laptop with its relay side applied on the relay (setup.sh as root), its domain
    published, serve running there (through ``wrap``, e.g. a ``prlimit`` command line; ``cap=False``: with
    the admission cap off); yields (config, serve's process, its log) once a PROPFIND through the relay's
    public address answers. Undone afterwards: serve stopped by pid, the A record removed."""
    cfg = init_instance(tmp_path / "ic", domain=DOMAIN, relay=f"inverse-cloud@{RELAY_NAME}")
    configure(cfg, "acme", enabled=False)       # the certificate is not what this test is about (curl -k)
    env = {"PYTHONPATH": str(REPO)}
    cli = ["env", *(f"{k}={v}" for k, v in env.items()), sys.executable, "-m", "inverse_cloud.cli"]
    bundle = tmp_path / "bundle"
    out = world.run("laptop", *cli, "relay-setup", "--config", str(cfg), "--output", str(bundle), "--yes",
                    timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    out = world.run("relay", "sh", "-s", input=(bundle / "setup.sh").read_text(), timeout=120)
    assert out.returncode == 0 and "relay ready" in out.stdout, out.stdout + out.stderr
    world.unpublish(f"{DOMAIN}.", "A", missing_ok=True)  # another test of the session's world may have left it
    world.publish([f"{DOMAIN}. A {HOSTS['relay'].address}"])
    log = tmp_path / "serve.log"
    serve = [*cli, "serve"] if cap else [*cli[:-2], "-c", WITHOUT_CAP, "serve"]
    proc = world.popen("woh-serve", "laptop", *wrap, *serve, "--config", str(cfg), log=log)
    try:
        wait_until(lambda: proc.poll() is None and propfind(world)[0] == "207", 120,
                   "a PROPFIND through the relay's public address", interval_s=0.5,
                   on_timeout=lambda: log.read_text(errors="replace")[-4000:])
        yield cfg, proc, log
    finally:
        world.stop("woh-serve")
        world.unpublish(f"{DOMAIN}.", "A")


def card(uid: str) -> str:
    return f"BEGIN:VCARD\r\nVERSION:3.0\r\nUID:{uid}\r\nFN:Contact {uid}\r\nN:{uid};;;;\r\nEND:VCARD\r\n"


@dataclass
class FloodResult:
    attack_s: float
    base_fds: int
    peak_fds: int
    syncs: list[tuple[str, str, float]]     # (method, HTTP code, seconds) on new connections, in order
    during: list[str]                        # log lines written during the attack
    first_after: tuple[str, float]
    later: tuple[str, float]
    after: list[str]                         # log lines from the first request after the attack on
    attacker: tuple[int, int, int, int]      # opened, closed by the far side, failed, held at most at once

    @property
    def access(self) -> list[str]:
        return [line for line in self.during if "aiohttp.access" in line]

    @property
    def other(self) -> list[str]:
        return [line for line in self.during if "aiohttp.access" not in line]

    def report(self) -> list[str]:
        secs = sorted(s for _, _, s in self.syncs)
        failed = sum(1 for _, c, _ in self.syncs if c not in ("207", "201", "204"))
        return [
            f"attacker: opened {self.attacker[0]}, closed by the far side {self.attacker[1]}, failed "
            f"{self.attacker[2]}, held at most {self.attacker[3]} at once, over {self.attack_s:.1f} s",
            f"laptop descriptors: {self.base_fds} before, at most {self.peak_fds} during the attack",
            f"phone syncs on new connections during the attack: {len(self.syncs)}, {failed} failed; seconds "
            f"p50 {secs[len(secs) // 2]:.2f}, max {secs[-1]:.2f}" if secs else "phone syncs: none",
            f"log lines during the attack: {len(self.during)} ({len(self.access)} access lines, "
            f"{len(self.other)} others: {len(self.other) / self.attack_s:.2f}/s)",
            f"after the attack: {self.first_after}, then {self.later}; 'Too many open files' lines after it: "
            f"{sum('Too many open files' in line for line in self.after)}",
        ]


def flood(world, proc: subprocess.Popen[bytes], log: Path, tmp_path: Path, attack_s: float = ATTACK_S
          ) -> FloodResult:
    """Run the attack against the serving laptop for ``attack_s`` while the phone syncs; see the test."""
    world.run("phone", "ip", "addr", "add", f"{ATTACKER}/24", "dev", "eth0", check=True)
    try:
        base_fds = descriptors(proc.pid)
        log_before = log.read_text(errors="replace").count("\n")
        syncs: list[tuple[str, str, float]] = []
        peak_fds = base_fds
        with Attacker(world, ATTACKER, (HOSTS["relay"].address, 443)) as attacker:
            t0 = time.monotonic()
            wait_until(lambda: attacker.error is not None or attacker.opened >= CONNECTIONS, 120,
                       "the attacker's first 2,000 connection attempts", interval_s=0.2)
            assert attacker.error is None, attacker.error
            n = 0
            while time.monotonic() - t0 < attack_s:
                peak_fds = max(peak_fds, descriptors(proc.pid))
                n += 1
                syncs.append(("PROPFIND", *propfind(world)))
                card_file = tmp_path / f"flood-{n}.vcf"
                card_file.write_text(card(f"flood-{n}"))
                syncs.append(("PUT", *put(world, f"flood-{n}", card_file)))
                peak_fds = max(peak_fds, descriptors(proc.pid))
            took = time.monotonic() - t0
            during = log.read_text(errors="replace").splitlines()[log_before:]
            stats = (attacker.opened, attacker.closed, attacker.failed, attacker.peak)
        assert attacker.error is None, attacker.error
        after_mark = log.read_text(errors="replace").count("\n")
        first_after = propfind(world)
        later = propfind(world)
        after = log.read_text(errors="replace").splitlines()[after_mark:]
    finally:
        world.run("phone", "ip", "addr", "del", f"{ATTACKER}/24", "dev", "eth0")
    return FloodResult(took, base_fds, peak_fds, syncs, during, first_after, later, after, stats)


@pytest.mark.slow
def test_idle_connection_flood_through_the_relay_leaves_phones_served(world, tmp_path):
    """An attacker (198.51.100.31) opens 2,000 idle connections to the relay's public 443 and renews each one
    as it is closed, for ATTACK_S. Meanwhile the phone (198.51.100.30) runs a PROPFIND and a PUT on new
    connections, through the domain's A record, again and again. Expected: every sync polled for during the
    attack gets through (207, 201) well within its deadline; the laptop's descriptors stay within its baseline
    plus two per admitted channel of both addresses (plus slack for the ACME, control and loopback sockets);
    the log during the attack holds no more than the rate-limited lines (the admission warning once per
    WARN_INTERVAL_S, asyncio's accept error once per RepeatLimiter interval) plus the phone's access lines and
    a few others; the serve process is alive. When the attacker lets go, the next PROPFIND succeeds at its
    first try and no 'Too many open files' line is logged from then on."""
    with laptop_serving(world, tmp_path) as (_cfg, proc, log):
        res = flood(world, proc, log, tmp_path)
        print("\n[fd flood] " + "\n[fd flood] ".join(res.report()))
        print("[fd flood] phone syncs: " + ", ".join(f"{m} {c} {s:.2f} s" for m, c, s in res.syncs))
        print("[fd flood] other lines:\n  " + "\n  ".join(res.other[:40]))
        assert proc.poll() is None, log.read_text(errors="replace")[-4000:]
    assert res.syncs and all(c in ("207", "201", "204") for _, c, _ in res.syncs), res.syncs
    # two descriptors per admitted channel, from both addresses, plus the relay link and spare sockets
    assert res.peak_fds <= res.base_fds + 2 * 2 * PER_ADDRESS_CHANNELS + 40, (res.base_fds, res.peak_fds)
    rate_limited = (math.ceil(res.attack_s / WARN_INTERVAL_S) + 1
                    + math.ceil(res.attack_s / RepeatLimiter().interval_s) + 1)
    assert len(res.other) <= rate_limited + 10, res.other[:60]
    assert len(res.access) <= len(res.syncs) + 2, res.access[-10:]
    assert res.first_after[0] == "207" and res.later[0] == "207", (res.first_after, res.later)
    assert not any("Too many open files" in line for line in res.after), res.after
    assert not any(re.search(r" (ERROR|CRITICAL) ", line) for line in res.during + res.after), res.during
