"""The tunnel end to end with a real OpenSSH sshd configured by `relay-setup`: DAV through the relay's
forwarded HTTPS port, ACME tokens through its HTTP port, the relay-seen client address in our logs, and
what the tunnel key cannot do."""

from __future__ import annotations

import asyncio
import logging
import re
import subprocess
from pathlib import Path

from relay_sshd import TEST_USER

from inverse_cloud.config import load
from inverse_cloud.dav.server import DavServer
from inverse_cloud.tunnel.link import Tunnel
from tests.support import ServeProcess, free_port, wait_until

PASSWORD = "correct horse"


def curl(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["curl", "-s", "--max-time", "20", *args], capture_output=True, text=True,
                          timeout=timeout, check=False)


def propfind_through_relay(relay, source: str = "") -> subprocess.CompletedProcess[str]:
    extra = ["--interface", source] if source else []
    return curl(*extra, "-k", "--resolve", f"laptop.test:{relay.https_port}:127.0.0.1", "-u", f"alice:{PASSWORD}",
                "-X", "PROPFIND", "-H", "Depth: 1", f"https://laptop.test:{relay.https_port}/radicale/alice/")


def test_dav_through_real_sshd(relay_instance):
    """init --relay -> relay-setup renders the sshd drop-in + authorized_keys -> real sshd with them
    (`sshd -t` passed) -> relay-setup pins the host key -> serve -> both forwards bound on the relay ->
    curl PROPFIND via the relay's forwarded HTTPS port lists alice's address book; port 80's forward
    answers our HTTP app (308 to https://laptop.test/)."""
    cfg, relay = relay_instance
    assert load(cfg).relay.host_key == relay.host_key_line
    with ServeProcess(cfg) as srv:
        relay.wait_forwards(30, on_timeout=srv.log)
        out = propfind_through_relay(relay)
        assert "/radicale/alice/contacts/" in out.stdout, (out.stderr, srv.log())
        redirect = curl("-o", "/dev/null", "-w", "%{http_code} %{redirect_url}",
                        f"http://127.0.0.1:{relay.http_port}/some/path")
        assert redirect.stdout == "308 https://laptop.test/some/path", redirect
        assert "tunnel up" in srv.log()


async def test_acme_token_and_client_address_through_the_tunnel(relay_instance, caplog):
    """In-process DavServer + Tunnel against the real sshd: a token put in ChallengeStore is served on the
    relay's forwarded HTTP port; a request from source address 127.0.0.9 (what the relay saw) is logged
    with 127.0.0.9 -- not with the tunnel's loopback address -- in the access log, and the 401's line
    carries Radicale's failed-login record naming 127.0.0.9; status() reports both forwards bound."""
    cfg_path, relay = relay_instance
    cfg = load(cfg_path)
    server = DavServer(cfg)
    tunnel = Tunnel(cfg, server)
    await server.start()
    try:
        await tunnel.start()
        await asyncio.to_thread(relay.wait_forwards, 30)
        st = tunnel.status()
        assert st["state"] == "up" and all(f["bound"] for f in st["forwards"]), st
        assert st["host_key_fingerprint"].startswith("SHA256:")
        server.challenges.set("tok-123", "tok-123.thumbprint")
        got = await asyncio.to_thread(curl, "--interface", "127.0.0.9",
                                      f"http://127.0.0.1:{relay.http_port}/.well-known/acme-challenge/tok-123")
        assert got.stdout == "tok-123.thumbprint", got
        caplog.set_level(logging.INFO)
        bad = await asyncio.to_thread(
            curl, "--interface", "127.0.0.9", "-k", "-o", "/dev/null", "-w", "%{http_code}", "--resolve",
            f"laptop.test:{relay.https_port}:127.0.0.1", "-u", "alice:wrong",
            f"https://laptop.test:{relay.https_port}/radicale/alice/")
        assert bad.stdout == "401", bad
        access = [r.getMessage() for r in caplog.records if "/radicale/alice/" in r.getMessage()]
        assert access and all(m.startswith("127.0.0.9 ") for m in access), access
        # Radicale's "Failed login" record is captured into the request's one access line.
        denied = [m for m in access if '" 401 ' in m]
        assert len(denied) == 1, access
        assert "Failed login attempt from 127.0.0.9" in denied[0] and "127.0.0.1" not in denied[0], denied
    finally:
        await tunnel.aclose()
        await server.aclose()
    # aclose cancelled the forwards and closed the link: the relay stops listening (polled, sshd is async)
    wait_until(lambda: not relay.forwards_bound(), 10, "forwards released on the relay")


def _ssh(relay, cfg_path: Path, *args: str, key: str = "key_file") -> subprocess.CompletedProcess[str]:
    cfg = load(cfg_path)
    kh = relay.workdir / "known_hosts"
    kh.write_text(f"[127.0.0.1]:{relay.ssh_port} {relay.host_key_line}\n")
    keyfile = cfg.relay.key_file if key == "key_file" else cfg.relay.takeover_key_file
    return subprocess.run(
        ["ssh", "-F", "/dev/null", "-p", str(relay.ssh_port), "-i", str(keyfile), "-o", "BatchMode=yes",
         "-o", "IdentitiesOnly=yes", "-o", f"UserKnownHostsFile={kh}", "-o", "StrictHostKeyChecking=yes",
         "-o", "ConnectTimeout=5", *args], capture_output=True, text=True, timeout=30, check=False,
        stdin=subprocess.DEVNULL)


def test_tunnel_key_is_good_for_nothing_else(relay_instance):
    """With the tunnel key and OpenSSH's ssh (forward-control.sh style): a command and a shell run
    /bin/false and print nothing; a local forward (direct-tcpip) is refused; a listen on another port is
    refused; the permitted listen works. The takeover key runs only its forced command."""
    cfg, relay = relay_instance
    target = f"{TEST_USER}@127.0.0.1"
    cmd = _ssh(relay, cfg, target, "id")
    assert cmd.returncode != 0 and "uid=" not in cmd.stdout, cmd
    shell = _ssh(relay, cfg, "-tt", target)
    assert shell.returncode != 0 and "$" not in shell.stdout and "#" not in shell.stdout, shell
    # direct-tcpip: -W asks sshd to connect to its own port; AllowTcpForwarding remote + PermitOpen none refuse
    lfwd = _ssh(relay, cfg, "-W", f"127.0.0.1:{relay.ssh_port}", target)
    assert lfwd.returncode != 0 and "SSH-" not in lfwd.stdout, lfwd
    assert "refused" in lfwd.stderr.lower() or "prohibited" in lfwd.stderr.lower(), lfwd
    other = free_port()
    rfwd = _ssh(relay, cfg, "-N", "-o", "ExitOnForwardFailure=yes", "-R", f"127.0.0.1:{other}:127.0.0.1:9", target)
    assert rfwd.returncode != 0 and "remote port forwarding failed" in rfwd.stderr, rfwd
    wildcard = _ssh(relay, cfg, "-N", "-o", "ExitOnForwardFailure=yes", "-R", f"0.0.0.0:{relay.https_port}:127.0.0.1:9",
                    target)
    assert wildcard.returncode != 0 and "remote port forwarding failed" in wildcard.stderr, wildcard
    takeover = _ssh(relay, cfg, target, "id", key="takeover")
    ended = re.search(r"inverse-cloud takeover: ended \d+ other session", takeover.stdout)
    assert takeover.returncode == 0 and ended, takeover
    assert "uid=" not in takeover.stdout
    log = relay.log()
    assert "Accepted publickey" in log
