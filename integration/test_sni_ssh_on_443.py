"""Several laptops on one relay AND SSH on 443 (`relay-setup --nat sni --ssh-on-443`): the relay's public 443 is
the real nginx `stream` router the bundle renders (ssl_preread, no TLS termination), in a private network
namespace with a real sshd. A connection whose first bytes are no TLS ClientHello (the laptop's SSH client)
goes to sshd, with the PROXY header taken off; TLS goes by server name to the laptop's forward, with it. The
laptop, in a network namespace of its own whose nftables drop outbound SSH to the relay's sshd port, brings
its tunnel up over 443 by itself, and a phone syncs through the same 443."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from dav_helpers import selfsigned_cert
from netns import LaptopNetns
from relay_sandbox import private_netns
from relay_sshd import configure, relay_sshd, sshd_available

from inverse_cloud.tunnel import relay_sni
from tests.support import ServeProcess, free_port, init_instance, wait_until

RELAY, LAPTOP = "10.99.44.1", "10.99.44.2"
USER = "s4tunnel"        # its own tunnel user: the takeover ends every other session of the user machine-wide
PASSWORD = "correct horse"
NGINX = "/usr/sbin/nginx"
STREAM_MODULE = "/usr/lib/nginx/modules/ngx_stream_module.so"


def _run(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    out = subprocess.run(list(args), input=stdin, capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0, f"{' '.join(args)}: {out.stdout}{out.stderr}"
    return out


def cli(cfg: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return _run(sys.executable, "-m", "inverse_cloud.cli", *args[:1], "--config", str(cfg), *args[1:])


@contextlib.contextmanager
def s4_laptop() -> Iterator[LaptopNetns]:
    """The laptop's namespace and veth pair (names prefixed s4), deleted on exit."""
    ns = LaptopNetns(name=f"s4-laptop-{os.getpid()}-{secrets.token_hex(3)}", relay_address=RELAY, address=LAPTOP,
                     relay_if="s4relay0", laptop_if="s4laptop0")
    try:
        ns.create()
        yield ns
    finally:
        if os.path.exists(ns.path):
            ns.delete()


@contextlib.contextmanager
def sni_router(bundle: Path, work: Path, sshd_port: int, https_at: str, http_at: str) -> Iterator[Path]:
    """The relay's nginx as setup.sh leaves it for this laptop: the bundle's shared frame, the laptop's record
    pieces (ic_write_site, as setup.sh runs it) and the SSH route, in private folders instead of /etc and /run
    (their paths replaced, nothing else). Started in the foreground; stopped by its pid. Yields the error log."""
    sites, ssh, run = work / "sites", work / "ssh-route", work / "run"
    for d in (sites, ssh, run):
        d.mkdir(parents=True)
    _run("sh", "-c", "set -eu\nwrite_file() { cat > \"$1\"; }\n" f"SITES={sites}\n" + relay_sni.write_site_function()
         + f"ic_write_site {USER} laptop.test {https_at} {http_at} 1\n")
    for name, text in relay_sni.ssh_route(sshd_port).items():
        (ssh / name).write_text(text)
    assert f"proxy_pass 127.0.0.1:{sshd_port};" in (bundle / "nginx-sni-ssh.conf").read_text()

    def local(text: str) -> str:
        return (text.replace(relay_sni.SITES, str(sites)).replace(relay_sni.SSH_ROUTE, str(ssh))
                .replace(relay_sni.SOCKETS, str(run)))

    for f in [*sites.glob("*"), *ssh.glob("*")]:
        f.write_text(local(f.read_text()))
    log = work / "error.log"
    conf = work / "nginx.conf"
    conf.write_text(f"load_module {STREAM_MODULE};\nuser root;\nworker_processes 1;\npid {work}/nginx.pid;\n"
                    f"error_log {log} info;\nevents {{ worker_connections 64; }}\n"
                    + local((bundle / "nginx-sni-stream.conf").read_text())
                    + f"http {{\n access_log off;\n client_body_temp_path {work}/body;\n"
                    + f" proxy_temp_path {work}/proxy;\n"
                    + local((bundle / "nginx-sni-http.conf").read_text()) + "}\n")
    check = subprocess.run([NGINX, "-t", "-q", "-c", str(conf)], capture_output=True, text=True, timeout=30)
    assert check.returncode == 0, check.stderr
    proc = subprocess.Popen([NGINX, "-c", str(conf), "-g", "daemon off;"], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        def listening() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(f"nginx exited with {proc.returncode}: {log.read_text()}")
            return ":443 " in _run("ss", "-Hltn", "sport = :443").stdout
        wait_until(listening, 20, "nginx listening on 443")
        yield log
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


def propfind(cafile: Path, name: str = "laptop.test") -> subprocess.CompletedProcess[str]:
    """A phone on the relay's side: PROPFIND https://<name>/ at the relay's public 443, verified."""
    return subprocess.run(
        ["curl", "-s", "--max-time", "10", "--cacert", str(cafile), "--resolve", f"{name}:443:{RELAY}",
         "-u", f"alice:{PASSWORD}", "-X", "PROPFIND", "-H", "Depth: 1", f"https://{name}/radicale/alice/"],
        capture_output=True, text=True, timeout=30, check=False)


def status_doc(cfg: Path) -> dict:
    out = subprocess.run([sys.executable, "-m", "inverse_cloud.cli", "status", "--json", "--config", str(cfg)],
                         capture_output=True, text=True, timeout=30, check=False)
    return json.loads(out.stdout)


def reconnect_s(srv: ServeProcess, relay, cafile: Path) -> float:
    """Kill the relay-side session; seconds until the phone syncs again."""
    t0 = time.monotonic()
    assert relay.kill_session()
    wait_until(lambda: not relay.forwards_bound(), 20, "the killed session's forwards gone")
    wait_until(lambda: "/radicale/alice/contacts/" in propfind(cafile).stdout, 90,
               "the phone syncing after the reconnect", interval_s=0.1, on_timeout=lambda: srv.log()[-3000:])
    return time.monotonic() - t0


@pytest.mark.slow
def test_tunnel_over_the_sni_routers_443_when_outbound_ssh_is_dropped(tmp_path):
    """1. `relay-setup --nat sni --ssh-on-443 --output`: no sslh in the bundle; its laptop.toml asks for
       fallback_port = 443 and proxy_protocol = true, `--adopt` sets both. 2. The relay (private network
       namespace): real sshd on every address, real nginx with the rendered stream frame, this laptop's record
       and the SSH route, on 443. 3. The laptop namespace drops outbound TCP to the sshd port (nft table
       s4_block). 4. serve starts: the SSH port times out, the tunnel comes up on 443 through nginx (one line
       "SSH reaches the relay on the fallback port 443 (port N: timed out)"); `status` says fallback; sshd saw
       that session from 127.0.0.1 (the documented trade-off). 5. A phone PROPFINDs https://laptop.test/ at the
       relay's 443 -> its collections; the laptop's access log names the phone's address (the PROXY header
       came through), never 127.0.0.1; a name no laptop carries gets no TLS answer. 6. The relay session is
       killed: the tunnel comes back over 443 (printed: seconds to a working sync); then with the drop rule gone
       and serve restarted, over the SSH port (printed likewise)."""
    missing = sshd_available()
    assert missing is None, missing
    for tool in ("ip", "ss", "curl", "nft", "openssl"):
        assert shutil.which(tool), f"{tool} missing: apt-get install -y iproute2 curl nftables openssl"
    assert os.path.exists(NGINX) and os.path.exists(STREAM_MODULE), "apt-get install nginx libnginx-mod-stream"
    with private_netns(), s4_laptop() as laptop:
        sshd_port = free_port()
        cfg = init_instance(tmp_path / "ic", relay=f"{USER}@{RELAY}:{sshd_port}")
        configure(cfg, "relay", keepalive_interval_s=1, keepalive_count_max=3, connect_timeout_s=3)
        try:
            # sshd on every address, as a relay's: the laptop dials RELAY, nginx's SSH route 127.0.0.1
            with relay_sshd(cfg, user=USER, client_alive_interval=15, listen_address="0.0.0.0") as relay:  # noqa: S104
                bundle = tmp_path / "bundle-sni443"
                cli(cfg, "relay-setup", "--output", str(bundle), "--no-pin", "--nat", "sni", "--ssh-on-443")
                assert not (bundle / "sslh.cfg").exists()
                settings = (bundle / "laptop.toml").read_text()
                assert "fallback_port = 443" in settings and "proxy_protocol = true" in settings, settings
                cli(cfg, "relay-setup", "--adopt", str(bundle))   # the relay side is set up below, before serve
                assert "fallback_port = 443" in cfg.read_text()
                _run(*laptop.exec_prefix, "nft", "-f", "-", stdin=(
                    "table inet s4_block {\n chain out {\n  type filter hook output priority 0; policy accept;\n"
                    f"  ip daddr {RELAY} tcp dport {sshd_port} drop\n }}\n}}\n"))
                cafile = selfsigned_cert(cfg.parent)
                sshd_seen = len(relay.log())
                with sni_router(bundle, tmp_path / "nginx", sshd_port, f"127.0.0.1:{relay.https_port}",
                                f"127.0.0.1:{relay.http_port}") as nginx_log, \
                        ServeProcess(cfg, prefix=laptop.exec_prefix, ready_probe=laptop.tls_handshake_ok) as srv:
                    dump = lambda: (srv.log()[-4000:] + "\n--- sshd ---\n" + relay.log()[-2000:]  # noqa: E731
                                    + "\n--- nginx ---\n" + nginx_log.read_text()[-2000:])
                    t0 = time.monotonic()
                    relay.wait_forwards(90, on_timeout=dump)
                    first_up = time.monotonic() - t0
                    assert f"SSH reaches the relay on the fallback port 443 (port {sshd_port}: timed out)" \
                        in srv.log(), dump()
                    tunnel = status_doc(cfg)["tunnel"]
                    assert tunnel["state"] == "up" and tunnel["ssh_port"] == 443 and tunnel["fallback"] is True
                    sshd_log = relay.log()[sshd_seen:]
                    assert f"Accepted publickey for {USER} from 127.0.0.1 port" in sshd_log, sshd_log[-2000:]
                    assert f"from {LAPTOP}" not in sshd_log, sshd_log[-2000:]
                    seen = len(srv.log())
                    wait_until(lambda: "/radicale/alice/contacts/" in propfind(cafile).stdout, 60,
                               "the phone syncing over the router's 443", on_timeout=dump)
                    wait_until(lambda: RELAY in srv.log()[seen:], 20, "the phone's address in the access log",
                               on_timeout=dump)
                    dav = [line for line in srv.log()[seen:].splitlines() if "/radicale/" in line]
                    assert dav and not any("127.0.0.1" in line for line in dav), dav[-5:]
                    unknown = subprocess.run(["openssl", "s_client", "-connect", f"{RELAY}:443", "-servername",
                                              "other.test"], input="", capture_output=True, text=True, timeout=30)
                    assert "BEGIN CERTIFICATE" not in unknown.stdout, unknown.stdout
                    over_443 = reconnect_s(srv, relay, cafile)
                    assert "Traceback" not in srv.log()
                    _run(*laptop.exec_prefix, "nft", "delete", "table", "inet", "s4_block")
                    srv.stop()
                    srv.start()
                    relay.wait_forwards(60, on_timeout=dump)
                    wait_until(lambda: status_doc(cfg)["tunnel"].get("ssh_port") == sshd_port, 30,
                               "the tunnel on the SSH port again", on_timeout=dump)
                    over_22 = reconnect_s(srv, relay, cafile)
            print(f"\n[sni + ssh-on-443] first connect with port {sshd_port} dropped (connect_timeout_s 3, then "
                  f"443 through nginx): {first_up:.2f} s; reconnect after a killed session: over 443 "
                  f"{over_443:.2f} s, over the SSH port {over_22:.2f} s")
        finally:
            subprocess.run(["userdel", USER], capture_output=True, check=False)
