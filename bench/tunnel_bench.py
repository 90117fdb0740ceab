#!/usr/bin/env python3
"""Tunnel benchmark: our asyncssh tunnel against the seed stack's ``autossh -M 0 -o
ServerAliveInterval=30`` + ``ssh -R``, interleaved in one run on loopback. Printed, never asserted.

    .venv/bin/python bench/tunnel_bench.py                  # the documented run (~6-8 min on 2 cores)
    .venv/bin/python bench/tunnel_bench.py --reps 3         # more repetitions (each adds ~5 min)
    .venv/bin/python bench/tunnel_bench.py --quick          # 50 cards, bound 40 s, 64 MiB: a smoke run
    .venv/bin/python bench/tunnel_bench.py --scenarios netns --reps 3   # (7) only: faults on a real path
    .venv/bin/python bench/tunnel_bench.py --scenarios reach --reps 3   # (8) only: 22 vs 443, IPv4 vs IPv6

Both sides run behind their own real sshd relay with ClientAliveInterval 15 (x3) and a chaos TCP proxy
between the laptop side and the relay:

  seed: Radicale's own server behind nginx (bench/seed-stack/infra/radicale.sh, nginx.sh) and autossh + ssh -R
        (tunnel.sh) to relay-sshd.sh (the blog's sshd config);
  ours: ``inverse-cloud serve`` with its tunnel, to an sshd configured by ``relay-setup``
        (integration/relay_sshd.py), default keepalive (5 s x 3).

Both serve the same certificate (a throwaway CA) and the same htpasswd line. A "phone" is a TLS GET of
/radicale/ with Basic auth on the relay's forwarded HTTPS port, verified against that CA.

Scenarios, per repetition, alternating which side goes first:
  (1) netchange  the SSH link's path dies (old TCP connection never comes back) with a --outage-s outage
                 (new connections held), while the phone retries every second -> seconds from the end of the
                 outage to a working request;
  (2) immediate  the same, and right after the outage the laptop side is told to reconnect now (seed: SIGUSR1
                 to autossh, which restarts ssh; ours: SIGUSR1) -> the stale-port case;
  (3) kill       the relay's session process holding the forward is killed -> seconds to a working request
                 (probing every 0.1 s);
  (4) sync       N-card DAVx5-like workload through the relay (bench/dav_bench.py run_workload): PROPFIND
                 Depth 1 + addressbook-multiget ("full sync"), uploads, GET p50;
  (6) memory     RSS/PSS of the laptop side after the workload (ours: one process; seed: radicale + nginx
                 master and workers + autossh + ssh);
  (5) throughput raw bytes through each tunnel to a plain TCP sink, both directions, with CPU seconds per GiB
                 of the laptop-side tunnel process (ours: the Tunnel in a child process; seed: ssh -R).
  (7) netns      ours only, opt-in (root, network namespaces, ~4 min per repetition): the laptop in its own
                 network namespace behind a veth, a real sshd relay, product defaults, a phone PROPFIND every
                 0.5 s: seconds from the end of each fault (address change, 20 s outage, 60 s SIGSTOP, relay
                 sshd restart, frozen until the relay drops the session) to the next 207, and the reason
                 status gives (bench/netns_faults.py; --faults to choose). Run it from the checkout whose
                 code you want measured: `python -m` puts the working directory first on serve's path.
  (8) reach      ours only, opt-in (root, namespaces, sslh): reconnect seconds over 22 vs over sslh's 443, and
                 PROPFIND times over IPv4 vs IPv6 through sslh (bench/reach_bench.py).
A recovery that does not happen within --bound is reported as "never (> bound)"; the seed side is then
repaired (stale relay session killed, ssh restarted) before the next scenario.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import shutil
import signal
import socket
import ssl
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "integration"))
sys.path.insert(0, str(HERE))

from chaos_proxy import ChaosProxy  # noqa: E402
from dav_bench import HOST, PASSWORD, USER, SeedSide, make_certificates, memory, run_workload  # noqa: E402
from relay_sshd import configure, port_holders, relay_sshd  # noqa: E402

from tests.support import ServeProcess, free_port, init_instance, wait_until  # noqa: E402

CHUNK = 1 << 20
SETTLE_S = 6.0      # > the tunnel's STABLE_S: the link counts as established before a fault is injected
TICK = os.sysconf("SC_CLK_TCK")


def log(msg: str) -> None:
    print(f"[tunnel_bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def cpu_s(pid: int) -> float:
    try:
        f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(f[11]) + int(f[12])) / TICK
    except (FileNotFoundError, IndexError):
        return 0.0


# --- the phone ---------------------------------------------------------------------------------------

class Phone:
    def __init__(self, cafile: Path) -> None:
        self.ctx = ssl.create_default_context(cafile=str(cafile))
        self.auth = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()

    def probe(self, port: int, timeout_s: float = 2.0) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as raw:
                raw.settimeout(timeout_s)
                with self.ctx.wrap_socket(raw, server_hostname=HOST) as s:
                    s.sendall(f"GET /radicale/ HTTP/1.1\r\nHost: {HOST}\r\nAuthorization: Basic {self.auth}\r\n"
                              "Connection: close\r\n\r\n".encode())
                    line = s.recv(64).split(b"\r\n", 1)[0]
                    return line.startswith((b"HTTP/1.1 2", b"HTTP/1.1 3"))
        except (OSError, ssl.SSLError):
            return False

    def wait_ok(self, port: int, bound_s: float, interval_s: float) -> float | None:
        """Seconds until a probe succeeds (a probe every ``interval_s``), None if not within ``bound_s``."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < bound_s:
            started = time.monotonic()
            if self.probe(port):
                return time.monotonic() - t0
            time.sleep(max(0.0, interval_s - (time.monotonic() - started)))   # the phone's retry interval
        return None


# --- the two sides -----------------------------------------------------------------------------------

class SeedTunnel:
    """The seed laptop side (radicale + nginx) plus its relay sshd and autossh through a chaos proxy."""

    label = "seed"

    def __init__(self, state: Path, cert_dir: Path) -> None:
        self.side = SeedSide(state, cert_dir, 5)
        self.sshd_port = free_port()
        self.proxy = ChaosProxy(self.sshd_port)
        self.env = self.side.env
        self.env.update({"RELAY_SSH_PORT": str(self.sshd_port), "RELAY_HTTPS_PORT": str(free_port()),
                         "RELAY_HTTP_PORT": str(free_port()), "THROUGHPUT_RELAY_PORT": str(free_port()),
                         "CLIENT_ALIVE_INTERVAL": "15", "SERVER_ALIVE_INTERVAL": "30"})
        self.state = state

    @property
    def relay_https_port(self) -> int:
        return int(self.env["RELAY_HTTPS_PORT"])

    def start(self) -> None:
        self.side.start()
        self.side.started.append("relay-sshd.sh")
        self.side._script("relay-sshd.sh", "start")
        self.proxy.start()
        self.env["RELAY_CONNECT_PORT"] = str(self.sshd_port)
        self.side.started.append("tunnel.sh")
        self.side._script("tunnel.sh", "start")

    def via_proxy(self) -> None:
        """Reconnect the tunnel through the chaos proxy (for the fault scenarios)."""
        self.side._script("tunnel.sh", "stop")
        wait_until(lambda: not port_holders(self.relay_https_port), 60, "seed forward released")
        self.env["RELAY_CONNECT_PORT"] = str(self.proxy.port)
        self.side._script("tunnel.sh", "start")

    def stop(self) -> None:
        self.side.stop()
        self.proxy.stop()

    def autossh_pid(self) -> int:
        return int((self.state / "laptop" / "autossh.pid").read_text())

    def ssh_pid(self) -> int | None:
        out = subprocess.run(["pgrep", "-P", str(self.autossh_pid()), "-x", "ssh"], capture_output=True,
                             text=True).stdout.split()
        return int(out[0]) if out else None

    def kick(self) -> None:
        os.kill(self.autossh_pid(), signal.SIGUSR1)     # autossh: kill ssh, start a new one now

    def repair(self, phone: Phone) -> None:
        """After a scenario that never recovered: end the stale relay session, restart ssh, wait."""
        for p in port_holders(self.relay_https_port):
            os.kill(p, signal.SIGTERM)
        self.kick()
        if phone.wait_ok(self.relay_https_port, 60, 0.5) is None:
            raise RuntimeError("seed tunnel did not come back after repair")

    def pids(self) -> dict[str, list[int]]:
        out = self.side.pids()
        out["autossh"] = [self.autossh_pid()]
        ssh = self.ssh_pid()
        out["ssh"] = [ssh] if ssh else []
        return out

    @property
    def base_url(self) -> str:
        return f"https://{HOST}:{self.relay_https_port}/radicale/"


class OurTunnel:
    """``inverse-cloud serve`` (bench certificate and user) with its tunnel to a relay-setup sshd."""

    label = "ours"

    def __init__(self, root: Path, chain: bytes, key: bytes, htpasswd_line: str) -> None:
        from inverse_cloud.certs.store import CertStore
        from inverse_cloud.config import load

        self.sshd_port = free_port()
        self.config = init_instance(root, domain=HOST, user=USER, password=PASSWORD,
                                    relay=f"icbench@127.0.0.1:{self.sshd_port}")
        configure(self.config, "acme", enabled=False)
        cfg = load(self.config)
        cfg.server.htpasswd_path.write_text(htpasswd_line)
        CertStore(cfg.server.cert_dir).save(chain, key)
        self.proxy = ChaosProxy(self.sshd_port)
        self.srv: ServeProcess | None = None
        self._relay_cm: Any = None
        self.relay: Any = None

    @property
    def relay_https_port(self) -> int:
        return int(self.relay.https_port)

    @property
    def https_port(self) -> int:
        assert self.srv is not None
        return self.srv.https_port

    def start(self) -> None:
        self._relay_cm = relay_sshd(self.config, user="icbench", client_alive_interval=15, client_alive_count_max=3)
        self.relay = self._relay_cm.__enter__()
        self.proxy.start()
        self.srv = ServeProcess(self.config).start()
        self.relay.wait_forwards(30, on_timeout=self.srv.log)
        log(f"inverse-cloud serve pid={self.srv.pid}, relay sshd pid={self.relay.pid}")

    def via_proxy(self) -> None:
        """Restart serve with the relay port pointing at the chaos proxy (for the fault scenarios)."""
        self.stop_serve()
        wait_until(lambda: not self.relay.forwards_bound(), 30, "our forwards released")
        configure(self.config, "relay", port=self.proxy.port)
        self.srv = ServeProcess(self.config).start()
        self.relay.wait_forwards(30, on_timeout=self.srv.log)
        log(f"inverse-cloud serve pid={self.srv.pid} now through the chaos proxy")

    def direct(self) -> None:
        configure(self.config, "relay", port=self.sshd_port)

    def stop_serve(self) -> None:
        if self.srv is not None:
            self.srv.stop()
            self.srv = None

    def stop(self) -> None:
        self.stop_serve()
        self.proxy.stop()
        if self._relay_cm is not None:
            self._relay_cm.__exit__(None, None, None)
            self._relay_cm = None

    def kick(self) -> None:
        assert self.srv is not None
        self.srv.signal(signal.SIGUSR1)

    def repair(self, phone: Phone) -> None:
        if phone.wait_ok(self.relay_https_port, 60, 0.5) is None:
            raise RuntimeError("our tunnel did not come back")

    def pids(self) -> dict[str, list[int]]:
        assert self.srv is not None
        return {"inverse_cloud": [self.srv.pid]}

    @property
    def base_url(self) -> str:
        return f"https://{HOST}:{self.relay_https_port}/radicale/"


# --- scenarios ----------------------------------------------------------------------------------------

def sc_netchange(side: Any, phone: Phone, outage_s: float, bound_s: float, immediate: bool) -> dict[str, Any]:
    side.proxy.set_mode("outage")
    time.sleep(outage_s)          # the outage itself is the measured condition
    side.proxy.set_mode("pass")
    if immediate:
        side.kick()
    took = phone.wait_ok(side.relay_https_port, bound_s, 1.0)
    return {"recovered_after_outage_s": None if took is None else round(took, 2)}


def sc_kill(side: Any, phone: Phone, bound_s: float) -> dict[str, Any]:
    holders = port_holders(side.relay_https_port)
    for p in holders:
        os.kill(p, signal.SIGTERM)
    took = phone.wait_ok(side.relay_https_port, bound_s, 0.1)
    return {"killed": holders, "recovered_s": None if took is None else round(took, 2)}


# --- throughput ----------------------------------------------------------------------------------------

class Sink:
    """Plain TCP target behind a tunnel: 'U'+n: read n bytes, answer the count; 'D'+n: send n bytes."""

    def __init__(self) -> None:
        self.srv = socket.create_server(("127.0.0.1", 0))
        self.port = self.srv.getsockname()[1]
        self.stop = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        self.srv.settimeout(0.5)
        while not self.stop.is_set():
            try:
                conn, _ = self.srv.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=self._one, args=(conn,), daemon=True).start()

    def _one(self, conn: socket.socket) -> None:
        conn.settimeout(120)
        buf = bytearray(CHUNK)
        data = memoryview(os.urandom(CHUNK))
        try:
            head = conn.recv(9, socket.MSG_WAITALL)
            if len(head) != 9:
                return
            mode, n = head[:1], struct.unpack("!Q", head[1:])[0]
            if mode == b"U":
                total = 0
                while total < n:
                    got = conn.recv_into(buf)
                    if not got:
                        break
                    total += got
                conn.sendall(struct.pack("!Q", total))
            else:
                left = n
                while left > 0:
                    conn.sendall(data[:min(left, CHUNK)])
                    left -= min(left, CHUNK)
        except OSError:
            pass
        finally:
            conn.close()

    def close(self) -> None:
        self.stop.set()
        self.srv.close()


def push(port: int, n: int, mode: bytes) -> float:
    """Seconds to move n bytes through ``port`` in direction ``mode`` (U: to the laptop, D: from it)."""
    data = memoryview(os.urandom(CHUNK))
    buf = bytearray(CHUNK)
    with socket.create_connection(("127.0.0.1", port), timeout=120) as s:
        t0 = time.perf_counter()
        s.sendall(mode + struct.pack("!Q", n))
        if mode == b"U":
            left = n
            while left > 0:
                s.sendall(data[:min(left, CHUNK)])
                left -= min(left, CHUNK)
            got = s.recv(8, socket.MSG_WAITALL)
            assert len(got) == 8 and struct.unpack("!Q", got)[0] == n, "short transfer"
        else:
            total = 0
            while total < n:
                k = s.recv_into(buf)
                if not k:
                    break
                total += k
            assert total == n, f"short transfer {total}/{n}"
        return time.perf_counter() - t0


def child_tunnel(config: str, target_port: int) -> None:
    """``--child-tunnel``: run only our Tunnel (forwarding both relay ports to ``target_port``) until SIGTERM."""
    from inverse_cloud.config import load
    from inverse_cloud.tunnel.link import Tunnel

    class Target:
        https_port = http_port = target_port

        class peers:  # noqa: N801
            @staticmethod
            def register(local_port: int, origin: tuple[str, int]) -> None:
                pass

            @staticmethod
            def unregister(local_port: int) -> None:
                pass

    async def run() -> None:
        tunnel = Tunnel(load(Path(config)), Target())  # type: ignore[arg-type]
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        await tunnel.start()
        await stop.wait()
        await tunnel.aclose()

    asyncio.run(run())


def throughput(seed: SeedTunnel, ours: OurTunnel, nbytes: int, reps: int) -> dict[str, Any]:
    sink = Sink()
    out: dict[str, Any] = {}
    procs: list[subprocess.Popen[bytes]] = []
    try:
        laptop = seed.state / "laptop"
        rport = int(seed.env["THROUGHPUT_RELAY_PORT"])
        ssh = subprocess.Popen(
            ["ssh", "-N", "-p", str(seed.sshd_port), "-i", str(laptop / "id_bench"), "-o", "IdentitiesOnly=yes",
             "-o", "BatchMode=yes", "-o", "HostKeyAlias=relay.test", "-o", f"UserKnownHostsFile={laptop / 'known_hosts'}",
             "-o", "ExitOnForwardFailure=yes", "-o", "ServerAliveInterval=30",
             "-R", f"127.0.0.1:{rport}:127.0.0.1:{sink.port}", "root@127.0.0.1"], stderr=subprocess.DEVNULL)
        procs.append(ssh)
        ours.stop_serve()      # the relay permits our two ports only: the serve's tunnel must let go of them
        wait_until(lambda: not ours.relay.forwards_bound(), 20, "our forwards released")
        child = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--child-tunnel", str(ours.config),
                                  "--target-port", str(sink.port)], stderr=subprocess.DEVNULL)
        procs.append(child)
        wait_until(lambda: ours.relay.forwards_bound(), 30, "our throughput tunnel")
        wait_until(lambda: bool(port_holders(rport)), 30, "seed throughput tunnel")
        sides = {"seed": (rport, ssh.pid), "ours": (ours.relay_https_port, child.pid)}
        direct = {m: [] for m in ("U", "D")}
        for r in range(reps):
            for name in (["seed", "ours"] if r % 2 == 0 else ["ours", "seed"]):
                port, pid = sides[name]
                for mode in ("U", "D"):
                    c0 = cpu_s(pid)
                    dt_s = push(port, nbytes, mode.encode())
                    cpu = cpu_s(pid) - c0
                    out.setdefault(name, {}).setdefault(mode, []).append((nbytes / dt_s / 1e6, cpu / nbytes * (1 << 30)))
            for mode in ("U", "D"):
                direct[mode].append(nbytes / push(sink.port, nbytes, mode.encode()) / 1e6)
        out["direct"] = direct
    finally:
        for p in procs:
            p.terminate()
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
        sink.close()
    return out


# --- report ---------------------------------------------------------------------------------------------

def fmt_s(v: float | None, bound: float) -> str:
    return f"never (> {bound:.0f} s)" if v is None else f"{v:.2f} s"


def med(vals: list[float | None]) -> float | None:
    got = [v for v in vals if v is not None]
    return statistics.median(got) if got and len(got) == len(vals) else None


def ratio(a: float | None, b: float | None) -> str:
    return "n/a" if a is None or b is None or b == 0 else f"{a / b:.2f}x"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=1, help="repetitions of the recovery scenarios and the sync")
    ap.add_argument("--cards", type=int, default=1000, help="vCards in the sync workload (default 1000)")
    ap.add_argument("--outage-s", type=float, default=5)
    ap.add_argument("--bound", type=float, default=150, help="max seconds to wait for a recovery")
    ap.add_argument("--bytes", type=int, default=256 << 20, help="bytes per throughput transfer")
    ap.add_argument("--scenarios", default="netchange,immediate,kill,sync,throughput")
    ap.add_argument("--quick", action="store_true", help="50 cards, bound 40 s, 64 MiB")
    ap.add_argument("--direct", action="store_true",
                    help="also run the sync workload straight to each laptop side, to show what the tunnel adds")
    ap.add_argument("--faults", default="address,outage,sigstop,restart,frozen",
                    help="faults of the netns scenario (7)")
    ap.add_argument("--json-out", help="write the figures as JSON here")
    ap.add_argument("--child-tunnel", help=argparse.SUPPRESS)
    ap.add_argument("--target-port", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child_tunnel:
        child_tunnel(args.child_tunnel, args.target_port)
        return 0
    if args.quick:
        args.cards, args.bound, args.bytes = 50, 40, 64 << 20
    if args.scenarios == "reach":
        from reach_bench import report as reach_report
        from reach_bench import run as run_reach

        t0 = time.monotonic()
        with tempfile.TemporaryDirectory(prefix="reach-bench-") as work:
            reach_res = run_reach(args.reps, args.bound, Path(work))
        print("\n".join([f"\n=== tunnel bench: reach (22 vs 443, IPv4 vs IPv6), {args.reps} rep(s) ==="]
                        + reach_report(reach_res) + [f"(total {time.monotonic() - t0:.0f} s)"]))
        if args.json_out:
            Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json_out).write_text(json.dumps({"args": vars(args), "results": {"reach": reach_res}},
                                                      indent=1, default=str) + "\n")
        return 0
    if args.scenarios == "netns":
        from netns_faults import report
        from netns_faults import run as run_netns

        t0 = time.monotonic()
        netns_res = run_netns(args.faults.split(","), args.reps, args.bound)
        print("\n".join([f"\n=== tunnel bench: netns faults, {args.reps} rep(s), bound {args.bound:g} s ==="]
                        + report(netns_res, args.bound) + [f"(total {time.monotonic() - t0:.0f} s)"]))
        if args.json_out:
            Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json_out).write_text(json.dumps({"args": vars(args), "results": {"netns": netns_res}},
                                                      indent=1, default=str) + "\n")
        return 0
    for tool in ("nginx", "autossh", "ssh", "/usr/sbin/sshd"):
        if shutil.which(tool) is None:
            print(f"{tool} is not installed (apt-get install nginx autossh openssh-server)", file=sys.stderr)
            return 2
    scenarios = args.scenarios.split(",")
    state = Path(tempfile.mkdtemp(prefix="ictunnelbench-"))
    state.chmod(0o755)   # noqa: S103 (nginx workers traverse it)
    cafile, chain, key = make_certificates(state / "cert")
    phone = Phone(cafile)
    res: dict[str, Any] = {"seed": {}, "ours": {}}
    t_start = time.monotonic()
    sides: dict[str, Any] = {}
    try:
        seed = SeedTunnel(state / "seed", state / "cert")
        sides["seed"] = seed
        seed.start()
        ours = OurTunnel(state / "ours", chain, key, seed.side.htpasswd_line())
        sides["ours"] = ours
        ours.start()
        for name, side in sides.items():
            if phone.wait_ok(side.relay_https_port, 30, 0.2) is None:
                raise RuntimeError(f"{name}: no working request through the relay at start")
        # Phase 1, tunnels straight to sshd: the sync workload (a TCP proxy in the path would change the
        # delayed-ACK behaviour under test), then memory after the workload.
        for r in range(args.reps):
            order = ["seed", "ours"] if r % 2 == 0 else ["ours", "seed"]
            if "sync" in scenarios:
                for name in order:
                    side = sides[name]
                    log(f"rep {r + 1}: {args.cards}-card sync through the relay on {name}")
                    w = run_workload(side.base_url, USER, PASSWORD, str(cafile), args.cards,
                                     resolve={HOST: "127.0.0.1"}, book=f"tb-{name}-{r}", get_samples=100)
                    log(f"  {name}: full sync {w['full_sync_s'] * 1000:.0f} ms, PUT {w['put_s']:.1f} s, "
                        f"GET p50 {w['get_p50_ms']:.2f} ms, ok={w['ok']}")
                    res[name].setdefault("sync", []).append(w)
                    if args.direct:
                        url = side.side.base_url if name == "seed" else \
                            f"https://{HOST}:{ours.https_port}/radicale/"
                        d = run_workload(url, USER, PASSWORD, str(cafile), args.cards, resolve={HOST: "127.0.0.1"},
                                         book=f"tbd-{name}-{r}", get_samples=100)
                        log(f"  {name} direct (no tunnel): full sync {d['full_sync_s'] * 1000:.0f} ms")
                        res[name].setdefault("sync_direct", []).append(d)
        for name, side in sides.items():
            res[name]["memory"] = memory(side.pids())
        # Phase 2, through the chaos proxies: the recovery scenarios.
        faults = [sc for sc in ("netchange", "immediate", "kill") if sc in scenarios]
        if faults:
            for side in sides.values():
                side.via_proxy()
                if phone.wait_ok(side.relay_https_port, 30, 0.2) is None:
                    raise RuntimeError(f"{side.label}: no working request through the proxy")
        for r in range(args.reps if faults else 0):
            order = ["seed", "ours"] if r % 2 == 0 else ["ours", "seed"]
            for sc in faults:
                for name in order:
                    side = sides[name]
                    # a link that has just been re-established gets backoff if it drops again at once (a
                    # flapping relay); every scenario starts from a link that has been up for a while
                    time.sleep(SETTLE_S)
                    log(f"rep {r + 1}: {sc} on {name}")
                    if sc == "kill":
                        out = sc_kill(side, phone, args.bound)
                        val = out["recovered_s"]
                    else:
                        out = sc_netchange(side, phone, args.outage_s, args.bound, sc == "immediate")
                        val = out["recovered_after_outage_s"]
                    log(f"  {name} {sc}: {fmt_s(val, args.bound)}")
                    res[name].setdefault(sc, []).append(val)
                    if val is None:
                        side.repair(phone)
                    elif phone.wait_ok(side.relay_https_port, 60, 0.5) is None:
                        side.repair(phone)
        ours.direct()      # the throughput child connects straight to sshd
        if "throughput" in scenarios:
            log("throughput")
            tp = throughput(seed, ours, args.bytes, args.reps)
            res["throughput"] = tp
    finally:
        for side in list(sides.values())[::-1]:
            try:
                side.stop()
            except Exception as exc:  # noqa: BLE001 (best effort: keep stopping the rest)
                log(f"stopping {side.label}: {exc}")
    elapsed = time.monotonic() - t_start

    lines = [f"\n=== tunnel bench: {args.reps} rep(s), outage {args.outage_s:g} s, bound {args.bound:g} s, "
             f"{args.cards} cards ==="]
    for sc, what in (("netchange", "(1) network change, 5 s outage -> working sync (phone every 1 s)"),
                     ("immediate", "(2) same + immediate reconnect (stale relay port)"),
                     ("kill", "(3) relay session killed -> working sync")):
        if sc not in scenarios:
            continue
        s_vals, o_vals = res["seed"].get(sc, []), res["ours"].get(sc, [])
        lines.append(f"{what}\n    seed: {', '.join(fmt_s(v, args.bound) for v in s_vals)}   "
                     f"ours: {', '.join(fmt_s(v, args.bound) for v in o_vals)}   ratio ours/seed (median): "
                     f"{ratio(med(o_vals), med(s_vals))}")
    if "sync" in scenarios:
        lines.append("(4) sync through the relay (median): metric | seed | ours | ours/seed")
        for key, unit, scale in (("full_sync_s", "ms", 1000), ("propfind_s", "ms", 1000), ("multiget_s", "ms", 1000),
                                 ("put_s", "s", 1), ("get_p50_ms", "ms", 1), ("get_p95_ms", "ms", 1)):
            sv = statistics.median(w[key] for w in res["seed"]["sync"]) * scale
            ov = statistics.median(w[key] for w in res["ours"]["sync"]) * scale
            lines.append(f"    {key:<12} {sv:9.2f} {unit} {ov:9.2f} {unit}   {ratio(ov, sv)}")
        if args.direct:
            lines.append("    same workload straight to each laptop side (no tunnel): metric | seed | ours")
            for key in ("full_sync_s", "propfind_s", "multiget_s"):
                sv = statistics.median(w[key] for w in res["seed"]["sync_direct"]) * 1000
                ov = statistics.median(w[key] for w in res["ours"]["sync_direct"]) * 1000
                lines.append(f"    {key:<12} {sv:9.2f} ms {ov:9.2f} ms   tunnel adds: seed "
                             f"{statistics.median(w[key] for w in res['seed']['sync']) * 1000 - sv:+.0f} ms, ours "
                             f"{statistics.median(w[key] for w in res['ours']['sync']) * 1000 - ov:+.0f} ms")
    tp = res.get("throughput")
    if tp:
        lines.append(f"(5) raw throughput, {args.bytes >> 20} MiB per transfer (median MB/s; laptop-side tunnel "
                     "CPU s/GiB)")
        for mode, what in (("U", "relay -> laptop"), ("D", "laptop -> relay")):
            d = statistics.median(tp["direct"][mode])
            row = {n: (statistics.median(x[0] for x in tp[n][mode]), statistics.median(x[1] for x in tp[n][mode]))
                   for n in ("seed", "ours")}
            lines.append(f"    {what}: direct {d:.0f} MB/s | seed {row['seed'][0]:.0f} MB/s, {row['seed'][1]:.2f} "
                         f"CPU s/GiB | ours {row['ours'][0]:.0f} MB/s, {row['ours'][1]:.2f} CPU s/GiB | ours/seed "
                         f"{ratio(row['ours'][0], row['seed'][0])} speed, {ratio(row['ours'][1], row['seed'][1])} CPU")
    if "memory" in res["ours"]:
        so, oo = res["seed"]["memory"], res["ours"]["memory"]
        lines.append(f"(6) laptop side memory after the workload: seed {json.dumps(so)}\n    ours {json.dumps(oo)}")
    lines.append(f"(total {elapsed:.0f} s)")
    print("\n".join(lines))
    if args.json_out:
        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_out).write_text(json.dumps({"args": vars(args), "results": res, "elapsed_s": elapsed},
                                                  indent=1, default=str) + "\n")
    shutil.rmtree(state, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
