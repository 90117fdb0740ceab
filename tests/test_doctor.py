"""`inverse-cloud doctor` names the first broken link. Real parts: a running `serve`, a second instance
standing in for a TLS-terminating middlebox, an in-process asyncssh server for the relay's host key."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import asyncssh
import pytest

from inverse_cloud import config as config_mod
from inverse_cloud.ops.doctor import DoctorOptions, dns_records, parse_connect_to, parse_resolve, run_doctor
from tests.support import ServeProcess, free_port, init_instance


def doctor(cfg: Path, *extra: str) -> tuple[int, dict]:
    out = subprocess.run([sys.executable, "-m", "inverse_cloud.cli", "doctor", "--json", "--timeout", "5",
                          "--config", str(cfg), *extra], capture_output=True, text=True, timeout=120)
    assert "Traceback" not in out.stderr, out.stderr
    return out.returncode, json.loads(out.stdout)


def states(report: dict) -> dict[str, str]:
    return {c["name"]: c["state"] for c in report["checks"]}


def detail(report: dict, name: str) -> str:
    c = next(c for c in report["checks"] if c["name"] == name)
    return f"{c['detail']} | fix: {c['fix']}"


def connect_to(srv: ServeProcess, http_port: int | None = None, https_port: int | None = None) -> list[str]:
    return ["--connect-to", f"laptop.test:80:127.0.0.1:{http_port or srv.http_port}",
            "--connect-to", f"laptop.test:443:127.0.0.1:{https_port or srv.https_port}"]


def selfsigned(cfg_path: Path) -> Path:
    return config_mod.load(cfg_path).server.cert_dir / "selfsigned" / "fullchain.pem"


def test_parsers():
    assert parse_resolve(["A.test:127.0.0.2", "a.test:[::1]"]) == {"a.test": ["127.0.0.2", "::1"]}
    assert parse_connect_to(["h:80:127.0.0.1:8080"]) == {("h", 80): ("127.0.0.1", 8080)}
    with pytest.raises(ValueError):
        parse_resolve(["nohost"])
    with pytest.raises(ValueError):
        parse_connect_to(["h:80:x"])


def test_bad_config_is_the_first_link(tmp_path):
    bad = tmp_path / "c.toml"
    bad.write_text("[server]\ndomain = \"x.test\"\nhttps_listen = 5\n")
    code, report = doctor(bad)
    assert code == 2 and report["first_broken"] == "config"
    assert "[server] https_listen" in detail(report, "config")
    assert states(report)["DNS"] == "not checked"


def test_readable_key_is_named_with_chmod(instance):
    cfg = config_mod.load(instance)
    os.chmod(cfg.relay.key_file, 0o644)
    code, report = doctor(instance)
    assert code == 1 and report["first_broken"] == "keys' permissions"
    assert f"chmod 600 {cfg.relay.key_file}" in detail(report, "keys' permissions")


def test_not_running_is_named(instance):
    code, report = doctor(instance)
    assert code == 1 and report["first_broken"] == "server running"
    assert "systemctl --user start inverse-cloud" in detail(report, "server running")
    assert states(report)["DNS"] == "skip"  # no relay: local only


def test_local_instance_healthy_then_middlebox_then_wrong_http(instance, tmp_path):
    """A running local-only instance with its self-signed certificate trusted (--cacert): every link works,
    exit 0. Then port 443 is pointed at another inverse-cloud (a middlebox with its own key): doctor says
    the key is not ours. Then port 80 at the other one: it does not answer our probe token. Then port 80
    at a closed port: does not answer. Without --cacert: our key, but not trusted."""
    other_cfg = init_instance(tmp_path / "other")
    with ServeProcess(instance) as srv, ServeProcess(other_cfg) as other:
        code, report = doctor(instance, *connect_to(srv), "--cacert", str(selfsigned(instance)))
        assert code == 0, report
        assert states(report) == {"config": "ok", "keys' permissions": "ok", "DNS": "skip", "relay": "skip",
                                  "server running": "ok", "forwards bound": "skip", "public HTTP": "ok",
                                  "public HTTPS": "ok", "public HTTPS (IPv6)": "skip", "DAV": "ok",
                                  "CAA": "skip"}
        assert "nobody in between terminates TLS" in detail(report, "public HTTPS")

        code, report = doctor(instance, *connect_to(srv, https_port=other.https_port),
                              "--cacert", str(selfsigned(instance)))
        assert code == 1 and report["first_broken"] == "public HTTPS"
        assert "whose key is not ours" in detail(report, "public HTTPS")

        code, report = doctor(instance, *connect_to(srv, http_port=other.http_port))
        assert report["first_broken"] == "public HTTP"
        assert "without our probe token" in detail(report, "public HTTP")

        code, report = doctor(instance, *connect_to(srv, http_port=free_port()))
        assert report["first_broken"] == "public HTTP"
        assert "does not answer (connection refused)" in detail(report, "public HTTP")

        code, report = doctor(instance, *connect_to(srv))
        assert report["first_broken"] == "public HTTPS"
        assert "phones will not trust it" in detail(report, "public HTTPS")
        assert "no certificate from the CA yet" in detail(report, "public HTTPS")


@pytest.fixture
async def ssh_server(tmp_path):
    """An asyncssh server on a free loopback port with a per-test host key (stands in for the relay's sshd
    host key exchange; doctor never authenticates)."""
    key = asyncssh.generate_private_key("ssh-ed25519")
    server = await asyncssh.listen("127.0.0.1", 0, server_host_keys=[key], reuse_address=True)
    port = server.sockets[0].getsockname()[1]
    try:
        yield port, key.export_public_key("openssh").decode().strip()
    finally:
        server.close()
        await server.wait_closed()


def _relay_instance(root: Path, port: int, host_key: str) -> Path:
    cfg = init_instance(root, relay=f"tunnel@127.0.0.1:{port}")
    text = cfg.read_text().replace('host_key = ""', f'host_key = "{" ".join(host_key.split()[:2])}"', 1)
    cfg.write_text(text)
    return cfg


async def test_relay_links(ssh_server, tmp_path):
    """With a relay configured: DNS elsewhere -> DNS link names both addresses; DNS right and the pinned key
    -> relay ok (chain goes on to "server running"); another pinned key -> "relay host key changed" with the
    fix; nothing listening -> unreachable."""
    port, host_key = ssh_server
    cfg = _relay_instance(tmp_path / "ic", port, host_key)

    report = await run_doctor(cfg, DoctorOptions(resolve=parse_resolve(["laptop.test:127.0.0.9"]), timeout_s=5))
    assert report.first_broken is not None and report.first_broken.name == "DNS"
    assert "points at 127.0.0.9, but the relay is 127.0.0.1" in report.first_broken.detail
    assert "laptop.test. A 127.0.0.1" in report.records

    good = DoctorOptions(resolve=parse_resolve(["laptop.test:127.0.0.1"]), timeout_s=5)
    report = await run_doctor(cfg, good)
    assert [c.state for c in report.checks[:4]] == ["ok", "ok", "ok", "ok"], report.checks
    assert report.first_broken is not None and report.first_broken.name == "server running"

    other = asyncssh.generate_private_key("ssh-ed25519").export_public_key("openssh").decode()
    cfg2 = _relay_instance(tmp_path / "ic2", port, other)
    report = await run_doctor(cfg2, good)
    assert report.first_broken is not None and report.first_broken.name == "relay"
    assert "relay host key changed: expected SHA256:" in report.first_broken.detail
    assert "relay-setup --accept-new-host-key" in report.first_broken.fix

    cfg3 = _relay_instance(tmp_path / "ic3", free_port(), host_key)
    report = await run_doctor(cfg3, good)
    assert report.first_broken is not None and report.first_broken.name == "relay"
    assert "unreachable (connection refused)" in report.first_broken.detail or "unreachable" in \
        report.first_broken.detail


def test_dns_records_include_caa_and_srv(instance):
    cfg = config_mod.load(instance)
    lines = dns_records(cfg, ["192.0.2.7", "2001:db8::7"], "https://acme.example/acct/1")
    assert "laptop.test. A 192.0.2.7" in lines
    assert any("CAA 0 issue" in ln and "accounturi=https://acme.example/acct/1" in ln
               and "validationmethods=http-01" in ln for ln in lines)
    assert any(ln.startswith("_carddavs._tcp.test. SRV 0 1 443 laptop.test.") for ln in lines)
    assert '_caldavs._tcp.test. TXT "path=/radicale/"' in lines


def test_tls_alpn_01_needs_no_port_80(instance):
    """[acme] challenge = "tls-alpn-01": port 80 closed is not a broken link (the CA validates on 443 only):
    "public HTTP" is skipped with the reason and the chain goes on to HTTPS and DAV. With "auto", a closed
    port 80 is no problem either: "public HTTP" is skipped, naming what port 80 did and that TLS-ALPN-01 on 443
    is used, with no fix telling the user to forward port 80, and doctor exits 0 (a set-up behind a provider
    that blocks port 80 is healthy)."""
    from inverse_cloud.tunnel.commands import set_config_value

    text = Path(instance).read_text()
    Path(instance).write_text(set_config_value(text, "acme", "challenge", '"tls-alpn-01"'))
    with ServeProcess(instance) as srv:
        code, report = doctor(instance, *connect_to(srv, http_port=free_port()), "--cacert", str(selfsigned(instance)))
        assert code == 0 and states(report)["public HTTP"] == "skip", report
        assert "tls-alpn-01" in detail(report, "public HTTP") and states(report)["DAV"] == "ok"
    Path(instance).write_text(set_config_value(Path(instance).read_text(), "acme", "challenge", '"auto"'))
    with ServeProcess(instance) as srv:
        code, report = doctor(instance, *connect_to(srv, http_port=free_port()), "--cacert", str(selfsigned(instance)))
        assert code == 0 and report["ok"], report
        assert states(report)["public HTTP"] == "skip" and states(report)["DAV"] == "ok", report
        text = detail(report, "public HTTP")
        assert "does not answer (connection refused)" in text and "TLS-ALPN-01 on port 443" in text, text
        assert text.endswith("| fix: "), text


async def test_real_names_resolve_with_the_system_resolver(ssh_server, tmp_path):
    """No --resolve: the relay is `localhost` (a name, as every real relay is). The system resolver answers it
    (127.0.0.1 from /etc/hosts), so the DNS link gets past the relay and names the domain (laptop.test has no
    record anywhere), and the records doctor prints carry the relay's real address, not a placeholder."""
    port, host_key = ssh_server
    cfg = init_instance(tmp_path / "ic", relay=f"tunnel@localhost:{port}")
    text = cfg.read_text().replace('host_key = ""', f'host_key = "{" ".join(host_key.split()[:2])}"', 1)
    cfg.write_text(text)
    report = await run_doctor(cfg, DoctorOptions(timeout_s=5))
    dns = next(c for c in report.checks if c.name == "DNS")
    assert "the relay host" not in dns.detail and "inet_pton" not in dns.detail, dns
    assert dns.state == "fail" and "laptop.test does not resolve" in dns.detail, dns
    assert "add a DNS record: laptop.test. A 127.0.0.1" in dns.fix, dns
    assert "laptop.test. A 127.0.0.1" in report.records, report.records
    assert not any("<relay" in r for r in report.records), report.records



def test_dns_records_ask_for_no_aaaa(instance):
    """Without [relay] listen_host6 the relay's NAT rules cover IPv4 only, so a relay whose name also has an
    IPv6 address gets an A record and no AAAA; a relay with no IPv4 address gets a placeholder, not an AAAA.
    With listen_host6 (relay-setup --ipv6) the relay's IPv6 address is published as AAAA too."""
    cfg = config_mod.load(instance)
    lines = dns_records(cfg, ["192.0.2.7", "2001:db8::7"], "")
    assert "laptop.test. A 192.0.2.7" in lines and not any(" AAAA " in ln for ln in lines), lines
    assert "laptop.test. A <relay IPv4 address>" in dns_records(cfg, ["2001:db8::7"], "")
    from inverse_cloud.tunnel.commands import set_config_value

    Path(instance).write_text(set_config_value(Path(instance).read_text(), "relay", "listen_host6", '"::"'))
    lines = dns_records(config_mod.load(instance), ["192.0.2.7", "2001:db8::7"], "")
    assert "laptop.test. A 192.0.2.7" in lines and "laptop.test. AAAA 2001:db8::7" in lines, lines


async def test_offline_laptop_is_told_to_check_its_network(ssh_server, tmp_path, monkeypatch):
    """The resolver gives no answer at all (EAI_AGAIN: the laptop is offline): the DNS link says so and asks
    whether this machine is online, instead of blaming [relay] host in the config."""
    import asyncio
    import socket

    port, host_key = ssh_server
    cfg = _relay_instance(tmp_path / "ic", port, host_key)
    text = cfg.read_text().replace('host = "127.0.0.1"', 'host = "relay.test"', 1)
    cfg.write_text(text)

    async def offline(*_a, **_k):
        raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")

    monkeypatch.setattr(asyncio.get_running_loop(), "getaddrinfo", offline)
    report = await run_doctor(cfg, DoctorOptions(timeout_s=5))
    assert report.first_broken is not None and report.first_broken.name == "DNS"
    assert "is this machine online" in report.first_broken.fix, report.first_broken
