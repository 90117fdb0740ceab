"""User journeys in the test world (integration/world.py), nothing arranged by hand beyond what a VPS
provider gives: names resolve through the world's DNS server, phones reach the relay's public address through its
NAT rules, the installed `inverse-cloud` console script runs every step (no `python -m`, no `--resolve`,
`--connect-to` or `dns_server` override).

The code blocks of README.md and docs/setup.md are run verbatim, each on the host its `<!-- docs-test: run on
ROLE by TEST -->` mark names; the example names in them (contacts.example.org, relay.example.org) are the
world's own. Each journey asserts at its end that it ran every block marked with its name, and
tests/test_docs.py fails on a block with no mark, so the docs cannot drift from what works:

- test_journey_in_the_world: README's "Run it" in its order (install, the hashed-lock install, init on a
  terminal, relay-setup, service install, phone, status and doctor), two phones, the relay's reboot, doctor
  naming each broken link;
- test_setup_md_in_the_world: docs/setup.md's steps in order on a second laptop (init from flags, relay-setup,
  the records published, service install, status and doctor, phone, user add), then `export` while a phone
  uploads, `import` refused onto a live store, the data folder wiped, `import` as a user does it (the changes
  listed, then --accept-changes), and a new phone sees everything the export held.

The world has no systemd user manager, so `service install` is run and must say so
(exit 1, the unit written, how to start it), and the journeys then start `inverse-cloud serve` as it says.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import textwrap
import time
from pathlib import Path

import pytest
from relay_sshd import configure

from inverse_cloud import config as config_mod
from tests.support import wait_until
from tests.support.docs import DocBlocks, shell_blocks

PASSWORD = "correct horse"
REPO = Path(__file__).resolve().parent.parent


def card(uid: str, name: str) -> str:
    return f"BEGIN:VCARD\r\nVERSION:3.0\r\nUID:{uid}\r\nFN:{name}\r\nN:{name};;;;\r\nEND:VCARD\r\n"


def event(uid: str, summary: str) -> str:
    return (f"BEGIN:VCALENDAR\r\nVERSION:2.0\r\nPRODID:-//journey//EN\r\nBEGIN:VEVENT\r\nUID:{uid}\r\n"
            f"DTSTAMP:20261101T000000Z\r\nDTSTART:20261201T100000Z\r\nDURATION:PT1H\r\nSUMMARY:{summary}\r\n"
            "END:VEVENT\r\nEND:VCALENDAR\r\n")


class Phone:
    """A vdirsyncer instance with its own local folders and status (one phone or one Thunderbird), run on the
    world's phone host: it is given the server URL as a phone is, and the system's trust store decides."""

    def __init__(self, root: Path, name: str, *, base: str, prefix: list[str], env: dict[str, str]) -> None:
        self.root = root / name
        self.contacts = self.root / "contacts"
        self.calendar = self.root / "calendar"
        for d in (self.contacts, self.calendar):
            d.mkdir(parents=True)
        self.prefix, self.env = prefix, env
        base = f"{base}/radicale/alice"
        remote = f'username = "alice"\npassword = "{PASSWORD}"\n'
        self.config = self.root / "config"
        self.config.write_text(textwrap.dedent(f"""\
            [general]
            status_path = "{self.root / 'status'}"

            [pair contacts]
            a = "{name}_contacts_local"
            b = "{name}_contacts_remote"
            collections = null
            conflict_resolution = "b wins"

            [storage {name}_contacts_local]
            type = "filesystem"
            path = "{self.contacts}"
            fileext = ".vcf"

            [storage {name}_contacts_remote]
            type = "carddav"
            url = "{base}/contacts/"
            """) + remote + textwrap.dedent(f"""
            [pair calendar]
            a = "{name}_calendar_local"
            b = "{name}_calendar_remote"
            collections = null
            conflict_resolution = "b wins"

            [storage {name}_calendar_local]
            type = "filesystem"
            path = "{self.calendar}"
            fileext = ".ics"

            [storage {name}_calendar_remote]
            type = "caldav"
            url = "{base}/calendar/"
            """) + remote)
        self.discovered = False

    def args(self, *extra: str) -> list[str]:
        return [*self.prefix, "vdirsyncer", "-c", str(self.config), *extra]

    def sync(self) -> None:
        if not self.discovered:
            out = subprocess.run(self.args("discover"), capture_output=True, text=True, timeout=120, input="y\n" * 4,
                                 env=self.env)
            assert out.returncode == 0, out.stdout + out.stderr
            self.discovered = True
        out = subprocess.run(self.args("sync"), capture_output=True, text=True, timeout=300, env=self.env)
        assert out.returncode == 0, out.stdout + out.stderr

    def texts(self, folder: Path) -> list[str]:
        return sorted(p.read_text() for p in folder.iterdir() if p.is_file())


def two_phones_sync(world, tmp_path: Path) -> tuple[Phone, Phone]:
    """Two phones on the world's internet side, through the relay's public address by name: A adds three cards
    and an event, B gets them, B renames a card, A gets the rename."""
    from world import DOMAIN

    a, b = (Phone(tmp_path, n, base=f"https://{DOMAIN}", prefix=world.prefix("phone"), env=world.env("phone"))
            for n in ("phone_a", "phone_b"))
    for i in range(3):
        (a.contacts / f"c{i}.vcf").write_text(card(f"c{i}", f"Contact {i}"))
    (a.calendar / "e0.ics").write_text(event("e0", "Meeting 0"))
    a.sync()
    b.sync()
    assert len(b.texts(b.contacts)) == 3 and len(b.texts(b.calendar)) == 1
    edited = next(p for p in b.contacts.iterdir() if "UID:c1" in p.read_text())
    edited.write_text(card("c1", "Contact One Renamed"))
    b.sync()
    a.sync()
    assert any("FN:Contact One Renamed" in t for t in a.texts(a.contacts))
    return a, b



def items_in(storage: Path) -> dict[str, bytes]:
    """Items (committed files) under collection-root; Radicale's dot-folders (temp, cache) are skipped, and
    a file that vanishes while we walk (a concurrent write's temp file) is ignored."""
    root = storage / "collection-root"
    out: dict[str, bytes] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            if name.startswith("."):
                continue
            path = Path(dirpath) / name
            try:
                out[str(path.relative_to(root))] = path.read_bytes()
            except FileNotFoundError:
                continue
    return out


def tree_hash(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*"))
            if p.is_file() and ".Radicale.cache" not in p.parts and p.name != ".Radicale.lock"}


def _copy_repo(dest: Path) -> Path:
    """This checkout as a user's clone would be (no venv, caches or git metadata)."""
    import shutil

    shutil.copytree(REPO, dest, ignore=shutil.ignore_patterns(".git", ".venv", "__pycache__", "build", "*.egg-info",
                                                              ".mypy_cache", ".ruff_cache", "test-artifacts"))
    return dest


_INSTALLED: dict[str, Path] = {}


def install_on_laptop(world) -> Path:
    """README's install block (its lines before `inverse-cloud init`), verbatim, in a clone on the laptop (its
    file system; this machine's network, where the package index is), once per world: the clone."""
    if world.tag in _INSTALLED:
        return _INSTALLED[world.tag]
    block = shell_blocks(REPO / "README.md", "Run it")[0]
    install = [line for line in block if not line.startswith("inverse-cloud")]
    clone = _copy_repo(world.laptop_home / "inverse-cloud")
    out = world.run("laptop", "sh", "-c", "set -e\n" + "\n".join(install), cwd=clone, net=False, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    where = world.run("laptop", "sh", "-c", "command -v inverse-cloud")
    assert where.stdout.strip() == "/usr/local/bin/inverse-cloud", where.stdout + where.stderr
    _INSTALLED[world.tag] = clone
    return clone


class Laptop:
    """The world's laptop as its user works on it: the installed `inverse-cloud` on PATH, no flags for paths."""

    def __init__(self, world) -> None:
        self.world = world

    def run(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return self.world.run("laptop", "inverse-cloud", *args, timeout=timeout)

    def spawn(self, *args: str):

        return self._spawn([*self.world.prefix("laptop"), "inverse-cloud", *args])

    def _spawn(self, argv: list[str]):
        import io

        import pexpect

        child = pexpect.spawn(argv[0], argv[1:], env=self.world.env("laptop"), encoding="utf-8", timeout=60)
        child.logfile_read = io.StringIO()  # the whole transcript, for _finish
        return child

    def spawn_shell(self, line: str):
        """A line from the docs, verbatim, on a terminal."""
        return self._spawn([*self.world.prefix("laptop"), "sh", "-c", line])

    def doctor(self) -> tuple[int, dict, str]:
        out = self.run("doctor", "--json", "--timeout", "10")
        assert "Traceback" not in out.stderr, out.stderr
        return out.returncode, json.loads(out.stdout), out.stdout

    def status(self) -> dict:
        out = self.run("status", "--json")
        return json.loads(out.stdout)


def _finish(child) -> str:
    import pexpect

    child.expect(pexpect.EOF, timeout=120)
    child.close()
    text = child.logfile_read.getvalue()
    assert child.exitstatus == 0, text
    return text


def use_the_world_ca(cfg: Path) -> None:
    """What a user of another CA writes in the file: the world's ACME directory (Pebble) instead of Let's
    Encrypt's, the system trust store for it, its CAA name; and faster keepalives (the test's patience)."""
    from world import CA_NAME, PEBBLE_PORT

    configure(cfg, "acme", directory=f"https://{CA_NAME}:{PEBBLE_PORT}/dir",
              ca_bundle="/etc/ssl/certs/ca-certificates.crt", caa_issuer="pebble.invalid")
    configure(cfg, "relay", keepalive_interval_s=2, keepalive_count_max=3, connect_timeout_s=5)


def authorize_admin_key(world) -> None:
    """The admin's SSH key (ssh-keygen's default path, ~/.ssh made as ssh-keygen makes it), installed for root
    on the relay as a VPS provider does."""
    dot_ssh = world.laptop_home / ".ssh"
    dot_ssh.mkdir(mode=0o700, exist_ok=True)
    key = dot_ssh / "id_ed25519"
    world.run("laptop", "ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key), check=True)
    world.authorize_admin(Path(f"{key}.pub").read_text())


def apply_relay_side(world, laptop: Laptop, line: str) -> None:
    """The docs' `relay-setup --apply root@relay.example.org` line on a terminal: ssh asks about the host key
    (first contact), then relay-setup shows the key it pins; both are compared with what the relay itself
    shows (as with the provider's console)."""
    from world import RELAY_NAME

    assert f"--apply root@{RELAY_NAME}" in line, line
    relay_fp = world.relay_fingerprint()
    child = laptop.spawn_shell(line)
    try:
        child.expect(r"Are you sure you want to continue connecting \(yes/no")
    except __import__("pexpect").EOF:
        probe = world.run("laptop", "ssh", "-v", "-o", "BatchMode=yes", f"root@{RELAY_NAME}", "true", timeout=60)
        raise AssertionError(f"ssh asked nothing:\n{child.logfile_read.getvalue()}\nssh -v:\n"
                             f"{probe.stderr[-3000:]}") from None
    assert relay_fp in (child.before or ""), child.before
    child.sendline("yes")
    child.expect(r"Does it match .* \[y/N\]")
    assert relay_fp in (child.before or ""), child.before
    child.sendline("y")
    text = _finish(child)
    assert "inverse-cloud: relay ready for user inverse-cloud" in text, text
    assert "dnat to 127.0.0.1:44353" in world.relay_nat()


def install_service(world, line: str) -> None:
    """The docs' `service install` line. The world has no systemd user manager: the unit is written (running
    the installed venv's python), and the command says in one line that nothing started (exit 1)."""
    out = world.run("laptop", "sh", "-c", line)
    assert out.returncode == 1, out.stdout + out.stderr
    assert "no systemd user manager answers" in out.stderr and "Traceback" not in out.stderr, out.stderr
    unit = (world.laptop_home / ".config" / "systemd" / "user" / "inverse-cloud.service").read_text()
    assert f"ExecStart={world.laptop_home}/.local/lib/inverse-cloud/bin/python" in unit, unit


def serve_until_certified(world, laptop: Laptop) -> dict:
    """`inverse-cloud serve` (what `service install` says to start without a user manager), then a certificate
    from Pebble, validated at the relay's public port 80 through its NAT and the tunnel: the status document."""
    world.popen("serve", "laptop", "inverse-cloud", "serve")

    def issued() -> dict | None:
        if world.procs["serve"].poll() is not None:
            raise RuntimeError(f"serve exited:\n{world.log('serve')}")
        st = laptop.run("status", "--json")
        if not st.stdout.startswith("{"):
            return None
        doc = json.loads(st.stdout)
        served = (doc.get("certificate") or {}).get("served") or {}
        return doc if served and not served.get("self_signed") else None

    doc = wait_until(issued, 180, "a certificate from Pebble", interval_s=0.5,
                     on_timeout=lambda: world.log("serve") + world.log("pebble"))
    assert "Pebble" in doc["certificate"]["served"]["issuer"]
    return doc


def stop_serve(world) -> None:
    """SIGTERM: a clean exit (0)."""
    proc = world.procs.pop("serve")
    os.kill(proc.pid, signal.SIGTERM)
    assert proc.wait(60) == 0, world.log("serve")


def check_phone_command(world, line: str) -> None:
    """The docs' `inverse-cloud phone`: the DAVx5 link with the server and user (never the password), and
    phones can sync now."""
    out = world.run("laptop", "sh", "-c", line)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "davx5://alice@contacts.example.org/radicale/" in out.stdout, out.stdout
    assert "ready for phones: yes" in out.stdout and PASSWORD not in out.stdout, out.stdout


@pytest.mark.slow
def test_journey_in_the_world(world, tmp_path):
    """A new user's journey in the test world, nothing arranged by hand beyond what a VPS provider gives:
    README's install block on the laptop -> `inverse-cloud` on root's PATH -> README's hashed-lock install ->
    README's `inverse-cloud init` on a terminal, wrong
    answers asked again (a URL as domain, root@ as relay login, an unreachable relay) -> the admin's key on the
    relay's root (the provider's part) -> `relay-setup --apply root@relay.example.org` on a terminal, ssh's
    host-key question and relay-setup's own answered after comparing with what the relay shows -> the records
    doctor prints published in the DNS server -> `service install` (no user manager here: it says so) ->
    `serve` -> a Pebble certificate (validated at the relay's public port 80, through its NAT and the tunnel)
    -> two vdirsyncer phones on the internet syncing through https://contacts.example.org/ (its public 443)
    -> CAA published from doctor's line; README's `inverse-cloud phone` and `status ; doctor` lines: healthy
    -> the relay reboots: the NAT comes back from its /etc, the tunnel reconnects, the phones sync ->
    doctor names each broken link: NAT flushed, A record removed, A record elsewhere, the relay's sshd
    stopped, the laptop offline (DNS: is this machine online?), the relay rebuilt with a new host key ->
    SIGTERM, exit 0."""
    from world import DOMAIN, HOSTS, RELAY_NAME

    docs = DocBlocks(REPO, "test_journey_in_the_world")
    t0 = time.monotonic()
    steps: list[tuple[str, float]] = []

    def mark(what: str) -> None:
        steps.append((what, time.monotonic() - t0))

    laptop = Laptop(world)
    # 1. README's install block, verbatim, in a clone on the laptop (setup.md's step 1 is the same block).
    first = docs.take("README.md", "sh scripts/install.sh")
    install_lines = [line for line in first.lines if not line.startswith("inverse-cloud")]
    assert first.lines[-1] == "inverse-cloud setup", first.lines  # the guided way: test_setup_journey.py
    assert [line for line in docs.take("docs/setup.md", "sh scripts/install.sh").lines
            if not line.startswith("inverse-cloud")] == install_lines
    clone = install_on_laptop(world)
    mark("README install")
    # ... and the hashed-lock variant README gives next to it, in the same venv and clone.
    lock = docs.take("README.md", "~/.local/lib/inverse-cloud/bin/pip install --require-hashes")
    out = world.run("laptop", "sh", "-c", "set -e\n" + "\n".join(lock.lines), cwd=clone, net=False, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    assert world.run("laptop", "inverse-cloud", "--help").returncode == 0
    mark("README hashed-lock install")

    # 2. README's step-by-step `inverse-cloud init` on a terminal; each wrong answer is asked again with its reason.
    init = docs.take("README.md", "inverse-cloud init")
    assert list(init.lines) == ["inverse-cloud init"], init.lines
    child = laptop.spawn_shell(init.lines[0])
    child.expect("Domain phones will use")
    child.sendline(f"https://{DOMAIN}/")
    child.expect("is a URL: give only the host name")
    child.expect("Domain phones will use")
    child.sendline(DOMAIN)
    child.expect("Relay host")
    child.sendline(f"root@{RELAY_NAME}")
    child.expect("the login is root")
    child.expect("Relay host")
    child.sendline(f"{RELAY_NAME}:2222")
    child.expect(f"relay {RELAY_NAME}:2222 does not answer")
    child.expect("Relay host")
    child.sendline(RELAY_NAME)
    child.expect("E-mail")
    child.sendline("")
    child.expect("First DAV user name")
    child.sendline("alice")
    child.expect("Password for DAV user alice")
    child.sendline(PASSWORD)
    child.expect("Again")
    child.sendline(PASSWORD)
    text = _finish(child)
    assert f"relay-setup --apply root@{RELAY_NAME}" in text, text
    cfg = world.laptop_home / ".config" / "inverse-cloud" / "config.toml"
    loaded = config_mod.load(cfg)
    assert (loaded.relay.user, loaded.relay.host, loaded.relay.port) == ("inverse-cloud", RELAY_NAME, 22)
    use_the_world_ca(cfg)
    mark("init on a terminal")

    # 3. The VPS provider's part: the admin's key for root on the relay.
    authorize_admin_key(world)

    # 4. README's next block: relay-setup --apply root@relay on a terminal.
    readme_next = docs.take("README.md", "inverse-cloud relay-setup --apply")
    apply_relay_side(world, laptop, docs.line(readme_next, "inverse-cloud relay-setup --apply"))
    mark("relay-setup --apply")

    # 5. Publish what doctor says to publish (the CAA line needs the account: later).
    code, report, text = laptop.doctor()
    assert report["first_broken"] == "DNS" and f"{DOMAIN} does not resolve" in text, text
    records = [r for r in report["dns_records"] if "<" not in r]
    assert f"{DOMAIN}. A {HOSTS['relay'].address}" in records, records
    world.publish(records)

    # 6. README's `service install` (no user manager here: it says so), then serve and a Pebble certificate.
    install_service(world, docs.line(readme_next, "inverse-cloud service install"))
    serve_until_certified(world, laptop)
    mark("certificate issued")

    # 7. Two phones on the internet sync through the relay's public address.
    a, b = two_phones_sync(world, tmp_path)
    mark("two phones sync")

    # 8. CAA from doctor's line, then status and doctor healthy, with no overrides.
    code, report, text = laptop.doctor()
    caa = [r for r in report["dns_records"] if " CAA " in r]
    assert caa and "accounturi=" in caa[0] and "<" not in caa[0], report["dns_records"]
    world.publish(caa)
    code, report, text = laptop.doctor()
    assert code == 0 and all(c["state"] == "ok" for c in report["checks"]), text
    check_phone_command(world, docs.line(readme_next, "inverse-cloud phone"))
    st = world.run("laptop", "sh", "-c", docs.line(readme_next, "inverse-cloud status"))
    assert st.returncode == 0 and "all links work" in st.stdout, st.stdout + st.stderr
    assert "tunnel:       up to relay.example.org:22" in st.stdout, st.stdout
    mark("status + doctor healthy")

    def tunnel_up() -> bool:
        return (laptop.status().get("tunnel") or {}).get("state") == "up"

    # 9. The relay reboots: only its /etc comes back, and with it the NAT; the tunnel reconnects.
    world.reboot_relay()
    assert "dnat to 127.0.0.1:44353" in world.relay_nat(), "the NAT did not come back after the reboot"
    wait_until(tunnel_up, 120, "the tunnel back after the relay's reboot", interval_s=0.5,
               on_timeout=lambda: world.log("serve"))
    (b.contacts / "after-reboot.vcf").write_text(card("r1", "After Reboot"))
    b.sync()
    a.sync()
    assert any("FN:After Reboot" in t for t in a.texts(a.contacts))
    mark("relay reboot, phones sync")

    # 10. doctor names each broken link.
    def broken(expect_link: str, fragment: str) -> None:
        code, report, text = laptop.doctor()
        assert code != 0 and report["first_broken"] == expect_link and fragment in text, text

    world.flush_relay_nat()
    broken("public HTTP", "does not answer")
    world.reboot_relay()
    wait_until(tunnel_up, 120, "the tunnel back", interval_s=0.5, on_timeout=lambda: world.log("serve"))
    world.unpublish(DOMAIN, "A")
    broken("DNS", f"{DOMAIN} does not resolve")
    world.publish([f"{DOMAIN}. A 198.51.100.99"])
    broken("DNS", f"{DOMAIN} points at 198.51.100.99")
    world.unpublish(DOMAIN, "A")
    world.publish([f"{DOMAIN}. A {HOSTS['relay'].address}"])
    world.stop_relay_sshd()
    broken("relay", "unreachable")
    world.start_relay_sshd()
    world.run("laptop", "ip", "link", "set", "eth0", "down", check=True)
    try:
        broken("DNS", "is this machine online")
    finally:
        world.run("laptop", "ip", "link", "set", "eth0", "up", check=True)
        world.run("laptop", "ip", "route", "replace", "default", "via", "192.168.7.1", check=True)
    world.stop_relay_sshd()
    world.new_relay_host_keys()
    world.start_relay_sshd()
    broken("relay", "relay host key changed")
    mark("broken links named")

    # 11. SIGTERM: a clean exit.
    stop_serve(world)
    docs.assert_all_ran()
    print("\nworld journey timings (s since start): " + ", ".join(f"{w} {t:.1f}" for w, t in steps))


@pytest.mark.slow
def test_setup_md_in_the_world(world, tmp_path):
    """docs/setup.md's steps in a user's order, on a second laptop (the installed package kept; its config, data,
    state and ~/.ssh gone, the old records unpublished): step 1's `init --non-interactive` with the password in
    ~/pw.txt -> the admin's key on the relay (the provider's part) -> step 2's `relay-setup --apply
    root@relay.example.org` on a terminal -> step 3's records, as doctor prints them, published -> step 4's
    `service install` (it says no user manager answers) -> `serve`, a Pebble certificate -> a phone syncs through
    the relay's public address -> the CAA record from doctor -> step 4's `status`/`doctor` block healthy ->
    step 5's `phone` -> `user add bob` on a terminal, `user list` -> `export` on a terminal while a phone uploads:
    everything committed before it began is in it -> `import` onto the live store refused, nothing changed ->
    SIGTERM -> the data folder wiped -> `import` lists what it would change and changes nothing -> `import
    --accept-changes` restores (Radicale verifies the store; every item committed before the export began is
    there byte for byte) -> `serve` again -> a new phone sees every item the export held."""
    from world import DOMAIN, HOSTS

    docs = DocBlocks(REPO, "test_setup_md_in_the_world")
    t0 = time.monotonic()
    steps: list[tuple[str, float]] = []

    def mark(what: str) -> None:
        steps.append((what, time.monotonic() - t0))

    laptop = Laptop(world)
    install_on_laptop(world)
    world.stop("serve")  # an earlier journey's server, if it failed before its own SIGTERM
    home = world.laptop_home
    for gone in (".config/inverse-cloud", ".local/share/inverse-cloud", ".local/state/inverse-cloud", ".ssh",
                 ".config/systemd"):
        subprocess.run(["rm", "-rf", str(home / gone)], check=True)
    zone = DOMAIN.split(".", 1)[1]
    for owner, rtype in ((DOMAIN, "A"), (DOMAIN, "CAA"), (f"_carddavs._tcp.{zone}", "SRV"),
                         (f"_caldavs._tcp.{zone}", "SRV"), (f"_carddavs._tcp.{zone}", "TXT"),
                         (f"_caldavs._tcp.{zone}", "TXT")):
        world.unpublish(owner, rtype, missing_ok=True)  # an earlier journey's records: the new laptop's own
    mark("second laptop")

    # Step 1: init from flags; the password file is the user's.
    init = docs.take("docs/setup.md", "inverse-cloud init --non-interactive")
    (home / "pw.txt").write_text(PASSWORD + "\n")
    out = world.run("laptop", "sh", "-c", "\n".join(init.lines))
    assert out.returncode == 0, out.stdout + out.stderr
    cfg = home / ".config" / "inverse-cloud" / "config.toml"
    loaded = config_mod.load(cfg)
    assert (loaded.relay.user, loaded.relay.host, loaded.server.domain) == (
        "inverse-cloud", "relay.example.org", DOMAIN), loaded
    use_the_world_ca(cfg)
    mark("init from flags")

    # Step 2: the provider's part (the admin's key for root), then relay-setup --apply on a terminal.
    authorize_admin_key(world)
    relay = docs.take("docs/setup.md", "inverse-cloud relay-setup --apply")
    apply_relay_side(world, laptop, relay.lines[0])
    mark("relay-setup --apply")

    # Step 3: the records doctor prints (the CAA line needs the account: later).
    code, report, text = laptop.doctor()
    assert report["first_broken"] == "DNS" and f"{DOMAIN} does not resolve" in text, text
    records = [r for r in report["dns_records"] if "<" not in r]
    assert f"{DOMAIN}. A {HOSTS['relay'].address}" in records, records
    world.publish(records)

    # Step 4: service install (no user manager here), serve, the first certificate.
    install_service(world, docs.take("docs/setup.md", "inverse-cloud service install").lines[0])
    serve_until_certified(world, laptop)
    mark("certificate issued")

    a = Phone(tmp_path, "phone_a", base=f"https://{DOMAIN}", prefix=world.prefix("phone"), env=world.env("phone"))
    for i in range(3):
        (a.contacts / f"c{i}.vcf").write_text(card(f"c{i}", f"Contact {i}"))
    (a.calendar / "e0.ics").write_text(event("e0", "Meeting 0"))
    a.sync()
    code, report, text = laptop.doctor()
    caa = [r for r in report["dns_records"] if " CAA " in r]
    assert caa and "accounturi=" in caa[0] and "<" not in caa[0], report["dns_records"]
    world.publish(caa)
    check = docs.take("docs/setup.md", "inverse-cloud status")
    out = world.run("laptop", "sh", "-c", "set -e\n" + "\n".join(check.lines))
    assert out.returncode == 0 and "all links work" in out.stdout, out.stdout + out.stderr
    assert "tunnel:       up to relay.example.org:22" in out.stdout, out.stdout
    assert "DAV user alice: calendar (calendar, 1 items), contacts (addressbook, 3 items)" in out.stdout, out.stdout
    assert "plaintext only here: TLS ends in this process" in out.stdout, out.stdout
    mark("phone synced, status + doctor healthy")

    # Step 5: the phone page; then more users.
    check_phone_command(world, docs.take("docs/setup.md", "inverse-cloud phone").lines[0])
    users = docs.take("docs/setup.md", "inverse-cloud user add bob")
    child = laptop.spawn_shell(users.lines[0])
    child.expect("Password for DAV user bob")
    child.sendline("battery staple horse")
    child.expect("Again")
    child.sendline("battery staple horse")
    _finish(child)
    listed = world.run("laptop", "sh", "-c", users.lines[1])
    assert listed.returncode == 0 and "bob" in listed.stdout and "alice" in listed.stdout, listed.stdout
    mark("phone page, user add")

    # Export on a terminal while the phone uploads: every item committed before it began is in the backup.
    for i in range(200):
        (a.contacts / f"bulk{i}.vcf").write_text(card(f"bulk{i}", f"Bulk {i}"))
    storage = config_mod.load(cfg).server.storage_dir
    backup = home / "contacts-backup.age"
    passphrase = "correct horse battery staple"
    with open(tmp_path / "vdirsyncer-bulk.log", "wb") as log_fh:
        writer = subprocess.Popen(a.args("sync"), stdout=log_fh, stderr=subprocess.STDOUT, env=a.env)
    try:
        wait_until(lambda: sum("bulk" in k for k in items_in(storage)) >= 20, 120, "the phone uploading",
                   interval_s=0.01)
        before = items_in(storage)
        still_writing = writer.poll() is None
        child = laptop.spawn("export", str(backup))
        child.expect("Backup passphrase: ")
        child.sendline(passphrase)
        child.expect("Again: ")
        child.sendline(passphrase)
        _finish(child)
    finally:
        wait_until(lambda: writer.poll() is not None, 300, "the phone's upload to finish")
    assert writer.returncode == 0, (tmp_path / "vdirsyncer-bulk.log").read_text()
    assert still_writing, "the phone finished before the export began: the test proved nothing"
    assert len(before) < 3 + 1 + 200
    mark("export during an upload")

    def import_backup(*flags: str) -> tuple[int, str]:
        child = laptop.spawn("import", str(backup), *flags)
        child.expect("Backup passphrase: ")
        child.sendline(passphrase)
        child.expect(__import__("pexpect").EOF, timeout=300)
        child.close()
        return child.exitstatus, child.logfile_read.getvalue()

    # import onto the live store: refused, nothing changed.
    data = config_mod.load(cfg).server.data_dir
    snapshot = tree_hash(data)
    code, text = import_backup()
    assert code == 1 and "refusing to import" in text, text
    assert tree_hash(data) == snapshot

    # The laptop's data lost: stop, wipe, import as a user does (the changes listed first, then accepted).
    stop_serve(world)
    subprocess.run(["rm", "-rf", str(data)], check=True)
    code, text = import_backup()
    assert code == 1 and "this import would change" in text and "--accept-changes" in text, text
    assert not data.exists() or not items_in(storage)
    code, text = import_backup("--accept-changes")
    assert code == 0 and "Radicale verified the store" in text, text
    restored = items_in(storage)
    assert [k for k in before if restored.get(k) != before[k]] == []
    mark("wipe, import")

    # The server again; a new phone sees every item the export held.
    serve_until_certified(world, laptop)
    c = Phone(tmp_path, "phone_c", base=f"https://{DOMAIN}", prefix=world.prefix("phone"), env=world.env("phone"))
    c.sync()
    uids = {line for t in c.texts(c.contacts) + c.texts(c.calendar) for line in t.splitlines()
            if line.startswith("UID:")}
    # what was restored: everything committed before the export began, and what the upload added until it began
    expected = {line for v in restored.values() for line in v.decode().splitlines() if line.startswith("UID:")}
    assert uids == expected and len(expected) == len(restored), (sorted(expected - uids)[:5],
                                                                 sorted(uids - expected)[:5])
    mark("a new phone sees it all")

    stop_serve(world)
    docs.assert_all_ran()
    print("\nsetup.md journey timings (s since start): " + ", ".join(f"{w} {t:.1f}" for w, t in steps))
