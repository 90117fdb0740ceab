"""SSH on the shared SNI router's 443 (`relay-setup --nat sni --ssh-on-443`), in the test world, as a user takes
it: a laptop installed with scripts/install.sh and set up with the installed `inverse-cloud` (`init`,
`relay-setup --nat sni --ssh-on-443 --apply root@relay.example.org`), a Pebble certificate through nginx's port
80, a phone syncing by name through nginx's 443. Then the laptop's network drops outbound SSH: the tunnel comes
back over 443 by itself, through the same nginx (no sslh), and the phone syncs.

It reinstalls the relay first (no other test's laptop on it) and again at the end (no nginx left on 443)."""

from __future__ import annotations

from pathlib import Path

import pytest
from relay_sshd import configure
from test_journey import Phone, card
from test_world_ssh_on_443 import access_lines, away_from_home
from test_world_two_laptops import admin_key, apply, install_and_init, status
from world import HOSTS, ZONE

from tests.support import wait_until

ROLE, SUBNET = "wos4", 44                 # the laptop (its home network 192.168.44.0/24, router side wol44)
DOMAIN = f"shared.{ZONE}"
BLOCK = "s4_block"                         # the router's nft table that drops outbound SSH
PASSWORD = "correct horse"


@pytest.mark.slow
def test_sni_router_carries_ssh_on_443_from_a_network_that_drops_ssh(world, tmp_path, request):
    """1. At home (outbound 22 open): the relay reinstalled. A laptop behind the home router installs with
       scripts/install.sh, runs `init` (domain shared.), makes an admin key (installed for the relay's root).
       `relay-setup --nat sni --ssh-on-443 --apply root@relay`: setup.sh writes the shared router and the SSH
       route (/etc/inverse-cloud/ssh-route), no sslh; the laptop's config gains fallback_port = 443 and
       proxy_protocol = true. The A record is published; `serve`: a Pebble certificate (HTTP-01 through nginx's
       port 80 by Host); the tunnel is on port 22. A phone syncs through https://shared.example.org/ (nginx's
       443 by SNI); the laptop's access log names the phone's address (the PROXY header).
    2. The home router drops forwarded TCP to port 22 (nft table s4_block). Keepalive notices the dead session;
       the reconnect finds 22 timing out and comes up on 443 through nginx (printed: seconds from the drop to
       `status` saying port 443, fallback, and to the phone's next sync). sshd logged that session from
       127.0.0.1 (the documented trade-off); the phone syncs; its DAV lines still name the phone."""
    world.rebuild_relay()
    world.add_laptop(ROLE, SUBNET)
    try:
        _journey(world, tmp_path, request)
    finally:
        world.stop(f"serve-{ROLE}")
        world.run("router", "nft", "delete", "table", "inet", BLOCK)
        world.unpublish(f"{DOMAIN}.", "A", missing_ok=True)
        world.rebuild_relay()


def _journey(world, tmp_path: Path, request) -> None:
    phone_addr, relay_addr = HOSTS["phone"].address, HOSTS["relay"].address
    cfg = install_and_init(world, ROLE, DOMAIN, PASSWORD)
    configure(cfg, "relay", keepalive_interval_s=2, keepalive_count_max=3, connect_timeout_s=5)
    admin_key(world, ROLE)

    # 1. at home: the shared router with SSH on its 443
    code, text = apply(world, ROLE, "--nat", "sni", "--ssh-on-443")
    assert code == 0 and "relay ready for user inverse-cloud" in text, text
    settings = cfg.read_text()
    assert "fallback_port = 443" in settings and "proxy_protocol = true" in settings, settings
    route = world.relay_etc / "inverse-cloud" / "ssh-route"
    assert (route / "protocol.map").read_text() == '    "" unix:/run/inverse-cloud/ssh.sock;\n'
    assert not (world.relay_etc / "sslh.cfg").exists()
    wait_until(lambda: world.tcp_open("phone", relay_addr, 443), 30, "nginx on the relay's public 443")
    world.unpublish(f"{DOMAIN}.", "A", missing_ok=True)
    world.publish([f"{DOMAIN}. A {relay_addr}"])

    log = world.root / f"serve-{ROLE}.log"
    world.popen(f"serve-{ROLE}", ROLE, "inverse-cloud", "serve", log=log)
    dump = lambda: log.read_text()[-4000:] + "\n--- relay sshd ---\n" + world.log("relay-sshd")[-1500:]  # noqa: E731

    def issued() -> bool:
        served = (status(world, ROLE).get("certificate") or {}).get("served") or {}
        return bool(served) and not served.get("self_signed")

    wait_until(issued, 300, "a certificate from Pebble", interval_s=1, on_timeout=dump)
    tunnel = status(world, ROLE)["tunnel"]
    assert tunnel["state"] == "up" and tunnel["ssh_port"] == 22 and not tunnel["fallback"], tunnel

    phone = Phone(tmp_path, "shared_phone", base=f"https://{DOMAIN}", prefix=world.prefix("phone"),
                  env=world.env("phone"))
    (phone.contacts / "home.vcf").write_text(card("home", "At Home"))
    phone.sync()
    lines = access_lines(log.read_text())
    assert lines and any(phone_addr in line for line in lines), lines[-5:]

    # 2. a network that drops outbound SSH (the home router drops what it forwards to port 22)
    up_s, sync_s, sshd_log = away_from_home(world, request, ROLE, SUBNET, BLOCK, phone, log, dump, 240)
    # the new session came through nginx's SSH route: sshd sees it from 127.0.0.1 (the trade-off)
    assert "Accepted publickey for inverse-cloud from 127.0.0.1 port" in sshd_log, sshd_log[-2000:]
    assert "Traceback" not in log.read_text()
    print(f"\n[sni + ssh-on-443 world] outbound 22 dropped -> tunnel on 443 through nginx: {up_s:.1f} s "
          f"(keepalive 2 s x 3, connect_timeout_s 5), phone synced {sync_s:.1f} s after the drop")
