"""SSH over the relay's 443 (`relay-setup --ssh-on-443`), in the test world, as a user takes it: a laptop installed
with scripts/install.sh and set up with the installed `inverse-cloud` (`init`, `relay-setup --ssh-on-443 --apply
root@relay.example.org` on a relay where sslh is installed), a Pebble certificate through the relay, a phone
syncing by name through the relay's 443, which sslh now owns (transparent: the laptop sees the phone's
address). Then the laptop's network drops outbound SSH: the tunnel comes back over 443 by itself. Then the
relay reboots: sslh comes back from the relay's /etc as boot starts it, and so does the tunnel over 443.

It reinstalls the relay first (no other test's laptop on it) and again at the end (no sslh left on 443)."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
from relay_boot import boot_services
from relay_sshd import configure
from test_journey import Phone, card
from test_world_two_laptops import admin_key, apply, cli, install_and_init, status
from world import HOSTS, ZONE

from tests.support import wait_until

ROLE, SUBNET = "wossh", 11                # the laptop (its home network 192.168.11.0/24, router side wol11)
DOMAIN = f"away.{ZONE}"
BLOCK = "w4_block"                         # the router's nft table that drops outbound SSH
PASSWORD = "correct horse"


def access_lines(log: str) -> list[str]:
    """The access log's DAV lines (``<client> [time] "METHOD /radicale/...``)."""
    return [line for line in log.splitlines() if re.search(r'"(PROPFIND|REPORT|PUT|GET) /radicale/', line)]


def tunnel_on_443(world, role: str) -> bool:
    """``status`` on ``role``: the tunnel up on the fallback port 443 with every forward bound."""
    t = status(world, role).get("tunnel") or {}
    return t.get("state") == "up" and t.get("ssh_port") == 443 and t.get("fallback") is True and all(
        f["bound"] for f in t.get("forwards", []))


def away_from_home(world, request, role: str, subnet: int, block: str, phone, log: Path, dump,
                   deadline_s: float) -> tuple[float, float, str]:
    """The laptop moves to a network that drops outbound SSH: the home router drops what it forwards from
    ``wol<subnet>`` to port 22 (nft table ``block``, removed at teardown). Waits for the tunnel back on its own
    over 443 with status saying so, then a phone sync; every access-log line since names the phone. Returns the
    seconds to the tunnel on 443, to the phone synced, and sshd's log since the drop."""
    request.addfinalizer(lambda: world.run("router", "nft", "delete", "table", "inet", block))
    sshd_log_path = world.root / "relay-sshd.log"
    seen, sshd_seen = len(log.read_text()), len(sshd_log_path.read_text(errors="replace"))
    t0 = time.monotonic()
    world.run("router", "nft", f"add table inet {block}; add chain inet {block} home_out {{ type filter hook "
              f"forward priority 0; policy accept; }}; add rule inet {block} home_out iifname \"wol{subnet}\" "
              "tcp dport 22 drop", check=True)

    wait_until(lambda: tunnel_on_443(world, role), deadline_s,
               "the tunnel back over 443 after outbound SSH was dropped", interval_s=0.5,
               on_timeout=dump)
    up_s = time.monotonic() - t0
    assert "SSH reaches the relay on the fallback port 443 (port 22: timed out)" in log.read_text(), dump()
    text = cli(world, role, "status").stdout
    assert ":443 (fallback port: 22 not reachable" in text, text
    (phone.contacts / "away.vcf").write_text(card("away", "Away From Home"))
    phone.sync()
    sync_s = time.monotonic() - t0
    since = access_lines(log.read_text()[seen:])
    phone_addr = HOSTS["phone"].address
    assert since and all(phone_addr in line for line in since), since[-5:]
    return up_s, sync_s, sshd_log_path.read_text(errors="replace")[sshd_seen:]


def relay_sslh(world) -> set[int]:
    """Pids of the sslh processes in the relay's network namespace (pgrep alone sees this machine's too)."""
    out = world.run("relay", "pgrep", "-x", "sslh")
    return {int(p) for p in out.stdout.split()} & set(world._relay_pids())


@pytest.mark.slow
def test_ssh_on_443_from_a_network_that_drops_ssh_and_after_a_relay_reboot(world, tmp_path, request):
    """1. At home (outbound 22 open): the relay reinstalled, `apt install sslh` there (its unit enabled, not
       running). A laptop behind the home router installs with scripts/install.sh, runs `init` (domain away.),
       makes an admin key (installed for the relay's root). `relay-setup --ssh-on-443 --apply root@relay`:
       setup.sh writes /etc/sslh.cfg and, no systemd running there, starts sslh itself on public 443; the
       laptop's config gains fallback_port = 443. The A record doctor prints is published; `serve`: a Pebble
       certificate (HTTP-01 through the DNAT of port 80); the tunnel is on port 22 (no fallback). A phone syncs
       through https://away.example.org/ (sslh's 443); the laptop's access log names the phone's address.
    2. The home router drops forwarded TCP to port 22 (nft table w4_block). Keepalive notices the dead session;
       the reconnect finds 22 timing out and comes up on 443 through sslh (printed: seconds from the drop to
       `status` saying port 443, fallback, and to the phone's next sync). `status` says "fallback port"; the
       phone syncs; every DAV line of the access log since names the phone's address, none 127.0.0.1.
    3. The relay reboots: boot (integration/relay_boot.py) starts sslh from the enabled unit and
       /etc/default/sslh (DAEMON_OPTS="-F/etc/sslh.cfg", which setup.sh wrote), the NAT unit re-applies the
       policy route and route_localnet the transparent mode needs. The tunnel comes back over 443, the phone
       syncs a new card, a second phone sees it; the access log still names the phone."""
    world.rebuild_relay()
    world.relay_apt_install("sslh")
    assert [s.name for s in boot_services(world.relay_etc)] == ["sslh.service"]
    world.add_laptop(ROLE, SUBNET)
    try:
        _journey(world, tmp_path, request)
    finally:
        world.stop(f"serve-{ROLE}")
        world.run("router", "nft", "delete", "table", "inet", BLOCK)
        world.unpublish(f"{DOMAIN}.", "A", missing_ok=True)
        world.rebuild_relay()


def _journey(world, tmp_path: Path, request) -> None:

    phone_addr = HOSTS["phone"].address
    cfg = install_and_init(world, ROLE, DOMAIN, PASSWORD)
    configure(cfg, "relay", keepalive_interval_s=2, keepalive_count_max=3, connect_timeout_s=5)
    configure(cfg, "acme", caa_issuer="pebble.invalid")
    admin_key(world, ROLE)

    # 1. at home: relay-setup --ssh-on-443 on the relay where sslh is installed
    code, text = apply(world, ROLE, "--ssh-on-443")
    assert code == 0 and "relay ready for user inverse-cloud" in text, text
    assert "fallback_port = 443" in cfg.read_text()
    assert "transparent: true;" in (world.relay_etc / "sslh.cfg").read_text()
    assert 'DAEMON_OPTS="-F/etc/sslh.cfg"' in (world.relay_etc / "default" / "sslh").read_text()
    started = relay_sslh(world)
    assert started, "setup.sh started no sslh on the relay (there is no systemd to start it)"
    wait_until(lambda: world.tcp_open("phone", HOSTS["relay"].address, 443), 30, "sslh on the relay's public 443")

    doc = json.loads(cli(world, ROLE, "doctor", "--json", "--timeout", "10").stdout)
    records = [r for r in doc["dns_records"] if " A " in r]
    assert records == [f"{DOMAIN}. A {HOSTS['relay'].address}"], doc["dns_records"]
    world.unpublish(f"{DOMAIN}.", "A", missing_ok=True)
    world.publish(records)

    log = world.root / f"serve-{ROLE}.log"
    world.popen(f"serve-{ROLE}", ROLE, "inverse-cloud", "serve", log=log)
    dump = lambda: log.read_text()[-4000:] + "\n--- relay sshd ---\n" + world.log("relay-sshd")[-1500:]  # noqa: E731

    def issued() -> bool:
        served = (status(world, ROLE).get("certificate") or {}).get("served") or {}
        return bool(served) and not served.get("self_signed")

    wait_until(issued, 240, "a certificate from Pebble", interval_s=1, on_timeout=dump)
    tunnel = status(world, ROLE)["tunnel"]
    assert tunnel["state"] == "up" and tunnel["ssh_port"] == 22 and not tunnel["fallback"], tunnel

    phone = Phone(tmp_path, "away_phone", base=f"https://{DOMAIN}", prefix=world.prefix("phone"),
                  env=world.env("phone"))
    (phone.contacts / "home.vcf").write_text(card("home", "At Home"))
    phone.sync()
    lines = access_lines(log.read_text())
    assert lines and not any('127.0.0.1 "' in line for line in lines), lines[-5:]
    assert any(phone_addr in line for line in lines), lines[-5:]

    # 2. a network that drops outbound SSH (the home router drops what it forwards to port 22)
    up_s, sync_s, sshd_log = away_from_home(world, request, ROLE, SUBNET, BLOCK, phone, log, dump, 180)
    # the new session came through sslh, and sshd saw the laptop's (router's) own address: sslh is transparent
    # for SSH too
    assert f"Accepted publickey for inverse-cloud from {HOSTS['router'].address} port" in sshd_log, sshd_log[-2000:]
    assert "from 127.0.0.1" not in sshd_log, sshd_log[-2000:]

    # 3. the relay reboots: sslh comes back from its /etc, so does the tunnel over 443
    boot = boot_services(world.relay_etc)
    assert [(s.name, s.argv, s.forking) for s in boot] == [
        ("sslh.service", ["/usr/sbin/sslh", "--foreground", "-F/etc/sslh.cfg"], False)], boot
    seen = len(log.read_text())
    before = status(world, ROLE)["tunnel"]["connected_since"]
    t1 = time.monotonic()
    world.reboot_relay()
    assert not started & relay_sslh(world), "the sslh setup.sh started survived the reboot"
    wait_until(lambda: relay_sslh(world) and world.tcp_open("phone", HOSTS["relay"].address, 443), 30,
               "sslh back on the relay's 443 after the reboot", on_timeout=lambda: world.log("relay-boot-sslh.service"))
    wait_until(lambda: tunnel_on_443(world, ROLE) and status(world, ROLE)["tunnel"]["connected_since"] != before, 180,
               "a new tunnel session over 443 after the reboot", interval_s=0.5, on_timeout=dump)
    reboot_s = time.monotonic() - t1
    (phone.contacts / "reboot.vcf").write_text(card("reboot", "After The Reboot"))
    phone.sync()
    again = Phone(tmp_path, "away_phone_b", base=f"https://{DOMAIN}", prefix=world.prefix("phone"),
                  env=world.env("phone"))
    again.sync()
    assert any("FN:After The Reboot" in t for t in again.texts(again.contacts))
    since = access_lines(log.read_text()[seen:])
    assert since and all(phone_addr in line for line in since), since[-5:]
    assert "Traceback" not in log.read_text()
    print(f"\n[ssh-on-443 world] outbound 22 dropped -> tunnel on 443: {up_s:.1f} s (keepalive 2 s x 3, "
          f"connect_timeout_s 5), phone synced {sync_s:.1f} s after the drop; relay reboot -> tunnel on 443: "
          f"{reboot_s:.1f} s")
