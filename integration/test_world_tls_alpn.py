"""TLS-ALPN-01 with the relay's port 80 closed, in the test world, as a user takes it: a laptop installed with
scripts/install.sh and set up with the installed `inverse-cloud` (`init`, `relay-setup --apply
root@relay.example.org`, the default DNAT of 80 and 443), behind a relay whose VPS provider drops inbound TCP 80
before it reaches the VM (a bridge filter on the world's internet, outside the relay). The user sets `[acme]
challenge = "auto"`: serve's HTTP-01 self-check through the name times out, it says it uses TLS-ALPN-01 and why,
and Pebble validates on the relay's 443 -> DNAT -> tunnel -> the laptop's listener. A phone syncs by name and
verifies the chain; `cert renew --force` renews the same way while the phone keeps syncing. doctor, once the CAA
record it prints is published, reports every link healthy.

It reinstalls the relay first (no other test's laptop on it) and again at the end."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest
from relay_sshd import configure
from test_journey import Phone, card
from test_world_two_laptops import admin_key, apply, cli, install_and_init, status
from world import HOSTS, ZONE, _run

from tests.support import wait_until

ROLE, SUBNET = "walpn", 14                 # the laptop (its home network 192.168.14.0/24, router side wol14)
DOMAIN = f"noport80.{ZONE}"
FIREWALL = "alw_provider"                  # the provider's bridge filter on the world's internet (nft table)
PASSWORD = "correct horse"
CAA_ISSUER = "pebble.invalid"


def probe(world, role: str, host: str, port: int) -> str:
    """A TCP connect from ``role`` to ``host:port``: "open", "refused", or "timed out" (a firewall's drop)."""
    def connect() -> str:
        try:
            with socket.create_connection((host, port), timeout=3):
                return "open"
        except ConnectionRefusedError:
            return "refused"
        except TimeoutError:
            return "timed out"
        except OSError as exc:
            return f"failed ({exc})"

    return world.call(role, connect)


def close_port_80_at_the_provider(world) -> None:
    """The VPS provider's firewall: inbound TCP 80 to the relay's public addresses is dropped on the way
    (nft bridge filter in the internet's namespace, between every host and the relay; the relay's own ruleset is
    not touched, so its DNAT of 80 stays as relay-setup wrote it)."""
    r4, r6 = HOSTS["relay"].address, HOSTS["relay"].address6
    _run("ip", "netns", "exec", world.ns("inet"), "nft",
         f"add table bridge {FIREWALL}; add chain bridge {FIREWALL} inbound {{ type filter hook forward priority 0; "
         f"policy accept; }}; add rule bridge {FIREWALL} inbound ip daddr {r4} tcp dport 80 drop; "
         f"add rule bridge {FIREWALL} inbound ip6 daddr {r6} tcp dport 80 drop")


def open_port_80_at_the_provider(world) -> None:
    _run("ip", "netns", "exec", world.ns("inet"), "nft", "delete", "table", "bridge", FIREWALL, check=False)


def served_serial(world) -> str:
    """The serial the phone's fresh, verified handshake with https://DOMAIN/ (by name, the phone's trust) gets."""
    out = world.run("phone", "openssl", "s_client", "-connect", f"{DOMAIN}:443", "-servername", DOMAIN,
                    "-verify_return_error", "-CAfile", "/etc/ssl/certs/ca-certificates.crt", input="", timeout=30)
    pem = re.search(r"-----BEGIN CERTIFICATE-----.*?-----END CERTIFICATE-----", out.stdout, re.S)
    assert out.returncode == 0 and pem, out.stdout[-2000:] + out.stderr[-2000:]
    x = subprocess.run(["openssl", "x509", "-noout", "-serial"], input=pem.group(0), capture_output=True, text=True,
                       timeout=30, check=True)
    return x.stdout.strip().split("=", 1)[1].lower().lstrip("0")


def validated_without_http(pebble_log: str) -> None:
    """Pebble's log since an order: a challenge validated, and no HTTP-01 attempt (Pebble logs each HTTP-01 fetch,
    "Attempting to validate w/ HTTP: <url>", and nothing for TLS-ALPN-01; the laptop answers only those two)."""
    assert "set VALID by completed challenge" in pebble_log, pebble_log[-3000:]
    assert "Attempting to validate w/ HTTP" not in pebble_log, pebble_log[-3000:]


def doctor(world) -> tuple[int, dict]:
    out = cli(world, ROLE, "doctor", "--json", "--timeout", "10", timeout=240)
    return out.returncode, json.loads(out.stdout)


def checks(report: dict) -> dict[str, dict]:
    return {c["name"]: c for c in report["checks"]}


@pytest.mark.slow
def test_tls_alpn_01_through_the_relay_whose_provider_drops_port_80(world, tmp_path):
    """1. The relay reinstalled; a laptop behind the home router installs with scripts/install.sh, runs `init`
       (domain noport80.), makes an admin key (installed for the relay's root); `relay-setup --apply
       root@relay` (the default DNAT of 80 and 443). The provider's firewall drops inbound TCP 80 to the relay
       (nft bridge table alw_provider on the world's internet). The user sets `[acme] challenge = "auto"` in
       config.toml (init has no flag for it). The A record doctor prints is published.
    2. `serve`: the HTTP-01 self-check through the name times out; one line "using tls-alpn-01: public path
       http://noport80.example.org/ does not reach this laptop (no answer from noport80.example.org:80 within
       5 s (timed out))".
       Pebble issues (printed: seconds to the certificate) and its log has no HTTP-01 attempt. From the phone:
       80 times out (dropped), 443 is open. A phone syncs through https://noport80.example.org/, verifying the
       chain with its own trust.
    3. doctor: the CAA line it prints carries validationmethods=http-01,tls-alpn-01; once published, doctor
       exits 0: "public HTTP" is skipped (port 80 does not answer; auto uses TLS-ALPN-01 on 443), the other
       links ok, CAA ok.
    4. `cert renew --force` while the phone syncs in a loop: a second TLS-ALPN-01 order (no HTTP-01 attempt in
       Pebble's log, "using tls-alpn-01" twice), the phone's fresh verified handshake gets the new serial, every
       sync before, during and after succeeds (no phone was handed the challenge certificate).
    5. With the provider's filter removed, port 80 answers from the phone: the drop was the only thing closing
       it (relay-setup's DNAT of 80 was in place all along)."""
    world.rebuild_relay()
    world.add_laptop(ROLE, SUBNET)
    try:
        _journey(world, tmp_path)
    finally:
        world.stop(f"serve-{ROLE}")
        open_port_80_at_the_provider(world)
        for rtype in ("A", "CAA"):
            world.unpublish(f"{DOMAIN}.", rtype, missing_ok=True)
        world.rebuild_relay()


def _journey(world, tmp_path: Path) -> None:

    relay4 = HOSTS["relay"].address
    cfg = install_and_init(world, ROLE, DOMAIN, PASSWORD)
    configure(cfg, "acme", caa_issuer=CAA_ISSUER, challenge="auto")
    admin_key(world, ROLE)

    # 1. relay-setup with the default DNAT of 80 and 443; the provider drops inbound 80 before the relay
    code, text = apply(world, ROLE)
    assert code == 0 and "relay ready for user inverse-cloud" in text, text
    assert "dport 80" in world.relay_nat() and "dport 443" in world.relay_nat(), world.relay_nat()
    close_port_80_at_the_provider(world)
    assert probe(world, "phone", relay4, 80) == "timed out"

    _code, doc = doctor(world)
    records = [r for r in doc["dns_records"] if " A " in r]
    assert records == [f"{DOMAIN}. A {relay4}"], doc["dns_records"]
    world.unpublish(f"{DOMAIN}.", "A", missing_ok=True)
    world.publish(records)

    # 2. serve: HTTP-01's self-check times out, TLS-ALPN-01 through 443 -> DNAT -> tunnel
    pebble_log = world.root / "pebble.log"
    pebble_seen = len(pebble_log.read_text(errors="replace"))
    log = world.root / f"serve-{ROLE}.log"
    t0 = time.monotonic()
    world.popen(f"serve-{ROLE}", ROLE, "inverse-cloud", "serve", log=log)
    dump = lambda: log.read_text()[-4000:] + "\n--- pebble ---\n" + world.log("pebble")[-2000:]  # noqa: E731

    def issued() -> str:
        served = (status(world, ROLE).get("certificate") or {}).get("served") or {}
        return "" if not served or served.get("self_signed") else str(served.get("serial", ""))

    wait_until(issued, 240, "a certificate from Pebble", interval_s=1, on_timeout=dump)
    first_s = time.monotonic() - t0
    first = issued()
    text = log.read_text()
    why = (f"using tls-alpn-01: public path http://{DOMAIN}/ does not reach this laptop (no answer from "
           f"{DOMAIN}:80 within 5 s (timed out))")
    assert text.count(why) == 1, dump()
    validated_without_http(pebble_log.read_text(errors="replace")[pebble_seen:])
    assert probe(world, "phone", relay4, 80) == "timed out"
    assert probe(world, "phone", relay4, 443) == "open"
    assert served_serial(world) == first

    phone = Phone(tmp_path, "alpn_phone", base=f"https://{DOMAIN}", prefix=world.prefix("phone"),
                  env=world.env("phone"))
    (phone.contacts / "first.vcf").write_text(card("first", "Before Renewal"))
    phone.sync()

    # 3. doctor: the CAA line for auto, published; then every link healthy with port 80 closed
    _code, doc = doctor(world)
    caa = [r for r in doc["dns_records"] if " CAA " in r]
    assert len(caa) == 1 and "<" not in caa[0], doc["dns_records"]
    assert caa[0].endswith('validationmethods=http-01,tls-alpn-01"') and CAA_ISSUER in caa[0], caa
    world.publish(caa)
    code, doc = doctor(world)
    by_name = checks(doc)
    assert code == 0 and doc["ok"], json.dumps(doc["checks"], indent=1)
    http = by_name["public HTTP"]
    assert http["state"] == "skip" and "tls-alpn-01" in http["detail"].lower(), http
    assert "does not answer" in http["detail"], http
    assert all(c["state"] == "ok" for n, c in by_name.items() if n not in ("public HTTP", "public HTTPS (IPv6)")), \
        json.dumps(doc["checks"], indent=1)
    assert by_name["CAA"]["state"] == "ok", by_name["CAA"]

    # 4. cert renew --force while the phone syncs
    results: list[tuple[bool, str]] = []
    stop = threading.Event()

    def phone_loop() -> None:
        n = 0
        while not stop.is_set():
            (phone.contacts / f"r{n}.vcf").write_text(card(f"renew-{n}", f"During Renewal {n}"))
            out = subprocess.run(phone.args("sync"), capture_output=True, text=True, timeout=180, env=phone.env,
                                 check=False)
            results.append((out.returncode == 0, out.stderr[-800:]))
            n += 1

    loop = threading.Thread(target=phone_loop, daemon=True)
    pebble_seen = len(pebble_log.read_text(errors="replace"))
    loop.start()
    try:
        wait_until(lambda: len(results) >= 1, 180, "a phone sync before the renewal")
        t1 = time.monotonic()
        out = cli(world, ROLE, "cert", "renew", "--force", timeout=300)
        assert out.returncode == 0, out.stdout + out.stderr + dump()
        wait_until(lambda: issued() not in ("", first), 180, "the renewed certificate served", interval_s=1,
                   on_timeout=dump)
        renew_s = time.monotonic() - t1
        during = len(results)
        wait_until(lambda: len(results) >= during + 2, 300, "two phone syncs after the renewal")
    finally:
        stop.set()
        loop.join(240)
    renewed = issued()
    assert results and all(ok for ok, _ in results), [r for r in results if not r[0]]
    assert log.read_text().count(why) == 2, dump()
    validated_without_http(pebble_log.read_text(errors="replace")[pebble_seen:])
    assert served_serial(world) == renewed
    again = Phone(tmp_path, "alpn_phone_b", base=f"https://{DOMAIN}", prefix=world.prefix("phone"),
                  env=world.env("phone"))
    again.sync()
    assert any("FN:Before Renewal" in t for t in again.texts(again.contacts))
    assert "Traceback" not in log.read_text()

    # 5. the provider's filter was the only thing closing port 80
    open_port_80_at_the_provider(world)
    assert probe(world, "phone", relay4, 80) == "open"
    print(f"\n[tls-alpn-01 world] port 80 dropped at the provider: serve start -> certificate {first_s:.1f} s "
          f"(HTTP-01 self-check timing out first), cert renew --force -> new serial served {renew_s:.1f} s, "
          f"{len(results)} phone syncs around the renewal, all ok")
