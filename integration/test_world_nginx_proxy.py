"""A relay whose nginx already serves a website (`relay-setup --nat none --proxy-protocol`), in the test world, as
a user takes it: the VPS serves https://www.example.org/ (its own certificate, from a CA the phone trusts) and
port 80 before the journey. A laptop installed with scripts/install.sh and set up with the installed
`inverse-cloud` (`init`, then what docs/setup.md says for a relay with a busy port 443: `relay-setup --nat none
--proxy-protocol --output DIR`, DIR copied to the relay with scp, `sh DIR/setup.sh` there over ssh, the generated
nginx files installed and the site moved behind the SNI router with commands over ssh, `nginx -t && nginx -s
reload`, then `relay-setup --adopt DIR`). A Pebble certificate through nginx's port 80, a phone syncing by name
through nginx's 443; the laptop and the existing site both see the phone's address (the PROXY header), so the
site's `allow 127.0.0.1` does not open to the internet. Then the relay reboots: nginx comes back from its enabled
unit with the new configuration, and so do the tunnel and the phone's sync.

It reinstalls the relay first (no other test's laptop on it) and again at the end (no nginx left on 443/80).
docs/test-matrix.md F21."""

from __future__ import annotations

import io
import json
import re
import time
from pathlib import Path

import pytest
from relay_boot import boot_services
from relay_sshd import configure
from test_journey import Phone, card
from test_world_ssh_on_443 import access_lines
from test_world_two_laptops import admin_key, cli, install_and_init, status
from world import HOSTS, RELAY_NAME, ZONE, ca_and_leaf

from tests.support import wait_until

ROLE, SUBNET = "ppw", 55                  # the laptop (its home network 192.168.55.0/24, router side wol55)
DOMAIN = f"behind.{ZONE}"
SITE = f"www.{ZONE}"                       # the website the VPS served before inverse-cloud
SITE_CONF = f"/etc/nginx/sites-enabled/{SITE}"
SITE_LOG = f"{SITE}.access.log"            # in the relay's /var/log/nginx
PASSWORD = "correct horse"
BUNDLE = "relay-bundle"                    # relay-setup --output DIR, in the laptop's home; scp puts it in root's


def existing_site(world) -> bytes:
    """The VPS before the journey: nginx installed, a site for www.example.org in sites-enabled (HTTPS on 443
    with its own certificate, port 80 redirecting, an /admin only for 127.0.0.1), its files in /var/www.
    Returns the CA certificate the phone must trust."""
    ca, leaf, key = ca_and_leaf("test world web CA", SITE)
    etc = world.relay_etc
    (etc / "ssl" / "certs" / f"{SITE}.pem").write_bytes(leaf)
    key_path = etc / "ssl" / "private" / f"{SITE}.key"
    key_path.write_bytes(key)
    key_path.chmod(0o600)
    www = world.relay_root / "var-www" / SITE
    (www / "admin").mkdir(parents=True)
    (www / "index.html").write_text("the existing site\n")
    (www / "admin" / "index.html").write_text("admin page\n")
    (etc / "nginx" / "sites-enabled" / SITE).write_text(
        "server {\n"
        "    listen 80;\n"
        f"    server_name {SITE};\n"
        f"    access_log /var/log/nginx/{SITE_LOG};\n"
        "    return 301 https://$host$request_uri;\n"
        "}\n"
        "server {\n"
        "    listen 443 ssl;\n"
        f"    server_name {SITE};\n"
        f"    ssl_certificate /etc/ssl/certs/{SITE}.pem;\n"
        f"    ssl_certificate_key /etc/ssl/private/{SITE}.key;\n"
        f"    root /var/www/{SITE};\n"
        f"    access_log /var/log/nginx/{SITE_LOG};\n"
        "    location /admin { allow 127.0.0.1; deny all; }\n"
        "}\n")
    return ca


def phone_get(world, url: str, *extra: str) -> tuple[str, str]:
    """curl on the phone (the system's trust store, the world's DNS): (HTTP status, body)."""
    out = world.run("phone", "curl", "-sS", "--max-time", "20", "-w", "\n%{http_code}", *extra, url, timeout=60)
    body, _, code = out.stdout.rpartition("\n")
    return code, body


def site_log_since(world, seen: int) -> list[str]:
    path = world.relay_root / "var-log-nginx" / SITE_LOG
    return path.read_text(errors="replace")[seen:].splitlines() if path.exists() else []


def site_log_size(world) -> int:
    path = world.relay_root / "var-log-nginx" / SITE_LOG
    return len(path.read_text(errors="replace")) if path.exists() else 0


def check_site(world, *, admin: str) -> None:
    """The phone gets the existing site by name over https; /admin answers ``admin``; nginx's access log names
    the phone's address for both requests."""
    phone_addr = HOSTS["phone"].address
    seen = site_log_size(world)
    code, body = phone_get(world, f"https://{SITE}/")
    assert (code, body) == ("200", "the existing site\n"), (code, body)
    code, _ = phone_get(world, f"https://{SITE}/admin/")
    assert code == admin, code
    code, _ = phone_get(world, f"http://{SITE}/", "-o", "/dev/null")
    assert code == "301", code
    wait_until(lambda: len(site_log_since(world, seen)) >= 3, 20, "the site's access log lines")
    lines = site_log_since(world, seen)
    assert all(line.startswith(f"{phone_addr} ") for line in lines), lines


def ssh_interactive(world, role: str, argv: list[str], timeout_s: float = 120) -> tuple[int, str]:
    """``argv`` (ssh or scp to the relay) on a terminal on ``role``: the first-contact host-key question is
    answered after comparing the fingerprint with the relay's own. (exit code, text)."""
    import pexpect

    full = [*world.prefix(role), *argv]
    child = pexpect.spawn(full[0], full[1:], env=world.env(role), encoding="utf-8", timeout=timeout_s)
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


def relay_setup_output(world, role: str) -> tuple[int, str]:
    """`inverse-cloud relay-setup --nat none --proxy-protocol --output DIR` on a terminal: the relay's host-key
    fingerprint it shows is compared with the relay's own, then confirmed. (exit code, text)."""
    import pexpect

    full = [*world.prefix(role), "inverse-cloud", "relay-setup", "--nat", "none", "--proxy-protocol",
            "--output", BUNDLE]
    child = pexpect.spawn(full[0], full[1:], env=world.env(role), encoding="utf-8", timeout=120)
    child.logfile_read = io.StringIO()
    child.expect(r"\[y/N\] ")
    assert world.relay_fingerprint() in (child.before or ""), child.before
    child.sendline("y")
    child.expect(pexpect.EOF)
    child.close()
    return child.exitstatus, child.logfile_read.getvalue()


def relay_nginx(world) -> set[int]:
    """Pids of nginx processes in the relay's network namespace."""
    out = world.run("relay", "pgrep", "-x", "nginx")
    return {int(p) for p in out.stdout.split()} & set(world._relay_pids())


@pytest.mark.slow
def test_nginx_with_an_existing_site_passes_the_phones_address_to_laptop_and_site(world, tmp_path):
    """1. The relay reinstalled, `apt install nginx` there (unit enabled), a site www.example.org in
       sites-enabled (TLS on 443 with a certificate from a CA the phone trusts, port 80 redirecting, /admin
       allowed for 127.0.0.1 only), its A record published; the relay boots (nginx from its enabled unit). The
       phone gets the site by name; /admin is 403 for it; nginx's log names the phone.
    2. A laptop installs with scripts/install.sh, runs `init`, makes an admin key (installed for the relay's
       root). `relay-setup --nat none --proxy-protocol --output relay-bundle` (the host key confirmed after
       comparing fingerprints); the config gains no proxy_protocol yet. `scp -r relay-bundle root@relay:` and
       `ssh root@relay sh relay-bundle/setup.sh` ("relay ready"). Over ssh, as the generated files' first
       lines say: nginx-stream.conf into /etc/nginx/stream.d/ with an include at nginx.conf's top level,
       nginx-http.conf into sites-enabled; the site's `listen 443 ssl` becomes `listen 127.0.0.1:8443 ssl
       proxy_protocol` with set_real_ip_from/real_ip_header as docs/setup.md says; `nginx -t && nginx -s
       reload`. `relay-setup --adopt relay-bundle` sets [relay] proxy_protocol = true.
    3. doctor's A record published; `serve`: a Pebble certificate (HTTP-01 through nginx's port 80 by Host), the
       tunnel up. The phone syncs through https://behind.example.org/ (nginx's 443 by SNI); the laptop's access
       log names the phone's address, never 127.0.0.1; a wrong password gives a 401 line naming the phone.
    4. The existing site still answers the phone by name; its access log names the phone; /admin is 403 for
       the phone (the `allow 127.0.0.1` does not open to the internet) and 200 for a client on the relay.
    5. A client on the relay connecting to the forwarded port without a PROXY header gets no HTTP answer.
    6. The relay reboots: nginx comes back from its unit with the new configuration, the tunnel reconnects, the
       phone syncs again, the laptop and the site still name the phone's address."""
    world.rebuild_relay()
    world.relay_apt_install("nginx")
    world.add_laptop(ROLE, SUBNET)
    try:
        _journey(world, tmp_path)
    finally:
        world.stop(f"serve-{ROLE}")
        world.unpublish(f"{DOMAIN}.", "A", missing_ok=True)
        world.unpublish(f"{SITE}.", "A", missing_ok=True)
        world.trust_pebble()
        world.rebuild_relay()


def _journey(world, tmp_path: Path) -> None:
    phone_addr, relay_addr = HOSTS["phone"].address, HOSTS["relay"].address

    # 1. before the journey: the VPS serves its website (nginx started as boot starts it)
    world.trust_pebble(also=(existing_site(world),))
    assert [s.name for s in boot_services(world.relay_etc)] == ["nginx.service"]
    world.reboot_relay()
    wait_until(lambda: world.tcp_open("phone", relay_addr, 443), 30, "the site's nginx on the relay's 443",
               on_timeout=lambda: (world.relay_root / "var-log-nginx" / "error.log").read_text())
    world.unpublish(f"{SITE}.", "A", missing_ok=True)
    world.publish([f"{SITE}. A {relay_addr}"])
    check_site(world, admin="403")

    # 2. the laptop, then what docs/setup.md says for a relay whose 443 is taken
    home = world.home_of(ROLE)
    cfg = install_and_init(world, ROLE, DOMAIN, PASSWORD)
    configure(cfg, "relay", keepalive_interval_s=2, keepalive_count_max=3, connect_timeout_s=5)
    configure(cfg, "acme", caa_issuer="pebble.invalid")
    admin_key(world, ROLE)

    code, text = relay_setup_output(world, ROLE)
    assert code == 0, text
    bundle = home / BUNDLE
    adopt = f"inverse-cloud relay-setup --adopt {bundle}"
    assert adopt in text and "[relay] proxy_protocol = true" in text, text
    assert "proxy_protocol = true" not in cfg.read_text()     # not before the relay carries its side
    assert "proxy_protocol on;" in (bundle / "nginx-stream.conf").read_text()
    readme = (bundle / "README.txt").read_text()      # what a user reads next to setup.sh
    assert adopt in readme and "setup.sh leaves public 443 and 80 to your nginx" in readme, readme

    code, text = ssh_interactive(world, ROLE, ["scp", "-r", BUNDLE, f"root@{RELAY_NAME}:"])
    assert code == 0, text
    code, text = ssh_interactive(world, ROLE, ["ssh", f"root@{RELAY_NAME}", "sh", f"{BUNDLE}/setup.sh"])
    assert code == 0 and "relay ready for user inverse-cloud" in text, text
    assert not world.run("relay", "nft", "list", "ruleset").stdout.strip()   # --nat none: no NAT rules

    # the user edits the relay's nginx, here with commands over ssh (an editor does the same): the two
    # generated files where their first lines say, the site moved behind the SNI router as docs/setup.md says
    listen = ("listen 127.0.0.1:8443 ssl proxy_protocol;\\n    set_real_ip_from 127.0.0.1;\\n"
              "    real_ip_header proxy_protocol;")
    edit = ("set -e; mkdir -p /etc/nginx/stream.d;"
            f" cp {BUNDLE}/nginx-stream.conf /etc/nginx/stream.d/inverse-cloud.conf;"
            f" cp {BUNDLE}/nginx-http.conf /etc/nginx/sites-enabled/inverse-cloud-{DOMAIN}.conf;"
            " grep -q 'stream.d/' /etc/nginx/nginx.conf || echo 'include /etc/nginx/stream.d/*.conf;' >> "
            "/etc/nginx/nginx.conf;"
            f" sed -i 's|listen 443 ssl;|{listen}|' {SITE_CONF};"
            " nginx -t && nginx -s reload")
    out = world.run(ROLE, "ssh", f"root@{RELAY_NAME}", edit, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    site = (world.relay_etc / "nginx" / "sites-enabled" / SITE).read_text()
    assert "listen 127.0.0.1:8443 ssl proxy_protocol;" in site and "real_ip_header proxy_protocol;" in site, site
    wait_until(lambda: world.tcp_open("relay", "127.0.0.1", 8443), 30, "the site on 127.0.0.1:8443 after reload")

    out = cli(world, ROLE, "relay-setup", "--adopt", BUNDLE)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "proxy_protocol = true" in cfg.read_text()

    # 3. DNS, serve, the certificate through nginx's port 80, the phone through nginx's 443
    doc = json.loads(cli(world, ROLE, "doctor", "--json", "--timeout", "10").stdout)
    records = [r for r in doc["dns_records"] if " A " in r]
    assert records == [f"{DOMAIN}. A {relay_addr}"], doc["dns_records"]
    world.unpublish(f"{DOMAIN}.", "A", missing_ok=True)
    world.publish(records)

    log = world.root / f"serve-{ROLE}.log"
    world.popen(f"serve-{ROLE}", ROLE, "inverse-cloud", "serve", log=log)
    nginx_errors = world.relay_root / "var-log-nginx" / "error.log"
    dump = lambda: (log.read_text()[-4000:] + "\n--- relay sshd ---\n" + world.log("relay-sshd")[-1500:]  # noqa: E731
                    + "\n--- relay nginx ---\n" + nginx_errors.read_text()[-1500:])

    def issued() -> bool:
        served = (status(world, ROLE).get("certificate") or {}).get("served") or {}
        return bool(served) and not served.get("self_signed")

    wait_until(issued, 300, "a certificate from Pebble through nginx's port 80", interval_s=1, on_timeout=dump)
    wait_until(lambda: (status(world, ROLE).get("tunnel") or {}).get("state") == "up", 60, "the tunnel up",
               on_timeout=dump)

    phone = Phone(tmp_path, "behind_phone", base=f"https://{DOMAIN}", prefix=world.prefix("phone"),
                  env=world.env("phone"))
    (phone.contacts / "home.vcf").write_text(card("home", "Behind Nginx"))
    phone.sync()
    lines = access_lines(log.read_text())
    assert lines and all(phone_addr in line for line in lines), lines[-5:]
    assert not any("127.0.0.1" in line for line in lines), lines[-5:]
    code, _ = phone_get(world, f"https://{DOMAIN}/radicale/alice/", "-u", "alice:wrong", "-X", "PROPFIND",
                        "-o", "/dev/null")
    assert code == "401", code

    def failed_lines() -> list[str]:
        return [line for line in log.read_text().splitlines() if re.search(r'"PROPFIND /radicale/alice/" 401 ', line)]

    wait_until(failed_lines, 20, "the failed login in the laptop's log", on_timeout=dump)
    assert all(f"{phone_addr} \"PROPFIND" in line for line in failed_lines()), failed_lines()

    # 4. the existing site: still there for the phone, naming it; its /admin closed to the internet
    check_site(world, admin="403")
    # a client on the relay itself (through the SNI router: its PROXY header says 127.0.0.1) is still let in;
    # -k: this checks who the site admits, not the certificate (the phone checked that)
    local = world.run("relay", "curl", "-sS", "--max-time", "20", "-k", "-o", "/dev/null", "-w", "%{http_code}",
                      "--resolve", f"{SITE}:443:127.0.0.1", f"https://{SITE}/admin/", timeout=60)
    assert local.stdout == "200", (local.stdout, local.stderr)

    # 5. a client on the relay itself, on the forwarded port, without a PROXY header: no HTTP answer
    https_port = next(f["relay_port"] for f in status(world, ROLE)["tunnel"]["forwards"] if f["name"] == "https")
    around = world.run("relay", "curl", "-sk", "--max-time", "20", "-o", "/dev/null", "-w", "%{http_code}",
                       f"https://127.0.0.1:{https_port}/radicale/", timeout=60)
    assert around.stdout == "000" and around.returncode != 0, (around.stdout, around.stderr)

    # 6. the relay reboots: nginx from its enabled unit and the edited /etc, then the tunnel and the phone
    before_nginx = relay_nginx(world)
    seen, before = len(log.read_text()), status(world, ROLE)["tunnel"]["connected_since"]
    t0 = time.monotonic()
    world.reboot_relay()
    assert not before_nginx & relay_nginx(world), "the nginx from before survived the reboot"
    wait_until(lambda: world.tcp_open("phone", relay_addr, 443) and world.tcp_open("relay", "127.0.0.1", 8443),
               30, "nginx back on the relay's 443 and the site on 127.0.0.1:8443 after the reboot", on_timeout=dump)

    def reconnected() -> bool:
        t = status(world, ROLE).get("tunnel") or {}
        return t.get("state") == "up" and t.get("connected_since") != before and all(
            f["bound"] for f in t.get("forwards", []))

    wait_until(reconnected, 180, "a new tunnel session after the reboot", interval_s=0.5, on_timeout=dump)
    reboot_s = time.monotonic() - t0
    (phone.contacts / "reboot.vcf").write_text(card("reboot", "After The Reboot"))
    phone.sync()
    again = Phone(tmp_path, "behind_phone_b", base=f"https://{DOMAIN}", prefix=world.prefix("phone"),
                  env=world.env("phone"))
    again.sync()
    assert any("FN:After The Reboot" in t for t in again.texts(again.contacts))
    since = access_lines(log.read_text()[seen:])
    assert since and all(phone_addr in line for line in since), since[-5:]
    check_site(world, admin="403")
    assert "Traceback" not in log.read_text()
    print(f"\n[nginx --proxy-protocol world] relay reboot -> new tunnel session: {reboot_s:.1f} s")
