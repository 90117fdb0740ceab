"""SSH on the relay's 443 with IPv6 (`relay-setup --ssh-on-443 --ipv6`), in the test world, as a user takes it:
sslh owns public 443 on both families and stays transparent for both (its targets are ``localhost``, which the
relay's Debian /etc/hosts names as 127.0.0.1 and ::1), so the laptop's access log names an IPv6-only phone by its
own IPv6 address and an IPv4 phone by its IPv4 address. Then the relay reboots: the ip6 table, the ``ip -6`` policy
rule and route, and sslh come back from the relay's /etc, and the IPv6 phone syncs again, still named.

It reinstalls the relay first (no other test's laptop on it) and again at the end (no sslh left on 443)."""

from __future__ import annotations

import io
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
from relay_boot import boot_services
from relay_sshd import configure
from test_journey import Phone, card
from test_world_ipv6 import propfind_times
from world import HOSTS, RELAY_NAME, ZONE

from tests.support import wait_until

ROLE, SUBNET = "wossh6", 12                # the laptop (its home network 192.168.12.0/24, router side wol12)
DOMAIN = f"away6.{ZONE}"
PASSWORD = "correct horse"
CLI = str(Path(sys.executable).parent / "inverse-cloud")   # the installed console script of this venv


def _env(world) -> dict[str, str]:
    """The laptop's environment, keeping PYTHONPATH (the console script then imports this checkout)."""
    env = world.env(ROLE)
    if "PYTHONPATH" in os.environ:
        env["PYTHONPATH"] = os.environ["PYTHONPATH"]
    return env


def cli(world, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    out = subprocess.run([*world.prefix(ROLE), CLI, *args], capture_output=True, text=True, timeout=timeout,
                         env=_env(world), stdin=subprocess.DEVNULL, check=False)
    assert "Traceback" not in out.stderr, out.stderr
    return out


def status(world) -> dict:
    out = cli(world, "status", "--json")
    return json.loads(out.stdout) if out.stdout.startswith("{") else {}


def apply(world, *extra: str) -> tuple[int, str]:
    """`inverse-cloud relay-setup --apply root@relay.example.org --yes ...` on a terminal; ssh's first-contact
    host-key question is answered after comparing the fingerprint with the relay's own. (exit code, text)."""
    import pexpect

    argv = [*world.prefix(ROLE), CLI, "relay-setup", "--apply", f"root@{RELAY_NAME}", "--yes", *extra]
    child = pexpect.spawn(argv[0], argv[1:], env=_env(world), encoding="utf-8", timeout=300)
    child.logfile_read = io.StringIO()
    seen = child.expect([r"Are you sure you want to continue connecting \(yes/no", r"password: ", pexpect.EOF])
    if seen == 0:
        assert world.relay_fingerprint() in (child.before or ""), child.before
        child.sendline("yes")
        seen = 1 + child.expect([r"password: ", pexpect.EOF])
    if seen == 1:
        child.terminate(force=True)
        raise AssertionError(f"the relay refused the admin key:\n{child.logfile_read.getvalue()}")
    child.close()
    return child.exitstatus, child.logfile_read.getvalue()


def access_lines(log: str) -> list[str]:
    """The access log's DAV lines (``... aiohttp.access: <client> "METHOD /radicale/..."``)."""
    return [line for line in log.splitlines() if re.search(r'"(PROPFIND|REPORT|PUT|GET) /radicale/', line)]


def named_by(lines: list[str], address: str) -> bool:
    """Every line names ``address`` as the client (and there is at least one)."""
    return bool(lines) and all(re.search(rf"\s{re.escape(address)} \"[A-Z]", line) for line in lines)


def relay_sslh(world) -> set[int]:
    """Pids of the sslh processes in the relay's network namespace (pgrep alone sees this machine's too)."""
    out = world.run("relay", "pgrep", "-x", "sslh")
    return {int(p) for p in out.stdout.split()} & set(world._relay_pids())


def policy_routing6(world) -> tuple[str, str]:
    """The relay's ``ip -6 rule`` and its table 1443 (the local delivery of sslh's marked replies)."""
    rules = world.run("relay", "ip", "-6", "rule", "show", check=True).stdout
    table = world.run("relay", "ip", "-6", "route", "show", "table", "1443", check=True).stdout
    return rules, table


def assert_divert6(world) -> None:
    rules, table = policy_routing6(world)
    assert "fwmark 0x1c lookup 1443" in rules, rules
    assert "local default dev lo" in table, table   # ::/0, as ip shows it
    nat6 = world.run("relay", "nft", "list", "table", "ip6", "inverse_cloud").stdout
    assert "chain sslh_divert" in nat6 and "ip6 saddr ::1" in nat6, nat6


@pytest.mark.slow
def test_ssh_on_443_ipv6_phone_keeps_its_address_through_sslh_and_a_relay_reboot(world, tmp_path):
    """1. The relay reinstalled, `apt install sslh` there. A laptop behind the home router runs `init` (domain
       away6.), makes an admin key (installed for the relay's root). `relay-setup --ssh-on-443 --ipv6 --apply
       root@relay`: setup.sh writes /etc/sslh.cfg (targets ``localhost``, transparent), loads the ip and ip6
       tables with their sslh_divert chains, adds the ``ip -6`` rule and route, starts sslh on 0.0.0.0:443 and
       [::]:443. The A and AAAA records doctor prints are published; `serve`: a Pebble certificate, four
       forwards bound (127.0.0.1 and [::]).
    2. An IPv6-only phone syncs through https://away6.example.org/ (sslh on the relay's [v6]:443): every DAV
       line of the access log names the phone's IPv6 address, none ::1 or 127.0.0.1. An IPv4 phone syncs: its
       lines name its IPv4 address. Printed, not asserted: PROPFIND times from each phone through sslh.
    3. The relay reboots: boot (integration/relay_boot.py) runs the NAT unit (ip and ip6 tables, the policy
       rules and routes of both families) and starts sslh from its enabled unit. The tunnel reconnects; the
       IPv6 phone syncs a new card, a second IPv6 phone sees it; the access log still names the phone's IPv6
       address."""
    world.rebuild_relay()
    world.relay_apt_install("sslh")
    assert [s.name for s in boot_services(world.relay_etc)] == ["sslh.service"]
    world.add_laptop(ROLE, SUBNET)
    try:
        _journey(world, tmp_path)
    finally:
        world.stop(f"serve-{ROLE}")
        for rtype in ("A", "AAAA"):
            world.unpublish(f"{DOMAIN}.", rtype, missing_ok=True)
        world.rebuild_relay()


def _journey(world, tmp_path: Path) -> None:
    phone4_addr, phone6_addr = HOSTS["phone"].address, HOSTS["phone6"].address6
    home = world.home_of(ROLE)
    (home / "password").write_text(PASSWORD + "\n")
    out = cli(world, "init", "--non-interactive", "--domain", DOMAIN, "--user", "alice", "--password-file",
              "/root/password", "--relay", RELAY_NAME, "--acme-email", "", "--acme-directory",
              world.acme_directory, "--acme-ca-bundle", "/etc/ssl/certs/ca-certificates.crt")
    assert out.returncode == 0, out.stdout + out.stderr
    cfg = home / ".config" / "inverse-cloud" / "config.toml"
    configure(cfg, "relay", keepalive_interval_s=2, keepalive_count_max=3, connect_timeout_s=5)
    configure(cfg, "acme", caa_issuer="pebble.invalid")
    key = home / ".ssh" / "id_ed25519"
    world.run(ROLE, "mkdir", "-p", "-m", "700", "/root/.ssh", check=True)
    world.run(ROLE, "ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", "/root/.ssh/id_ed25519", check=True)
    world.authorize_admin(Path(f"{key}.pub").read_text())

    # 1. relay-setup --ssh-on-443 --ipv6 on the relay where sslh is installed
    code, text = apply(world, "--ssh-on-443", "--ipv6")
    assert code == 0 and "relay ready for user inverse-cloud" in text, text
    assert 'listen_host6 = "::"' in cfg.read_text()
    sslh_cfg = (world.relay_etc / "sslh.cfg").read_text()
    assert "transparent: true;" in sslh_cfg and 'host: "::"; port: "443"' in sslh_cfg, sslh_cfg
    assert_divert6(world)
    assert relay_sslh(world), "setup.sh started no sslh on the relay (there is no systemd to start it)"
    wait_until(lambda: world.tcp_open("phone", HOSTS["relay"].address, 443), 30, "sslh on the relay's public 443")

    doc = json.loads(cli(world, "doctor", "--json", "--timeout", "10").stdout)
    records = [r for r in doc["dns_records"] if " A " in r or " AAAA " in r]
    assert sorted(records) == [f"{DOMAIN}. A {HOSTS['relay'].address}",
                               f"{DOMAIN}. AAAA {HOSTS['relay'].address6}"], doc["dns_records"]
    for rtype in ("A", "AAAA"):
        world.unpublish(f"{DOMAIN}.", rtype, missing_ok=True)
    world.publish(records)

    log = world.root / f"serve-{ROLE}.log"
    with open(log, "ab") as fh:
        world.procs[f"serve-{ROLE}"] = subprocess.Popen(   # stopped by pid with the world, or in the finally
            [*world.prefix(ROLE), CLI, "serve"], stdin=subprocess.DEVNULL, stdout=fh, stderr=subprocess.STDOUT,
            env=_env(world))
    dump = lambda: log.read_text()[-4000:] + "\n--- relay sshd ---\n" + world.log("relay-sshd")[-1500:]  # noqa: E731

    def issued() -> bool:
        served = (status(world).get("certificate") or {}).get("served") or {}
        return bool(served) and not served.get("self_signed")

    def all_bound() -> bool:
        t = status(world).get("tunnel") or {}
        return t.get("state") == "up" and len(t.get("forwards", [])) == 4 and all(
            f["bound"] for f in t["forwards"])

    wait_until(issued, 240, "a certificate from Pebble", interval_s=1, on_timeout=dump)
    wait_until(all_bound, 60, "four forwards bound", interval_s=0.5, on_timeout=dump)

    # 2. an IPv6-only phone through sslh on [v6]:443, then an IPv4 phone through 0.0.0.0:443
    phone6 = world.add_phone6()
    wait_until(lambda: world.tcp_open(phone6, HOSTS["relay"].address6, 443), 30,
               "the relay's [v6]:443 from the IPv6-only phone", interval_s=0.2)
    seen = len(log.read_text())
    p6 = Phone(tmp_path, "away6_phone", base=f"https://{DOMAIN}", prefix=world.prefix(phone6),
               env=world.env(phone6))
    (p6.contacts / "v6.vcf").write_text(card("v6", "Over IPv6 Through sslh"))
    t0 = time.monotonic()
    p6.sync()
    sync6_s = time.monotonic() - t0
    lines = access_lines(log.read_text()[seen:])
    assert named_by(lines, phone6_addr), lines[-5:]

    seen = len(log.read_text())
    p4 = Phone(tmp_path, "away4_phone", base=f"https://{DOMAIN}", prefix=world.prefix("phone"),
               env=world.env("phone"))
    t0 = time.monotonic()
    p4.sync()
    sync4_s = time.monotonic() - t0
    assert any("FN:Over IPv6 Through sslh" in t for t in p4.texts(p4.contacts))
    lines = access_lines(log.read_text()[seen:])
    assert named_by(lines, phone4_addr), lines[-5:]

    url = f"https://{DOMAIN}/radicale/alice/"
    v4, v6 = propfind_times(world, "phone", "-4", url), propfind_times(world, phone6, "-6", url)

    # 3. the relay reboots: the ip6 divert (table, rule, route) and sslh come back from its /etc
    seen = len(log.read_text())
    before = status(world)["tunnel"]["connected_since"]
    t1 = time.monotonic()
    world.reboot_relay()
    wait_until(lambda: relay_sslh(world) and world.tcp_open(phone6, HOSTS["relay"].address6, 443), 30,
               "sslh back on the relay's [v6]:443 after the reboot",
               on_timeout=lambda: world.log("relay-boot-sslh.service"))
    assert_divert6(world)
    wait_until(lambda: all_bound() and status(world)["tunnel"]["connected_since"] != before, 180,
               "a new tunnel session after the reboot", interval_s=0.5, on_timeout=dump)
    reboot_s = time.monotonic() - t1
    (p6.contacts / "reboot.vcf").write_text(card("r6", "After The Reboot Over IPv6"))
    p6.sync()
    again = Phone(tmp_path, "away6_phone_b", base=f"https://{DOMAIN}", prefix=world.prefix(phone6),
                  env=world.env(phone6))
    again.sync()
    assert any("FN:After The Reboot Over IPv6" in t for t in again.texts(again.contacts))
    lines = access_lines(log.read_text()[seen:])
    assert named_by(lines, phone6_addr), lines[-5:]
    assert "Traceback" not in log.read_text()
    print(f"\n[ssh-on-443 ipv6 world] first sync through sslh: IPv6 phone {sync6_s:.1f} s, IPv4 phone "
          f"{sync4_s:.1f} s; PROPFIND Depth 1 through sslh and the tunnel, median of {len(v4)}: IPv4 "
          f"{statistics.median(v4) * 1000:.1f} ms, IPv6 {statistics.median(v6) * 1000:.1f} ms; relay reboot -> "
          f"tunnel up, four forwards bound: {reboot_s:.1f} s")
