"""F12 end to end: ``inverse-cloud serve`` under real libfaketime (Debian's ``faketime`` package), its wall clock
jumped +100 days and then back to -2 days while Pebble (real time) issues its certificates and the tunnel to a
real sshd stays up.

How the clock is faked: ``LD_PRELOAD`` of libfaketimeMT.so.1 (the thread-safe build: serve reads the clock from
ACME, Radicale and TLS threads), ``FAKETIME_TIMESTAMP_FILE`` holding an offset ("+100d") that the test rewrites
atomically, ``FAKETIME_NO_CACHE=1`` so the next clock read sees it. ``FAKETIME_DONT_FAKE_MONOTONIC=1``: a real
clock jump (NTP step, ``date -s``, a wrong RTC after resume) moves CLOCK_REALTIME only. Faking CLOCK_MONOTONIC
too would model no real machine, and the manager's jump detector, which compares the two clocks, could not
see the jump. OpenSSL's certificate time checks in the process read the faked clock (``time()``).

Pebble's own HTTPS certificate (the ACME server's, checked by our ACME client under the faked clock) is made
valid from 10 days before to 200 days after now. This models a CA whose server certificate is valid at both
clock readings, so "CA permitting" means the CA answers. With the fixture's 2-day certificate every new TLS
connection to Pebble fails verification after the jump ("certificate has expired"), and whether an order
goes through depends on a keep-alive connection opened before it: that tests OpenSSL and connection reuse,
not the renewal logic.
"""

from __future__ import annotations

import datetime as dt
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from acme_support import DOMAIN, configure_acme, verified_serial, wait_issued
from cryptography import x509
from dav_helpers import DavClient
from pebble import PebbleCA
from relay_sandbox import private_netns
from relay_sshd import TEST_USER, configure, relay_sshd, sshd_available

from inverse_cloud.certs.manager import StateFiles
from inverse_cloud.config import load
from tests.support import ServeProcess, free_port, init_instance, wait_until

LIBFAKETIME_DIRS = ("/usr/lib/x86_64-linux-gnu/faketime", "/usr/lib/aarch64-linux-gnu/faketime",
                    "/usr/lib/faketime")
CHECKS = 8               # full checks (one per 2 s) each phase is watched for a renewal loop
VALIDITY_S = 6 * 3600    # Pebble's certificates: not due for renewal during the test at offset 0 or -2 d


def require_libfaketime() -> Path:
    """libfaketimeMT.so.1, or fail (never skip) with what to install."""
    for d in LIBFAKETIME_DIRS:
        lib = Path(d) / "libfaketimeMT.so.1"
        if lib.exists():
            return lib
    raise AssertionError(f"libfaketimeMT.so.1 not found in {LIBFAKETIME_DIRS}: apt-get install faketime")


# libfaketime 0.9.10 (Debian 12) with FAKETIME_DONT_FAKE_MONOTONIC=1 moves the absolute CLOCK_MONOTONIC deadline
# of clock_nanosleep(TIMER_ABSTIME) by the fake offset and passes a negative time to the kernel: EINVAL. Python
# >= 3.11's time.sleep() is exactly that call (libfaketime upstream issue #426; `strace` shows
# clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, {tv_sec=-1795602945, ...}) = -1 EINVAL). Relative waits
# (select, epoll, futex, which asyncio and threading use) are not affected. When the probe below finds the bug,
# the faked processes get this sitecustomize: time.sleep becomes an equivalent relative wait.
SLEEP_SHIM = '''"""F12 test shim (integration/test_clock_jump.py): time.sleep without clock_nanosleep(TIMER_ABSTIME)."""
import threading
import time


def _sleep(seconds):
    if seconds < 0:
        raise ValueError("sleep length must be non-negative")
    threading.Event().wait(seconds)


time.sleep = _sleep
'''


class FakeClock:
    """The wall clock of processes started with :meth:`env`: real time plus the offset in ``path``."""

    def __init__(self, path: Path) -> None:
        self.lib = require_libfaketime()
        self.path = path
        self.shim_dir: Path | None = None
        self.set("+0")
        probe = self.run_python("import time; time.sleep(0.01)")
        if probe.returncode != 0:
            assert "Invalid argument" in probe.stderr, f"python under libfaketime fails:\n{probe.stderr}"
            self.shim_dir = path.parent / "faketime-shim"
            self.shim_dir.mkdir(exist_ok=True)
            (self.shim_dir / "sitecustomize.py").write_text(SLEEP_SHIM)
            shimmed = self.run_python("import time; time.sleep(0.01)")
            assert shimmed.returncode == 0, shimmed.stderr
            print("\nlibfaketime: time.sleep() fails with EINVAL (clock_nanosleep TIMER_ABSTIME, libfaketime #426); "
                  "faked processes get a sitecustomize that sleeps with a relative wait")

    def set(self, offset: str) -> None:
        """Write the offset ("+100d", "-2d") atomically: a half-written file must never be read."""
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(offset + "\n")
        os.replace(tmp, self.path)

    def env(self) -> dict[str, str]:
        env = {"LD_PRELOAD": str(self.lib), "FAKETIME_TIMESTAMP_FILE": str(self.path), "FAKETIME_NO_CACHE": "1",
               "FAKETIME_DONT_FAKE_MONOTONIC": "1"}
        if self.shim_dir is not None:
            env["PYTHONPATH"] = os.pathsep.join(p for p in (str(self.shim_dir), os.environ.get("PYTHONPATH")) if p)
        return env

    def run_python(self, code: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False,
                              env={**os.environ, **self.env()})


def watch(checks: int, ca: PebbleCA, state: StateFiles, srv: ServeProcess, max_new_orders: int) -> tuple[int, int]:
    """Wait until the manager has finished ``checks`` more full checks (``last_check_at`` in its state file; one
    every 2 s of its wall clock, [acme] check_interval_s), or Pebble holds more than ``max_new_orders`` new
    orders (a renewal loop orders at every check). Returns (new orders, checks seen)."""
    orders0 = ca.orders()
    before = state.load_state().last_check_at
    seen: set[dt.datetime] = set()

    def done() -> bool:
        at = state.load_state().last_check_at
        if at is not None and at != before:
            seen.add(at)
        return len(seen) >= checks or ca.orders() - orders0 > max_new_orders

    wait_until(done, 2 * checks + 60, f"{checks} full checks by the certificate manager", interval_s=0.2,
               on_timeout=srv.log)
    return ca.orders() - orders0, len(seen)


def dav_ok(port: int, cafile: Path) -> int:
    """A PROPFIND through ``port`` on a fresh verified connection: the status and the served serial."""
    with DavClient(port, cafile) as dav:
        r = dav.request("PROPFIND", "/radicale/alice/", headers={"Depth": "0"})
        assert r.status == 207, (r.status, r.text[:300])
        return dav.peer_serial()


def cert_renew_force(cfg: Path, clock: FakeClock) -> subprocess.CompletedProcess[str]:
    """``cert renew --force`` on the same (faked) clock as the server: a clock jump moves every process."""
    return subprocess.run([sys.executable, "-m", "inverse_cloud.cli", "cert", "renew", "--force", "--config",
                           str(cfg)], capture_output=True, text=True, timeout=120, check=False,
                          env={**os.environ, **clock.env()})


def served_not_before(cert_dir: Path) -> dt.datetime:
    leaf = x509.load_pem_x509_certificates((cert_dir / "current" / "fullchain.pem").read_bytes())[0]
    return leaf.not_valid_before_utc


def since(t0: float) -> str:
    return f"{time.monotonic() - t0:.2f} s"


@pytest.mark.slow
def test_clock_jumps_under_libfaketime(tmp_path: Path) -> None:
    """1. Offset 0: serve (under libfaketime, tunnel to a real sshd up) obtains a certificate from Pebble; a
       verified handshake (the test's clock is real) presents it; DAV works through the relay.
    2. +100 days: the manager logs the jump, then "certificate expired according to the local clock" and
       orders at once. Pebble issues on real time, so the new certificate is also expired for the process:
       it is served (clients on real time accept it), an ERROR says the local clock is probably wrong, and
       the manager backs off: at most 2 orders in the phase over CHECKS more full checks (a loop orders at
       every check).
    3. -2 days (relative to real time): the jump is logged; the served certificate's NotBefore is in the
       future for the process, and it is still served. No order over CHECKS full checks. A forced renewal
       (`cert renew --force` on the same clock) obtains a new certificate: ACME works (JWS carries no
       time); again no order over the next CHECKS checks.
    Throughout: DAV through the tunnel after each jump; the SSH session never drops (keepalive timers run on
    the monotonic clock). All of it in a private network namespace. Timings are printed, not asserted."""
    require_libfaketime()
    missing = sshd_available()
    assert missing is None, missing
    with private_netns():  # our own ports: no other test's relay or tunnel can collide with ours
        run_phases(tmp_path)


def run_phases(tmp_path: Path) -> None:
    """The test proper, in the private network namespace."""
    cfg = init_instance(tmp_path / "ic", relay=f"{TEST_USER}@127.0.0.1:{free_port()}")
    # Keepalive with room for a loaded machine (6 x 5 s on both ends): a wall-clock-driven keepalive would
    # still fail at once on a +100 d jump, so the margin hides nothing.
    configure(cfg, "relay", keepalive_interval_s=5, keepalive_count_max=6, connect_timeout_s=10)
    c = load(cfg)
    port80, state = c.server.http_listen[1], StateFiles(c)
    clock = FakeClock(tmp_path / "faketime.rc")
    # Pebble's own HTTPS certificate must verify at both clock readings the server will have.
    ca = PebbleCA(tmp_path / "pebble", http_port=port80, validity_s=VALIDITY_S,
                  wfe_validity=(dt.timedelta(days=10), dt.timedelta(days=200)))
    with relay_sshd(cfg, client_alive_interval=5, client_alive_count_max=6) as relay, ca:
        configure_acme(cfg, ca, port80)
        root = ca.write_root(tmp_path / "root.pem")
        t0 = time.monotonic()
        with ServeProcess(cfg, env=clock.env()) as srv:
            # 1. Offset 0.
            first = wait_issued(srv.https_port, root, 120, srv.log)
            relay.wait_forwards(60, on_timeout=srv.log)
            session = relay.holders()
            assert dav_ok(relay.https_port, root) == first
            print(f"\nfirst certificate {first:x} served {since(t0)} after serve started (under libfaketime)")

            # 2. +100 days.
            mark, orders0 = len(srv.log()), ca.orders()
            clock.set("+100d")
            t1 = time.monotonic()
            wait_until(lambda: "wall clock moved +" in srv.log()[mark:], 60, "the +100 d jump to be detected",
                       on_timeout=srv.log)
            print(f"+100 d: jump logged after {since(t1)}")
            wait_until(lambda: "certificate expired according to the local clock" in srv.log()[mark:]
                       and ca.orders() > orders0, 60, "an order after the +100 d jump", on_timeout=srv.log)
            print(f"+100 d: 'expired according to the local clock' and an order at Pebble after {since(t1)}")
            second = wait_issued(srv.https_port, root, 120, srv.log, not_serial=first)
            print(f"+100 d: next certificate {second:x} served after {since(t1)}")
            wait_until(lambda: "already expired according to the local clock" in srv.log()[mark:], 60,
                       "the line saying the new certificate is expired on arrival", on_timeout=srv.log)
            line = next(ln for ln in srv.log()[mark:].splitlines() if "already expired according to the local" in ln)
            print(f"+100 d: {line}")
            _, checks = watch(CHECKS, ca, state, srv, 1)
            orders = ca.orders() - orders0
            print(f"+100 d: {orders} order(s) in the phase, {checks} full checks after the line; {since(t1)} "
                  "since the jump")
            assert orders <= 2, f"renewal loop: {orders} orders\n{srv.log()[mark:]}"
            assert " ERROR " in line and "the local clock is probably wrong; retry in 1m" in line, line
            assert dav_ok(relay.https_port, root) == second

            # 3. -2 days.
            mark, orders1 = len(srv.log()), ca.orders()
            clock.set("-2d")
            t2 = time.monotonic()
            wait_until(lambda: "wall clock moved -" in srv.log()[mark:], 60, "the -2 d jump to be detected",
                       on_timeout=srv.log)
            print(f"-2 d: jump logged after {since(t2)}")
            # The served certificate is valid and not due for the process now: the streak of the +100 d
            # phase is over (status healthy again) without another order.
            wait_until(lambda: "failed attempt(s) before no longer matter" in srv.log()[mark:], 60,
                       "the +100 d failure streak to be cleared", on_timeout=srv.log)
            print(f"-2 d: failure streak cleared after {since(t2)}")
            orders, checks = watch(CHECKS, ca, state, srv, 0)
            print(f"-2 d: {orders} order(s) over {checks} full checks ({since(t2)})")
            assert orders == 0, f"renewal at -2 d\n{srv.log()[mark:]}"
            not_before = served_not_before(c.server.cert_dir)
            print(f"-2 d: served NotBefore {not_before:%Y-%m-%d %H:%M:%S} UTC, the process's clock "
                  f"{dt.datetime.now(dt.UTC) - dt.timedelta(days=2):%Y-%m-%d %H:%M:%S} UTC")
            assert not_before > dt.datetime.now(dt.UTC) - dt.timedelta(days=2)   # "in the future" for serve
            assert verified_serial(srv.https_port, root) == second                # and still served
            assert dav_ok(relay.https_port, root) == second
            t3 = time.monotonic()
            out = cert_renew_force(cfg, clock)
            assert out.returncode == 0 and "renewed: serial" in out.stdout, (out, srv.log()[mark:])
            third = wait_issued(srv.https_port, root, 60, srv.log, not_serial=second)
            print(f"-2 d: forced renewal (cert renew --force on the faked clock) served {third:x} after {since(t3)}")
            orders, checks = watch(CHECKS, ca, state, srv, 0)
            print(f"-2 d: {orders} order(s) over {checks} full checks after it")
            assert orders == 0, srv.log()[mark:]
            assert dav_ok(relay.https_port, root) == third

            # The tunnel never noticed: the same SSH session throughout, one "tunnel up", no link lost.
            log = srv.log()
            lost = [ln for ln in log.splitlines() if "relay link lost" in ln]
            if lost:
                print("sshd: " + " | ".join(ln for ln in relay.log().splitlines()
                                            if re.search(r"Timeout|[Dd]isconnect|signal|Close|killed", ln)))
            assert not lost and log.count("tunnel up:") == 1, lost
            assert relay.holders() == session
            print(f"tunnel: one SSH session (relay pid {session[0]}) across both jumps, no link lost")
        assert not re.search(r"Traceback|certificate check failed unexpectedly|unexpected error", log), log
        print(f"orders at Pebble: {ca.orders()} (1 at offset 0, {orders1 - orders0} at +100 d, 1 forced at -2 d); "
              f"{DOMAIN} served {first:x} -> {second:x} -> {third:x}; total {since(t0)}")
