"""`inverse-cloud setup --ipv6` in the namespaces test world (integration/world.py): the guided set-up builds the
IPv6 relay variant and publishes nothing by itself; the records are published exactly as it prints them, and a
phone that has only IPv6 syncs through https://contacts.example.org/.

Run with the installed console script of this venv, non-interactive (every answer a flag, --yes for the host key,
ssh told to accept the relay's key on first contact, as a user answers "yes"), on the session's world. What the
test plays by hand, as a person would: the VPS provider's part (the admin's SSH key for root on the relay),
publishing the records at the DNS provider, and running the `serve` line setup names (no systemd user manager
answers on the world's laptop). Undone afterwards: serve stopped by pid, the domain's A, AAAA and CAA records
removed.
"""

from __future__ import annotations

import io
import os
import re
import shlex
import signal
import sys
from pathlib import Path

import pexpect
import pytest
from test_journey import PASSWORD, Phone, card
from test_world_ipv6 import _env as _laptop_env  # keeps PYTHONPATH: the console script imports this checkout

from inverse_cloud import config as config_mod
from tests.support import free_port, wait_until

CLI = str(Path(sys.executable).parent / "inverse-cloud")   # the installed console script of this venv
CAA_ISSUER = "pebble.invalid"


def _records(transcript: str, after: str) -> list[str]:
    block = transcript.rsplit(after, 1)[1].split("waiting until", 1)[0]
    return [line.strip() for line in block.splitlines() if re.match(r"\s+\S+\. (A|AAAA|CAA) ", line)]


@pytest.mark.slow
def test_setup_ipv6_in_the_world_then_an_ipv6_only_phone_syncs(world, tmp_path, request):
    """1. The admin's key for root on the relay. 2. `inverse-cloud setup --ipv6 --non-interactive --yes ...`: the
    relay step applies relay-setup's --ipv6 side over ssh as root (the relay's ip6 table then redirects [v6]:443)
    and sets [relay] listen_host6 = "::" after it; the dns step prints the A and the AAAA record of the relay's
    addresses and waits for both; they are published as printed; then the CAA record, likewise; the serve line it
    names is run; the certificate comes from the world's Pebble; setup ends 'ready for phones: yes'. 3. A phone
    with only IPv6 (its DNS server by IPv6 too) syncs a contact; a second IPv6-only phone reads it back; serve's
    log names the phone's own IPv6 address."""
    from world import DOMAIN, HOSTS, RELAY_NAME

    key = world.laptop_home / ".ssh" / "id_ed25519"
    if not key.exists():
        key.parent.mkdir(mode=0o700, exist_ok=True)  # ssh-keygen -f does not make it
        world.run("laptop", "ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key), check=True)
    world.authorize_admin(Path(f"{key}.pub").read_text())
    (world.laptop_home / ".ssh" / "config").write_text("StrictHostKeyChecking accept-new\n")
    for rtype in ("A", "AAAA", "CAA"):
        world.unpublish(f"{DOMAIN}.", rtype, missing_ok=True)   # another test of the session's world may have left it
        request.addfinalizer(lambda rtype=rtype: world.unpublish(f"{DOMAIN}.", rtype, missing_ok=True))

    root = tmp_path / "ic"
    root.mkdir()
    (root / "password").write_text(PASSWORD)
    cfg = root / "config.toml"
    argv = [CLI, "setup", "--ipv6", "--non-interactive", "--yes", "--config", str(cfg), "--data-dir",
            str(root / "data"), "--state-dir", str(root / "state"), "--https-listen", f"127.0.0.1:{free_port()}",
            "--http-listen", f"127.0.0.1:{free_port()}", "--domain", DOMAIN, "--relay", RELAY_NAME, "--relay-admin",
            "root", "--user", "alice", "--password-file", str(root / "password"), "--acme-directory",
            world.acme_directory, "--acme-ca-bundle", "/etc/ssl/certs/ca-certificates.crt", "--acme-caa-issuer",
            CAA_ISSUER, "--wait", "600"]
    child = pexpect.spawn("nsenter", [*world.prefix("laptop")[1:], *argv], env=_laptop_env(world),
                          encoding="utf-8", timeout=300, dimensions=(50, 250))
    child.logfile_read = io.StringIO()
    serve = None
    try:
        child.expect_exact(f"[2/8] relay: relay side --ipv6 applied on {RELAY_NAME} as root (tunnel login "
                           'inverse-cloud); [relay] listen_host6 = "::"')
        nat6 = world.run("relay", "nft", "list", "table", "ip6", "inverse_cloud").stdout
        assert "redirect to :44353" in nat6, nat6

        relay4, relay6 = HOSTS["relay"].address, HOSTS["relay"].address6
        child.expect_exact(f"answers {DOMAIN} with {relay4}, {relay6}")
        records = _records(child.logfile_read.getvalue(), "publish at your DNS provider (A and AAAA")
        assert records == [f"{DOMAIN}. A {relay4}", f"{DOMAIN}. AAAA {relay6}"], records
        world.publish(records)
        child.expect_exact(f"[3/8] dns: {DOMAIN} -> {relay4}, {relay6} at every authoritative server")

        child.expect_exact(f"answers {DOMAIN} with it")
        caa = _records(child.logfile_read.getvalue(), "publish this CAA record too")
        assert len(caa) == 1 and f'CAA 0 issue "{CAA_ISSUER}; accounturi=https://' in caa[0], caa
        world.publish(caa)
        child.expect_exact("[5/8] caa: CAA pins account")

        child.expect(r"no systemd user manager answers here, so no service is installed: run `([^`]+)` in ")
        line = shlex.split(child.match.group(1))
        assert line == ["inverse-cloud", "serve", "--config", str(cfg)], line
        keep = [f"PYTHONPATH={os.environ['PYTHONPATH']}"] if "PYTHONPATH" in os.environ else []
        serve = world.popen("rs-serve", "laptop", "env", *keep, CLI, *line[1:])
        child.expect_exact("[6/8] start: started by hand")
        child.expect_exact("[7/8] certificate: certificate ")
        child.expect(r"\[8/8\] phone: ready for phones: (.*)\r\n")
        ready = child.match.group(1)
        child.expect(pexpect.EOF)
        child.close()
        transcript = child.logfile_read.getvalue()
        assert ready.startswith("yes"), (ready, world.log("rs-serve"))
        assert child.exitstatus == 0 and "Traceback" not in transcript, transcript
        assert config_mod.load(cfg).relay.listen_host6 == "::"

        phone6 = world.add_phone6()
        wait_until(lambda: world.tcp_open(phone6, relay6, 443), 30, "the relay's [v6]:443 from the IPv6-only phone",
                   interval_s=0.2)
        phone = Phone(tmp_path, "rsphone6", base=f"https://{DOMAIN}", prefix=world.prefix(phone6),
                      env=world.env(phone6))
        (phone.contacts / "rs6.vcf").write_text(card("rs6", "Set Up With IPv6"))
        phone.sync()
        again = Phone(tmp_path, "rsphone6b", base=f"https://{DOMAIN}", prefix=world.prefix(phone6),
                      env=world.env(phone6))
        again.sync()
        assert any("FN:Set Up With IPv6" in t for t in again.texts(again.contacts))
        serve_log = (world.root / "rs-serve.log").read_text(errors="replace")
        assert HOSTS["phone6"].address6 in serve_log, serve_log[-3000:]
    finally:
        if child.isalive():
            child.close(force=True)
        if serve is not None and serve.poll() is None:
            os.kill(serve.pid, signal.SIGTERM)
            serve.wait(60)
        world.procs.pop("rs-serve", None)
