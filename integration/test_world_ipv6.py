"""IPv6 through the default (DNAT) relay variant, in the namespaces test world (integration/world.py): the relay's
ip6 table from `relay-setup --ipv6`, the laptop's second pair of forwards on the relay's [::], a phone that has
only IPv6 and reaches the relay by its AAAA record, and the relay rebooted in between."""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from relay_sshd import configure
from test_journey import Phone, card

from tests.support import ServeProcess, free_port, wait_until

PASSWORD = "correct horse"
CLI = str(Path(sys.executable).parent / "inverse-cloud")   # the installed console script of this venv


def _env(world) -> dict[str, str]:
    """The laptop's environment, keeping PYTHONPATH (the console script then imports this checkout)."""
    env = world.env("laptop")
    if "PYTHONPATH" in os.environ:
        env["PYTHONPATH"] = os.environ["PYTHONPATH"]
    return env


def laptop(world, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*world.prefix("laptop"), CLI, *args], capture_output=True, text=True, timeout=timeout,
                          env=_env(world), stdin=subprocess.DEVNULL, check=False)


def propfind_times(world, role: str, family: str, url: str, n: int = 20) -> list[float]:
    """``n`` verified PROPFINDs (Depth 1) from ``role``, over IPv4 or IPv6 only (curl -4/-6): seconds each."""
    out = []
    for _ in range(n):
        r = world.run(role, "curl", "-s", family, "--max-time", "10", "-u", f"alice:{PASSWORD}", "-X", "PROPFIND",
                      "-H", "Depth: 1", "-o", "/dev/null", "-w", "%{http_code} %{time_total}", url, timeout=30)
        code, _, total = r.stdout.partition(" ")
        assert code == "207", (role, family, r.stdout, r.stderr)
        out.append(float(total))
    return out


def v6_link(world, cfg: Path) -> dict:
    doc = json.loads(laptop(world, "doctor", "--json", "--timeout", "10", "--config", str(cfg)).stdout)
    return next(c for c in doc["checks"] if c["name"] == "public HTTPS (IPv6)")


HOME6, ROUTER6, ROUTER_LAN6, LAPTOP6 = "2001:db8:7::/64", "2001:db8:1::2", "2001:db8:7::1", "2001:db8:7::2"


@contextlib.contextmanager
def home_ipv6(world) -> Iterator[None]:
    """The laptop's home network gets routed IPv6 (no NAT for v6, as at most ISPs): the router forwards, the
    laptop has an address and a default route, the internet (here: the relay) routes the home prefix to the
    router. Everything is removed again on exit (the world is shared by the session)."""
    steps = [("router", ["ip", "addr", "add", f"{ROUTER6}/64", "dev", "eth0", "nodad"]),
             ("router", ["ip", "addr", "add", f"{ROUTER_LAN6}/64", "dev", "lan0", "nodad"]),
             ("router", ["sysctl", "-q", "-w", "net.ipv6.conf.all.forwarding=1"]),
             ("laptop", ["ip", "addr", "add", f"{LAPTOP6}/64", "dev", "eth0", "nodad"]),
             ("laptop", ["ip", "-6", "route", "add", "default", "via", ROUTER_LAN6]),
             ("relay", ["ip", "-6", "route", "add", HOME6, "via", ROUTER6])]
    undo = [("relay", ["ip", "-6", "route", "del", HOME6]),
            ("laptop", ["ip", "-6", "route", "del", "default", "via", ROUTER_LAN6]),
            ("laptop", ["ip", "addr", "del", f"{LAPTOP6}/64", "dev", "eth0"]),
            ("router", ["sysctl", "-q", "-w", "net.ipv6.conf.all.forwarding=0"]),
            ("router", ["ip", "addr", "del", f"{ROUTER_LAN6}/64", "dev", "lan0"]),
            ("router", ["ip", "addr", "del", f"{ROUTER6}/64", "dev", "eth0"])]
    try:
        for role, argv in steps:
            world.run(role, *argv, check=True)
        wait_until(lambda: world.tcp_open("laptop", "2001:db8:1::10", 22), 20, "the laptop reaching the relay's "
                   "sshd over IPv6")
        yield
    finally:
        for role, argv in undo:
            world.run(role, *argv)


@pytest.mark.slow
def test_ipv6_only_phone_syncs_through_the_dnat_variant_after_a_relay_reboot(world, tmp_path, request):
    """1. `init` on the laptop (the relay by name, the world's Pebble); the admin's key for root on the relay.
    2. `relay-setup --apply root@relay.example.org --ipv6 --yes` (default NAT, nft): setup.sh loads the ip and ip6
       tables and enables the NAT unit; [relay] listen_host6 = "::" is set. 3. doctor prints the A and the AAAA
       record (the relay's name has both); they are published. 4. serve: the tunnel binds four forwards, Pebble
       issues (validating port 80 over whichever address it picks). 5. A phone with only IPv6 (its DNS server by
       IPv6 too) syncs through https://contacts.example.org/; the laptop's log names the phone's own IPv6
       address (the ip6 redirect keeps it). doctor's IPv6 link: skipped while the laptop's network has no IPv6
       (it cannot probe), ok once the home network gets routed IPv6 (the AAAA address presents our key).
    6. The relay reboots: the ip6 table comes back from its /etc, the tunnel reconnects, the IPv6-only phone syncs
       again. 7. Printed, not asserted: PROPFIND times from the IPv4 phone and the IPv6 phone."""
    from world import DOMAIN, HOSTS, RELAY_NAME

    root = tmp_path / "ic"
    root.mkdir()
    (root / "password").write_text(PASSWORD)
    cfg = root / "config.toml"
    out = laptop(world, "init", "--non-interactive", "--config", str(cfg), "--data-dir", str(root / "data"),
                 "--state-dir", str(root / "state"), "--domain", DOMAIN, "--user", "alice", "--password-file",
                 str(root / "password"), "--https-listen", f"127.0.0.1:{free_port()}", "--http-listen",
                 f"127.0.0.1:{free_port()}", "--relay", RELAY_NAME, "--acme-email", "",
                 "--acme-directory", world.acme_directory, "--acme-ca-bundle", "/etc/ssl/certs/ca-certificates.crt")
    assert out.returncode == 0, out.stdout + out.stderr
    configure(cfg, "relay", keepalive_interval_s=2, keepalive_count_max=3, connect_timeout_s=5)
    configure(cfg, "acme", caa_issuer="pebble.invalid")

    key = world.laptop_home / ".ssh" / "id_ed25519"
    if not key.exists():
        key.parent.mkdir(mode=0o700, exist_ok=True)  # ssh-keygen -f does not make it
        world.run("laptop", "ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key), check=True)
    world.authorize_admin(Path(f"{key}.pub").read_text())
    (world.laptop_home / ".ssh" / "config").write_text("StrictHostKeyChecking accept-new\n")

    out = laptop(world, "relay-setup", "--config", str(cfg), "--apply", f"root@{RELAY_NAME}", "--ipv6", "--yes",
                 timeout=300)
    assert out.returncode == 0 and "relay ready for user inverse-cloud" in out.stdout, out.stdout + out.stderr
    assert 'listen_host6 = "::"' in cfg.read_text()
    nat = world.run("relay", "nft", "list", "table", "ip6", "inverse_cloud").stdout
    assert "redirect to :44353" in nat, nat

    doc = json.loads(laptop(world, "doctor", "--json", "--timeout", "10", "--config", str(cfg)).stdout)
    records = [r for r in doc["dns_records"] if "<" not in r]
    assert f"{DOMAIN}. A {HOSTS['relay'].address}" in records, records
    assert f"{DOMAIN}. AAAA {HOSTS['relay'].address6}" in records, records
    # the session's world may hold the domain's A record from another test: replaced, and removed at the end
    for rtype in ("A", "AAAA"):
        world.unpublish(f"{DOMAIN}.", rtype, missing_ok=True)
        request.addfinalizer(lambda rtype=rtype: world.unpublish(f"{DOMAIN}.", rtype, missing_ok=True))
    world.publish([r for r in records if " A " in r or " AAAA " in r])

    def ready(port: int) -> bool:
        return laptop(world, "status", "--json", "--config", str(cfg)).stdout.startswith("{")

    def status() -> dict:
        text = laptop(world, "status", "--json", "--config", str(cfg)).stdout
        return json.loads(text) if text.startswith("{") else {}

    with ServeProcess(cfg, env={"HOME": str(world.laptop_home)}, prefix=world.prefix("laptop"),
                      ready_probe=ready) as srv:
        def issued() -> bool:
            served = (status().get("certificate") or {}).get("served") or {}
            return bool(served) and not served.get("self_signed")

        wait_until(issued, 180, "a certificate from Pebble", interval_s=0.5,
                   on_timeout=lambda: srv.log()[-4000:] + world.log("pebble")[-2000:])
        tunnel = status()["tunnel"]
        assert [(f["relay_host"], f["bound"]) for f in tunnel["forwards"]] == [
            ("127.0.0.1", True), ("127.0.0.1", True), ("::", True), ("::", True)], tunnel

        phone6 = world.add_phone6()
        phone = Phone(tmp_path, "v6phone", base=f"https://{DOMAIN}", prefix=world.prefix(phone6),
                      env=world.env(phone6))
        (phone.contacts / "v6.vcf").write_text(card("v6", "Over IPv6"))
        # the new phone's link settles first (seen once: the first connect refused right after add_phone6)
        wait_until(lambda: world.tcp_open(phone6, HOSTS["relay"].address6, 443), 30,
                   "the relay's [v6]:443 from the new IPv6-only phone", interval_s=0.2)
        phone.sync()
        assert HOSTS["phone6"].address6 in srv.log(), srv.log()[-3000:]
        assert v6_link(world, cfg)["state"] == "skip" and "no IPv6 route" in v6_link(world, cfg)["detail"]
        with home_ipv6(world):
            link = v6_link(world, cfg)
            assert link["state"] == "ok" and "presents our key" in link["detail"], link

        world.reboot_relay()
        assert "redirect to :44353" in world.run("relay", "nft", "list", "table", "ip6", "inverse_cloud").stdout, \
            "the ip6 table did not come back after the reboot"
        wait_until(lambda: (status().get("tunnel") or {}).get("state") == "up" and all(
            f["bound"] for f in status()["tunnel"]["forwards"]), 120, "the tunnel back after the reboot",
            interval_s=0.5, on_timeout=lambda: srv.log()[-4000:])
        (phone.contacts / "after-reboot.vcf").write_text(card("r6", "After Reboot Over IPv6"))
        phone.sync()
        again = Phone(tmp_path, "v6phone_b", base=f"https://{DOMAIN}", prefix=world.prefix(phone6),
                      env=world.env(phone6))
        again.sync()
        assert any("FN:After Reboot Over IPv6" in t for t in again.texts(again.contacts))

        url = f"https://{DOMAIN}/radicale/alice/"
        v4 = propfind_times(world, "phone", "-4", url)
        v6 = propfind_times(world, phone6, "-6", url)
        assert "Traceback" not in srv.log()
    print(f"\n[ipv6] PROPFIND Depth 1 through the DNAT relay and the tunnel, median of {len(v4)}: "
          f"IPv4 {statistics.median(v4) * 1000:.1f} ms, IPv6 {statistics.median(v6) * 1000:.1f} ms "
          f"(p90 {sorted(v4)[int(len(v4) * 0.9)] * 1000:.1f} / {sorted(v6)[int(len(v6) * 0.9)] * 1000:.1f} ms)")
