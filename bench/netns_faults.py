"""Per-fault recovery seconds on a real path, for ``tunnel_bench.py --scenarios netns`` (printed, never
asserted).

The laptop (``inverse-cloud serve``, product defaults: keepalive 5 s x 3) runs in its own network namespace
joined by a veth pair to a private namespace holding the relay (real sshd configured by relay-setup,
ClientAlive 15 s x 3) and the phone (integration/netns.py, relay_sandbox.py). The phone starts a PROPFIND
(Depth 1, Basic auth, TLS) on the relay's forwarded HTTPS port every 0.5 s, each with a 2 s timeout,
whether or not the previous one finished. Each fault is measured from its end (the new address in place,
the link back, the process resumed, sshd restarted) to the end of the phone's next PROPFIND answered 207.

Faults, each repeated ``reps`` times after the link has been up for SETTLE_S:
  address   the laptop's address is replaced (old removed, new added, default route replaced);
  outage    the laptop's interface is down for 20 s, then up again (default route restored);
  sigstop   serve is stopped (SIGSTOP) for 60 s, as in a suspend, then resumed;
  restart   the relay's sshd is restarted (listener and every session);
  frozen    serve is stopped until the relay ends its session: the seconds the relay's ClientAlive takes to
            drop a laptop that answers nothing (then serve is resumed and its recovery measured too). The phone
            pauses meanwhile: while something keeps connecting to the port, sshd's ClientAlive never fires.

With NETNS_BENCH_DEBUG=1 serve logs at debug level; each fault's end is printed as a wall-clock time next to
serve's log path, so its lines (milliseconds: network event, probe, reconnect, tunnel up, the phone's
request with its duration) can be read against it.

Which code runs is the ``inverse_cloud`` the child imports: ``python -m`` puts the working directory first
on its path, so run the bench from the checkout to measure (see bench/README.md).
"""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from netns import LaptopNetns, laptop_netns
from relay_sandbox import private_netns
from relay_sshd import RelaySshd, configure, relay_sshd

from tests.support import ServeProcess, free_port, init_instance, wait_until

USER, PASSWORD, HOST = "alice", "correct horse", "laptop.test"
RELAY_USER = "nmbench"
RELAY_ADDRESS = "10.99.7.1"
FAULTS = ("address", "outage", "sigstop", "restart", "frozen")
SETTLE_S = 6.0          # > the tunnel's STABLE_S: every fault starts from an established link
OUTAGE_S = 20.0
SIGSTOP_S = 60.0


def log(msg: str) -> None:
    print(f"[netns_faults {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class PollingPhone:
    """A PROPFIND every 0.5 s from a thread in the relay's namespace; records (start, end, ok) per attempt."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        self.ctx.check_hostname = False
        self.ctx.verify_mode = ssl.CERT_NONE
        auth = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
        self.request = (f"PROPFIND /radicale/{USER}/ HTTP/1.1\r\nHost: {HOST}\r\nAuthorization: Basic {auth}\r\n"
                        "Depth: 1\r\nContent-Length: 0\r\nConnection: close\r\n\r\n").encode()
        self.results: list[tuple[float, float, bool]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.paused = threading.Event()
        self._thread = threading.Thread(target=self._run, name="phone", daemon=True)

    def _attempt(self) -> None:
        t0 = time.monotonic()
        ok = False
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=2) as raw:
                raw.settimeout(2)
                with self.ctx.wrap_socket(raw, server_hostname=HOST) as s:
                    s.sendall(self.request)
                    ok = s.recv(64).startswith(b"HTTP/1.1 207")
        except (OSError, ssl.SSLError):
            ok = False
        with self._lock:
            self.results.append((t0, time.monotonic(), ok))

    def _run(self) -> None:
        with ThreadPoolExecutor(max_workers=10, thread_name_prefix="phone") as pool:
            while not self._stop.is_set():
                if not self.paused.is_set():
                    pool.submit(self._attempt)
                self._stop.wait(0.5)          # the phone's pace, not a wait for a condition

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)

    def first_ok_after(self, t: float) -> float | None:
        with self._lock:
            ends = [end for _, end, ok in self.results if ok and end > t]
        return min(ends) - t if ends else None

    def wait_ok_after(self, t: float, bound_s: float) -> float | None:
        try:
            return wait_until(lambda: self.first_ok_after(t), bound_s, "the phone's next 207", interval_s=0.05)
        except TimeoutError:
            return None


def status(cfg: Path) -> dict[str, Any]:
    out = subprocess.run([sys.executable, "-m", "inverse_cloud.cli", "status", "--json", "--config", str(cfg)],
                         capture_output=True, text=True, timeout=30, check=False)
    try:
        return dict(json.loads(out.stdout).get("tunnel") or {})
    except json.JSONDecodeError:
        return {}


def _settle(srv: ServeProcess, relay: RelaySshd, phone: PollingPhone) -> None:
    wait_until(lambda: relay.forwards_bound(), 120, "forwards bound", on_timeout=lambda: srv.log()[-3000:])
    start = time.monotonic()
    if phone.wait_ok_after(start, 120) is None:
        raise RuntimeError("no working PROPFIND through the relay before the fault:\n" + srv.log()[-3000:])
    time.sleep(SETTLE_S)                      # the link must count as established (backoff rules)


def _fault(name: str, laptop: LaptopNetns, srv: ServeProcess, relay: RelaySshd, rep: int,
           phone: PollingPhone) -> dict[str, Any]:
    """Inject one fault; return when it is over, with ``end`` (monotonic) and fault-specific figures."""
    out: dict[str, Any] = {}
    if name == "address":
        laptop.change_address(laptop.address, f"10.99.7.{10 + rep % 200}")
        laptop.ip("route", "replace", "default", "via", RELAY_ADDRESS)
    elif name == "outage":
        laptop.ip("link", "set", laptop.laptop_if, "down")
        time.sleep(OUTAGE_S)                  # the outage itself is the measured condition
        laptop.ip("link", "set", laptop.laptop_if, "up")
        laptop.ip("route", "replace", "default", "via", RELAY_ADDRESS)
    elif name == "sigstop":
        srv.signal(signal.SIGSTOP)
        try:
            time.sleep(SIGSTOP_S)             # the suspend itself is the measured condition
        finally:
            srv.signal(signal.SIGCONT)
    elif name == "restart":
        relay.restart()
    elif name == "frozen":
        # the phone pauses: while something keeps connecting to the forwarded port, sshd's ClientAlive
        # never fires (its check runs only when the session has been idle for a whole interval)
        phone.paused.set()
        holders = relay.holders()
        t0 = time.monotonic()
        srv.signal(signal.SIGSTOP)
        try:
            wait_until(lambda: relay.holders() != holders, 180, "the relay dropping the frozen session",
                       interval_s=0.1)
            out["relay_dropped_after_s"] = round(time.monotonic() - t0, 1)
        except TimeoutError:
            out["relay_dropped_after_s"] = None
        finally:
            srv.signal(signal.SIGCONT)
            phone.paused.clear()
    else:
        raise ValueError(name)
    out["end"] = time.monotonic()
    return out


def run(faults: list[str], reps: int, bound_s: float) -> dict[str, list[dict[str, Any]]]:
    """Run every fault ``reps`` times; return {fault: [{"recovered_s", "reason", ...}]}."""
    res: dict[str, list[dict[str, Any]]] = {f: [] for f in faults}
    root = Path(tempfile.mkdtemp(prefix="nm-bench-"))
    with private_netns(), laptop_netns(RELAY_ADDRESS, "10.99.7.3", name_prefix="nm-bench") as laptop:
        laptop.ip("route", "add", "default", "via", RELAY_ADDRESS)
        cfg = init_instance(root / "ic", relay=f"{RELAY_USER}@{RELAY_ADDRESS}:{free_port()}")
        if os.environ.get("NETNS_BENCH_DEBUG"):
            configure(cfg, "server", log_level="debug")
        with relay_sshd(cfg, user=RELAY_USER, client_alive_interval=15, client_alive_count_max=3,
                        listen_address=RELAY_ADDRESS) as relay:
            with ServeProcess(cfg, prefix=laptop.exec_prefix, ready_probe=laptop.tls_handshake_ok) as srv:
                phone = PollingPhone(relay.https_port)
                phone.start()
                try:
                    for rep in range(reps):
                        for name in faults:
                            _settle(srv, relay, phone)
                            before = len(status(cfg).get("reconnects") or [])
                            log(f"rep {rep + 1}: {name}")
                            out = _fault(name, laptop, srv, relay, rep, phone)
                            end = out.pop("end")
                            log(f"  fault end at {time.time() - (time.monotonic() - end):.3f} (log {srv.log_path})")
                            took = phone.wait_ok_after(end, bound_s)
                            now = status(cfg)
                            last = now.get("last_reconnect")
                            reconnected = len(now.get("reconnects") or []) - before
                            reason = last.get("reason") if isinstance(last, dict) else "not in this version's status"
                            out.update(recovered_s=None if took is None else round(took, 2), reconnects=reconnected,
                                       reason=reason if reconnected else "no reconnect")
                            log(f"  {name}: {out}")
                            res[name].append(out)
                finally:
                    phone.stop()
    subprocess.run(["userdel", RELAY_USER], capture_output=True, check=False, timeout=30)
    return res


def report(res: dict[str, list[dict[str, Any]]], bound_s: float) -> list[str]:
    what = {"address": "laptop address changes (old removed, new added, default route replaced)",
            "outage": f"{OUTAGE_S:.0f} s outage (interface down), then restore",
            "sigstop": f"serve stopped {SIGSTOP_S:.0f} s (SIGSTOP, as in a suspend), then resumed",
            "restart": "relay sshd restarted",
            "frozen": "serve stopped until the relay drops its session, then resumed"}
    code = os.path.dirname(os.path.dirname(os.path.abspath(sys.modules["inverse_cloud"].__file__ or "")))
    lines = [f"(7) faults on a real path (laptop netns + veth + real sshd; keepalive 5 s x 3, ClientAlive 15 s x 3; "
             f"phone PROPFIND every 0.5 s); serve from {os.getcwd()}, bench process imports {code}",
             "    seconds from the end of the fault to the phone's next 207 (each run), [last reconnect's reason in "
             "status, or no reconnect]"]
    for name, runs in res.items():
        vals = ", ".join(f"never (> {bound_s:.0f} s)" if r["recovered_s"] is None else f"{r['recovered_s']:.2f}"
                         for r in runs)
        reasons = sorted({f"{r.get('reason')}" + (f" x{r['reconnects']}" if r.get("reconnects", 0) > 1 else "")
                          for r in runs})
        lines.append(f"    {what[name]}: {vals} s  [{', '.join(reasons)}]")
        if name == "frozen":
            lines.append("      relay dropped the frozen session after: "
                         + ", ".join(f"{r.get('relay_dropped_after_s')} s" for r in runs))
    return lines
