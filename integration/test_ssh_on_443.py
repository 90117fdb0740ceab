"""SSH on 443 for laptops in networks that block outbound SSH: the relay runs Debian's real sslh on its
public 443 (config from `relay-setup --ssh-on-443`), next to its sshd; the laptop, in a network namespace of
its own whose nftables drop outbound SSH to the relay's sshd port, brings the tunnel up over 443 by itself
and the phone syncs through the same 443."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from dav_helpers import selfsigned_cert
from netns import LaptopNetns
from relay_sandbox import private_netns
from relay_sshd import configure, port_listening, relay_sshd, sshd_available

from tests.support import ServeProcess, free_port, init_instance, wait_until

RELAY, LAPTOP = "10.99.14.1", "10.99.14.2"
RELAY6, PHONE6 = "fd00:99:15::1", "fd00:99:15::2"        # the relay's public IPv6 side, a phone with only IPv6
RELAY4B, PHONE4 = "10.99.15.1", "10.99.15.2"               # added to the same phone later, for the v4/v6 figure
USER = "retunnel"     # its own tunnel user: the takeover ends every other session of the user machine-wide
PASSWORD = "correct horse"


def _run(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    out = subprocess.run(list(args), input=stdin, capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0, f"{' '.join(args)}: {out.stderr}"
    return out


@contextlib.contextmanager
def re_laptop() -> Iterator[LaptopNetns]:
    """The laptop's namespace and veth pair (names prefixed re-), deleted on exit."""
    ns = LaptopNetns(name=f"re-laptop-{os.getpid()}-{secrets.token_hex(3)}", relay_address=RELAY, address=LAPTOP,
                     relay_if="rerelay0", laptop_if="relaptop0")
    try:
        ns.create()
        yield ns
    finally:
        if os.path.exists(ns.path):
            ns.delete()


# A Debian relay's /etc/hosts names localhost for both families (this test machine's may not): sslh's targets
# with --ssh-on-443 --ipv6 are "localhost", resolved by sslh when it reads its configuration.
RELAY_HOSTS = "127.0.0.1\tlocalhost\n::1\t\tlocalhost ip6-localhost ip6-loopback\n"


@contextlib.contextmanager
def sslh(cfg_path: Path, log: Path, hosts: Path | None = None) -> Iterator[subprocess.Popen[bytes]]:
    """sslh-select (one process: stopping its pid stops every connection it carries) in the foreground; with
    ``hosts``, in a mount namespace of its own where that file is /etc/hosts (unshare and sh exec into sslh, so
    the pid is sslh's)."""
    argv = ["sslh-select", "-f", f"-F{cfg_path}"]
    if hosts is not None:
        argv = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                'mount --bind "$0" /etc/hosts && exec "$@"', str(hosts), *argv]
    with open(log, "wb") as fh:
        proc = subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT)
    try:
        def listening() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(f"sslh exited with {proc.returncode}: {log.read_text()}")
            return f"{RELAY}:443" in _run("ss", "-Hltn", "sport = :443").stdout or \
                "0.0.0.0:443" in _run("ss", "-Hltn", "sport = :443").stdout
        wait_until(listening, 15, "sslh listening on 443")
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


@contextlib.contextmanager
def re_phone6() -> Iterator[str]:
    """A phone namespace (name prefixed re-) with only an IPv6 address, on a veth to the relay's side."""
    name = f"re-phone-{os.getpid()}-{secrets.token_hex(3)}"
    try:
        _run("ip", "netns", "add", name)
        _run("ip", "-n", name, "link", "set", "lo", "up")
        _run("ip", "link", "add", "rephone0", "type", "veth", "peer", "name", "rephonep", "netns", name)
        _run("ip", "addr", "add", f"{RELAY6}/64", "dev", "rephone0", "nodad")
        _run("ip", "link", "set", "rephone0", "up")
        _run("ip", "-n", name, "addr", "add", f"{PHONE6}/64", "dev", "rephonep", "nodad")
        _run("ip", "-n", name, "link", "set", "rephonep", "up")
        yield name
    finally:
        if os.path.exists(f"/run/netns/{name}"):
            subprocess.run(["ip", "netns", "delete", name], capture_output=True, check=False)


def phone_times(ns: str, address: str, cafile: Path, n: int = 20) -> list[float]:
    """``n`` verified PROPFINDs from the phone namespace to ``address``:443; each one's total time (s)."""
    host = f"[{address}]" if ":" in address else address
    out = []
    for _ in range(n):
        r = subprocess.run(
            ["ip", "netns", "exec", ns, "curl", "-s", "--max-time", "5", "--cacert", str(cafile), "--resolve",
             f"laptop.test:443:{host}", "-u", f"alice:{PASSWORD}", "-X", "PROPFIND", "-H", "Depth: 1", "-o",
             "/dev/null", "-w", "%{http_code} %{time_total}", "https://laptop.test/radicale/alice/"],
            capture_output=True, text=True, timeout=20, check=False)
        code, _, total = r.stdout.partition(" ")
        assert code == "207", (address, r.stdout, r.stderr)
        out.append(float(total))
    return out


def phone_propfind(cafile: Path) -> bool:
    """A phone on the relay's side: PROPFIND https://laptop.test/ (public 443 = sslh), verified."""
    out = subprocess.run(
        ["curl", "-s", "--max-time", "5", "--cacert", str(cafile), "--resolve", f"laptop.test:443:{RELAY}",
         "-u", f"alice:{PASSWORD}", "-X", "PROPFIND", "-H", "Depth: 1", "https://laptop.test/radicale/alice/"],
        capture_output=True, text=True, timeout=20, check=False)
    return "/radicale/alice/contacts/" in out.stdout


def status_doc(cfg: Path) -> dict:
    out = subprocess.run([sys.executable, "-m", "inverse_cloud.cli", "status", "--json", "--config", str(cfg)],
                         capture_output=True, text=True, timeout=30, check=False)
    return json.loads(out.stdout)


def reconnect_s(srv: ServeProcess, relay, cafile: Path) -> float:
    """Kill the relay-side session; seconds until the phone syncs again."""
    t0 = time.monotonic()
    assert relay.kill_session()
    wait_until(lambda: not relay.forwards_bound(), 10, "the killed session's forwards gone")
    wait_until(lambda: phone_propfind(cafile), 40, "the phone syncing after the reconnect", interval_s=0.1,
               on_timeout=lambda: srv.log()[-3000:])
    return time.monotonic() - t0


@pytest.mark.slow
def test_tunnel_comes_up_over_443_when_outbound_ssh_is_dropped(tmp_path):
    """1. Relay side (private network namespace): real sshd on RELAY:<ssh port> with relay-setup's config,
       Debian's sslh on 443 with the sslh.cfg `relay-setup --ssh-on-443` renders (which also sets [relay]
       fallback_port = 443 in the laptop's config). 2. The laptop namespace drops outbound TCP to <ssh port>
       (nftables table re_block). 3. serve starts: the SSH port times out, the tunnel comes up on 443 through
       sslh, one line "SSH reaches the relay on the fallback port 443 (port N: timed out)"; `status` says
       "fallback"; a phone PROPFINDs https://laptop.test/ on the relay's 443 (TLS through sslh) -> 207; a
       phone with only IPv6 does the same through sslh's [::]:443 (`--ipv6`), 20 times (timed, v4 too).
    4. The relay session is killed: the reconnect goes straight to 443 (printed: seconds to a working sync).
    5. The drop rule removed and serve restarted: the tunnel uses the SSH port again (printed likewise)."""
    missing = sshd_available()
    assert missing is None, missing
    for tool in ("ip", "ss", "curl", "nft", "sslh-select"):
        assert shutil.which(tool), f"{tool} missing: apt-get install -y iproute2 curl nftables sslh"
    with private_netns(), re_laptop() as laptop:
        sshd_port = free_port()
        cfg = init_instance(tmp_path / "ic", relay=f"{USER}@{RELAY}:{sshd_port}")
        configure(cfg, "relay", keepalive_interval_s=1, keepalive_count_max=3, connect_timeout_s=3)
        try:
            with relay_sshd(cfg, user=USER, client_alive_interval=15, listen_address=RELAY) as relay:
                bundle = tmp_path / "bundle443"
                _run(sys.executable, "-m", "inverse_cloud.cli", "relay-setup", "--config", str(cfg), "--output",
                     str(bundle), "--no-pin", "--ssh-on-443", "--ipv6", "--nat", "none")
                # The test sets up the relay side itself (below) before serve starts: the laptop adopts the
                # bundle's settings now, as a user does once setup.sh succeeded on the relay.
                _run(sys.executable, "-m", "inverse_cloud.cli", "relay-setup", "--config", str(cfg), "--adopt",
                     str(bundle))
                # --nat none: this relay has no NAT (with nft, --ipv6 also sets [relay] listen_host6, and the
                # laptop would ask for [::] forwards that the Match block relay_sshd installed does not permit).
                # Test-only: this sshd listens on RELAY, not on every address as a relay's does.
                sslh_cfg = bundle / "sslh.cfg"
                sslh_cfg.write_text(sslh_cfg.read_text().replace(f'host: "127.0.0.1"; port: "{sshd_port}"',
                                                                 f'host: "{RELAY}"; port: "{sshd_port}"'))
                assert "fallback_port = 443" in cfg.read_text()
                _run(*laptop.exec_prefix, "nft", "-f", "-", stdin=(
                    "table inet re_block {\n chain out {\n  type filter hook output priority 0; policy accept;\n"
                    f"  ip daddr {RELAY} tcp dport {sshd_port} drop\n }}\n}}\n"))
                cafile = selfsigned_cert(cfg.parent)
                with sslh(sslh_cfg, tmp_path / "sslh.log"), \
                        ServeProcess(cfg, prefix=laptop.exec_prefix, ready_probe=laptop.tls_handshake_ok) as srv:
                    dump = lambda: srv.log()[-4000:] + "\n--- sshd ---\n" + relay.log()[-2000:]  # noqa: E731
                    t0 = time.monotonic()
                    relay.wait_forwards(40, on_timeout=dump)
                    first_up = time.monotonic() - t0
                    assert f"SSH reaches the relay on the fallback port 443 (port {sshd_port}: timed out)" in srv.log()
                    wait_until(lambda: phone_propfind(cafile), 20, "the phone syncing over 443", on_timeout=dump)
                    tunnel = status_doc(cfg)["tunnel"]
                    assert tunnel["state"] == "up" and tunnel["ssh_port"] == 443 and tunnel["fallback"] is True
                    text = subprocess.run([sys.executable, "-m", "inverse_cloud.cli", "status", "--config", str(cfg)],
                                          capture_output=True, text=True, timeout=30, check=False).stdout
                    assert f"to {RELAY}:443 (fallback port: {sshd_port} not reachable" in text, text
                    with re_phone6() as phone:
                        v6 = phone_times(phone, RELAY6, cafile)          # only IPv6: through sslh's [::]:443
                        _run("ip", "addr", "add", f"{RELAY4B}/24", "dev", "rephone0")
                        _run("ip", "-n", phone, "addr", "add", f"{PHONE4}/24", "dev", "rephonep")
                        v4 = phone_times(phone, RELAY4B, cafile)
                    over_443 = reconnect_s(srv, relay, cafile)
                    assert "Traceback" not in srv.log()
                    _run(*laptop.exec_prefix, "nft", "delete", "table", "inet", "re_block")
                    srv.stop()
                    srv.start()
                    relay.wait_forwards(30, on_timeout=dump)
                    wait_until(lambda: status_doc(cfg)["tunnel"].get("ssh_port") == sshd_port, 20,
                               "the tunnel on the SSH port again", on_timeout=dump)
                    over_22 = reconnect_s(srv, relay, cafile)
            print(f"\n[ssh-on-443] first connect with port {sshd_port} dropped (connect_timeout_s 3, then 443): "
                  f"{first_up:.2f} s; reconnect after a killed session: over 443 {over_443:.2f} s, over the SSH "
                  f"port {over_22:.2f} s")
            print(f"[ssh-on-443] phone PROPFIND (Depth 1) through sslh and the tunnel, median of {len(v4)}: "
                  f"IPv4 {sorted(v4)[len(v4) // 2] * 1000:.1f} ms, IPv6 {sorted(v6)[len(v6) // 2] * 1000:.1f} ms")
        finally:
            subprocess.run(["userdel", USER], capture_output=True, check=False)


def phone_curl(ns: str, address: str, cafile: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["ip", "netns", "exec", ns, "curl", "-s", "--max-time", "5", "--cacert", str(cafile), "--resolve",
         f"laptop.test:443:{address}", "-u", f"alice:{PASSWORD}", "-X", "PROPFIND", "-H", "Depth: 1", "-o",
         "/dev/null", "-w", "%{http_code}", "https://laptop.test/radicale/alice/"],
        capture_output=True, text=True, timeout=20, check=False)


@pytest.mark.slow
@pytest.mark.parametrize("ipv6", [False, True], ids=["ipv4", "ipv6"])
def test_sslh_transparent_passes_the_phones_address_to_the_laptop(tmp_path, ipv6):
    """The relay side as `relay-setup --ssh-on-443` renders it (ipv6: with --ipv6): sslh.cfg with transparent:
    true, and nftables.conf plus the loader's policy route, loaded in the relay's namespace as setup.sh and boot
    do. The laptop's outbound SSH port is dropped, so the tunnel itself comes through sslh (transparently: sshd
    sees the laptop's own address). A phone on another address PROPFINDs https://laptop.test/ at the relay's 443
    -> 207, and the laptop's access log names the phone's address, not 127.0.0.1. ipv6: sslh's targets are
    localhost (the relay's /etc/hosts names 127.0.0.1 and ::1), the laptop also binds its [::] pair, and the ip6
    table marks the replies from ::1: first a phone with only IPv6 PROPFINDs at the relay's IPv6 address -> 207,
    the access log names its IPv6 address (before, --ipv6 turned transparent mode off and the laptop logged
    127.0.0.1), then the same phone over IPv4 as above."""
    missing = sshd_available()
    assert missing is None, missing
    for tool in ("ip", "ss", "curl", "nft", "sslh-select", "unshare"):
        assert shutil.which(tool), f"{tool} missing: apt-get install -y iproute2 curl nftables sslh util-linux"
    with private_netns(), re_laptop() as laptop:
        sshd_port = free_port()
        cfg = init_instance(tmp_path / "ic", relay=f"{USER}@{RELAY}:{sshd_port}")
        configure(cfg, "relay", keepalive_interval_s=1, keepalive_count_max=3, connect_timeout_s=3)
        extra = ("--ssh-on-443", "--ipv6") if ipv6 else ()
        try:
            with relay_sshd(cfg, user=USER, client_alive_interval=15, listen_address=RELAY,
                            setup_args=extra) as relay:
                bundle = tmp_path / "bundle443"
                _run(sys.executable, "-m", "inverse_cloud.cli", "relay-setup", "--config", str(cfg), "--output",
                     str(bundle), "--no-pin", "--ssh-on-443", *extra)
                _run(sys.executable, "-m", "inverse_cloud.cli", "relay-setup", "--config", str(cfg), "--adopt",
                     str(bundle))   # the relay side is set up below, before serve starts
                sslh_cfg = bundle / "sslh.cfg"
                assert "transparent: true;" in sslh_cfg.read_text()
                target = "localhost" if ipv6 else "127.0.0.1"
                assert f'name: "tls"; host: "{target}"; port: "{relay.https_port}"' in sslh_cfg.read_text()
                # Test-only: this sshd listens on RELAY, not on every address as a relay's does; its replies to
                # sslh's transparent connections come from RELAY, so they are marked too.
                sslh_cfg.write_text(sslh_cfg.read_text().replace(f'host: "{target}"; port: "{sshd_port}"',
                                                                 f'host: "{RELAY}"; port: "{sshd_port}"'))
                nft = (bundle / "nftables.conf").read_text()
                assert ("table ip6 inverse_cloud" in nft) == ipv6
                nft = nft.replace("tcp sport {", f"tcp sport {{ {sshd_port}, ", 1).replace(
                    "ip saddr 127.0.0.0/8 ip daddr != 127.0.0.0/8", f"ip saddr {{ 127.0.0.0/8, {RELAY} }} "
                    f"ip daddr != {{ 127.0.0.0/8, {RELAY} }}", 1)
                (tmp_path / "nat.nft").write_text(nft)
                _run("sysctl", "-q", "-w", "net.ipv4.conf.all.route_localnet=1")
                _run("nft", "-f", str(tmp_path / "nat.nft"))
                loader = (bundle / "setup.sh").read_text().split("nft -f /etc/inverse-cloud/nat.nft\n", 1)[1]
                _run("sh", "-ec", loader.split("INVERSE_CLOUD_EOF", 1)[0])
                _run(*laptop.exec_prefix, "nft", "-f", "-", stdin=(
                    "table inet re_block {\n chain out {\n  type filter hook output priority 0; policy accept;\n"
                    f"  ip daddr {RELAY} tcp dport {sshd_port} drop\n }}\n}}\n"))
                cafile = selfsigned_cert(cfg.parent)
                hosts = tmp_path / "relay-hosts"
                hosts.write_text(RELAY_HOSTS)
                with sslh(sslh_cfg, tmp_path / "sslh.log", hosts if ipv6 else None), \
                        ServeProcess(cfg, prefix=laptop.exec_prefix, ready_probe=laptop.tls_handshake_ok) as srv:
                    dump = lambda: (srv.log()[-4000:] + "\n--- sshd ---\n" + relay.log()[-2000:]  # noqa: E731
                                    + "\n--- sslh ---\n" + (tmp_path / "sslh.log").read_text()[-2000:])
                    relay.wait_forwards(40, on_timeout=dump)
                    assert f"Connection from {LAPTOP} port" in relay.log(), relay.log()[-2000:]
                    with re_phone6() as phone:
                        if ipv6:
                            wait_until(lambda: port_listening(relay.https_port, "[::]"), 20,
                                       "the laptop's [::] forward pair bound", on_timeout=dump)
                            wait_until(lambda: phone_curl(phone, f"[{RELAY6}]", cafile).stdout == "207", 20,
                                       "the IPv6-only phone syncing through the transparent sslh", on_timeout=dump)
                            wait_until(lambda: PHONE6 in srv.log(), 10, "the phone's IPv6 address in the access "
                                       "log", on_timeout=dump)
                        _run("ip", "addr", "add", f"{RELAY4B}/24", "dev", "rephone0")
                        _run("ip", "-n", phone, "addr", "add", f"{PHONE4}/24", "dev", "rephonep")
                        wait_until(lambda: phone_curl(phone, RELAY4B, cafile).stdout == "207", 20,
                                   "the phone syncing through the transparent sslh", on_timeout=dump)
                        wait_until(lambda: PHONE4 in srv.log(), 10, "the phone's address in the access log",
                                   on_timeout=dump)
                    assert "Traceback" not in srv.log()
                print(f"\n[ssh-on-443] transparent sslh ({'--ipv6' if ipv6 else 'IPv4'}): the laptop's log names "
                      f"the phone {PHONE6 + ' and ' if ipv6 else ''}{PHONE4}; sshd saw the laptop as {LAPTOP}")
        finally:
            subprocess.run(["userdel", USER], capture_output=True, check=False)
