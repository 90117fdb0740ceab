"""The relay's NAT rules with ``route_localnet = 1`` must not open its loopback services to its network
segment (the bug class of CVE-2020-8558).

Two named network namespaces joined by a veth pair: the relay (the generated rules loaded, route_localnet
set as setup.sh sets it, a service on 127.0.0.1 that is no DNAT target, and the forwarded HTTPS port) and
a neighbour on the same segment that routes 127.0.0.1 over the veth. The neighbour must not reach the
loopback service, and must still reach the forwarded port through the relay's public address.
"""

from __future__ import annotations

import contextlib
import secrets
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from inverse_cloud.tunnel import relay_files as relay
from tests.support import wait_until

RELAY_ADDR, NEIGHBOUR_ADDR = "10.98.7.1", "10.98.7.2"
HIDDEN_PORT, FORWARD_PORT = 9631, 44353


def _run(*args: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    out = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout)
    if check and out.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({out.returncode}): {out.stderr.strip()}")
    return out


@contextlib.contextmanager
def _segment() -> Iterator[tuple[str, str]]:
    """(relay namespace, neighbour namespace), both deleted on exit (the veth pair with them)."""
    tag = secrets.token_hex(3)
    relay_ns, nbr_ns = f"ha-relay-{tag}", f"ha-nbr-{tag}"
    _run("ip", "netns", "add", relay_ns)
    try:
        _run("ip", "netns", "add", nbr_ns)
        try:
            _run("ip", "link", "add", f"ha-r{tag}", "netns", relay_ns, "type", "veth", "peer", "name",
                 f"ha-n{tag}", "netns", nbr_ns)
            for ns, dev, addr in ((relay_ns, f"ha-r{tag}", RELAY_ADDR), (nbr_ns, f"ha-n{tag}", NEIGHBOUR_ADDR)):
                _run("ip", "-n", ns, "link", "set", "lo", "up")
                _run("ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
                _run("ip", "-n", ns, "link", "set", dev, "up")
            # The neighbour (the attacker) sends 127.0.0.1 over the veth and accepts answers from it.
            nbr = ["ip", "netns", "exec", nbr_ns]
            _run(*nbr, "sysctl", "-q", "-w", "net.ipv4.conf.all.route_localnet=1")
            _run(*nbr, "sysctl", "-q", "-w", f"net.ipv4.conf.ha-n{tag}.route_localnet=1")
            _run("ip", "-n", nbr_ns, "addr", "flush", "dev", "lo")   # 127.0.0.1 is not its own any more
            _run("ip", "-n", nbr_ns, "route", "add", "127.0.0.1/32", "via", RELAY_ADDR)
            # The relay as setup.sh leaves it.
            _run("ip", "netns", "exec", relay_ns, "sysctl", "-q", "-w", "net.ipv4.conf.all.route_localnet=1")
            yield relay_ns, nbr_ns
        finally:
            _run("ip", "netns", "del", nbr_ns, check=False)
    finally:
        _run("ip", "netns", "del", relay_ns, check=False)


@contextlib.contextmanager
def _http_server(ns: str, port: int) -> Iterator[None]:
    proc = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-m", "http.server", "--bind",
                             "127.0.0.1", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            cwd="/")
    try:
        wait_until(lambda: _run("ip", "netns", "exec", ns, "curl", "-s", "-o", "/dev/null", "-w", "%{http_code}",
                                f"http://127.0.0.1:{port}/", check=False).stdout == "200", 20,
                   f"http.server on 127.0.0.1:{port} in {ns}")
        yield
    finally:
        proc.terminate()
        proc.wait(10)


def _status(nbr_ns: str, url: str) -> str:
    out = _run("ip", "netns", "exec", nbr_ns, "curl", "-s", "--max-time", "3", "-o", "/dev/null", "-w",
               "%{http_code}", url, check=False)
    return out.stdout


def _load(relay_ns: str, nat: str, tmp_path: Path) -> None:
    """Load the generated rules into the relay namespace the way setup.sh does."""
    s = relay.RelaySpec(domain="laptop.test", user="ictunnel", tunnel_key="ssh-ed25519 AAAA t",
                        takeover_key="ssh-ed25519 AAAA k", https_port=FORWARD_PORT)
    if nat == "nft":
        rules = tmp_path / "nat.nft"
        rules.write_text(relay.nftables_rules(s))
        _run("ip", "netns", "exec", relay_ns, "nft", "-f", str(rules))
        return
    rules = tmp_path / "nat.iptables"
    rules.write_text(relay.iptables_rules(s))
    with open(rules) as fh:
        out = subprocess.run(["ip", "netns", "exec", relay_ns, "iptables-restore", "--noflush"], stdin=fh,
                             capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    # The chain jumps, exactly as the generated setup.sh adds them.
    hooks = [line for line in relay.setup_script(s, "iptables").splitlines() if line.startswith("iptables -")]
    assert hooks
    for line in hooks:
        _run("ip", "netns", "exec", relay_ns, "sh", "-c", line)


@pytest.mark.parametrize("nat", ["nft", "iptables"])
def test_loopback_services_stay_unreachable_from_the_segment(tmp_path, nat):
    """A neighbour routing 127.0.0.1 over its link to the relay: before the rules drop such packets, it got
    200 from a relay service bound to 127.0.0.1 (route_localnet = 1 makes them routable). Now it gets no
    answer, while the forwarded port still answers through the relay's address (DNAT-ed packets pass)."""
    for tool in ("ip", "curl", "nft" if nat == "nft" else "iptables-restore"):
        assert _run("sh", "-c", f"command -v {tool}", check=False).returncode == 0, f"{tool} is needed"
    with _segment() as (relay_ns, nbr_ns), _http_server(relay_ns, HIDDEN_PORT), _http_server(relay_ns, FORWARD_PORT):
        # The control: without the rules the neighbour does reach the loopback service (so the check below can
        # fail, and the segment really routes 127.0.0.1 to the relay).
        assert _status(nbr_ns, f"http://127.0.0.1:{HIDDEN_PORT}/") == "200", "the attack path does not work here"
        _load(relay_ns, nat, tmp_path)
        assert _status(nbr_ns, f"http://{RELAY_ADDR}:443/") == "200", "the DNAT path is broken"
        assert _status(nbr_ns, f"http://127.0.0.1:{HIDDEN_PORT}/") != "200", \
            "a relay service on 127.0.0.1 answered a neighbour on the segment"
