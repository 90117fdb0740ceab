"""Several laptops on one relay (``relay-setup --nat sni``): the relay-side check that refuses a clash with the
laptops a relay already carries, run as the generated sh against folders standing in for the relay's; the
shared nginx text; the command's refusals."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from inverse_cloud.tunnel import relay_files as relay
from inverse_cloud.tunnel import relay_sni

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIPdR/oJumYvxBj5EcrtzZ7CKnzQkJornglLlC0nU8PWb t"
FIRST = relay.RelaySpec(domain="contacts.example.org", user="inverse-cloud", tunnel_key=KEY, takeover_key=KEY)


def spec(**kw: object) -> relay.RelaySpec:
    base = {"domain": "family.example.org", "user": "inverse-cloud-2", "tunnel_key": KEY, "takeover_key": KEY,
            "https_port": 44354, "http_port": 8054}
    base.update(kw)
    return relay.RelaySpec(**base)  # type: ignore[arg-type]


def check(tmp: Path, s: relay.RelaySpec, mode: str) -> subprocess.CompletedProcess[str]:
    """The clash check of setup.sh for ``s``, against tmp/sites and tmp/dropins (the relay's folders)."""
    script = ("set -eu\n"
              f"U={s.user}\nDOMAIN={s.domain}\nHTTPS_AT={s.listen_host}:{s.https_port}\n"
              f"HTTP_AT={s.listen_host}:{s.http_port}\nSITES={tmp / 'sites'}\nDROPINS={tmp / 'dropins'}\n"
              + relay_sni.sites_check(mode) + "echo clear\n")
    (tmp / "sites").mkdir(exist_ok=True)
    (tmp / "dropins").mkdir(exist_ok=True)
    return subprocess.run(["sh", "-c", script], capture_output=True, text=True, timeout=30, check=False)


def legacy(tmp: Path, s: relay.RelaySpec) -> None:
    """A laptop set up before the shared router: only its sshd drop-in tells what it is."""
    (tmp / "dropins").mkdir(exist_ok=True)
    (tmp / "dropins" / f"inverse-cloud-{s.user}.conf").write_text(relay.sshd_dropin(s))


def refusal(out: subprocess.CompletedProcess[str]) -> str:
    assert out.returncode == 1 and "clear" not in out.stdout, out
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    return lines[0]


def test_an_empty_relay_and_a_rerun_of_the_same_laptop_are_clear(tmp_path):
    """No laptop yet: clear in every mode. The first laptop again (its own drop-in, same user and domain):
    clear, also with DNAT (relay-setup is idempotent)."""
    for mode in ("nft", "iptables", "none", "sni"):
        assert check(tmp_path, FIRST, mode).stdout == "clear\n"
    legacy(tmp_path, FIRST)
    for mode in ("nft", "sni"):
        assert check(tmp_path, FIRST, mode).stdout == "clear\n"


@pytest.mark.parametrize(("second", "mode", "fragment"), [
    # the second laptop kept init's default user: it would overwrite the first one's keys
    (spec(user="inverse-cloud"), "sni", "relay user inverse-cloud already carries contacts.example.org; give this "
                                        "laptop its own tunnel user: set [relay] user (e.g. inverse-cloud-2)"),
    # its own user, but init's default ports: the listens would collide on the relay
    (spec(https_port=44353, http_port=8053), "sni",
     "contacts.example.org (relay user inverse-cloud) forwards ports 44353 and 8053 on this relay, and this laptop "
     "asks for 44353 and 8053; set [relay] https_port = 44354 and http_port = 8054"),
    (spec(https_port=8053), "sni", "forwards ports 44353 and 8053"),
    (spec(domain="contacts.example.org"), "sni", "contacts.example.org is already carried by relay user "
                                                 "inverse-cloud"),
    # everything its own, but DNAT would take public 443/80 from the first laptop
    (spec(), "nft", "this relay already carries contacts.example.org (relay user inverse-cloud) on its public "
                    "443/80; a second laptop needs the shared router: run relay-setup --nat sni"),
    (spec(), "iptables", "run relay-setup --nat sni"),
    (spec(), "none", "run relay-setup --nat sni"),
])
def test_a_second_laptop_that_clashes_is_refused_with_one_line(tmp_path, second, mode, fragment):
    """The first laptop is known from its drop-in (a DNAT set-up). The second laptop's check refuses, with
    one line naming the clash and what to set, before setup.sh changes anything."""
    legacy(tmp_path, FIRST)
    assert fragment in refusal(check(tmp_path, second, mode))


def test_a_second_laptop_with_its_own_user_and_ports_joins_the_shared_router(tmp_path):
    """Own user, own domain, own ports, --nat sni: clear. With the first laptop's record in sites/ instead of
    only its drop-in, the same; a third laptop on the first's ports is told the next free pair."""
    legacy(tmp_path, FIRST)
    assert check(tmp_path, spec(), "sni").stdout == "clear\n"
    (tmp_path / "sites" / "inverse-cloud.site").write_text(
        "inverse-cloud contacts.example.org 127.0.0.1:44353 127.0.0.1:8053 0\n")
    (tmp_path / "sites" / "inverse-cloud-2.site").write_text(
        "inverse-cloud-2 family.example.org 127.0.0.1:44354 127.0.0.1:8054 1\n")
    assert check(tmp_path, spec(), "sni").stdout == "clear\n"
    third = spec(user="inverse-cloud-3", domain="third.example.org", https_port=44354, http_port=8060)
    assert "set [relay] https_port = 44355 and http_port = 8061" in refusal(check(tmp_path, third, "sni"))


def test_the_shared_router_routes_by_name_closes_unknown_names_and_sends_proxy_headers():
    """Public 443: ssl_preread (no termination), each laptop's name from its map file, a name no laptop carries
    to a socket nobody listens on, a PROXY header to every laptop. Port 80: each laptop's server_name."""
    stream = relay_sni.stream_frame()
    assert "ssl_preread on;" in stream and "proxy_protocol on;" in stream
    assert "        listen 443;\n        include /etc/inverse-cloud/listen6/stream*.conf;\n" in stream
    assert "include /etc/inverse-cloud/sites/*.map;" in stream
    assert "default unix:/run/inverse-cloud/unknown-name.sock;" in stream
    assert "ssl_certificate" not in stream
    assert "include /etc/inverse-cloud/sites/*.http;" in relay_sni.http_frame()
    files = relay.bundle(spec(proxy_protocol=True), "sni")
    assert "nftables.conf" not in files and "nginx-sni-stream.conf" in files
    script = files["setup.sh"]
    # the check comes before the account, keys or drop-in are touched
    assert script.index("CLASH=$(ic_sites | ic_clash)") < script.index("useradd")
    assert 'ic_write_site "$U" "$DOMAIN" "$HTTPS_AT" "$HTTP_AT" 1' in script
    assert "route_localnet = 1" not in script
    # without --ipv6 the relay-wide IPv6 listeners are left as another laptop's --ipv6 wrote them
    assert "    include /etc/inverse-cloud/listen6/http*.conf;\n" in script
    assert "write_file /etc/inverse-cloud/listen6/" not in script and "rm -f /etc/inverse-cloud/listen6" not in script


@pytest.mark.parametrize("ipv6", [False, True])
def test_generated_shared_router_is_accepted_by_nginx(tmp_path, ipv6):
    """The frame (with and without the relay-wide [::]:443 and [::]:80 listeners of --ipv6, which every laptop's
    port-80 site includes) plus the pieces ic_write_site writes for a laptop that reads PROXY headers and one
    migrated from DNAT (which does not), plus the SSH route of --ssh-on-443, pass `nginx -t` (which opens no
    listener), in a private prefix."""
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    assert Path(nginx).exists(), "nginx missing: apt-get install -y nginx-light libnginx-mod-stream"
    module = Path("/usr/lib/nginx/modules/ngx_stream_module.so")
    assert module.exists(), "apt-get install -y libnginx-mod-stream"
    sites = tmp_path / "sites"
    sites.mkdir()
    script = ("set -eu\n"
              "write_file() { cat > \"$1\"; }\n"
              f"SITES={sites}\n" + relay_sni.write_site_function()
              + "ic_write_site inverse-cloud contacts.example.org 127.0.0.1:44353 127.0.0.1:8053 0\n"
              "ic_write_site inverse-cloud-2 family.example.org 127.0.0.1:44354 127.0.0.1:8054 1\n")
    subprocess.run(["sh", "-c", script], check=True, timeout=30)
    assert (sites / "inverse-cloud.stream").exists() and not (sites / "inverse-cloud-2.stream").exists()
    assert (sites / "inverse-cloud-2.map").read_text() == "    family.example.org 127.0.0.1:44354;\n"
    run = tmp_path / "run"
    run.mkdir()
    ssh = tmp_path / "ssh-route"
    ssh.mkdir()
    for name, text in relay_sni.ssh_route(22).items():
        (ssh / name).write_text(text)
    listen6 = tmp_path / "listen6"
    listen6.mkdir()
    for name, text in (relay_sni.listen6().items() if ipv6 else ()):
        (listen6 / name).write_text(text)
    stream = relay_sni.stream_frame().replace(relay_sni.SITES, str(sites)).replace(
        relay_sni.SOCKETS, str(run)).replace(relay_sni.SSH_ROUTE, str(ssh)).replace(relay_sni.LISTEN6, str(listen6))
    http = relay_sni.http_frame().replace(relay_sni.SITES, str(sites))
    for f in [*sites.glob("*"), *ssh.glob("*")]:
        f.write_text(f.read_text().replace(relay_sni.SOCKETS, str(run)).replace(relay_sni.LISTEN6, str(listen6)))
    conf = tmp_path / "nginx.conf"
    conf.write_text(f"load_module {module};\npid {tmp_path / 'nginx.pid'};\nerror_log stderr;\n"
                    "events {}\n" + stream + f"http {{\naccess_log off;\n{http}}}\n")
    out = subprocess.run([nginx, "-t", "-q", "-p", str(tmp_path), "-c", str(conf)], capture_output=True, text=True,
                         timeout=30, check=False)
    assert out.returncode == 0, out.stderr


def test_relay_setup_nat_sni_sets_proxy_protocol_and_with_ssh_on_443_the_fallback_port(instance, tmp_path, capsys):
    """`--nat sni --ipv6`: setup.sh writes the relay-wide IPv6 listeners, [::]:443 for the shared router and
    [::]:80 for every laptop's port-80 site (a CA validating HTTP-01 over the AAAA record must reach the
    laptop's server name, not nginx's default site); --adopt of it sets [relay] proxy_protocol = true.
    `--nat sni --ssh-on-443` (no longer refused: nginx alone takes SSH on 443): the bundle carries the SSH
    route, no sslh, and its laptop.toml asks for fallback_port = 443 too; --adopt sets it."""
    from inverse_cloud.cli import main
    from inverse_cloud.config import load

    Path(instance).write_text(Path(instance).read_text().replace('host = ""', 'host = "relay.example"'))
    out = tmp_path / "bundle"
    base = ["relay-setup", "--config", str(instance), "--output", str(out), "--no-pin", "--nat", "sni"]
    assert main([*base, "--ipv6"]) == 0
    assert "listen [::]:443;\n" in (out / "nginx-sni-listen6.conf").read_text()
    assert "write_file /etc/inverse-cloud/listen6/http.conf 0644 <<'INVERSE_CLOUD_EOF'\nlisten [::]:80;\n" in \
        (out / "setup.sh").read_text()
    assert not load(Path(instance)).relay.proxy_protocol   # until setup.sh ran on the relay and --adopt
    assert main(["relay-setup", "--config", str(instance), "--adopt", str(out)]) == 0
    assert "set [relay] proxy_protocol = true" in capsys.readouterr().out
    assert load(Path(instance)).relay.proxy_protocol
    assert main([*base, "--proxy-protocol"]) == 0   # implied, and accepted when given
    both = tmp_path / "both"
    capsys.readouterr()
    assert main(["relay-setup", "--config", str(instance), "--output", str(both), "--no-pin", "--nat", "sni",
                 "--ssh-on-443"]) == 0, capsys.readouterr().err
    assert "sslh.cfg" not in {p.name for p in both.iterdir()}
    assert '"" unix:/run/inverse-cloud/ssh.sock;' in (both / "nginx-sni-ssh.conf").read_text()
    settings = (both / "laptop.toml").read_text()
    assert "fallback_port = 443" in settings and "proxy_protocol = true" in settings, settings
    assert load(Path(instance)).relay.fallback_port != 443
    assert main(["relay-setup", "--config", str(instance), "--adopt", str(both)]) == 0
    assert "set [relay] fallback_port = 443" in capsys.readouterr().out
    assert load(Path(instance)).relay.fallback_port == 443


def test_ssh_on_443_routes_what_is_not_tls_to_sshd_without_a_proxy_header():
    """--nat sni --ssh-on-443: the frame looks at $ssl_preread_protocol first: empty (the first bytes are no TLS
    ClientHello: an SSH client's "SSH-2.0-...") goes to an inner server that takes the PROXY header off and
    connects to the relay's own sshd; anything TLS keeps the routing by name. The route lives in files of its
    own, which setup.sh writes only with --ssh-on-443 (a later laptop without it leaves them alone)."""
    stream = relay_sni.stream_frame()
    assert "map $ssl_preread_protocol $inverse_cloud_upstream {" in stream
    assert f"include {relay_sni.SSH_ROUTE}/*.map;" in stream and f"include {relay_sni.SSH_ROUTE}/*.stream;" in stream
    assert "default $inverse_cloud_by_name;" in stream
    assert "map $ssl_preread_server_name $inverse_cloud_by_name {" in stream
    route = relay_sni.ssh_route(2222)
    assert route["protocol.map"] == '    "" unix:/run/inverse-cloud/ssh.sock;\n'
    inner = route["sshd.stream"]
    assert "listen unix:/run/inverse-cloud/ssh.sock proxy_protocol;" in inner
    assert "proxy_pass 127.0.0.1:2222;" in inner and "proxy_protocol on" not in inner
    with_ssh = relay.bundle(spec(proxy_protocol=True, ssh_on_443=True, sshd_port=2222), "sni")
    script = with_ssh["setup.sh"]
    assert f"{relay_sni.SSH_ROUTE}/protocol.map" in script and "proxy_pass 127.0.0.1:2222;" in script
    assert script.index(f"{relay_sni.SSH_ROUTE}/protocol.map") < script.index("nginx -t -q")
    assert "sslh" not in script.lower().replace("no sslh", "")
    assert "dport 443" not in script
    without = relay.bundle(spec(proxy_protocol=True), "sni")["setup.sh"]
    assert f"{relay_sni.SSH_ROUTE}/protocol.map" not in without
    assert f"mkdir -p \"$SITES\" {relay_sni.SSH_ROUTE}" in without
