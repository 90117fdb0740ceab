"""`inverse-cloud setup`: answers checked on entry and asked again with a one-line reason, steps one line each,
and a rerun that continues where the last one stopped. Driven through a pty (pexpect), as a person types.

Loopback stand-ins (all in threads of this process, all stopped at the end): an asyncssh server for the
relay's host key, a DNS server (dnspython) given to setup with the test-only ``--dns-server``, and an ACME
directory that nothing serves, so the run stops at the account step with its one-line reason."""

from __future__ import annotations

import asyncio
import json
import socket
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import asyncssh
import dns.message
import dns.rcode
import dns.rrset
import pexpect
import pytest

from inverse_cloud.ops.answers import domain_problem, email_problem, password_problem, relay_problem
from inverse_cloud.ops.setup import SetupState, relay_reach_problem, tunnel_login_problem
from tests.support import free_port

TIMEOUT_S = 60


class ThreadedSsh:
    """An asyncssh server (host key exchange only) on its own loop in a thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        key = asyncssh.generate_private_key("ssh-ed25519")

        async def listen() -> asyncssh.SSHAcceptor:
            return await asyncssh.listen("127.0.0.1", 0, server_host_keys=[key], reuse_address=True)

        self.server = asyncio.run_coroutine_threadsafe(listen(), self.loop).result(30)
        self.port = self.server.sockets[0].getsockname()[1]
        self.fingerprint = key.get_fingerprint("sha256")

    def close(self) -> None:
        async def stop() -> None:
            self.server.close()
            await self.server.wait_closed()

        asyncio.run_coroutine_threadsafe(stop(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(30)
        self.loop.close()


class ThreadedDns:
    """A UDP DNS server answering from ``records`` ({(name, type): [rdata text]}); NXDOMAIN otherwise."""

    def __init__(self, records: dict[tuple[str, str], list[str]]) -> None:
        self.records = records
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.queries: list[tuple[str, str]] = []
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                data, peer = self.sock.recvfrom(4096)
            except TimeoutError:
                continue
            query = dns.message.from_wire(data)
            reply = dns.message.make_response(query)
            q = query.question[0]
            name, rtype = q.name.to_text().rstrip(".").lower(), dns.rdatatype.to_text(q.rdtype)
            self.queries.append((name, rtype))
            values = self.records.get((name, rtype))
            if values:
                reply.answer.append(dns.rrset.from_text_list(q.name, 60, "IN", rtype, values))
            elif not any(n == name for n, _ in self.records):
                reply.set_rcode(dns.rcode.NXDOMAIN)
            self.sock.sendto(reply.to_wire(), peer)

    def close(self) -> None:
        self._stop.set()
        self.thread.join(30)
        self.sock.close()


@pytest.fixture
def relay() -> Iterator[ThreadedSsh]:
    server = ThreadedSsh()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def dns_server() -> Iterator[ThreadedDns]:
    server = ThreadedDns({("laptop.test", "A"): ["127.0.0.1"]})
    try:
        yield server
    finally:
        server.close()


def spawn(root: Path, *extra: str) -> pexpect.spawn:
    argv = ["-m", "inverse_cloud.cli", "setup", "--config", str(root / "cfg" / "config.toml"),
            "--data-dir", str(root / "data"), "--state-dir", str(root / "state"),
            "--https-listen", f"127.0.0.1:{free_port()}", "--http-listen", f"127.0.0.1:{free_port()}",
            "--acme-directory", f"https://127.0.0.1:{free_port()}/dir", "--wait", "20", *extra]
    child = pexpect.spawn(sys.executable, argv, encoding="utf-8", timeout=TIMEOUT_S, dimensions=(50, 200))
    child.logfile_read = sys.stdout  # shown by pytest when the test fails
    return child


def finish(child: pexpect.spawn) -> int:
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus is not None, "setup was killed"
    return int(child.exitstatus)


def test_setup_asks_again_with_reasons_then_resumes(tmp_path, relay, dns_server):
    """Typed answers, wrong ones first: a URL for the domain, an unresolvable relay, a relay port with no SSH
    server, a short password and a mismatch: each is asked again with its one-line reason. The tunnel login
    is not asked: it defaults to inverse-cloud. Steps then run one line each: init, relay (host key shown and
    pinned after typing y), dns (the A record seen at the given server) and account, which fails with one
    line because no CA answers. A rerun asks nothing, says 'done before' for the first three steps and
    stops at the same step: the end state is the same."""
    root = tmp_path / "ic"
    closed = free_port()
    child = spawn(root, "--dns-server", f"127.0.0.1:{dns_server.port}")
    child.expect_exact("Domain phones will use")
    child.sendline("https://laptop.test/")
    child.expect_exact("is a URL: give only the host name")
    child.sendline("laptop.test")
    child.expect_exact("Relay host")
    child.sendline("relay.invalid")
    child.expect_exact("relay.invalid does not resolve (no such name in DNS")
    child.sendline(f"127.0.0.1:{closed}")
    child.expect_exact(f"the relay 127.0.0.1:{closed} does not answer on SSH (connection refused)")
    child.sendline(f"127.0.0.1:{relay.port}")
    child.expect_exact("Admin login on the relay")
    child.sendline("none")
    child.expect_exact("First DAV user name")
    child.sendline("alice")
    child.expect_exact("Password for DAV user alice:")
    child.sendline("abc")
    child.expect_exact("too short")
    child.expect_exact("Password for DAV user alice:")
    child.sendline("correct horse battery")
    child.expect_exact("Again:")
    child.sendline("correct horse battery staple")
    child.expect_exact("the two passwords differ; try again")
    child.expect_exact("Password for DAV user alice:")
    child.sendline("correct horse battery")
    child.expect_exact("Again:")
    child.sendline("correct horse battery")
    child.expect_exact("[1/8] init: wrote")
    child.expect_exact(relay.fingerprint)
    child.expect_exact("[y/N]")
    child.sendline("y")
    child.expect_exact("[2/8] relay: relay side left to you")
    child.expect_exact("laptop.test. A 127.0.0.1")
    child.expect_exact("[3/8] dns: laptop.test -> 127.0.0.1 at every authoritative server")
    child.expect_exact("inverse-cloud: ")
    rest = child.readline()
    assert finish(child) == 1
    assert "Traceback" not in child.before

    state = json.loads((root / "cfg" / "setup-state.json").read_text())
    assert state["done"] == ["init", "relay", "dns"]
    assert state["answers"]["tunnel_user"] == "inverse-cloud" and state["answers"]["email"] == ""
    assert "correct horse" not in (root / "cfg" / "setup-state.json").read_text()
    cfg_text = (root / "cfg" / "config.toml").read_text()
    assert 'user = "inverse-cloud"' in cfg_text and f"port = {relay.port}" in cfg_text
    assert 'host_key = "ssh-ed25519 ' in cfg_text
    assert ("laptop.test", "A") in dns_server.queries

    again = spawn(root, "--dns-server", f"127.0.0.1:{dns_server.port}")
    for n, step in ((1, "init"), (2, "relay"), (3, "dns")):
        again.expect_exact(f"[{n}/8] {step}: done before")
    again.expect_exact("inverse-cloud: ")
    assert again.readline() == rest
    assert finish(again) == 1
    assert json.loads((root / "cfg" / "setup-state.json").read_text()) == state
    assert (root / "cfg" / "config.toml").read_text() == cfg_text


def test_setup_non_interactive_refuses_a_bad_answer_in_one_line(tmp_path, relay):
    """--non-interactive with a URL for --domain, or a bad --email: exit 2, one line with the reason, nothing
    written."""
    root = tmp_path / "ic"
    child = spawn(root, "--non-interactive", "--domain", "https://laptop.test/", "--relay", "127.0.0.1:1")
    assert finish(child) == 2
    assert "--domain https://laptop.test/: 'https://laptop.test/' is a URL" in child.before
    assert not (root / "cfg" / "config.toml").exists()
    bad_mail = spawn(root, "--non-interactive", "--domain", "laptop.test", "--relay", f"127.0.0.1:{relay.port}",
                     "--relay-admin", "none", "--email", "not-an-email")
    assert finish(bad_mail) == 2
    assert "not an e-mail address" in bad_mail.before


@pytest.mark.parametrize(("check", "answer", "fragment"), [
    (domain_problem, "https://contacts.example.org/", "is a URL"),
    (domain_problem, "me@example.org", "e-mail"),
    (domain_problem, "contacts", "no dot"),
    (domain_problem, "contacts.example.org", None),
    (email_problem, "not-an-email", "not an e-mail"),
    (email_problem, "me@example.org", None),
    (relay_problem, "ssh://relay.example.org", "is a URL"),
    (relay_problem, "relay.example.org:99999", "port"),
    (relay_problem, "203.0.113.7:2222", None),
    (relay_reach_problem, "root@relay.example.org", "the relay's host only (relay.example.org); the tunnel "
                                                    "login is inverse-cloud, and the admin login (root) is asked"),
    (tunnel_login_problem, "root", "the tunnel needs an account of its own"),
    (tunnel_login_problem, "inverse-cloud", None),
    (lambda pw: password_problem(pw, "alice"), "abc", "too short"),
    (lambda pw: password_problem(pw, "alice"), "aaaaaaaaaaaa", "too easy"),
    (lambda pw: password_problem(pw, "alicealice1"), "alicealice1", "too easy"),
    (lambda pw: password_problem(pw, "alice"), "correct horse", None),
])
def test_answer_checks(check, answer, fragment):
    why = check(answer)
    assert (why is None) if fragment is None else (fragment in why), why


def test_state_file_round_trip(tmp_path):
    state = SetupState.load(tmp_path / "s.json")
    assert state.answers == {} and state.done == []
    state.answers["domain"] = "laptop.test"
    state.finish("init")
    state.finish("init")
    again = SetupState.load(tmp_path / "s.json")
    assert again.answers == {"domain": "laptop.test"} and again.done == ["init"]
    assert (tmp_path / "s.json").stat().st_mode & 0o077 == 0


def test_setup_shows_what_dns_says_and_resumes_after_ctrl_c(tmp_path, relay, dns_server):
    """Everything given as flags (nothing is asked). The A record is not published yet: the dns step shows
    what the server says ('no A/AAAA record yet') and keeps waiting; Ctrl-C stops it (exit 130) with init
    and relay recorded as done. The record is published; the rerun skips init and relay, sees the record and
    goes on to the next step."""
    dns_server.records = {("laptop.test", "TXT"): ['"placeholder"']}  # the zone exists, the A record not yet
    root = tmp_path / "ic"
    pw = tmp_path / "pw"
    pw.write_text("correct horse battery\n")
    flags = ["--domain", "laptop.test", "--relay", f"127.0.0.1:{relay.port}", "--relay-admin", "none",
             "--email", "", "--user", "alice", "--password-file", str(pw), "--yes",
             "--dns-server", f"127.0.0.1:{dns_server.port}"]
    child = spawn(root, *flags)
    child.expect_exact("[2/8] relay: ")
    child.expect_exact("127.0.0.1: no A/AAAA record yet")
    child.sendintr()
    assert finish(child) == 130
    state = json.loads((root / "cfg" / "setup-state.json").read_text())
    assert state["done"] == ["init", "relay"]

    dns_server.records = {("laptop.test", "A"): ["127.0.0.1"]}
    again = spawn(root, *flags)
    again.expect_exact("[1/8] init: done before")
    again.expect_exact("[2/8] relay: done before")
    again.expect_exact("[3/8] dns: laptop.test -> 127.0.0.1")
    assert finish(again) == 1  # the account step: no CA in this test
    assert json.loads((root / "cfg" / "setup-state.json").read_text())["done"] == ["init", "relay", "dns"]


def test_relay_step_applies_the_rendered_script_as_the_admin(tmp_path, relay, monkeypatch):
    """With an admin login, the relay step runs relay-setup's own setup.sh over `ssh ADMIN@HOST:PORT` (the
    call is recorded here instead of reaching a real relay), then pins the host key it shows."""
    import argparse

    from inverse_cloud.ops import setup_steps
    from inverse_cloud.ops.setup import Lines
    from inverse_cloud.tunnel import commands as tunnel_commands
    from tests.support import init_instance

    cfg = init_instance(tmp_path / "ic", relay=f"inverse-cloud@127.0.0.1:{relay.port}")
    calls: list[tuple[str, str]] = []
    monkeypatch.setattr(tunnel_commands, "apply_over_ssh", lambda target, script: calls.append((target, script)))
    ctx = setup_steps.Context(args=argparse.Namespace(yes=True), cfg_path=cfg, password="",
                              answers={"relay": f"127.0.0.1:{relay.port}", "relay_admin": "root"}, out=Lines(),
                              interactive=False)
    line = setup_steps.step_relay(ctx)
    assert calls and calls[0][0] == f"root@127.0.0.1:{relay.port}"
    assert "inverse-cloud" in calls[0][1] and "sshd -t" in calls[0][1]
    assert line.startswith("relay side applied on 127.0.0.1 as root (tunnel login inverse-cloud)"), line
    assert relay.fingerprint in line
    assert 'host_key = "ssh-ed25519 ' in cfg.read_text()


def gone(pid: int) -> bool:
    try:
        return "zombie" in Path(f"/proc/{pid}/status").read_text().lower()
    except FileNotFoundError:
        return True


def test_start_step_installs_the_unit_enables_linger_and_waits_for_the_server(tmp_path, monkeypatch):
    """With a user manager (stand-ins for systemctl and loginctl on PATH that record their arguments; the
    systemctl stand-in starts `serve` for `enable --now`, as the real one would through the unit): the start
    step writes the unit, runs daemon-reload and enable --now, enables linger, and returns once the server
    answers on its control socket."""
    import argparse
    import os
    import signal

    from inverse_cloud.ops import setup_steps
    from inverse_cloud.ops.setup import Lines
    from tests.support import init_instance, wait_until

    cfg = init_instance(tmp_path / "ic")
    bindir, calls, pidfile = tmp_path / "bin", tmp_path / "calls", tmp_path / "serve.pid"
    bindir.mkdir()
    (bindir / "systemctl").write_text(
        f'#!/bin/sh\necho "systemctl $*" >> {calls}\n'
        f'case "$*" in *"enable --now"*) {sys.executable} -m inverse_cloud.cli serve --config {cfg} '
        f'> {tmp_path}/serve.log 2>&1 & echo $! > {pidfile};; esac\nexit 0\n')
    (bindir / "loginctl").write_text(f'#!/bin/sh\necho "loginctl $*" >> {calls}\nexit 0\n')
    for tool in ("systemctl", "loginctl"):
        (bindir / tool).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}:{os.environ['PATH']}")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    ctx = setup_steps.Context(args=argparse.Namespace(wait=60), cfg_path=cfg, password="",
                              answers={"user": "alice"}, out=Lines(), interactive=False)
    try:
        line = setup_steps.step_start(ctx)
    finally:
        if pidfile.exists():
            pid = int(pidfile.read_text())
            os.kill(pid, signal.SIGTERM)
            wait_until(lambda: gone(pid), 30, "serve to stop")
    recorded = calls.read_text()
    assert "systemctl --user daemon-reload" in recorded
    assert "systemctl --user enable --now inverse-cloud.service" in recorded
    assert "loginctl enable-linger" in recorded
    assert (tmp_path / "xdg" / "systemd" / "user" / "inverse-cloud.service").exists()
    assert line.startswith("user unit installed and started, linger on"), line


def test_ctrl_c_at_the_host_key_question_resumes_at_the_relay_step(tmp_path, relay, dns_server):
    """Ctrl-C while setup asks to confirm the relay's host key: exit 130, only init recorded, nothing pinned.
    The rerun skips init, asks the same question again (same fingerprint) and, after y, goes on."""
    root = tmp_path / "ic"
    pw = tmp_path / "pw"
    pw.write_text("correct horse battery\n")
    flags = ["--domain", "laptop.test", "--relay", f"127.0.0.1:{relay.port}", "--relay-admin", "none",
             "--user", "alice", "--password-file", str(pw), "--dns-server", f"127.0.0.1:{dns_server.port}"]
    child = spawn(root, *flags)
    child.expect_exact("[1/8] init: wrote")
    child.expect_exact(relay.fingerprint)
    child.expect_exact("[y/N]")
    child.sendintr()
    assert finish(child) == 130
    assert json.loads((root / "cfg" / "setup-state.json").read_text())["done"] == ["init"]
    assert 'host_key = ""' in (root / "cfg" / "config.toml").read_text()

    again = spawn(root, *flags)
    again.expect_exact("[1/8] init: done before")
    again.expect_exact(relay.fingerprint)
    again.expect_exact("[y/N]")
    again.sendline("y")
    again.expect_exact("[2/8] relay: relay side left to you")
    again.expect_exact("[3/8] dns: laptop.test -> 127.0.0.1")
    assert finish(again) == 1  # the account step: no CA in this test
    assert json.loads((root / "cfg" / "setup-state.json").read_text())["done"] == ["init", "relay", "dns"]


@pytest.mark.parametrize(("extra", "fragment"), [
    (["--dns", "power dns"], "give a dns-lexicon provider name"),
    (["--dns", "powerdns", "--dns-option", "pdns_server"], "give NAME=VALUE"),
    (["--dns-option", "pdns_server=http://ns:8081"], "go with --dns PROVIDER"),
])
def test_setup_dns_flags_are_checked_in_one_line(tmp_path, relay, capsys, extra, fragment):
    """Wrong --dns flags: exit 2, one line saying what to give, no config written."""
    from inverse_cloud import cli

    root = tmp_path / "ic"
    pw = tmp_path / "pw"
    pw.write_text("correct horse battery\n")
    argv = ["setup", "--non-interactive", "--config", str(root / "cfg" / "config.toml"), "--domain", "laptop.test",
            "--relay", f"127.0.0.1:{relay.port}", "--relay-admin", "none", "--user", "alice", "--password-file",
            str(pw), *extra]
    capsys.readouterr()
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and fragment in err, err
    assert not (root / "cfg" / "config.toml").exists()


def test_dns_provider_saved_without_its_token_and_none_turns_it_off(tmp_path):
    """--dns, its options and the token file's path are saved for a plain rerun; the token never is; --dns
    none removes them."""
    import argparse

    from inverse_cloud.ops.setup import _dns_answers

    state = SetupState.load(tmp_path / "s.json")
    token = tmp_path / "token"
    token.write_text("s3cret-token\n")
    args = argparse.Namespace(dns="powerdns", dns_option=["pdns_server=http://ns:8081", "pdns_server_id=x"],
                              dns_token_file=str(token))
    got = _dns_answers(args, state)
    assert got == {"dns": "powerdns", "dns_options": "pdns_server=http://ns:8081\npdns_server_id=x",
                   "dns_token_file": str(token)}
    assert "s3cret" not in (tmp_path / "s.json").read_text()
    rerun = _dns_answers(argparse.Namespace(dns=None, dns_option=[], dns_token_file=None),
                         SetupState.load(tmp_path / "s.json"))
    assert rerun == got
    off = _dns_answers(argparse.Namespace(dns="none", dns_option=[], dns_token_file=None),
                       SetupState.load(tmp_path / "s.json"))
    assert off == {} and "powerdns" not in (tmp_path / "s.json").read_text()


def test_dns_api_errors_are_one_line(tmp_path):
    """An unknown provider, an empty token file, and a provider that does not answer: one line each, naming
    what failed."""
    from inverse_cloud.errors import ConfigError
    from inverse_cloud.ops.setup_dnsapi import DnsApi, DnsApiError, read_token

    empty = tmp_path / "empty"
    empty.write_text("\n")
    with pytest.raises(ConfigError, match="the file is empty"):
        read_token(str(empty))
    with pytest.raises(DnsApiError) as caught:
        DnsApi("no_such_provider").replace("laptop.test", "A", ["127.0.0.1"])
    assert "no_such_provider" in str(caught.value) and "\n" not in str(caught.value)
    closed = free_port()
    api = DnsApi("powerdns", {"pdns_server": f"http://127.0.0.1:{closed}"}, "key")
    with pytest.raises(DnsApiError) as caught:  # the zone not found in DNS, or the API not answering
        api.replace("laptop.test", "A", ["127.0.0.1"])
    assert str(caught.value).startswith("powerdns: ") and "\n" not in str(caught.value), caught.value
