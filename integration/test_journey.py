"""The whole journey, driven through the CLI as a user would, with real parts: a fresh venv with the package
installed by pip (not editable) whose `inverse-cloud` runs every step -> `init` (flags) -> `relay-setup --apply
root@RELAY` over OpenSSH against a real sshd (integration/relay_sandbox.py: the relay's /etc is a copy, the
whole journey runs in its own network namespace; setup.sh creates the user, the keys file, the drop-in, the
NAT table, reloads sshd; relay-setup then pins the host key) -> `serve` ->
a certificate from Pebble validated through the tunnel -> two vdirsyncer "phones" syncing contacts and a
calendar both ways through the relay -> `status --json` and `doctor` healthy -> SIGTERM, clean exit ->
broken links named by `doctor` -> `export` while vdirsyncer writes -> `import` on a fresh data folder
accepted by `radicale --verify-storage` -> `import` onto a non-empty store refused, nothing changed.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import ssl
import subprocess
import textwrap
import time
from pathlib import Path

import pytest
from pebble import PebbleCA
from relay_sandbox import private_netns, sandbox_relay
from relay_sshd import TEST_USER, configure, sshd_available

from inverse_cloud import config as config_mod
from tests.support import ServeProcess, free_port, init_instance, wait_until

PASSWORD = "correct horse"
REPO = Path(__file__).resolve().parent.parent
CLI: list[str] = []  # the fresh venv's `inverse-cloud`, set by install_fresh_venv


def cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    assert CLI, "install_fresh_venv first"
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout, check=False)


def install_fresh_venv(root: Path) -> Path:
    """`python3 -m venv` + `pip install REPO` (not editable; pip's cache makes it quick): the venv's python."""
    venv = root / "venv"
    subprocess.run(["python3", "-m", "venv", str(venv)], check=True, capture_output=True, timeout=120)
    out = subprocess.run([str(venv / "bin" / "pip"), "install", "--quiet", "--disable-pip-version-check",
                          str(REPO)], capture_output=True, text=True, timeout=600, check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    exe = venv / "bin" / "inverse-cloud"
    assert exe.exists(), "pip did not install the inverse-cloud script"
    # the package in use is the installed copy (templates and all), never this checkout
    where = subprocess.run([str(venv / "bin" / "python"), "-P", "-c",
                            "import inverse_cloud; print(inverse_cloud.__file__)"],
                           capture_output=True, text=True, check=True, cwd=root).stdout.strip()
    assert where.startswith(str(venv)), where
    CLI[:] = [str(exe)]
    return venv / "bin" / "python"


def card(uid: str, name: str) -> str:
    return f"BEGIN:VCARD\r\nVERSION:3.0\r\nUID:{uid}\r\nFN:{name}\r\nN:{name};;;;\r\nEND:VCARD\r\n"


def event(uid: str, summary: str) -> str:
    return (f"BEGIN:VCALENDAR\r\nVERSION:2.0\r\nPRODID:-//journey//EN\r\nBEGIN:VEVENT\r\nUID:{uid}\r\n"
            f"DTSTAMP:20261101T000000Z\r\nDTSTART:20261201T100000Z\r\nDURATION:PT1H\r\nSUMMARY:{summary}\r\n"
            "END:VEVENT\r\nEND:VCALENDAR\r\n")


class Phone:
    """A vdirsyncer instance with its own local folders and status (one phone or one Thunderbird)."""

    def __init__(self, root: Path, name: str, https_port: int = 0, fingerprint: str = "", *, base: str = "",
                 prefix: list[str] | None = None, env: dict[str, str] | None = None) -> None:
        """``base``: the server URL as a phone is given it (then the system's trust store decides, as on a
        phone); else ``https://127.0.0.1:PORT`` with the certificate pinned by ``fingerprint``. ``prefix`` runs
        vdirsyncer elsewhere (another host of the test world)."""
        self.root = root / name
        self.contacts = self.root / "contacts"
        self.calendar = self.root / "calendar"
        for d in (self.contacts, self.calendar):
            d.mkdir(parents=True)
        self.prefix, self.env = prefix or [], env
        base = f"{base or f'https://127.0.0.1:{https_port}'}/radicale/alice"
        pin = f'verify_fingerprint = "{fingerprint}"\n' if fingerprint else ""
        remote = f'username = "alice"\npassword = "{PASSWORD}"\n{pin}'
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
        out = subprocess.run(self.args("sync"), capture_output=True, text=True, timeout=180, env=self.env)
        assert out.returncode == 0, out.stdout + out.stderr

    def texts(self, folder: Path) -> list[str]:
        return sorted(p.read_text() for p in folder.iterdir() if p.is_file())


def leaf_fingerprint(port: int) -> str:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
            ctx.wrap_socket(raw, server_hostname="laptop.test") as s:
        der = s.getpeercert(binary_form=True)
    assert der is not None
    digest = hashlib.sha256(der).hexdigest().upper()
    return ":".join(digest[i:i + 2] for i in range(0, len(digest), 2))


def items_in(storage: Path) -> dict[str, bytes]:
    """Items (committed files) under collection-root; Radicale's dot-folders (temp, cache) are skipped, and
    a file that vanishes while we walk (a concurrent write's temp file) is ignored."""
    import os

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


def doctor(cfg: Path, relay, extra: list[str]) -> tuple[int, dict, str]:
    out = cli("doctor", "--json", "--timeout", "10", "--config", str(cfg),
              "--connect-to", f"laptop.test:80:127.0.0.1:{relay.http_port}",
              "--connect-to", f"laptop.test:443:127.0.0.1:{relay.https_port}", *extra)
    assert "Traceback" not in out.stderr, out.stderr
    return out.returncode, json.loads(out.stdout), out.stdout


@pytest.mark.slow
def test_journey(tmp_path, monkeypatch):
    """The journey in this module's docstring, in order, in a private network namespace: a fresh venv with
    the package installed by pip; init; relay-setup --apply against a real sshd; serve; a Pebble certificate;
    two vdirsyncer phones; status and doctor healthy; an export while a phone writes (everything committed
    before it began is in it); SIGTERM, exit 0; doctor naming each broken link; import on a fresh data folder
    (radicale --verify-storage passes, items byte for byte); import onto a non-empty store refused. The
    seconds since the start of each step are printed."""
    missing = sshd_available()
    assert missing is None, missing
    t_start = time.monotonic()
    steps: list[tuple[str, float]] = []

    def mark(what: str) -> None:
        steps.append((what, time.monotonic() - t_start))

    # 0. A fresh venv, as the README installs it. `python -m inverse_cloud.cli` (init_instance, ServeProcess)
    #    must not pick up this checkout from the working directory: safe path (-P) for every child.
    monkeypatch.delenv("PYTHONPATH", raising=False)  # a developer's PYTHONPATH would import a checkout instead
    python = install_fresh_venv(tmp_path)
    monkeypatch.setenv("PYTHONSAFEPATH", "1")
    mark("venv + pip install")
    with private_netns():
        _journey(tmp_path, str(python), mark)
    print("\njourney timings (s since start): " + ", ".join(f"{w} {t:.1f}" for w, t in steps))


def _journey(tmp_path: Path, python: str, mark) -> None:
    # 1. init, as documented, with flags (the ACME directory is our Pebble).
    ca_root = tmp_path / "pebble"
    probe_port = free_port()  # pebble needs an http port now; the relay's is set below
    ca = PebbleCA(ca_root, http_port=probe_port, validity_s=3600)
    cfg = init_instance(tmp_path / "ic", relay=f"{TEST_USER}@127.0.0.1:{free_port()}", acme_directory=ca.directory,
                        acme_ca_bundle=str(ca.wfe_ca), python=python)
    configure(cfg, "relay", keepalive_interval_s=2, keepalive_count_max=3, connect_timeout_s=5)
    mark("init")
    with sandbox_relay(cfg) as relay:  # a real sshd, admin login for root; nothing set up for the tunnel yet
        out = relay.apply(CLI[0], "--yes", "--accept-new-host-key", "--client-alive-interval", "2",
                          "--client-alive-count-max", "3")
        assert out.returncode == 0, out.stdout + out.stderr + relay.log()
        assert f"inverse-cloud: relay ready for user {TEST_USER}" in out.stdout, out.stdout
        assert (relay.etc / "ssh" / "sshd_config.d" / f"inverse-cloud-{TEST_USER}.conf").exists()
        assert not Path(f"/etc/ssh/sshd_config.d/inverse-cloud-{TEST_USER}.conf").exists()  # host untouched
        nft = subprocess.run(["nft", "list", "table", "ip", "inverse_cloud"], capture_output=True, text=True)
        assert f"dnat to 127.0.0.1:{relay.https_port}" in nft.stdout, nft.stdout + nft.stderr
        assert "host_key" in cfg.read_text()
        relay.wait_listening()  # setup.sh reloaded sshd (SIGHUP: it re-executes itself)
        mark("relay-setup --apply")
        ca.http_port = relay.http_port  # Pebble validates through the relay's port-80 stand-in
        configure(cfg, "acme", dns_server=ca.dns_server, self_check_address=f"127.0.0.1:{relay.http_port}",
                  caa_issuer="pebble.invalid")
        with ca:  # starts pebble + challtestsrv; stops both by pid
            ca_file = ca.write_root(tmp_path / "pebble-root.pem")
            unit_dir = tmp_path / "units"
            out = cli("service", "install", "--config", str(cfg), "--unit-dir", str(unit_dir), "--no-systemctl")
            assert out.returncode == 0 and (unit_dir / "inverse-cloud.service").exists(), out.stderr

            srv = ServeProcess(cfg, python=python)
            with srv:
                mark("serve listening")
                relay.wait_forwards(30, on_timeout=srv.log)

                def issued() -> dict | None:
                    st = cli("status", "--json", "--config", str(cfg))
                    doc = json.loads(st.stdout)
                    served = (doc.get("certificate") or {}).get("served") or {}
                    return doc if served and not served.get("self_signed") else None

                doc = wait_until(issued, 120, "a certificate from Pebble through the tunnel", interval_s=0.5,
                                 on_timeout=srv.log)
                mark("certificate issued")
                assert "Pebble" in doc["certificate"]["served"]["issuer"]

                # 2. Two phones sync contacts and a calendar both ways through the relay.
                fp = leaf_fingerprint(relay.https_port)
                a = Phone(tmp_path, "phone_a", relay.https_port, fp)
                b = Phone(tmp_path, "phone_b", relay.https_port, fp)
                for i in range(3):
                    (a.contacts / f"c{i}.vcf").write_text(card(f"c{i}", f"Contact {i}"))
                for i in range(2):
                    (a.calendar / f"e{i}.ics").write_text(event(f"e{i}", f"Meeting {i}"))
                a.sync()
                b.sync()
                assert len(b.texts(b.contacts)) == 3 and len(b.texts(b.calendar)) == 2
                edited = next(p for p in b.contacts.iterdir() if "UID:c1" in p.read_text())
                edited.write_text(card("c1", "Contact One Renamed"))
                next(p for p in b.calendar.iterdir() if "UID:e0" in p.read_text()).unlink()
                b.sync()
                a.sync()
                assert any("FN:Contact One Renamed" in t for t in a.texts(a.contacts))
                assert len(a.texts(a.calendar)) == 1 and "UID:e1" in a.texts(a.calendar)[0]
                mark("two-way sync")

                # 3. status --json and doctor report healthy. The CAA record pins our ACME account.
                st = cli("status", "--json", "--config", str(cfg))
                doc = json.loads(st.stdout)
                assert st.returncode == 0 and doc["health"] == "healthy", (doc["problems"], doc["components"])
                assert doc["tunnel"]["state"] == "up"
                assert {c["collection"]: c["items"] for c in doc["dav"]["alice"]} == {"contacts": 3, "calendar": 1}
                assert {c["user_agent"].split("/")[0] for c in doc["clients"]} == {"vdirsyncer"}
                account = doc["certificate"]["manager"]["account"]
                assert account.startswith("https://127.0.0.1:")
                ca.add_caa("laptop.test", [("issue", f"pebble.invalid; accounturi={account}; "
                                                     "validationmethods=http-01")])
                good = ["--resolve", "laptop.test:127.0.0.1", "--cacert", str(ca_file)]
                code, report, text = doctor(cfg, relay, good)
                assert code == 0, text
                assert all(c["state"] == "ok" for c in report["checks"]), text
                assert any("CAA 0 issue" in r for r in report["dns_records"])
                human = cli("status", "--config", str(cfg))
                assert human.returncode == 0, human.stdout
                assert "tunnel:       up to 127.0.0.1:" in human.stdout
                assert "DAV user alice: calendar (calendar, 1 items), contacts (addressbook, 3 items)" in human.stdout
                assert "plaintext only here: TLS ends in this process" in human.stdout
                human_doctor = cli("doctor", "--config", str(cfg), *good,
                                   "--connect-to", f"laptop.test:80:127.0.0.1:{relay.http_port}",
                                   "--connect-to", f"laptop.test:443:127.0.0.1:{relay.https_port}")
                assert human_doctor.returncode == 0 and "all links work" in human_doctor.stdout, human_doctor.stdout
                print("\n" + human.stdout + "\n" + human_doctor.stdout)
                mark("status + doctor healthy")

                # 4. Export while a phone is uploading: every item committed before the export began is in it.
                for i in range(300):
                    (a.contacts / f"bulk{i}.vcf").write_text(card(f"bulk{i}", f"Bulk {i}"))
                storage = config_mod.load(cfg).server.storage_dir
                writer_log = tmp_path / "vdirsyncer-bulk.log"
                with open(writer_log, "wb") as log_fh:
                    writer = subprocess.Popen(a.args("sync"), stdout=log_fh, stderr=subprocess.STDOUT)
                try:
                    wait_until(lambda: sum("bulk" in k for k in items_in(storage)) >= 20, 60,
                               "vdirsyncer uploading", interval_s=0.01)
                    before = items_in(storage)
                    still_writing = writer.poll() is None
                    backup = tmp_path / "backup.tar.gz"
                    passphrase = tmp_path / "backup-passphrase"
                    passphrase.write_text("correct horse battery staple\n")
                    out = cli("export", str(backup), "--config", str(cfg), "--passphrase-file", str(passphrase))
                    assert out.returncode == 0, out.stderr
                finally:
                    wait_until(lambda: writer.poll() is not None, 180, "vdirsyncer to finish")
                assert writer.returncode == 0, writer_log.read_text()
                assert still_writing, "vdirsyncer finished before the export began: the test proved nothing"
                assert len(before) < 3 + 1 + 300
                mark("export during writes")

                # 5. SIGTERM: clean exit.
                srv.signal(signal.SIGTERM)
                assert srv.proc is not None and srv.proc.wait(60) == 0, srv.log()
            mark("SIGTERM, exit 0")

            # 6. Broken links: doctor names exactly the one that is broken.
            code, report, text = doctor(cfg, relay, good)
            assert report["first_broken"] == "server running", text
            code, report, text = doctor(cfg, relay, ["--resolve", "laptop.test:127.0.0.9", "--cacert", str(ca_file)])
            assert report["first_broken"] == "DNS" and "points at 127.0.0.9" in text, text
            relay.restart(new_host_key=True)
            code, report, text = doctor(cfg, relay, good)
            assert report["first_broken"] == "relay" and "relay host key changed" in text, text
            relay.stop()
            code, report, text = doctor(cfg, relay, good)
            assert report["first_broken"] == "relay" and "unreachable" in text, text
            mark("broken links named")

    # 7. Import on a fresh data folder: Radicale's --verify-storage accepts it; everything committed before
    #    the export began is there, byte for byte.
    new = tmp_path / "new-laptop"
    out = cli("import", str(backup), "--config", str(new / "config.toml"), "--data-dir", str(new / "data"),
              "--passphrase-file", str(passphrase), "--accept-changes")
    assert out.returncode == 0, out.stderr
    new_storage = config_mod.load(new / "config.toml").server.storage_dir
    verify = subprocess.run([python, "-m", "radicale", "--config", "",
                             f"--storage-filesystem-folder={new_storage}", "--verify-storage"],
                            capture_output=True, text=True, timeout=120)
    assert verify.returncode == 0, verify.stderr
    restored = items_in(new_storage)
    missing_items = [k for k in before if restored.get(k) != before[k]]
    assert not missing_items, missing_items[:5]
    mark("import + verify-storage")

    # 8. Import onto the old (non-empty) store is refused and changes nothing.
    old_data = config_mod.load(cfg).server.data_dir
    snapshot = tree_hash(old_data)
    out = cli("import", str(backup), "--config", str(cfg), "--passphrase-file", str(passphrase))
    assert out.returncode == 1 and "refusing to import" in out.stderr, out.stderr
    assert tree_hash(old_data) == snapshot
    mark("import onto non-empty refused")


# --- the journey in the test world (integration/world.py) -------------------------------------------------

def _copy_repo(dest: Path) -> Path:
    """This checkout as a user's clone would be (no venv, caches or git metadata)."""
    import shutil

    shutil.copytree(REPO, dest, ignore=shutil.ignore_patterns(".git", ".venv", "__pycache__", "build", "*.egg-info",
                                                              ".mypy_cache", ".ruff_cache", "test-artifacts"))
    return dest


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


@pytest.mark.slow
def test_journey_in_the_world(world, tmp_path):
    """A new user's journey in the test world, nothing arranged by hand beyond what a VPS provider gives:
    README's install block on the laptop -> `inverse-cloud` on root's PATH -> `init` on a terminal, wrong
    answers asked again (a URL as domain, root@ as relay login, an unreachable relay) -> the admin's key on the
    relay's root (the provider's part) -> `relay-setup --apply root@relay.example.org` on a terminal, ssh's
    host-key question and relay-setup's own answered after comparing with what the relay shows -> the records
    doctor prints published in the DNS server -> `serve` -> a Pebble certificate (validated at the relay's
    public port 80, through its NAT and the tunnel) -> two vdirsyncer phones on the internet syncing through
    https://contacts.example.org/ (its public 443) -> CAA published from doctor's line; status and doctor
    healthy -> the relay reboots: the NAT comes back from its /etc, the tunnel reconnects, the phones sync ->
    doctor names each broken link: NAT flushed, A record removed, A record elsewhere, the relay's sshd
    stopped, the laptop offline (DNS: is this machine online?), the relay rebuilt with a new host key ->
    SIGTERM, exit 0."""
    from world import DOMAIN, HOSTS, RELAY_NAME

    from tests.support.docs import shell_blocks

    t0 = time.monotonic()
    steps: list[tuple[str, float]] = []

    def mark(what: str) -> None:
        steps.append((what, time.monotonic() - t0))

    laptop = Laptop(world)
    # 1. README's install block, verbatim, in a clone on the laptop (its file system; this machine's network,
    #    where the package index is).
    block = shell_blocks(REPO / "README.md", "Run it")[0]
    install = [line for line in block if not line.startswith("inverse-cloud")]
    clone = _copy_repo(world.laptop_home / "inverse-cloud")
    out = world.run("laptop", "sh", "-c", "set -e\n" + "\n".join(install), cwd=clone, net=False, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    where = world.run("laptop", "sh", "-c", "command -v inverse-cloud")
    assert where.stdout.strip() == "/usr/local/bin/inverse-cloud", where.stdout + where.stderr
    mark("README install")

    # 2. init on a terminal; the wrong answers are asked again, each with its reason.
    child = laptop.spawn("init", "--acme-directory", world.acme_directory,
                         "--acme-ca-bundle", "/etc/ssl/certs/ca-certificates.crt")
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
    # what a user may tune in the file: faster keepalives (the test's patience), the private CA's CAA name
    configure(cfg, "relay", keepalive_interval_s=2, keepalive_count_max=3, connect_timeout_s=5)
    configure(cfg, "acme", caa_issuer="pebble.invalid")
    mark("init on a terminal")

    # 3. The VPS provider's part: the admin's key for root on the relay.
    key = world.laptop_home / ".ssh" / "id_ed25519"
    world.run("laptop", "ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key), check=True)
    world.authorize_admin(Path(f"{key}.pub").read_text())

    # 4. relay-setup --apply root@relay on a terminal: ssh asks about the host key (first contact), then
    #    relay-setup shows the key it pins; both are compared with what the relay itself shows.
    relay_fp = world.relay_fingerprint()
    readme_next = shell_blocks(REPO / "README.md", "Run it")[1]  # relay-setup, service install, phone, status
    apply_line = next(line for line in readme_next if line.startswith("inverse-cloud relay-setup --apply"))
    assert f"root@{RELAY_NAME}" in apply_line, apply_line
    child = laptop.spawn_shell(apply_line)
    child.expect(r"Are you sure you want to continue connecting \(yes/no")
    assert relay_fp in (child.before or ""), child.before
    child.sendline("yes")
    child.expect(r"Does it match .* \[y/N\]")
    assert relay_fp in (child.before or ""), child.before
    child.sendline("y")
    text = _finish(child)
    assert "inverse-cloud: relay ready for user inverse-cloud" in text, text
    assert "dnat to 127.0.0.1:44353" in world.relay_nat()
    mark("relay-setup --apply")

    # 5. Publish what doctor says to publish (the CAA line needs the account: later).
    code, report, text = laptop.doctor()
    assert report["first_broken"] == "DNS" and f"{DOMAIN} does not resolve" in text, text
    records = [r for r in report["dns_records"] if "<" not in r]
    assert f"{DOMAIN}. A {HOSTS['relay'].address}" in records, records
    world.publish(records)

    # 6. serve, a certificate from Pebble through the relay's public port 80.
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
    mark("certificate issued")

    # 7. Two phones on the internet sync through the relay's public address.
    phones = [Phone(tmp_path, n, base=f"https://{DOMAIN}", prefix=world.prefix("phone"), env=world.env("phone"))
              for n in ("phone_a", "phone_b")]
    a, b = phones
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
    mark("two phones sync")

    # 8. CAA from doctor's line, then status and doctor healthy, with no overrides.
    code, report, text = laptop.doctor()
    caa = [r for r in report["dns_records"] if " CAA " in r]
    assert caa and "accounturi=" in caa[0] and "<" not in caa[0], report["dns_records"]
    world.publish(caa)
    code, report, text = laptop.doctor()
    assert code == 0 and all(c["state"] == "ok" for c in report["checks"]), text
    status_line = next(line for line in readme_next if line.startswith("inverse-cloud status"))
    st = world.run("laptop", "sh", "-c", status_line)
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
    proc = world.procs["serve"]
    os.kill(proc.pid, signal.SIGTERM)
    assert proc.wait(60) == 0, world.log("serve")
    world.procs.pop("serve")
    print("\nworld journey timings (s since start): " + ", ".join(f"{w} {t:.1f}" for w, t in steps))
