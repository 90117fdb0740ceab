"""The whole `inverse-cloud setup` journey through a pty, with real parts: a real OpenSSH sshd as the relay,
Pebble as the CA validating HTTP-01 through the relay's forwarded port and the SSH tunnel, and
pebble-challtestsrv as the DNS server (given to setup with its test-only ``--dns-server``: the namespaces
test world with real authoritative DNS is another piece of work). Answers are typed, wrong ones included;
each step's line and the elapsed time are printed.

What the test plays by hand, as a person would: the relay's admin applying the relay side (answer ``none``,
then the rendered authorized_keys is installed for the test sshd), publishing the A and CAA records
(challtestsrv answers A with 127.0.0.1, the relay; the CAA record is added when setup prints it), and
starting ``serve`` when setup says no systemd user manager answers (there is none in CI)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time

import pexpect
from pebble import PebbleCA
from relay_sshd import TEST_USER, configure, relay_sshd, sshd_available

from inverse_cloud.config import load
from tests.support import ServeProcess, free_port, init_instance

DOMAIN = "laptop.test"
PASSWORD = "correct horse battery"


def test_setup_from_nothing_to_ready_for_phones(tmp_path):
    """Typed: a URL for the domain (asked again), the relay, `none` for the admin, the user and a short
    password (asked again), then the right one twice (the tunnel login is the test relay's, as a flag).
    Steps: init, relay (host key shown; typed y), dns (A seen), account (CAA record with accounturi
    printed), caa (seen after it is added), start (serve started by hand when asked), certificate (Pebble
    issues through the tunnel), phone (QR code, Thunderbird lines, 'ready for phones: yes'). A rerun skips
    every step and ends ready again."""
    missing = sshd_available()
    assert missing is None, missing
    root = tmp_path / "ic"
    cfg_path = root / "cfg" / "config.toml"
    # The relay sshd is prepared from a stand-in config with the same tunnel login (its Match block does not
    # depend on keys); the keys setup's init creates are installed into its authorized_keys later.
    stand_in = init_instance(tmp_path / "stand-in", relay=f"{TEST_USER}@127.0.0.1:{free_port()}")
    started = time.monotonic()
    marks: list[tuple[str, float]] = []
    with relay_sshd(stand_in, pin=False) as relay, \
            PebbleCA(tmp_path / "pebble", http_port=relay.http_port) as ca:
        argv = ["-m", "inverse_cloud.cli", "setup", "--config", str(cfg_path), "--data-dir", str(root / "data"),
                "--state-dir", str(root / "state"), "--https-listen", f"127.0.0.1:{free_port()}",
                "--http-listen", f"127.0.0.1:{free_port()}", "--acme-directory", ca.directory,
                "--acme-ca-bundle", str(ca.wfe_ca), "--dns-server", ca.dns_server, "--wait", "120",
                "--tunnel-user", TEST_USER]
        child = pexpect.spawn(sys.executable, argv, encoding="utf-8", timeout=180, dimensions=(50, 220))
        child.logfile_read = sys.stdout
        srv: ServeProcess | None = None
        try:
            child.expect_exact("Domain phones will use")
            child.sendline(f"https://{DOMAIN}/radicale/")
            child.expect_exact("is a URL")
            child.sendline(DOMAIN)
            child.expect_exact("Relay host")
            child.sendline(f"127.0.0.1:{relay.ssh_port}")
            child.expect_exact("Admin login on the relay")
            child.sendline("none")
            child.expect_exact("First DAV user name")
            child.sendline("alice")
            child.expect_exact("Password for DAV user alice:")
            child.sendline("short")
            child.expect_exact("too short")
            child.expect_exact("Password for DAV user alice:")
            child.sendline(PASSWORD)
            child.expect_exact("Again:")
            child.sendline(PASSWORD)
            child.expect_exact("[1/8] init: wrote")
            marks.append(("init", time.monotonic() - started))
            child.expect_exact("[y/N]")
            # While setup waits for the host-key answer: the relay's admin installs the relay side by hand
            # (the forwarded ports of this test relay, its authorized_keys), and the CA's test knobs.
            configure(cfg_path, "relay", https_port=relay.https_port, http_port=relay.http_port,
                      keepalive_interval_s=2, keepalive_count_max=3, connect_timeout_s=5)
            configure(cfg_path, "acme", self_check_address=f"127.0.0.1:{relay.http_port}",
                      caa_issuer="pebble.test", check_interval_s=2)
            bundle = tmp_path / "bundle"
            out = subprocess.run([sys.executable, "-m", "inverse_cloud.cli", "relay-setup", "--config",
                                  str(cfg_path), "--output", str(bundle), "--no-pin", "--client-alive-interval",
                                  "2", "--authorized-keys-file", str(relay.bundle / "authorized_keys")],
                                 capture_output=True, text=True, timeout=60, check=True)
            assert out.returncode == 0
            shutil.copyfile(bundle / "authorized_keys", relay.bundle / "authorized_keys")
            child.sendline("y")
            child.expect_exact("[2/8] relay: relay side left to you")
            marks.append(("relay", time.monotonic() - started))
            child.expect_exact(f"{DOMAIN}. A 127.0.0.1")
            child.expect_exact("[3/8] dns: laptop.test -> 127.0.0.1")
            marks.append(("dns", time.monotonic() - started))
            child.expect(r"(laptop\.test\. CAA 0 issue \"pebble\.test; accounturi=(\S+); validationmethods=http-01\")")
            uri = child.match.group(2)
            child.expect_exact("[4/8] account: ACME account")
            marks.append(("account", time.monotonic() - started))
            ca.add_caa(DOMAIN, [("issue", f"pebble.test; accounturi={uri}; validationmethods=http-01")])
            child.expect_exact("[5/8] caa: CAA pins account")
            marks.append(("caa", time.monotonic() - started))
            assert ca.orders() == 0, "no order before the CAA record is visible"
            child.expect_exact(f"inverse-cloud serve --config {cfg_path}")
            srv = ServeProcess(cfg_path).start()
            child.expect_exact("[6/8] start: started by hand")
            marks.append(("start", time.monotonic() - started))
            child.expect_exact("[7/8] certificate: certificate ")
            marks.append(("certificate", time.monotonic() - started))
            child.expect_exact("davx5://alice@laptop.test/radicale/")
            child.expect_exact("location https://laptop.test/radicale/alice/contacts/")
            child.expect(r"\[8/8\] phone: ready for phones: (.*)\r\n")
            ready = child.match.group(1)
            marks.append(("phone", time.monotonic() - started))
            child.expect(pexpect.EOF)
            child.close()
            assert ready.startswith("yes"), (ready, srv.log())
            assert child.exitstatus == 0

            again = pexpect.spawn(sys.executable, argv, encoding="utf-8", timeout=60, dimensions=(50, 220))
            again.logfile_read = sys.stdout
            for n, step in enumerate(("init", "relay", "dns", "account", "caa", "start", "certificate"), 1):
                again.expect_exact(f"[{n}/8] {step}: done before")
            again.expect_exact("[8/8] phone: ready for phones: yes")
            again.expect(pexpect.EOF)
            again.close()
            assert again.exitstatus == 0
            assert ca.orders() == 1
        finally:
            if child.isalive():
                child.terminate(force=True)
            if srv is not None:
                srv.stop()
    cfg = load(cfg_path)
    assert cfg.relay.user == TEST_USER and cfg.relay.host_key.startswith("ssh-ed25519 ")
    assert re.fullmatch(r"https://\S+", uri)
    print("\nsetup journey (typed answers, wrong ones included), elapsed since start:")
    for step, at in marks:
        print(f"  {step:12s} {at:6.1f} s")
