"""The `inverse-cloud setup` journey in the namespaces test world (integration/world.py), driven through a pty
as a new user would: README's install block on the laptop, then `inverse-cloud setup` with the answers typed,
wrong ones included, the relay side applied over the real ssh as root on relay.example.org, the DNS records
published into knot exactly as setup prints them, the first certificate from the world's Pebble (validated at
the relay's public port 80, through its NAT and the tunnel), then two phones on the internet syncing through
https://contacts.example.org/. No override on any path the user takes: setup finds the zone's authoritative
server through the laptop's resolver (the NS of example.org), the phones reach the relay's public address.

The world is this module's own (built fresh, torn down at the end): the journey starts from a laptop that
has never run inverse-cloud and a relay that has never seen it, also when the session's shared world has
been used by another journey before.

What the test plays by hand, as a person would: the VPS provider's part (the admin's SSH key for root on the
relay), publishing the records at the DNS provider, and running `inverse-cloud serve` in a second terminal
when setup says no systemd user manager answers (there is none in this test machine). Each step's elapsed
seconds, the total, and what the user typed and did are printed.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shlex
import shutil
import signal
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pexpect
import pytest
from test_journey import PASSWORD, REPO, Phone, _copy_repo, card, two_phones_sync
from world import DOMAIN, HOSTS, RELAY_NAME, World

from inverse_cloud import config as config_mod
from tests.support import default_signals
from tests.support.docs import shell_blocks

CAA_ISSUER = "pebble.invalid"   # the world's CA is not Let's Encrypt: its CAA issuer domain is given as a flag


@contextlib.contextmanager
def own_world() -> Iterator[World]:
    """A fresh world with namespaces tagged for this module (it can coexist with the session's world)."""
    root = Path(tempfile.mkdtemp(prefix="wou-world-"))
    world = World(root=root, tag=f"wou{os.getpid() % 100000}")
    try:
        world.build()
        yield world
    finally:
        world.close()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def fresh_world():
    assert os.geteuid() == 0, "the world needs root (network and mount namespaces); CI runs as root"
    with own_world() as w:
        yield w


class User:
    """What the person at the laptop types and does, counted."""

    def __init__(self, world: World) -> None:
        self.world = world
        self.typed: list[str] = []     # every line typed at a prompt
        self.actions: list[str] = []   # everything else the user does (a command, a DNS record, a QR scan)
        self.marks: list[tuple[str, float]] = []
        self.t0 = time.monotonic()
        self.last = self.t0

    def mark(self, what: str) -> None:
        now = time.monotonic()
        self.marks.append((what, now - self.last))
        self.last = now

    def spawn(self, line: str) -> pexpect.spawn:
        self.actions.append(f"runs `{line}`")
        # in the laptop's namespaces: nsenter execs, so the pty stays the command's terminal and the exit
        # status is the command's own (as a shell shows it: 130 after Ctrl-C)
        child = pexpect.spawn("nsenter", [*self.world.prefix("laptop")[1:], *shlex.split(line)],
                              env=self.world.env("laptop"), encoding="utf-8", timeout=240, dimensions=(50, 250),
                              preexec_fn=default_signals)
        child.logfile_read = io.StringIO()
        return child

    def type(self, child: pexpect.spawn, text: str) -> None:
        self.typed.append(text)
        child.sendline(text)

    def report(self) -> str:
        total = time.monotonic() - self.t0
        lines = ["", "setup journey in the world, seconds per step:"]
        lines += [f"  {what:44s} {s:7.1f}" for what, s in self.marks]
        lines.append(f"  {'total':44s} {total:7.1f}  ({total / 60:.1f} min)")
        lines.append(f"user actions ({len(self.actions)}): " + "; ".join(self.actions))
        lines.append(f"lines typed at prompts ({len(self.typed)}, wrong ones included): "
                     + ", ".join(repr(t if t not in (PASSWORD, WRONG_AGAIN) else "<password>") for t in self.typed))
        return "\n".join(lines)


WRONG_AGAIN = "correct horse but not the same"


def printed_records(transcript: str, after: str, until: str) -> list[str]:
    """The indented record lines setup printed between ``after`` and ``until`` (the last such block)."""
    block = transcript.rsplit(after, 1)[1].split(until, 1)[0]
    return [line.strip() for line in block.splitlines() if re.match(r"\s+\S+\. (A|AAAA|CAA) ", line)]


@pytest.mark.slow
def test_setup_in_the_world_from_nothing_to_two_phones_syncing(fresh_world, tmp_path):
    """README's install block -> `inverse-cloud setup` on a terminal. Typed, each wrong answer asked again
    with its one-line reason: a URL as the domain; root@relay as the relay (the tunnel login is not root); a
    relay port nothing answers on; Enter for the offered admin login root; the user; a short password; two
    different passwords; then the password twice. The relay step applies the relay side over ssh as root:
    ssh's first-contact question and setup's own are answered after comparing with what the relay shows.
    The A record is published exactly as printed; setup waits until the zone's server (found through the
    NS of example.org) shows it; then the CAA record with the account's URI, likewise; no order is placed
    before it is visible. setup says in one line that no systemd user manager answers and what to run; the
    user runs that `serve`; the certificate comes from the world's Pebble; setup ends with the QR code and
    'ready for phones: yes'. Two phones sync both ways through https://contacts.example.org/. A rerun shows
    every step done before, ends ready, and places no second order."""
    world = fresh_world
    user = User(world)

    # 1. README's install block, verbatim, in a copy of the repository on the laptop.
    block = shell_blocks(REPO / "README.md", "Run it")[0]
    install = [line for line in block if not line.startswith("inverse-cloud")]
    clone = _copy_repo(world.laptop_home / "inverse-cloud")
    out = world.run("laptop", "sh", "-c", "set -e\n" + "\n".join(install), cwd=clone, net=False, timeout=900)
    assert out.returncode == 0, out.stdout + out.stderr
    assert world.run("laptop", "sh", "-c", "command -v inverse-cloud").stdout.strip() == "/usr/local/bin/inverse-cloud"
    user.actions.append("runs README's install block (" + "; ".join(install) + ")")
    user.mark("README install")

    # 2. The VPS provider's part: the admin's SSH key for root on the relay.
    key = world.laptop_home / ".ssh" / "id_ed25519"
    key.parent.mkdir(mode=0o700, exist_ok=True)  # ssh-keygen -f does not make it
    world.run("laptop", "ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key), check=True)
    world.authorize_admin(Path(f"{key}.pub").read_text())
    user.actions.append("gives the VPS provider an SSH key (ssh-keygen)")

    # 3. setup, answers typed.
    setup_line = (f"inverse-cloud setup --acme-directory {world.acme_directory} "
                  f"--acme-ca-bundle /etc/ssl/certs/ca-certificates.crt --acme-caa-issuer {CAA_ISSUER}")
    child = user.spawn(setup_line)
    try:
        _journey(world, user, child)
    finally:
        if child.isalive():
            child.close(force=True)
    serve = world.procs["serve"]

    # 4. Two phones on the internet sync through the relay's public address.
    user.actions.append("scans the QR code with DAVx5 on the phone")
    a, b = two_phones_sync(world, tmp_path)
    user.mark("two phones sync through the relay")
    print(user.report())

    # 5. A rerun: every step done before, ready again, no second certificate order.
    serial = _served_serial(world)
    again = user.spawn("inverse-cloud setup")
    user.actions.pop()  # not part of the journey
    steps = ("init", "relay", "dns", "account", "caa", "start", "certificate")
    for n, step in enumerate(steps, 1):
        again.expect_exact(f"[{n}/8] {step}: done before")
    again.expect_exact("[8/8] phone: ready for phones: yes")
    again.expect(pexpect.EOF)
    again.close()
    assert again.exitstatus == 0, again.logfile_read.getvalue()
    assert _served_serial(world) == serial, "the rerun replaced the certificate"

    os.kill(serve.pid, signal.SIGTERM)
    assert serve.wait(60) == 0, world.log("serve")
    world.procs.pop("serve")


def _served_serial(world: World) -> str:
    import json

    out = world.run("laptop", "inverse-cloud", "status", "--json")
    return str(json.loads(out.stdout)["certificate"]["served"]["serial"])


def _journey(world: World, user: User, child: pexpect.spawn) -> None:
    child.expect_exact("Domain phones will use")
    user.type(child, f"https://{DOMAIN}/")
    child.expect_exact("is a URL: give only the host name")
    child.expect_exact("Domain phones will use")
    user.type(child, DOMAIN)
    child.expect_exact("Relay host")
    user.type(child, f"root@{RELAY_NAME}")
    child.expect_exact(f"give the relay's host only ({RELAY_NAME}); the tunnel login is inverse-cloud")
    child.expect_exact("Relay host")
    user.type(child, f"{RELAY_NAME}:2222")
    child.expect_exact(f"the relay {RELAY_NAME}:2222 does not answer on SSH")
    child.expect_exact("Relay host")
    user.type(child, RELAY_NAME)
    child.expect_exact("Admin login on the relay")
    child.expect_exact("[root]:")
    user.type(child, "")
    child.expect_exact("First DAV user name")
    user.type(child, "alice")
    child.expect_exact("Password for DAV user alice:")
    user.type(child, "short")
    child.expect_exact("that password is too short")
    child.expect_exact("Password for DAV user alice:")
    user.type(child, PASSWORD)
    child.expect_exact("Again:")
    user.type(child, WRONG_AGAIN)
    child.expect_exact("the two passwords differ")
    child.expect_exact("Password for DAV user alice:")
    user.type(child, PASSWORD)
    child.expect_exact("Again:")
    user.type(child, PASSWORD)
    child.expect_exact("[1/8] init: wrote")
    user.mark("setup: answers typed, init")

    # relay: ssh's first contact, then setup's own question; both compared with the relay's key file.
    relay_fp = world.relay_fingerprint()
    child.expect(r"Are you sure you want to continue connecting \(yes/no")
    assert relay_fp in (child.before or ""), child.before
    user.type(child, "yes")
    child.expect(r"Does it match .* \[y/N\]")
    assert relay_fp in (child.before or ""), child.before
    user.type(child, "y")
    child.expect_exact(f"[2/8] relay: relay side applied on {RELAY_NAME} as root (tunnel login inverse-cloud)")
    assert "dnat to 127.0.0.1:44353" in world.relay_nat()
    user.mark("setup: relay side applied, host key pinned")

    # dns: publish exactly what is printed; setup waits for the zone's server to show it.
    child.expect_exact("waiting until ns.example.org (198.51.100.53) answers")
    records = printed_records(child.logfile_read.getvalue(), "publish at your DNS provider", "waiting until")
    assert records == [f"{DOMAIN}. A {HOSTS['relay'].address}"], records
    child.expect_exact("no A/AAAA record yet")
    world.publish(records)
    user.actions.append(f"publishes the A record ({records[0]})")
    child.expect_exact(f"[3/8] dns: {DOMAIN} -> {HOSTS['relay'].address} at every authoritative server")
    user.mark("setup: A record published and seen")

    # account + caa: the CAA record with accounturi, published as printed; no order before it is seen.
    child.expect_exact("[4/8] account: ACME account")
    child.expect_exact(f"answers {DOMAIN} with it")
    caa = printed_records(child.logfile_read.getvalue(), "publish this CAA record too", "waiting until")
    assert len(caa) == 1 and f'CAA 0 issue "{CAA_ISSUER}; accounturi=https://' in caa[0], caa
    assert "serve" not in world.procs
    world.publish(caa)
    user.actions.append("publishes the CAA record")
    child.expect_exact("[5/8] caa: CAA pins account")
    user.mark("setup: account registered, CAA published and seen")

    # start: no systemd user manager here; setup says so in one line and names the command to run.
    child.expect(r"no systemd user manager answers here, so no service is installed: run `([^`]+)` in "
                 r"another terminal")
    serve_line = child.match.group(1)
    assert serve_line == "inverse-cloud serve", serve_line
    world.popen("serve", "laptop", "sh", "-c", f"exec {serve_line}")
    user.actions.append(f"runs `{serve_line}` in a second terminal (no systemd here)")
    child.expect_exact("[6/8] start: started by hand")
    child.expect_exact("[7/8] certificate: certificate ")
    user.mark("setup: serve started, first certificate")

    child.expect_exact(f"davx5://alice@{DOMAIN}/radicale/")
    child.expect(r"\[8/8\] phone: ready for phones: (.*)\r\n")
    ready = child.match.group(1)
    child.expect(pexpect.EOF)
    child.close()
    transcript = child.logfile_read.getvalue()
    assert ready.startswith("yes"), (ready, world.log("serve"))
    assert child.exitstatus == 0, transcript
    assert "Traceback" not in transcript, transcript
    cfg = config_mod.load(world.laptop_home / ".config" / "inverse-cloud" / "config.toml")
    assert (cfg.relay.user, cfg.relay.host, cfg.relay.port) == ("inverse-cloud", RELAY_NAME, 22)
    assert cfg.relay.host_key.startswith("ssh-ed25519 ")
    user.mark("setup: QR code, ready for phones")


# --- interrupted after each step ------------------------------------------------------------------------

def _ensure_installed(world: World) -> None:
    """README's install block and the provider's admin key, unless the journey above did them already."""
    if world.run("laptop", "sh", "-c", "command -v inverse-cloud").returncode != 0:
        block = [line for line in shell_blocks(REPO / "README.md", "Run it")[0] if not line.startswith("inverse-cloud")]
        clone = _copy_repo(world.laptop_home / "inverse-cloud")
        out = world.run("laptop", "sh", "-c", "set -e\n" + "\n".join(block), cwd=clone, net=False, timeout=900)
        assert out.returncode == 0, out.stdout + out.stderr
    key = world.laptop_home / ".ssh" / "id_ed25519"
    if not key.exists():
        key.parent.mkdir(mode=0o700, exist_ok=True)
        world.run("laptop", "ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key), check=True)
    world.authorize_admin(Path(f"{key}.pub").read_text())


def _forget_the_laptop(world: World) -> None:
    """A laptop that never ran setup (the install stays), and a zone without the records: what the journey
    above left is removed (its server stopped by pid, its folders, its A and CAA records)."""
    if "serve" in world.procs:
        world.stop("serve")
    for d in (".config/inverse-cloud", ".local/share/inverse-cloud", ".local/state/inverse-cloud"):
        shutil.rmtree(world.laptop_home / d, ignore_errors=True)
    import subprocess

    knotc = ["knotc", "-c", str(world.knot_conf)]
    subprocess.run([*knotc, "zone-begin", "example.org"], check=True, capture_output=True, timeout=30)
    for rtype in ("A", "CAA"):  # absent when this test runs alone: knotc says so, and that is fine
        subprocess.run([*knotc, "zone-unset", "example.org", f"{DOMAIN}.", rtype], capture_output=True, timeout=30,
                       check=False)
    subprocess.run([*knotc, "zone-commit", "example.org"], check=True, capture_output=True, timeout=30)


def _setup_state(world: World) -> list[str]:
    import json

    path = world.laptop_home / ".config" / "inverse-cloud" / "setup-state.json"
    return list(json.loads(path.read_text())["done"])


def _killed(child: pexpect.spawn, how: str) -> int | None:
    """Ctrl-C (SIGINT from the terminal) or a kill (SIGKILL); the exit status (None when killed)."""
    if how == "ctrl-c":
        child.sendintr()
    else:
        child.kill(signal.SIGKILL)
    child.expect(pexpect.EOF, timeout=60)
    child.close()
    return child.exitstatus


@pytest.mark.slow
def test_setup_interrupted_after_each_step_in_the_world_ends_in_the_same_state(fresh_world, tmp_path):
    """Every answer as a flag; setup is interrupted at the next wait after each step, alternately with
    Ctrl-C and a kill, and run again each time with the same command:
    after init (Ctrl-C at the host-key question), after relay (kill while waiting for the A record), after
    dns and account (Ctrl-C while waiting for CAA: the rerun prints the same CAA record again), after caa
    (kill while waiting for the server), after start (kill once the server answers), after certificate (kill
    once it is shown), then to the end. Each rerun says "done before" for what was done.
    The end state is one run's: every step done, the tunnel key made once, the relay's keys file holding it
    once, the host key pinned once, one ACME account, one certificate (a further rerun keeps it), and a
    phone syncs."""
    world = fresh_world
    _ensure_installed(world)
    _forget_the_laptop(world)
    home = world.laptop_home
    cfg_path = home / ".config" / "inverse-cloud" / "config.toml"
    pw = home / "pw"
    pw.write_text(PASSWORD + "\n")
    line = (f"inverse-cloud setup --domain {DOMAIN} --relay {RELAY_NAME} --relay-admin root --user alice "
            f"--password-file {pw} --acme-directory {world.acme_directory} "
            f"--acme-ca-bundle /etc/ssl/certs/ca-certificates.crt --acme-caa-issuer {CAA_ISSUER}")
    user = User(world)

    def host_key_question(child: pexpect.spawn) -> None:
        first = child.expect([r"Are you sure you want to continue connecting \(yes/no", r"Does it match .* \[y/N\]"])
        if first == 0:
            child.sendline("yes")
            child.expect(r"Does it match .* \[y/N\]")

    # after init: Ctrl-C at the host-key question
    child = user.spawn(line)
    child.expect_exact("[1/8] init: wrote")
    host_key_question(child)
    assert _killed(child, "ctrl-c") == 130, child.logfile_read.getvalue()
    assert _setup_state(world) == ["init"]
    tunnel_key = (home / ".local/share/inverse-cloud/ssh/id_ed25519.pub").read_text()

    # after relay: killed while waiting for the A record
    child = user.spawn(line)
    child.expect_exact("[1/8] init: done before")
    host_key_question(child)
    child.sendline("y")
    child.expect_exact("[2/8] relay: relay side applied")
    child.expect_exact("no A/AAAA record yet")
    assert _killed(child, "kill") is None
    assert _setup_state(world) == ["init", "relay"]
    pinned = config_mod.load(cfg_path)
    assert pinned.relay.host_key.startswith("ssh-ed25519 ")

    # after dns and account: Ctrl-C while waiting for the CAA record
    child = user.spawn(line)
    for n, step in enumerate(("init", "relay"), 1):
        child.expect_exact(f"[{n}/8] {step}: done before")
    child.expect_exact("no A/AAAA record yet")
    world.publish(printed_records(child.logfile_read.getvalue(), "publish at your DNS provider", "waiting until"))
    child.expect_exact("[3/8] dns: ")
    child.expect_exact("[4/8] account: ACME account")
    child.expect_exact(f"answers {DOMAIN} with it")
    caa = printed_records(child.logfile_read.getvalue(), "publish this CAA record too", "waiting until")
    assert len(caa) == 1, caa
    assert _killed(child, "ctrl-c") == 130
    assert _setup_state(world) == ["init", "relay", "dns", "account"]

    # after caa: the record printed again, published; killed while waiting for the server
    child = user.spawn(line)
    for n, step in enumerate(("init", "relay", "dns", "account"), 1):
        child.expect_exact(f"[{n}/8] {step}: done before")
    child.expect_exact(f"answers {DOMAIN} with it")
    again = printed_records(child.logfile_read.getvalue(), "publish this CAA record too", "waiting until")
    assert again == caa, (again, caa)
    world.publish(caa)
    child.expect_exact("[5/8] caa: CAA pins account")
    child.expect_exact("no systemd user manager answers here")
    assert _killed(child, "kill") is None
    assert _setup_state(world) == ["init", "relay", "dns", "account", "caa"]

    # after start: killed as soon as the server answered
    child = user.spawn(line)
    for n, step in enumerate(("init", "relay", "dns", "account", "caa"), 1):
        child.expect_exact(f"[{n}/8] {step}: done before")
    child.expect(r"run `([^`]+)` in another terminal")
    world.popen("serve", "laptop", "sh", "-c", f"exec {child.match.group(1)}")
    child.expect_exact("[6/8] start: started by hand")
    assert _killed(child, "kill") is None
    # a step is recorded before its line is shown; the certificate may have come in the meantime
    assert _setup_state(world)[:6] == ["init", "relay", "dns", "account", "caa", "start"]

    # after certificate: killed as soon as it is shown (the phone step may already have run: it only prints)
    child = user.spawn(line)
    for n, step in enumerate(("init", "relay", "dns", "account", "caa", "start"), 1):
        child.expect_exact(f"[{n}/8] {step}: done before")
    child.expect_exact(["[7/8] certificate: certificate ", "[7/8] certificate: done before"])
    assert _killed(child, "kill") in (None, 0)
    assert _setup_state(world)[:7] == ["init", "relay", "dns", "account", "caa", "start", "certificate"]

    # to the end
    child = user.spawn(line)
    for n, step in enumerate(("init", "relay", "dns", "account", "caa", "start"), 1):
        child.expect_exact(f"[{n}/8] {step}: done before")
    child.expect_exact("[7/8] certificate: done before")
    child.expect_exact("[8/8] phone: ready for phones: yes")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0, child.logfile_read.getvalue()
    serial = _served_serial(world)

    # a rerun changes nothing
    child = user.spawn(line)
    child.expect_exact("[7/8] certificate: done before")
    child.expect_exact("[8/8] phone: ready for phones: yes")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0

    from inverse_cloud.ops.setup import STEPS

    cfg = config_mod.load(cfg_path)
    assert _setup_state(world) == list(STEPS)
    assert (home / ".local/share/inverse-cloud/ssh/id_ed25519.pub").read_text() == tunnel_key
    assert cfg.relay.host_key == pinned.relay.host_key
    assert cfg_path.read_text().count("host_key = ") == 1
    keys_file = world.relay_etc / "ssh" / "inverse-cloud" / "inverse-cloud.keys"
    body = tunnel_key.split()[1]
    assert keys_file.read_text().count(body) == 1, keys_file.read_text()
    import json

    accounts = json.loads((cfg.acme.account_dir / "account.json").read_text())["accounts"]
    assert list(accounts.values()) == [re.search(r"accounturi=(\S+);", caa[0]).group(1)], accounts
    assert _served_serial(world) == serial
    phone = Phone(tmp_path, "phone_c", base=f"https://{DOMAIN}", prefix=world.prefix("phone"), env=world.env("phone"))
    (phone.contacts / "r.vcf").write_text(card("r", "After Interruptions"))
    phone.sync()
    world.stop("serve")


# --- DNS automation: PowerDNS's HTTP API ----------------------------------------------------------------

PDNS_API_PORT = 8081


def _replace_knot_by_powerdns(world: World) -> str:
    """PowerDNS (sqlite backend, HTTP API on) becomes the authoritative server of the world's zones at the same
    address, with what a user has before the journey (the relay's name, the CA's); knot is stopped by pid.
    Returns the API key. PowerDNS is stopped by pid with the world."""
    import secrets
    import sqlite3
    import subprocess

    from world import CA_ZONE, DNS_ADDR, ZONE

    from tests.support import wait_until

    world.stop("knot")
    d = world.root / "pdns"
    (d / "run").mkdir(parents=True)
    db = d / "pdns.sqlite3"
    with contextlib.closing(sqlite3.connect(db)) as conn:
        conn.executescript(Path("/usr/share/pdns-backend-sqlite3/schema/schema.sqlite3.sql").read_text())
        conn.commit()
    key = secrets.token_urlsafe(24)
    # no caches: an answer changes as soon as the API changes a record (knot's zone transactions do the same)
    (d / "pdns.conf").write_text(
        f"launch=gsqlite3\ngsqlite3-database={db}\nlocal-address={DNS_ADDR}\nlocal-port=53\nsocket-dir={d / 'run'}\n"
        f"api=yes\napi-key={key}\nwebserver=yes\nwebserver-address={DNS_ADDR}\nwebserver-port={PDNS_API_PORT}\n"
        "webserver-allow-from=0.0.0.0/0\ncache-ttl=0\nnegquery-cache-ttl=0\nquery-cache-ttl=0\n"
        "disable-syslog=yes\ndaemon=no\nguardian=no\n")
    util = ["pdnsutil", f"--config-dir={d}"]
    for argv in ([*util, "create-zone", ZONE, f"ns.{ZONE}"], [*util, "add-record", ZONE, "ns", "A", "1", DNS_ADDR],
                 [*util, "add-record", ZONE, "relay", "A", "1", HOSTS["relay"].address],
                 [*util, "add-record", ZONE, "relay", "AAAA", "1", HOSTS["relay"].address6],
                 [*util, "create-zone", CA_ZONE, f"ns.{ZONE}"],
                 [*util, "add-record", CA_ZONE, "acme", "A", "1", HOSTS["ca"].address]):
        subprocess.run(argv, check=True, capture_output=True, timeout=60)
    world.popen("pdns", "dns", "/usr/sbin/pdns_server", f"--config-dir={d}")
    wait_until(lambda: world.procs["pdns"].poll() is None and world.resolve("phone", RELAY_NAME) ==
               [HOSTS["relay"].address] and world.tcp_open("phone", DNS_ADDR, PDNS_API_PORT), 30,
               "PowerDNS to answer", on_timeout=lambda: world.log("pdns"))
    return key


@pytest.mark.slow
def test_setup_with_dns_powerdns_creates_the_records_itself(fresh_world, tmp_path):
    """PowerDNS is the zone's authoritative server, with its HTTP API. The laptop installs with the dns extra
    (`sh scripts/install.sh dns`), then runs setup with `--dns powerdns`, the API's URL and a file holding its
    key. The user publishes no record: setup creates the A record (the relay's address) and, after the
    account is registered, the CAA record through the API, and waits for each as before (asking the zone's
    server found through NS). Certificate, 'ready for phones: yes', and a phone syncs."""
    world = fresh_world
    _ensure_installed(world)
    if "knot" in world.procs:
        _forget_the_laptop(world)
    key = _replace_knot_by_powerdns(world)
    clone = world.laptop_home / "inverse-cloud"
    out = world.run("laptop", "sh", "scripts/install.sh", "dns", cwd=clone, net=False, timeout=900)
    assert out.returncode == 0, out.stdout + out.stderr
    home = world.laptop_home
    (home / "pdns-api-key").write_text(key + "\n")
    (home / "pdns-api-key").chmod(0o600)
    pw = home / "pw"
    pw.write_text(PASSWORD + "\n")
    user = User(world)
    child = user.spawn(
        f"inverse-cloud setup --domain {DOMAIN} --relay {RELAY_NAME} --relay-admin root --user alice "
        f"--password-file {pw} --acme-directory {world.acme_directory} "
        f"--acme-ca-bundle /etc/ssl/certs/ca-certificates.crt --acme-caa-issuer {CAA_ISSUER} "
        f"--dns powerdns --dns-option pdns_server=http://ns.example.org:{PDNS_API_PORT} "
        f"--dns-token-file {home / 'pdns-api-key'}")
    try:
        first = child.expect([r"Are you sure you want to continue connecting \(yes/no", r"Does it match .* \[y/N\]"])
        if first == 0:
            child.sendline("yes")
            child.expect(r"Does it match .* \[y/N\]")
        child.sendline("y")
        child.expect_exact("[2/8] relay: relay side applied")
        child.expect_exact("created at powerdns")
        child.expect_exact(f"[3/8] dns: {DOMAIN} -> {HOSTS['relay'].address} at every authoritative server")
        child.expect_exact("[4/8] account: ACME account")
        child.expect_exact("created at powerdns: only this account may get certificates")
        child.expect_exact("[5/8] caa: CAA pins account")
        child.expect(r"run `([^`]+)` in another terminal")
        world.popen("serve", "laptop", "sh", "-c", f"exec {child.match.group(1)}")
        child.expect_exact("[6/8] start: started by hand")
        child.expect_exact("[7/8] certificate: certificate ")
        child.expect_exact("[8/8] phone: ready for phones: yes")
        child.expect(pexpect.EOF)
        child.close()
        assert child.exitstatus == 0, child.logfile_read.getvalue()
    finally:
        if child.isalive():
            child.close(force=True)
    transcript = child.logfile_read.getvalue()
    assert "publish at your DNS provider" not in transcript and "publish this CAA record" not in transcript
    assert key not in transcript and key not in (home / ".config/inverse-cloud/setup-state.json").read_text()
    phone = Phone(tmp_path, "phone_d", base=f"https://{DOMAIN}", prefix=world.prefix("phone"), env=world.env("phone"))
    (phone.contacts / "p.vcf").write_text(card("p", "Via PowerDNS"))
    phone.sync()
    world.stop("serve")
