"""Two laptops, two domains, one relay, in the test world: each laptop installed with scripts/install.sh and set
up with the installed `inverse-cloud` as a user would (`init`, `relay-setup --apply root@relay.example.org`), the
first with the default DNAT, the second with `--nat sni`, which moves the first onto the shared SNI router. Both
get Pebble certificates (HTTP-01 through the relay's public port 80), both phones sync through the relay's
public 443; one laptop's reconnect storm leaves the other's relay session and phone alone; a name no laptop
carries is closed at the relay.

Runs last among the world's tests (it reinstalls the relay first, and leaves nginx on its 443)."""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import threading
import time
from pathlib import Path

import pytest
from relay_boot import boot_services
from relay_sshd import configure
from test_journey import PASSWORD, Phone, _copy_repo, card
from world import HOSTS, RELAY_NAME, ZONE

from inverse_cloud import config as config_mod
from tests.support import wait_until

A, B = "wola", "wolb"                                  # the two laptops' roles (hosts) in the world
DOMAINS = {A: f"alpha.{ZONE}", B: f"beta.{ZONE}"}
UNKNOWN = f"gamma.{ZONE}"                              # points at the relay, carried by no laptop
SUBNETS = {A: 8, B: 9}


def cli(world, role: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    out = world.run(role, "inverse-cloud", *args, timeout=timeout)
    assert "Traceback" not in out.stderr, out.stderr
    return out


def status(world, role: str) -> dict:
    out = cli(world, role, "status", "--json")
    return json.loads(out.stdout) if out.stdout.startswith("{") else {}


def apply(world, role: str, *extra: str) -> tuple[int, str]:
    """`inverse-cloud relay-setup --apply root@relay.example.org --yes ...` on a terminal; ssh's first-contact
    host-key question is answered after comparing the fingerprint with the relay's own. (exit code, text)."""
    import io

    import pexpect

    argv = [*world.prefix(role), "inverse-cloud", "relay-setup", "--apply", f"root@{RELAY_NAME}", "--yes", *extra]
    child = pexpect.spawn(argv[0], argv[1:], env=world.env(role), encoding="utf-8", timeout=120)
    child.logfile_read = io.StringIO()
    refused = r"password: "   # the admin's key refused: ssh falls back to a password nobody has
    seen = child.expect([r"Are you sure you want to continue connecting \(yes/no", refused, pexpect.EOF])
    if seen == 0:
        assert world.relay_fingerprint() in (child.before or ""), child.before
        child.sendline("yes")
        seen = 1 + child.expect([refused, pexpect.EOF])
    if seen == 1:
        child.terminate(force=True)
        raise AssertionError(f"the relay refused {role}'s admin key:\n{child.logfile_read.getvalue()}\n"
                             f"--- relay sshd ---\n{world.log('relay-sshd')}")
    child.close()
    return child.exitstatus, child.logfile_read.getvalue()


def install_and_init(world, role: str, domain: str, password: str = PASSWORD) -> Path:
    """A laptop as README takes it: scripts/install.sh from a copy of this checkout, then the installed
    `inverse-cloud init --non-interactive` for ``domain`` (user alice, the relay by name, the world's CA). The
    path of the config init wrote."""
    home = world.home_of(role)
    clone = _copy_repo(home / "inverse-cloud")
    out = world.run(role, "sh", "scripts/install.sh", cwd=clone, net=False, timeout=900)
    assert out.returncode == 0, out.stdout + out.stderr
    (home / "password").write_text(password + "\n")
    out = cli(world, role, "init", "--non-interactive", "--domain", domain, "--user", "alice", "--password-file",
              str(home / "password"), "--relay", RELAY_NAME, "--acme-email", "", "--acme-directory",
              world.acme_directory, "--acme-ca-bundle", "/etc/ssl/certs/ca-certificates.crt")
    assert out.returncode == 0, out.stdout + out.stderr
    return home / ".config" / "inverse-cloud" / "config.toml"


def admin_key(world, role: str, *, also: bool = False) -> None:
    """An SSH key of ``role``'s user, installed for the relay's root as a VPS provider installs it (``also``:
    next to the keys already there)."""
    key = world.home_of(role) / ".ssh" / "id_ed25519"
    world.run(role, "mkdir", "-p", "-m", "700", str(key.parent), check=True)
    world.run(role, "ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key), check=True)
    world.authorize_admin(Path(f"{key}.pub").read_text(), also=also)


def relay_sessions(world, user: str) -> set[int]:
    """The relay's sshd processes of ``user`` (the per-session child that holds its forwards)."""
    out = world.run("relay", "pgrep", "-u", user, "-x", "sshd|sshd-session")
    return {int(p) for p in out.stdout.split()}


def tls_refused(world, name: str) -> str:
    """openssl s_client from the phone to the relay's 443 with ``name`` as SNI (empty: no SNI at all)."""
    sni = ["-servername", name] if name else ["-noservername"]
    out = world.run("phone", "openssl", "s_client", "-connect", f"{RELAY_NAME}:443", *sni, input="", timeout=30)
    return out.stdout + out.stderr


@pytest.mark.slow
def test_two_laptops_share_one_relay(world, tmp_path):
    """1. The relay reinstalled (no other test's laptop on it); laptops A and B, each behind the home router in a
       network of its own, install inverse-cloud with scripts/install.sh, run `init` (domains alpha/beta), make
       an admin key (installed for the relay's root, as a provider does).
    2. A: `relay-setup --apply root@relay` (the default DNAT), its A record, `serve`: a Pebble certificate; its
       phone syncs through https://alpha.example.org/ (timed).
    3. B with init's defaults: refused with one line (relay user inverse-cloud already carries alpha); with its
       own user: refused with one line naming the ports and a free pair; with those but without `--nat sni`:
       refused (DNAT would take A's 443/80); with `--nat sni`: applied, A moved from DNAT to the shared router
       (the relay's DNAT table now empty), A's phone still syncs. B's record, `serve`: a Pebble certificate
       through nginx's port 80 by Host; B's phone syncs.
    4. A name no laptop carries (and no name at all) on the relay's 443: closed, no certificate.
    5. A's storm: serve killed with SIGKILL and started again, SIGUSR1, and A's takeover key run by hand, five
       rounds, while B's phone syncs in a loop: every B sync succeeds, B's relay session (pid) and B's tunnel
       (connected_since, reconnects) are the same after it; A's takeovers ended only A's sessions.
    6. B's relay-setup again: the relay's records unchanged, B's session kept. A's `relay-setup --nat sni`: its
       record now reads PROXY headers (the inner hop gone); after a restart its phone syncs, and B's.
    7. The relay reboots: boot starts nginx (setup.sh enabled it) from the relay's /etc; both tunnels reconnect,
       both phones sync.
    B's access log (and A's, after step 6) names the phone's own address: the PROXY header came through."""
    relay_addr = HOSTS["relay"].address
    world.rebuild_relay()
    steps: list[tuple[str, float]] = []
    t0 = time.monotonic()
    for role in (A, B):
        world.add_laptop(role, SUBNETS[role])
    try:
        _two_laptops(world, tmp_path, relay_addr, steps, t0)
    finally:
        for role in (A, B):
            world.stop(f"serve-{role}")
        print("\ntwo laptops, timings (s since start): " + ", ".join(f"{w} {t:.1f}" for w, t in steps))


def _two_laptops(world, tmp_path: Path, relay_addr: str, steps, t0: float) -> None:
    def mark(what: str) -> None:
        steps.append((what, time.monotonic() - t0))

    cfgs: dict[str, Path] = {}
    for role in (A, B):
        cfgs[role] = install_and_init(world, role, DOMAINS[role])
        configure(cfgs[role], "relay", keepalive_interval_s=2, keepalive_count_max=3, connect_timeout_s=5)
        admin_key(world, role, also=True)
    mark("install + init, both")

    def serve(role: str) -> None:
        world.popen(f"serve-{role}", role, "inverse-cloud", "serve", log=world.root / f"serve-{role}.log")

    def certified(role: str) -> None:
        def issued() -> dict | None:
            if world.procs[f"serve-{role}"].poll() is not None:
                raise RuntimeError(f"serve on {role} exited:\n{world.log(f'serve-{role}')}")
            served = (status(world, role).get("certificate") or {}).get("served") or {}
            return served if served and not served.get("self_signed") else None

        served = wait_until(issued, 240, f"a certificate from Pebble for {role}", interval_s=0.5,
                            on_timeout=lambda: world.log(f"serve-{role}") + world.log("pebble"))
        assert "Pebble" in served["issuer"], served

    # 2. A alone, as on a relay of its own: DNAT.
    code, text = apply(world, A)
    assert code == 0 and "inverse-cloud: relay ready for user inverse-cloud" in text, text
    assert "dnat to 127.0.0.1:44353" in world.relay_nat()
    world.publish([f"{DOMAINS[A]}. A {relay_addr}"])
    serve(A)
    certified(A)
    phones = {role: Phone(tmp_path, f"phone_{role}", base=f"https://{DOMAINS[role]}", prefix=world.prefix("phone"),
                          env=world.env("phone")) for role in (A, B)}
    (phones[A].contacts / "a0.vcf").write_text(card("a0", "Alpha Zero"))
    phones[A].sync()
    mark("A certified, its phone syncs (DNAT)")

    # 3. B: the clashes first, each one line, nothing changed on the relay.
    code, text = apply(world, B, "--nat", "sni")
    assert code != 0 and "relay user inverse-cloud already carries alpha.example.org" in text, text
    configure(cfgs[B], "relay", user="inverse-cloud-2")
    code, text = apply(world, B, "--nat", "sni")
    assert code != 0 and "set [relay] https_port = 44354 and http_port = 8054" in text, text
    configure(cfgs[B], "relay", https_port=44354, http_port=8054)
    code, text = apply(world, B)
    assert code != 0 and "a second laptop needs the shared router: run relay-setup --nat sni" in text, text
    assert "dnat to 127.0.0.1:44353" in world.relay_nat(), "a refusal changed the relay"
    code, text = apply(world, B, "--nat", "sni")
    assert code == 0 and "moved alpha.example.org (relay user inverse-cloud) from DNAT to the shared router" in text
    assert "set [relay] proxy_protocol = true" in text, text
    assert "dnat" not in world.relay_nat()
    (phones[A].contacts / "a1.vcf").write_text(card("a1", "Alpha One"))
    phones[A].sync()   # the first laptop keeps working, untouched, through the shared router
    mark("B applied (A migrated; A's phone syncs)")
    world.publish([f"{DOMAINS[B]}. A {relay_addr}", f"{UNKNOWN}. A {relay_addr}"])
    serve(B)
    certified(B)
    (phones[B].contacts / "b0.vcf").write_text(card("b0", "Beta Zero"))
    phones[B].sync()
    assert [p.name for p in phones[B].contacts.iterdir()] == ["b0.vcf"], "B's phone sees A's cards"
    # B reads the PROXY header nginx sends: its access log names the phone, not the relay's 127.0.0.1
    assert f'{HOSTS["phone"].address} "PROPFIND ' in world.log(f"serve-{B}"), world.log(f"serve-{B}")
    mark("B certified, its phone syncs (SNI)")

    # sync times, each laptop's phone through the relay (one PUT + listing per sync)
    times: dict[str, list[float]] = {A: [], B: []}
    for i in range(5):
        for role in (A, B):
            (phones[role].contacts / f"t{i}.vcf").write_text(card(f"{role}-t{i}", f"Timed {i}"))
            s = time.monotonic()
            phones[role].sync()
            times[role].append(time.monotonic() - s)

    # 4. Names no laptop carries.
    for name in (UNKNOWN, ""):
        text = tls_refused(world, name)
        assert "no peer certificate available" in text and "BEGIN CERTIFICATE" not in text, text
    mark("unknown SNI closed")

    # 5. A's storm, B's phone syncing throughout.
    b_user = "inverse-cloud-2"
    b_before = relay_sessions(world, b_user)
    assert b_before, "B has no relay session"
    b_tunnel = status(world, B)["tunnel"]
    results: list[tuple[bool, float, str]] = []
    stop = threading.Event()

    def b_phone_loop() -> None:
        n = 0
        while not stop.is_set():
            (phones[B].contacts / f"s{n}.vcf").write_text(card(f"storm-{n}", f"Storm {n}"))
            s = time.monotonic()
            out = subprocess.run(phones[B].args("sync"), capture_output=True, text=True, timeout=180,
                                 env=phones[B].env, check=False)
            results.append((out.returncode == 0, time.monotonic() - s, out.stderr[-500:]))
            n += 1

    takeover_key = str(config_mod.load(cfgs[A]).relay.takeover_key_file)
    ended: list[str] = []
    loop = threading.Thread(target=b_phone_loop, daemon=True)
    loop.start()
    try:
        for _ in range(5):
            proc = world.procs.pop(f"serve-{A}")
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(30)
            serve(A)
            wait_until(lambda: (status(world, A).get("tunnel") or {}).get("state") == "up", 120,
                       "A's tunnel up again", interval_s=0.3, on_timeout=lambda: world.log(f"serve-{A}"))
            os.kill(world.procs[f"serve-{A}"].pid, signal.SIGUSR1)
            out = world.run(A, "ssh", "-i", takeover_key, "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes",
                            f"inverse-cloud@{RELAY_NAME}", timeout=60)
            ended.append(out.stdout.strip())
            wait_until(lambda: (status(world, A).get("tunnel") or {}).get("state") == "up", 120,
                       "A's tunnel up after its takeover", interval_s=0.3, on_timeout=lambda: world.log(f"serve-{A}"))
        wait_until(lambda: len(results) >= 3, 300, "B's phone to sync during the storm")
    finally:
        stop.set()
        loop.join(240)
    assert all("inverse-cloud takeover: ended" in line for line in ended), ended
    assert results and all(ok for ok, _, _ in results), [r for r in results if not r[0]]
    assert relay_sessions(world, b_user) == b_before, "the storm ended B's relay session"
    after = status(world, B)["tunnel"]
    assert (after["connected_since"], after["reconnects"]) == (b_tunnel["connected_since"], b_tunnel["reconnects"])
    phones[A].sync()
    mark("A's storm; B untouched")

    # 6. B again: idempotent (the relay's records unchanged, B's session kept). A onto the shared router itself:
    #    its record now says it reads PROXY headers, the inner hop is gone, and after a restart its phone syncs.
    sites = world.relay_etc / "inverse-cloud" / "sites"

    def records() -> dict[str, str]:
        return {p.name: p.read_text() for p in sorted(sites.iterdir())}

    before = records()
    assert before["inverse-cloud.site"] == "inverse-cloud alpha.example.org 127.0.0.1:44353 127.0.0.1:8053 0\n"
    assert "inverse-cloud.stream" in before and "inverse-cloud-2.stream" not in before
    code, text = apply(world, B, "--nat", "sni")
    assert code == 0 and "moved" not in text, text
    assert records() == before and relay_sessions(world, b_user) == b_before
    code, text = apply(world, A, "--nat", "sni")
    assert code == 0 and "set [relay] proxy_protocol = true" in text, text
    after_a = records()
    assert after_a["inverse-cloud.site"] == "inverse-cloud alpha.example.org 127.0.0.1:44353 127.0.0.1:8053 1\n"
    assert "inverse-cloud.stream" not in after_a
    world.stop(f"serve-{A}")
    a_log = world.root / f"serve-{A}.log"
    a_seen = len(a_log.read_text(errors="replace"))
    serve(A)
    wait_until(lambda: (status(world, A).get("tunnel") or {}).get("state") == "up", 120, "A's tunnel up",
               interval_s=0.3, on_timeout=lambda: world.log(f"serve-{A}"))
    (phones[A].contacts / "a2.vcf").write_text(card("a2", "Alpha Two"))
    phones[A].sync()
    assert f'{HOSTS["phone"].address} "PROPFIND ' in a_log.read_text(errors="replace")[a_seen:], "A lost the address"
    phones[B].sync()
    mark("B rerun idempotent; A on the shared router with PROXY")

    # 7. The relay reboots: nginx (enabled by setup.sh) comes back from the relay's /etc, so do both tunnels;
    #    both phones sync again.
    assert [s.name for s in boot_services(world.relay_etc)] == ["nginx.service"]
    since = {role: status(world, role)["tunnel"]["connected_since"] for role in (A, B)}
    world.reboot_relay()
    wait_until(lambda: world.tcp_open("phone", relay_addr, 443), 30, "nginx back on the relay's 443")
    for role in (A, B):
        def back(role: str = role) -> bool:
            t = status(world, role).get("tunnel") or {}
            return t.get("state") == "up" and t.get("connected_since") != since[role] and all(
                f["bound"] for f in t.get("forwards", []))

        wait_until(back, 180, f"{role}'s tunnel back after the relay's reboot", interval_s=0.5,
                   on_timeout=lambda role=role: world.log(f"serve-{role}"))
    for role in (A, B):
        (phones[role].contacts / "reboot.vcf").write_text(card(f"{role}-reboot", "After The Reboot"))
        phones[role].sync()
    mark("relay rebooted (nginx from its /etc); both phones sync")
    med = {role: statistics.median(t) for role, t in times.items()}
    storm = [d for _, d, _ in results]
    print(f"\n[two laptops] phone sync (vdirsyncer, 1 new card), median of 5: A (migrated, via the plain hop) "
          f"{med[A]:.2f} s, B (SNI + PROXY) {med[B]:.2f} s; during A's storm: B {len(storm)} syncs, all ok, "
          f"median {statistics.median(storm):.2f} s, max {max(storm):.2f} s; A's takeovers: {ended}")
