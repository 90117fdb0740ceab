"""Relay reach figures for ``tunnel_bench.py --scenarios reach`` (printed, never asserted).

One relay in a private network namespace: real sshd (relay-setup's config, ClientAlive 15 s x 3) and Debian's sslh
on 443 in front of it (the sslh.cfg of ``relay-setup --ssh-on-443 --ipv6``); the laptop (``inverse-cloud serve``,
``[relay] fallback_port = 443``, connect_timeout_s 3) in its own namespace behind a veth; a phone namespace with
an IPv4 and an IPv6 address on another veth.

  reconnect  per repetition, in alternating order, over 22 (the laptop reaches sshd directly) and over 443 (its
             outbound SSH port is dropped, so it uses sslh): serve is restarted, the tunnel comes up on that path,
             then the relay's session is killed -> seconds to the phone's next working PROPFIND (probing every
             0.1 s);
  propfind   PROPFIND Depth 1 (Basic auth, verified TLS, curl) from the phone through sslh and the tunnel, 20 per
             repetition over IPv4 and 20 over IPv6, interleaved one by one -> median and p90.

Run it from the checkout whose code you want measured (``python -m`` puts the working directory first).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from netns import LaptopNetns
from relay_sandbox import private_netns
from relay_sshd import configure, relay_sshd

from tests.support import ServeProcess, free_port, init_instance, wait_until

RELAY, LAPTOP = "10.99.16.1", "10.99.16.2"
RELAY4B, PHONE4, RELAY6, PHONE6 = "10.99.17.1", "10.99.17.2", "fd00:99:17::1", "fd00:99:17::2"
RELAY_USER = "rbtunnel"
PASSWORD = "correct horse"


def log(msg: str) -> None:
    print(f"[reach_bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _run(*args: str, stdin: str | None = None) -> str:
    out = subprocess.run(list(args), input=stdin, capture_output=True, text=True, timeout=60, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(args)}: {out.stderr}")
    return out.stdout


def _curl(prefix: list[str], address: str, cafile: Path) -> tuple[str, float]:
    host = f"[{address}]" if ":" in address else address
    out = subprocess.run([*prefix, "curl", "-s", "--max-time", "5", "--cacert", str(cafile), "--resolve",
                          f"laptop.test:443:{host}", "-u", f"alice:{PASSWORD}", "-X", "PROPFIND", "-H", "Depth: 1",
                          "-o", "/dev/null", "-w", "%{http_code} %{time_total}", "https://laptop.test/radicale/alice/"],
                         capture_output=True, text=True, timeout=20, check=False)
    code, _, total = out.stdout.partition(" ")
    return code, float(total or 0)


@contextlib.contextmanager
def _phone() -> Any:
    name = f"rb-phone-{os.getpid()}-{secrets.token_hex(3)}"
    try:
        _run("ip", "netns", "add", name)
        _run("ip", "-n", name, "link", "set", "lo", "up")
        _run("ip", "link", "add", "rbphone0", "type", "veth", "peer", "name", "rbphonep", "netns", name)
        _run("ip", "addr", "add", f"{RELAY4B}/24", "dev", "rbphone0")
        _run("ip", "addr", "add", f"{RELAY6}/64", "dev", "rbphone0", "nodad")
        _run("ip", "link", "set", "rbphone0", "up")
        _run("ip", "-n", name, "addr", "add", f"{PHONE4}/24", "dev", "rbphonep")
        _run("ip", "-n", name, "addr", "add", f"{PHONE6}/64", "dev", "rbphonep", "nodad")
        _run("ip", "-n", name, "link", "set", "rbphonep", "up")
        yield ["ip", "netns", "exec", name]
    finally:
        subprocess.run(["ip", "netns", "delete", name], capture_output=True, check=False)


def run(reps: int, bound_s: float, work: Path) -> dict[str, Any]:
    from dav_helpers import selfsigned_cert
    from test_ssh_on_443 import sslh

    res: dict[str, Any] = {"reconnect_22": [], "reconnect_443": [], "propfind_v4": [], "propfind_v6": []}
    laptop = LaptopNetns(name=f"rb-laptop-{os.getpid()}-{secrets.token_hex(3)}", relay_address=RELAY,
                         address=LAPTOP, relay_if="rbrelay0", laptop_if="rblaptop0")
    with private_netns():
        laptop.create()
        try:
            sshd_port = free_port()
            cfg = init_instance(work / "ic", relay=f"{RELAY_USER}@{RELAY}:{sshd_port}")
            configure(cfg, "relay", connect_timeout_s=3)
            with relay_sshd(cfg, user=RELAY_USER, client_alive_interval=15, listen_address=RELAY) as relay:
                bundle = work / "bundle"
                _run(sys.executable, "-m", "inverse_cloud.cli", "relay-setup", "--config", str(cfg), "--output",
                     str(bundle), "--no-pin", "--ssh-on-443", "--nat", "none", "--ipv6")
                _run(sys.executable, "-m", "inverse_cloud.cli", "relay-setup", "--config", str(cfg), "--adopt",
                     str(bundle))   # the relay side is set up below, before serve starts
                sslh_cfg = bundle / "sslh.cfg"   # this sshd listens on RELAY only (a relay's listens everywhere)
                sslh_cfg.write_text(sslh_cfg.read_text().replace(f'host: "127.0.0.1"; port: "{sshd_port}"',
                                                                 f'host: "{RELAY}"; port: "{sshd_port}"'))
                cafile = selfsigned_cert(cfg.parent)
                block = (f"table inet rb_block {{\n chain out {{\n  type filter hook output priority 0; policy accept;"
                         f"\n  ip daddr {RELAY} tcp dport {sshd_port} drop\n }}\n}}\n")
                with sslh(sslh_cfg, work / "sslh.log"), _phone() as phone:
                    srv = ServeProcess(cfg, prefix=laptop.exec_prefix, ready_probe=laptop.tls_handshake_ok)
                    try:
                        for rep in range(reps):
                            for via in (("22", "443") if rep % 2 == 0 else ("443", "22")):
                                if via == "443":
                                    _run(*laptop.exec_prefix, "nft", "-f", "-", stdin=block)
                                srv.start()
                                relay.wait_forwards(60)
                                wait_until(lambda: _curl(phone, RELAY4B, cafile)[0] == "207", 30, "the phone")
                                t0 = time.monotonic()
                                relay.kill_session()
                                wait_until(lambda: not relay.forwards_bound(), 10, "the session's forwards gone")
                                wait_until(lambda: _curl(phone, RELAY4B, cafile)[0] == "207", bound_s,
                                           f"a sync after the reconnect over {via}", interval_s=0.1)
                                took = time.monotonic() - t0
                                res[f"reconnect_{via}"].append(took)
                                log(f"rep {rep + 1}: reconnect over {via}: {took:.2f} s")
                                if via == "443":
                                    for address in (RELAY4B, RELAY6):
                                        _curl(phone, address, cafile)   # warm: the first handshake of each family
                                    for _ in range(20):
                                        for address, key in ((RELAY4B, "propfind_v4"), (RELAY6, "propfind_v6")):
                                            code, total = _curl(phone, address, cafile)
                                            if code == "207":
                                                res[key].append(total)
                                    _run(*laptop.exec_prefix, "nft", "delete", "table", "inet", "rb_block")
                                srv.stop()
                    finally:
                        srv.stop()
        finally:
            laptop.delete()
            subprocess.run(["userdel", RELAY_USER], capture_output=True, check=False)
    return res


def report(res: dict[str, Any]) -> list[str]:
    def ms(vals: list[float], q: float) -> str:
        return f"{sorted(vals)[min(len(vals) - 1, int(len(vals) * q))] * 1000:.1f}" if vals else "-"

    lines = ["reconnect after a killed relay session, over 22: "
             + " / ".join(f"{v:.2f}" for v in res["reconnect_22"]) + " s; over 443 (sslh): "
             + " / ".join(f"{v:.2f}" for v in res["reconnect_443"]) + " s"]
    for key, name in (("propfind_v4", "IPv4"), ("propfind_v6", "IPv6")):
        vals = res[key]
        med = f"{statistics.median(vals) * 1000:.1f}" if vals else "-"
        lines.append(f"PROPFIND Depth 1 through sslh and the tunnel over {name}: median {med} ms, p90 "
                     f"{ms(vals, 0.9)} ms (n={len(vals)})")
    return lines
