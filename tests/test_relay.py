"""relay.py rendering (pure) and relay-setup's host-key pinning; every generated sshd config passes the
real `sshd -t`, the nftables rules `nft -c` and the iptables rules `iptables-restore --test` (both in a
network namespace of their own), setup.sh `sh -n`."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from inverse_cloud.config import loads
from inverse_cloud.errors import HostKeyMismatch
from inverse_cloud.tunnel import relay_files as relay
from inverse_cloud.tunnel.commands import pin_host_key, set_config_value
from tests.support import wait_until

TUN = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIPdR/oJumYvxBj5EcrtzZ7CKnzQkJornglLlC0nU8PWb tunnel laptop.test"
TKO = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIIkGPrKIDriY0NovBgUlqIKnU7vKVf01jD7MhuH3zs5N takeover"
HOST_A = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIPdR/oJumYvxBj5EcrtzZ7CKnzQkJornglLlC0nU8PWb"
HOST_B = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIIkGPrKIDriY0NovBgUlqIKnU7vKVf01jD7MhuH3zs5N"


def spec(**kw) -> relay.RelaySpec:
    return relay.RelaySpec(domain="laptop.test", user="ictunnel", tunnel_key=TUN, takeover_key=TKO, **kw)


def test_authorized_keys_restrict_every_key():
    """The tunnel key may only listen on exactly the two ports and runs /bin/false; the takeover key has
    restrict (no forwarding) and the forced command that ends other sessions."""
    text = relay.authorized_keys(spec(https_port=44353, http_port=8053))
    lines = [line for line in text.splitlines() if line and not line.startswith("#")]
    assert len(lines) == 2
    assert lines[0].startswith('restrict,port-forwarding,permitlisten="127.0.0.1:44353",'
                               'permitlisten="127.0.0.1:8053",command="/bin/false" ssh-ed25519 AAAAC3')
    assert lines[1].startswith('restrict,command="n=0; for p in $(pgrep -u $(id -u) -x')
    assert "[ $p = $PPID ] ||" in lines[1]
    # nothing in the forced command may end the quoted option early
    assert lines[1].count('"') == 2


def test_dropin_has_the_match_block_and_no_force_command():
    text = relay.sshd_dropin(spec(listen_host="127.0.0.1", https_port=1, http_port=2, client_alive_interval_s=15))
    body = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    assert body[0] == "Match User ictunnel"
    for want in ("AllowTcpForwarding remote", "PermitListen 127.0.0.1:1 127.0.0.1:2", "PermitOpen none",
                 "PermitTTY no", "X11Forwarding no", "AllowAgentForwarding no", "ClientAliveInterval 15",
                 "ClientAliveCountMax 3", "GatewayPorts clientspecified",
                 "AuthorizedKeysFile /etc/ssh/inverse-cloud/ictunnel.keys"):
        assert want in body, want
    assert not any(line.startswith("ForceCommand") for line in body)


def test_nat_rules_keep_the_client_address_and_cover_output():
    nft = relay.nftables_rules(spec(https_port=44353, http_port=8053))
    assert "tcp dport 443 dnat to 127.0.0.1:44353" in nft and "tcp dport 80 dnat to 127.0.0.1:8053" in nft
    assert "hook prerouting" in nft and "hook output" in nft and "masquerade" not in nft and "snat" not in nft
    assert "route_localnet" in nft
    public = relay.nftables_rules(spec(listen_host="203.0.113.7"))
    assert "dnat to 203.0.113.7:44353" in public and "route_localnet" not in public
    ipt = relay.iptables_rules(spec())
    assert "-j DNAT --to-destination 127.0.0.1:44353" in ipt and "MASQUERADE" not in ipt


def test_readme_says_offline_refuses_and_no_aaaa():
    text = relay.readme(spec())
    assert "refuses" in text and "never answers with an HTTP error page" in text
    assert "NO AAAA record" in text


def test_readme_of_the_nginx_variant_says_setup_sh_leaves_80_443_to_nginx():
    """--nat none: setup.sh installs no NAT rules and no inverse-cloud-nat.service, so README.txt must not say
    it does; it names the two nginx files to install and the reload that applies them."""
    text = relay.readme(spec(), "none")
    assert "setup.sh leaves public 443 and 80 to your nginx" in text, text
    assert "nginx-stream.conf" in text and "nginx-http.conf" in text and "nginx -t && nginx -s reload" in text
    assert "inverse-cloud-nat.service" not in text and "DNAT" not in text, text
    assert "inverse-cloud-nat.service (enabled) loads them again at boot" in relay.readme(spec(), "nft")


def test_readme_gives_the_real_clientalive_drop_time():
    """sshd ends a silent client when its count of silent intervals goes above ClientAliveCountMax: with
    15 s x 3 that is ~60 s, not 45 s (the old figure, interval x count): in README.txt and the drop-in."""
    assert "dropped after 60 s at the earliest (ClientAlive" in relay.readme(spec())
    five_by_four = spec(client_alive_interval_s=5, client_alive_count_max=4)
    assert "dropped after 25 s at the earliest" in relay.readme(five_by_four)
    assert "dropped (and its ports freed) after 60 s at the earliest" in relay.sshd_dropin(spec())


def test_nginx_variant_routes_by_sni_without_terminating_tls():
    stream = relay.nginx_stream(spec())
    assert "ssl_preread on;" in stream and "laptop.test 127.0.0.1:44353;" in stream
    assert "ssl_certificate" not in stream
    http = relay.nginx_http_vhost(spec())
    assert "proxy_pass http://127.0.0.1:8053;" in http and "return 444" in http


def _need(tool: str) -> str:
    path = shutil.which(tool) or (f"/usr/sbin/{tool}" if os.path.exists(f"/usr/sbin/{tool}") else None)
    assert path, f"{tool} missing: apt-get install {'openssh-server' if tool == 'sshd' else tool}"
    return path


@pytest.mark.parametrize("variant", [
    dict(), dict(listen_host="203.0.113.7", client_alive_interval_s=2, client_alive_count_max=5),
    dict(listen_host="localhost", https_port=1443, http_port=1080),
])
def test_generated_sshd_config_passes_sshd_t(tmp_path, variant):
    """The drop-in, included at the top of a Debian-like sshd_config, passes the real `sshd -t`, and
    `sshd -T` shows the Match values for the tunnel user only."""
    sshd = _need("sshd")
    os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
    s = spec(**variant)
    (tmp_path / "dropin.conf").write_text(relay.sshd_dropin(s))
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "hk")], check=True)
    cfg = tmp_path / "sshd_config"
    cfg.write_text(f"Include {tmp_path}/dropin.conf\nHostKey {tmp_path}/hk\nPort 2222\nAllowTcpForwarding no\n"
                   "X11Forwarding yes\nSubsystem sftp /usr/lib/openssh/sftp-server\n")
    check = subprocess.run([sshd, "-t", "-f", str(cfg)], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    eff = subprocess.run([sshd, "-T", "-f", str(cfg), "-C", "user=ictunnel,host=x,addr=127.0.0.1"],
                         capture_output=True, text=True, check=True).stdout
    assert "allowtcpforwarding remote" in eff and "x11forwarding no" in eff and "permitopen none" in eff
    other = subprocess.run([sshd, "-T", "-f", str(cfg), "-C", "user=root,host=x,addr=127.0.0.1"],
                           capture_output=True, text=True, check=True).stdout
    assert "allowtcpforwarding no" in other and "x11forwarding yes" in other


def test_nft_and_iptables_rules_load_in_a_namespace(tmp_path):
    """`nft -c -f` and `iptables-restore --test --noflush` accept the rules (checked inside `unshare -n`,
    so nothing on this machine changes)."""
    _need("unshare")
    nft, ipt = _need("nft"), _need("iptables-restore")
    for s in (spec(), spec(listen_host="203.0.113.7")):
        (tmp_path / "r.nft").write_text(relay.nftables_rules(s))
        out = subprocess.run(["unshare", "-n", nft, "-c", "-f", str(tmp_path / "r.nft")], capture_output=True,
                             text=True)
        assert out.returncode == 0, out.stderr
        (tmp_path / "r.ipt").write_text(relay.iptables_rules(s))
        with open(tmp_path / "r.ipt") as fh:
            out = subprocess.run(["unshare", "-n", ipt, "--test", "--noflush"], stdin=fh, capture_output=True,
                                 text=True)
        assert out.returncode == 0, out.stderr


@pytest.mark.parametrize("nat", ["nft", "iptables", "none"])
def test_setup_script_is_valid_sh_and_checks_sshd_t_before_reload(nat):
    script = relay.setup_script(spec(), nat)
    out = subprocess.run(["sh", "-n"], input=script, text=True, capture_output=True)
    assert out.returncode == 0, out.stderr
    assert script.index("if ! sshd -t; then") < script.index("systemctl reload ssh")
    assert "useradd --system" in script and "--shell /bin/sh" in script
    assert relay.authorized_keys(spec()) in script and relay.sshd_dropin(spec()) in script
    assert ("nft -f" in script) == (nat == "nft") and ("iptables-restore" in script) == (nat == "iptables")


CONFIG = """[server]
domain = "laptop.test"

[relay]
host = "relay.example"
# The pinned key
host_key = ""
# https_port = 44353

[acme]
email = ""
"""


@pytest.mark.parametrize("key,literal,expect", [
    ("host_key", '"ssh-ed25519 AAAA"', 'host_key = "ssh-ed25519 AAAA"\n'),
    ("https_port", "5000", "https_port = 5000\n"),          # replaces the commented default
    ("user", '"bob"', 'user = "bob"\n'),                     # not present: added under the header
])
def test_set_config_value_is_a_minimal_edit(key, literal, expect):
    out = set_config_value(CONFIG, "relay", key, literal)
    assert expect in out
    assert out.count("\n") in (CONFIG.count("\n"), CONFIG.count("\n") + 1)
    assert loads(out).relay is not None
    assert out.replace(expect, "") in (CONFIG.replace('host_key = ""\n', "").replace("# https_port = 44353\n", ""),
                                       CONFIG.replace('host_key = ""\n', ""),
                                       CONFIG.replace("# https_port = 44353\n", ""), CONFIG)


def test_pin_refuses_a_different_key_unless_accepted(tmp_path, capsys):
    path = tmp_path / "config.toml"
    path.write_text(set_config_value(CONFIG, "relay", "host_key", f'"{HOST_A}"'))
    cfg = loads(path.read_text(), path)
    assert pin_host_key(cfg, HOST_A, yes=True, accept_new=False) is False     # same key: nothing to do
    with pytest.raises(HostKeyMismatch) as exc:
        pin_host_key(cfg, HOST_B, yes=True, accept_new=False)
    msg = str(exc.value)
    assert msg.startswith("relay host key changed: expected SHA256:") and ", got SHA256:" in msg
    assert msg.endswith("run `inverse-cloud relay-setup --accept-new-host-key`") and "\n" not in msg
    assert loads(path.read_text()).relay.host_key == HOST_A
    assert pin_host_key(cfg, HOST_B, yes=True, accept_new=True) is True
    assert loads(path.read_text()).relay.host_key == HOST_B
    assert (path.stat().st_mode & 0o777) == 0o600


def test_relay_setup_output_writes_the_bundle(instance, tmp_path):
    """`relay-setup --output DIR --no-pin` (no network) writes every file; setup.sh is executable."""
    from inverse_cloud.cli import main

    Path(instance).write_text(Path(instance).read_text().replace('host = ""', 'host = "relay.example"'))
    out = tmp_path / "bundle"
    assert main(["relay-setup", "--config", str(instance), "--output", str(out), "--no-pin"]) == 0
    names = {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()}
    assert names == set(relay.bundle(spec()).keys()) | {"laptop.toml"}
    assert os.access(out / "setup.sh", os.X_OK)
    keys = (out / "authorized_keys").read_text()
    assert (Path(instance).parent / "data" / "ssh" / "id_ed25519.pub").read_text().split()[1] in keys


# --- golden files: the exact text a relay admin reviews and runs as root -----------------------------

GOLDEN = Path(__file__).parent / "golden" / "relay"
GOLDEN_CASES = {
    "nft": (dict(), "nft"),
    "iptables": (dict(), "iptables"),
    "none": (dict(), "none"),
    "public-listen": (dict(listen_host="203.0.113.7", https_port=1443, http_port=1080, client_alive_interval_s=20,
                           client_alive_count_max=4), "nft"),
    "sni": (dict(proxy_protocol=True), "sni"),
    "sni-ssh443": (dict(proxy_protocol=True, ssh_on_443=True), "sni"),
    "ssh443-ipv6": (dict(ssh_on_443=True, ipv6=True, listen_host6="::", sslh_transparent=True), "nft"),
    "none-proxy": (dict(proxy_protocol=True), "none"),
    "ssh443-proxy": (dict(ssh_on_443=True, proxy_protocol=True), "nft"),
    "nft-ipv6": (dict(ipv6=True, listen_host6="::"), "nft"),
    "ssh443": (dict(ssh_on_443=True, sslh_transparent=True), "nft"),
    "ssh443-iptables": (dict(ssh_on_443=True), "iptables"),
    "sni-ipv6": (dict(proxy_protocol=True, ipv6=True), "sni"),
}


@pytest.mark.parametrize("case", list(GOLDEN_CASES))
def test_bundle_matches_the_reviewed_golden_files(case):
    """Every file of the bundle equals its reviewed copy under tests/golden/relay/<case>/ (a change to the
    text a relay admin runs as root shows up as a diff there). After an intended change, regenerate with
    INVERSE_CLOUD_UPDATE_GOLDEN=1 and review the diff."""
    kw, nat = GOLDEN_CASES[case]
    files = relay.bundle(spec(**kw), nat)
    root = GOLDEN / case
    if os.environ.get("INVERSE_CLOUD_UPDATE_GOLDEN") == "1":
        for name, text in files.items():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            (root / name).write_text(text)
    on_disk = {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}
    assert on_disk == set(files)
    for name, text in files.items():
        assert text == (root / name).read_text(), f"{case}/{name} differs from its golden copy"


@pytest.mark.parametrize(("host", "loopback"), [("127.0.0.1", True), ("127.0.0.2", True), ("::1", True),
                                                ("localhost", True), ("203.0.113.7", False),
                                                ("relay.example", False)])
def test_listen_is_loopback(host, loopback):
    """Only a loopback listen needs route_localnet for the DNAT (a name other than localhost is not one)."""
    assert spec(listen_host=host).listen_is_loopback is loopback
    assert ("route_localnet" in relay.setup_script(spec(listen_host=host), "nft")) is loopback


def test_bad_inputs_to_the_renderer_are_one_line():
    with pytest.raises(ValueError) as caught:
        relay.authorized_keys(relay.RelaySpec(domain="laptop.test", user="u", tunnel_key="garbage",
                                              takeover_key=TKO))
    assert str(caught.value) == "not an OpenSSH public key line: 'garbage'"
    with pytest.raises(ValueError) as caught:
        relay.setup_script(spec(), "pf")
    assert str(caught.value) == "nat must be nft, iptables, none or sni, not 'pf'"
    assert relay.takeover_command() in relay.authorized_keys(spec())


@pytest.mark.parametrize(("line", "rendered"), [
    ("ssh-ed25519 AAAAC3Nz", "ssh-ed25519 AAAAC3Nz"),                                # no comment: no trailing space
    ("  ssh-ed25519 AAAAC3Nz tunnel laptop.test \n", "ssh-ed25519 AAAAC3Nz tunnel laptop.test"),
    ("ssh-ed25519 AAAAC3Nz one\ntwo", "ssh-ed25519 AAAAC3Nz one two"),              # a comment stays one line
])
def test_key_lines_are_copied_as_one_clean_line(line, rendered):
    keys = relay.authorized_keys(relay.RelaySpec(domain="laptop.test", user="u", tunnel_key=line, takeover_key=TKO))
    tunnel_line = keys.splitlines()[[i for i, k in enumerate(keys.splitlines()) if "AAAAC3Nz" in k][0]]
    assert tunnel_line.endswith(" " + rendered)


def test_a_long_bad_key_line_is_quoted_up_to_40_characters():
    with pytest.raises(ValueError) as caught:
        relay.authorized_keys(relay.RelaySpec(domain="laptop.test", user="u", tunnel_key="x" * 60, takeover_key=TKO))
    assert str(caught.value) == f"not an OpenSSH public key line: {'x' * 40!r}"


def test_localhost_listen_is_dnatted_to_127_0_0_1_and_nft_is_the_default():
    s = spec(listen_host="localhost")
    assert "dnat to 127.0.0.1:44353" in relay.nftables_rules(s) and "localhost:44353" not in relay.nftables_rules(s)
    assert "127.0.0.1:44353" in relay.nginx_stream(s) and "127.0.0.1:8053" in relay.nginx_http_vhost(s)
    assert relay.setup_script(spec()) == relay.setup_script(spec(), "nft")
    assert relay.bundle(spec()) == relay.bundle(spec(), "nft")


# --- SSH on 443 (sslh) ---------------------------------------------------------------------------------

def test_ssh_on_443_moves_public_443_from_dnat_to_sslh():
    """--ssh-on-443: no DNAT for 443 (sslh owns it), 80 still DNATed; sslh sends SSH to the relay's sshd
    and TLS for the domain only to the https forward; the bundle gains sslh.cfg and setup.sh installs it."""
    s = spec(ssh_on_443=True, sshd_port=2222)
    nft, ipt = relay.nftables_rules(s), relay.iptables_rules(s)
    assert "dport 443" not in nft and "dport 80 dnat to 127.0.0.1:8053" in nft
    assert "--dport 443" not in ipt and "--dport 80 -j DNAT" in ipt
    assert "dport 443 dnat" in relay.nftables_rules(spec())          # the plain variant is unchanged
    cfg = relay.sslh_config(s)
    assert '{ name: "ssh"; service: "ssh"; host: "127.0.0.1"; port: "2222"; }' in cfg
    assert '{ name: "tls"; host: "127.0.0.1"; port: "44353"; sni_hostnames: [ "laptop.test" ]; }' in cfg
    assert 'port: "443"' in cfg and "transparent: false;" in cfg
    assert relay.bundle(s)["sslh.cfg"] == cfg and "sslh.cfg" not in relay.bundle(spec())
    script = relay.setup_script(s)
    assert cfg in script and "apt install sslh" in script
    out = subprocess.run(["sh", "-n"], input=script, text=True, capture_output=True)
    assert out.returncode == 0, out.stderr


def test_sslh_config_is_accepted_by_sslh(tmp_path):
    """The real sslh (Debian's 1.20) parses the rendered file: -F<file> -V reads the configuration and prints
    the version without binding; a syntax error exits 1 (checked, so this test can fail)."""
    sslh = _need("sslh")
    (tmp_path / "sslh.cfg").write_text(relay.sslh_config(spec(ssh_on_443=True)))
    out = subprocess.run([sslh, f"-F{tmp_path / 'sslh.cfg'}", "-V"], capture_output=True, text=True, timeout=10)
    assert out.returncode == 0 and "sslh" in (out.stdout + out.stderr), out
    (tmp_path / "bad.cfg").write_text(relay.sslh_config(spec(ssh_on_443=True)).replace("protocols:", "protocols"))
    bad = subprocess.run([sslh, f"-F{tmp_path / 'bad.cfg'}", "-V"], capture_output=True, text=True, timeout=10)
    assert bad.returncode != 0, bad


def test_relay_setup_ssh_on_443_sets_the_fallback_port(instance, tmp_path):
    from inverse_cloud.cli import main
    from inverse_cloud.config import load

    Path(instance).write_text(Path(instance).read_text().replace('host = ""', 'host = "relay.example"'))
    out = tmp_path / "bundle"
    assert main(["relay-setup", "--config", str(instance), "--output", str(out), "--no-pin", "--ssh-on-443"]) == 0
    assert (out / "sslh.cfg").exists() and "dport 443" not in (out / "nftables.conf").read_text()
    assert main(["relay-setup", "--config", str(instance), "--adopt", str(out)]) == 0   # once setup.sh ran there
    assert load(Path(instance)).relay.fallback_port == 443


def test_proxy_protocol_variant_sends_the_header_to_both_upstreams():
    stream = relay.nginx_stream(spec(proxy_protocol=True))
    assert "        proxy_protocol on;\n" in stream
    assert "listen 127.0.0.1:8443 ssl proxy_protocol;" in stream and "real_ip_header proxy_protocol;" in stream
    assert "proxy_protocol on;" not in relay.nginx_stream(spec())


def test_relay_setup_proxy_protocol_needs_nat_none_and_sets_the_option(instance, tmp_path, capsys):
    from inverse_cloud.cli import main
    from inverse_cloud.config import load

    Path(instance).write_text(Path(instance).read_text().replace('host = ""', 'host = "relay.example"'))
    out = tmp_path / "bundle"
    assert main(["relay-setup", "--config", str(instance), "--output", str(out), "--no-pin", "--proxy-protocol"]) == 2
    assert "--proxy-protocol needs --nat none (nginx) or --ssh-on-443" in capsys.readouterr().err
    assert not load(Path(instance)).relay.proxy_protocol
    assert main(["relay-setup", "--config", str(instance), "--output", str(out), "--no-pin", "--nat", "none",
                 "--proxy-protocol"]) == 0
    assert "proxy_protocol on;" in (out / "nginx-stream.conf").read_text()
    assert main(["relay-setup", "--config", str(instance), "--adopt", str(out)]) == 0   # once setup.sh ran there
    assert load(Path(instance)).relay.proxy_protocol


def _sslh_start(tmp_path: Path, systemctl_rc: int, sslh_body: str) -> subprocess.CompletedProcess[str]:
    """The tail of setup.sh's sslh part (after sslh.cfg is written) with a fake ``systemctl`` exiting
    ``systemctl_rc`` and a fake ``sslh`` running ``sslh_body``; /run paths moved into ``tmp_path``."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, body in (("systemctl", f"exit {systemctl_rc}"), ("sslh", sslh_body)):
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / name).chmod(0o755)
    script = relay.sslh_setup(spec(ssh_on_443=True)).split("/etc/default/sslh\nfi\n", 1)[1]
    script = script.replace("/run/", f"{tmp_path}/run-")
    return subprocess.run(["sh", "-ec", script], env={"PATH": f"{bin_dir}:/usr/bin:/bin"}, capture_output=True,
                          text=True, timeout=30, check=False)


def test_sslh_is_started_by_setup_sh_where_no_systemd_runs(tmp_path):
    """setup.sh on a relay without a running systemd (systemctl restart fails): it starts sslh itself, with
    /etc/sslh.cfg and a pid file, its descriptors not the ssh session's. A rerun stops the sslh it started
    before (by that pid file) and starts it again. sslh refusing to start: its own line and one line of ours,
    exit 1. With systemd running, systemctl restarts it and setup.sh starts nothing."""
    args, pidfile = tmp_path / "args", tmp_path / "run-sslh.pid"
    # like sslh, the "daemon" keeps the descriptors it was started with: a run that left them on the
    # script's stdout/stderr would not end (subprocess.run waits for them to close)
    daemon = f'echo "$@" >> {args}; sleep 300 & echo $! > {pidfile}'
    started: list[int] = []
    try:
        out = _sslh_start(tmp_path, 1, daemon)
        assert out.returncode == 0, out.stderr
        assert args.read_text() == f"-F/etc/sslh.cfg --pidfile {pidfile}\n"
        first = int(pidfile.read_text())
        started.append(first)
        out = _sslh_start(tmp_path, 1, daemon)
        assert out.returncode == 0, out.stderr
        started.append(int(pidfile.read_text()))
        assert len(args.read_text().splitlines()) == 2
        wait_until(lambda: _is_gone(first), 10, "the first sslh stopped by the rerun")
        out = _sslh_start(tmp_path, 1, "echo '0.0.0.0:443:bind: Address already in use' >&2; exit 1")
        assert out.returncode == 1
        assert out.stderr.splitlines() == ["0.0.0.0:443:bind: Address already in use",
                                           "sslh did not start (no systemd here to start it): see the line above"]
        args.unlink()
        out = _sslh_start(tmp_path, 0, daemon)
        assert out.returncode == 0 and not args.exists(), out.stderr
    finally:
        for pid in started:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _is_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    # a zombie (its parent, the script's shell, is gone; whoever reaps it has not yet) has ended too
    return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1].startswith("Z")


def test_sslh_with_proxy_protocol_sends_v2_and_refuses_sslh_1(tmp_path):
    """--ssh-on-443 --proxy-protocol: the tls entry gets proxyprotocol: 2; setup.sh refuses an sslh 1.x
    (Debian 12's 1.20 parses the setting and silently ignores it: every phone would then be closed)."""
    s = spec(ssh_on_443=True, proxy_protocol=True)
    cfg = relay.sslh_config(s)
    assert 'sni_hostnames: [ "laptop.test" ]; proxyprotocol: 2; }' in cfg
    assert "proxyprotocol" not in relay.sslh_config(spec(ssh_on_443=True)).split("protocols:")[1]
    script = relay.sslh_setup(s)
    fake = tmp_path / "sslh"
    fake.write_text("#!/bin/sh\necho 'sslh-fork 1.20-1+deb12u1'\n")
    fake.chmod(0o755)
    head = script.split("write_file")[0]
    out = subprocess.run(["sh", "-c", head], env={"PATH": f"{tmp_path}:/usr/bin:/bin"}, capture_output=True,
                         text=True)
    assert out.returncode == 1 and "too old to send PROXY headers" in out.stderr
    fake.write_text("#!/bin/sh\necho 'sslh-fork v2.2.1'\n")
    out = subprocess.run(["sh", "-c", head], env={"PATH": f"{tmp_path}:/usr/bin:/bin"}, capture_output=True,
                         text=True)
    assert out.returncode == 0, out.stderr


def test_ipv6_adds_a_v6_listener_to_sslh_and_nginx(tmp_path):
    """--ipv6: sslh and the nginx stream block also listen on [::]:443 (checked by the real sslh parser), and
    the nginx port-80 site on [::]:80 (an IPv6 ACME validation or redirect would otherwise meet no listener)."""
    cfg = relay.sslh_config(spec(ssh_on_443=True, ipv6=True))
    assert '{ host: "0.0.0.0"; port: "443"; },\n    { host: "::"; port: "443"; }\n);' in cfg
    assert '"::"' not in relay.sslh_config(spec(ssh_on_443=True))
    assert "listen [::]:443;" in relay.nginx_stream(spec(ipv6=True))
    assert "[::]" not in relay.nginx_stream(spec())
    assert "    listen 80;\n    listen [::]:80;\n" in relay.nginx_http_vhost(spec(ipv6=True))
    assert "[::]" not in relay.nginx_http_vhost(spec())
    d = tmp_path / "nginx"
    d.mkdir()
    (d / "nginx.conf").write_text(f"pid {d}/pid;\nerror_log {d}/err.log;\nevents {{}}\nhttp {{\n"
                                  f"{relay.nginx_http_vhost(spec(ipv6=True))}}}\n")
    check = subprocess.run([_need("nginx"), "-t", "-q", "-p", str(d), "-c", str(d / "nginx.conf")],
                           capture_output=True, text=True, timeout=30)
    assert check.returncode == 0, check.stderr
    (tmp_path / "v6.cfg").write_text(cfg)
    out = subprocess.run([_need("sslh"), f"-F{tmp_path / 'v6.cfg'}", "-V"], capture_output=True, text=True,
                         timeout=10)
    assert out.returncode == 0, out


def test_relay_setup_ipv6_with_dnat_adds_the_ip6_table_and_sets_listen_host6(instance, tmp_path, capsys):
    """--ipv6 with the default NAT (nft): the bundle permits the laptop's second pair of forwards on [::] (keys
    and Match block), nftables.conf gains the ip6 table (accepted by `nft -c`), and [relay] listen_host6 = "::"
    is set by --adopt; --nat iptables refuses (its rules are IPv4 only); --ssh-on-443 still gives sslh its [::]:443."""
    from inverse_cloud.cli import main

    Path(instance).write_text(Path(instance).read_text().replace('host = ""', 'host = "relay.example"'))
    out = tmp_path / "bundle"
    assert main(["relay-setup", "--config", str(instance), "--output", str(out), "--no-pin", "--ipv6",
                 "--nat", "iptables"]) == 2
    assert "--ipv6 with DNAT needs --nat nft" in capsys.readouterr().err
    assert main(["relay-setup", "--config", str(instance), "--output", str(out), "--no-pin", "--ipv6"]) == 0
    assert main(["relay-setup", "--config", str(instance), "--adopt", str(out)]) == 0   # once setup.sh ran there
    assert 'set [relay] listen_host6 = "::"' in capsys.readouterr().out
    assert loads(Path(instance).read_text()).relay.listen_host6 == "::"
    keys = (out / "authorized_keys").read_text()
    assert 'permitlisten="[::]:44353",permitlisten="[::]:8053"' in keys, keys
    assert "PermitListen 127.0.0.1:44353 127.0.0.1:8053 [::]:44353 [::]:8053\n" in \
        (out / "sshd_config.d" / "inverse-cloud.conf").read_text()
    nft = (out / "nftables.conf").read_text()
    assert "table ip6 inverse_cloud {" in nft and "tcp dport 443 redirect to :44353" in nft
    assert "publish no AAAA" not in nft and "publish the relay's AAAA record" in (out / "README.txt").read_text()
    check = subprocess.run(["unshare", "-n", _need("nft"), "-c", "-f", str(out / "nftables.conf")],
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    assert main(["relay-setup", "--config", str(instance), "--output", str(out), "--no-pin", "--ipv6",
                 "--ssh-on-443"]) == 0
    assert '"::"' in (out / "sslh.cfg").read_text()
    nft = (out / "nftables.conf").read_text()
    assert "dport 443" not in nft.split("table ip6")[1] and "tcp dport 80 redirect to :8053" in nft


def test_ip6_rules_drop_what_was_not_mapped_and_load(tmp_path):
    """The ip6 table keeps the loopback rule's intent for forwards that listen on a public address: from outside,
    only connections it redirected reach the forwarded ports. A specific listen_host6 is a DNAT, "::" a
    redirect; both load with `nft -c`."""
    for host6, action in (("::", "redirect to :44353"), ("2001:db8::10", "dnat to [2001:db8::10]:44353")):
        rules = relay.nftables_rules(spec(listen_host6=host6))
        v6 = rules.split("table ip6 inverse_cloud {")[1]
        assert f"fib daddr type local tcp dport 443 {action}" in v6
        assert 'iif != "lo" tcp dport { 44353, 8053 } ct status & dnat == 0 drop' in v6
        # the relay itself reaching its own public [v6]:443/80 (OUTPUT): mapped too, but not ::1's own ports
        output = v6.split("chain output {")[1].split("}")[0]
        assert f"fib daddr type local ip6 daddr != ::1 tcp dport 443 {action}" in output, output
        assert f"fib daddr type local ip6 daddr != ::1 tcp dport 80 {action.replace('44353', '8053')}" in output
        (tmp_path / "r.nft").write_text(rules)
        out = subprocess.run(["unshare", "-n", _need("nft"), "-c", "-f", str(tmp_path / "r.nft")],
                             capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
    assert "ip6" not in relay.nftables_rules(spec())


def test_ip6_table_maps_443_unless_sslh_owns_it():
    """nftables6_rules maps public [v6]:443 by default, in PREROUTING and OUTPUT; with map_443=False (sslh on
    443) only port 80 is mapped, in both chains."""
    from inverse_cloud.tunnel.relay_nat6 import nftables6_rules

    both = nftables6_rules("d.example", "::", 44353, 8053)
    assert both.count("tcp dport 443 redirect to :44353") == 2 and both.count("tcp dport 80 redirect to :8053") == 2
    only80 = nftables6_rules("d.example", "::", 44353, 8053, map_443=False)
    assert "dport 443" not in only80 and only80.count("tcp dport 80 redirect to :8053") == 2


def test_ip6_permits_pass_sshd_t(tmp_path):
    """The Match block with [::] listens is accepted by the real `sshd -t`, and sshd -T shows the v6 permit."""
    sshd = _need("sshd")
    cfg = tmp_path / "sshd_config"
    hk = tmp_path / "hk"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(hk)], check=True)
    cfg.write_text(f"HostKey {hk}\nPidFile none\n" + relay.sshd_dropin(spec(listen_host6="::")))
    check = subprocess.run([sshd, "-t", "-f", str(cfg)], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    eff = subprocess.run([sshd, "-T", "-f", str(cfg), "-C", "user=ictunnel,host=x,addr=127.0.0.1"],
                         capture_output=True, text=True, check=True).stdout
    assert "[::]:44353" in eff or ":::44353" in eff, [ln for ln in eff.splitlines() if "permitlisten" in ln]


def _with_relay(instance: Path, user: str) -> Path:
    text = Path(instance).read_text().replace('host = ""', 'host = "relay.example"')
    text = set_config_value(text, "relay", "user", f'"{user}"')
    Path(instance).write_text(text)
    return Path(instance)


@pytest.mark.parametrize(("user", "apply", "fragment"), [
    ("root", None, "[relay] user is root: setup.sh would wipe root's password and leave it only the tunnel key; "
                   "the tunnel needs an account of its own, e.g. inverse-cloud (root belongs in --apply root@RELAY)"),
    ("root", "root@relay.example", "[relay] user is root"),
    ("admin", "admin@relay.example:2222", "[relay] user admin is the admin given to --apply: setup.sh would lock "
                                          "that login to the tunnel key; use an account of its own for the tunnel, "
                                          "e.g. inverse-cloud"),
])
def test_relay_setup_refuses_root_or_the_admin_as_tunnel_login(instance, tmp_path, capsys, user, apply, fragment):
    """The tunnel login is never root or the --apply admin: setup.sh would wipe its password and shell and
    leave it only the tunnel key. relay-setup says why in one line and renders and runs nothing."""
    from inverse_cloud.cli import main

    cfg = _with_relay(instance, user)
    out = tmp_path / "bundle"
    args = ["relay-setup", "--config", str(cfg), "--no-pin", "--output", str(out)]
    if apply:
        args += ["--apply", apply]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and fragment in err and "inverse-cloud" in err, err
    assert not out.exists()


def test_ssh_on_443_makes_sslh_transparent_with_the_reply_routing(instance, tmp_path):
    """--ssh-on-443 (nft): sslh.cfg says transparent: true; nat.nft marks only the replies its targets send from
    127.0.0.0/8 on sshd's and the https forward's ports (so sshd's direct connections are untouched) and loads
    with `nft -c`; the loader adds the policy route the mark selects, which boot runs again. With --proxy-protocol
    sslh stays non-transparent and nothing is marked."""
    from inverse_cloud.cli import main

    Path(instance).write_text(Path(instance).read_text().replace('host = ""', 'host = "relay.example"'))
    out = tmp_path / "bundle"
    assert main(["relay-setup", "--config", str(instance), "--output", str(out), "--no-pin", "--ssh-on-443"]) == 0
    assert "transparent: true;" in (out / "sslh.cfg").read_text()
    nft = (out / "nftables.conf").read_text()
    assert "ip saddr 127.0.0.0/8 ip daddr != 127.0.0.0/8 tcp sport { 22, 44353 } meta mark set 0x1c" in nft, nft
    check = subprocess.run(["unshare", "-n", _need("nft"), "-c", "-f", str(out / "nftables.conf")],
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    setup = (out / "setup.sh").read_text()
    assert "ip rule add fwmark 0x1c lookup 1443" in setup and "ip route replace local 0.0.0.0/0 dev lo table 1443" \
        in setup
    assert "ip -6" not in setup and "getent ahosts localhost" not in setup
    assert main(["relay-setup", "--config", str(instance), "--output", str(out), "--no-pin", "--ssh-on-443",
                 "--proxy-protocol"]) == 0
    assert "transparent: false;" in (out / "sslh.cfg").read_text()
    assert "mark set" not in (out / "nftables.conf").read_text()


def test_ssh_on_443_with_ipv6_keeps_sslh_transparent_for_both_families(instance, tmp_path):
    """--ssh-on-443 --ipv6 (nft): sslh stays transparent, its targets are localhost (sslh 1.20 connects a client
    only to a target of its own family: 127.0.0.1 for IPv4, ::1 for IPv6); the ip6 table marks the replies from
    ::1 on sshd's and the https forward's ports, nft -c accepts both tables; the loader adds the ip -6 rule and
    route too; setup.sh refuses a relay whose localhost lacks one family (checked with a stand-in getent). A
    listen_host6 other than "::" (sslh could not reach it as localhost) keeps sslh non-transparent. Before,
    --ipv6 always turned transparent mode off (IPv6 phones were seen as 127.0.0.1)."""
    from inverse_cloud.cli import main

    Path(instance).write_text(Path(instance).read_text().replace('host = ""', 'host = "relay.example"'))
    out = tmp_path / "bundle"
    assert main(["relay-setup", "--config", str(instance), "--output", str(out), "--no-pin", "--ssh-on-443",
                 "--ipv6"]) == 0
    cfg = (out / "sslh.cfg").read_text()
    assert "transparent: true;" in cfg
    assert '{ name: "ssh"; service: "ssh"; host: "localhost"; port: "22"; }' in cfg
    assert 'name: "tls"; host: "localhost"; port: "44353";' in cfg
    nft = (out / "nftables.conf").read_text()
    assert "ip saddr 127.0.0.0/8 ip daddr != 127.0.0.0/8 tcp sport { 22, 44353 } meta mark set 0x1c" in nft, nft
    v6 = nft.split("table ip6 inverse_cloud {", 1)[1]
    assert "ip6 saddr ::1 ip6 daddr != ::1 tcp sport { 22, 44353 } meta mark set 0x1c" in v6, nft
    check = subprocess.run(["unshare", "-n", _need("nft"), "-c", "-f", str(out / "nftables.conf")],
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    setup = (out / "setup.sh").read_text()
    loader = setup.split("nft -f /etc/inverse-cloud/nat.nft\n", 1)[1].split("INVERSE_CLOUD_EOF", 1)[0]
    assert "ip rule add fwmark 0x1c lookup 1443\n" in loader and "ip -6 rule add fwmark 0x1c lookup 1443\n" in loader
    assert "ip -6 route replace local ::/0 dev lo table 1443\n" in loader
    assert setup.index("getent ahosts localhost") < setup.index("useradd")     # before anything changes
    check_text = setup[setup.index("case \"$(getent ahosts localhost"):]
    check_text = check_text[:check_text.index("esac\n") + 5]
    for answer, code in (("127.0.0.1 STREAM localhost", 1), ("::1 STREAM localhost", 1),
                         ("::1 STREAM localhost\n127.0.0.1 STREAM", 0), ("127.0.0.1 STREAM localhost\n::1 STREAM", 0)):
        (tmp_path / "getent").write_text(f"#!/bin/sh\nprintf '%s\\n' '{answer}'\n")
        (tmp_path / "getent").chmod(0o755)
        ran = subprocess.run(["sh", "-c", check_text], env={"PATH": f"{tmp_path}:/usr/bin:/bin"},
                             capture_output=True, text=True)
        assert ran.returncode == code, (answer, ran)
        assert ("must resolve to both 127.0.0.1 and ::1" in ran.stderr) == (code == 1), ran.stderr
    assert main(["relay-setup", "--config", str(instance), "--adopt", str(out)]) == 0     # as after setup.sh ran
    assert 'listen_host6 = "::"' in Path(instance).read_text()
    Path(instance).write_text(Path(instance).read_text().replace('listen_host6 = "::"', 'listen_host6 = "2001:db8::7"'))
    assert main(["relay-setup", "--config", str(instance), "--output", str(out), "--no-pin", "--ssh-on-443",
                 "--ipv6"]) == 0
    assert "transparent: false;" in (out / "sslh.cfg").read_text()
    assert "mark set" not in (out / "nftables.conf").read_text()
    assert 'host: "127.0.0.1"; port: "22"' in (out / "sslh.cfg").read_text()


def test_sslh_reaches_a_forward_bound_on_an_ipv6_loopback():
    """[relay] listen_host = "::1": sslh's tls target is host "::1", port 44353 (the port is what follows the
    last colon of the forward's address)."""
    cfg = relay.sslh_config(spec(ssh_on_443=True, listen_host="::1"))
    assert '{ name: "tls"; host: "::1"; port: "44353";' in cfg, cfg


def test_divert_routes_are_ipv4_only_unless_asked():
    """divert_routes() without ipv6 gives only the IPv4 rule and route (a relay with no IPv6 route table must
    not get `ip -6` lines that fail at boot); with ipv6 the IPv6 twin follows."""
    from inverse_cloud.tunnel.relay_divert import divert_routes

    v4 = divert_routes()
    assert "ip -6" not in v4 and v4.count("ip rule add fwmark 0x1c lookup 1443\n") == 1
    assert divert_routes(ipv6=True).startswith(v4) and "ip -6 route replace local ::/0 dev lo table 1443\n" in \
        divert_routes(ipv6=True)
