"""relay.py rendering (pure) and relay-setup's host-key pinning; every generated sshd config passes the
real `sshd -t`, the nftables rules `nft -c` and the iptables rules `iptables-restore --test` (both in a
network namespace of their own), setup.sh `sh -n`."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from inverse_cloud.config import loads
from inverse_cloud.errors import HostKeyMismatch
from inverse_cloud.tunnel import relay_files as relay
from inverse_cloud.tunnel.commands import pin_host_key, set_config_value

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

    text = Path(instance).read_text().replace('host = ""', 'host = "relay.example"')
    Path(instance).write_text(text)
    out = tmp_path / "bundle"
    assert main(["relay-setup", "--config", str(instance), "--output", str(out), "--no-pin"]) == 0
    names = {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()}
    assert names == set(relay.bundle(spec()).keys())
    assert os.access(out / "setup.sh", os.X_OK)
    keys = (out / "authorized_keys").read_text()
    assert (Path(instance).parent / "data" / "ssh" / "id_ed25519.pub").read_text().split()[1] in keys


def _with_relay(instance: Path, user: str) -> Path:
    text = Path(instance).read_text().replace('host = ""', 'host = "relay.example"')
    text = set_config_value(text, "relay", "user", f'"{user}"')
    Path(instance).write_text(text)
    return Path(instance)


@pytest.mark.parametrize(("user", "apply", "fragment"), [
    ("root", None, "[relay] user is root"),
    ("root", "root@relay.example", "[relay] user is root"),
    ("admin", "admin@relay.example:2222", "is the admin given to --apply"),
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
