"""The nginx SNI-router variant with PROXY protocol (`relay-setup --nat none --proxy-protocol`): real nginx
with the rendered nginx-stream.conf in front of the real tunnel and an existing HTTPS site configured as the
file's comment says (listen ... ssl proxy_protocol; real_ip_header proxy_protocol). A phone connecting from
127.0.0.2 is seen as 127.0.0.2 by both the laptop and the existing site, not as nginx's 127.0.0.1."""

from __future__ import annotations

import os
import subprocess
import sys

from relay_sshd import TEST_USER, configure, relay_sshd, sshd_available

from tests.support import ServeProcess, free_port, init_instance, wait_until

NGINX = "/usr/sbin/nginx"
STREAM_MODULE = "/usr/lib/nginx/modules/ngx_stream_module.so"
PHONE = "127.0.0.2"


def curl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["curl", "-s", "--max-time", "10", "--interface", PHONE, *args], capture_output=True,
                          text=True, timeout=30)


def test_proxy_protocol_gives_laptop_and_site_the_phone_address(tmp_path):
    """1. relay-setup --nat none --proxy-protocol renders nginx-stream.conf with `proxy_protocol on;` and
       sets [relay] proxy_protocol = true. 2. nginx (stream + an existing site reading the header) and the
       tunnel up. 3. A phone from 127.0.0.2: PROXY header -> the laptop's failed-login line names 127.0.0.2
       and a PROPFIND works (207 content); the existing site's $remote_addr is 127.0.0.2. 4. A client that
       reaches the forwarded port around nginx (no header) is closed without an answer."""
    assert sshd_available() is None, sshd_available()
    assert os.path.exists(NGINX) and os.path.exists(STREAM_MODULE), "apt-get install nginx libnginx-mod-stream"
    cfg = init_instance(tmp_path / "ic", relay=f"{TEST_USER}@127.0.0.1:{free_port()}")
    configure(cfg, "relay", keepalive_interval_s=2)
    p443, other = free_port(), free_port()
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                    "-subj", "/CN=other.test", "-days", "1", "-keyout", str(tmp_path / "o.key"), "-out",
                    str(tmp_path / "o.crt")], check=True, capture_output=True)
    nginx: subprocess.Popen[bytes] | None = None
    try:
        with relay_sshd(cfg) as relay:
            bundle = tmp_path / "bundle-pp"
            out = subprocess.run([sys.executable, "-m", "inverse_cloud.cli", "relay-setup", "--config", str(cfg),
                                  "--output", str(bundle), "--no-pin", "--nat", "none", "--proxy-protocol"],
                                 capture_output=True, text=True, timeout=60)
            assert out.returncode == 0, out.stderr
            assert "proxy_protocol = true" not in cfg.read_text()   # not before the relay carries its side
            out = subprocess.run([sys.executable, "-m", "inverse_cloud.cli", "relay-setup", "--config", str(cfg),
                                  "--adopt", str(bundle)], capture_output=True, text=True, timeout=60)
            assert out.returncode == 0, out.stderr   # nginx below is started before serve: adopt now
            assert "proxy_protocol = true" in cfg.read_text()
            stream = (bundle / "nginx-stream.conf").read_text()
            assert "proxy_protocol on;" in stream
            stream = stream.replace("listen 443;", f"listen 127.0.0.1:{p443};").replace(
                "default 127.0.0.1:8443;", f"default 127.0.0.1:{other};")
            d = tmp_path / "nginx"
            d.mkdir()
            site = (f"server {{\n listen 127.0.0.1:{other} ssl proxy_protocol;\n server_name other.test;\n"
                    f" ssl_certificate {tmp_path}/o.crt;\n ssl_certificate_key {tmp_path}/o.key;\n"
                    " set_real_ip_from 127.0.0.1;\n real_ip_header proxy_protocol;\n"
                    " location / { return 200 \"addr=$remote_addr\\n\"; }\n}\n")
            conf = d / "nginx.conf"
            conf.write_text(f"load_module {STREAM_MODULE};\nuser root;\nworker_processes 1;\npid {d}/nginx.pid;\n"
                            f"error_log {d}/error.log warn;\nevents {{ worker_connections 64; }}\n{stream}\n"
                            f"http {{\n access_log off;\n client_body_temp_path {d}/body;\n proxy_temp_path {d}/proxy;"
                            f"\n{site}\n}}\n")
            check = subprocess.run([NGINX, "-t", "-c", str(conf)], capture_output=True, text=True)
            assert check.returncode == 0, check.stderr
            nginx = subprocess.Popen([NGINX, "-c", str(conf), "-g", "daemon off;"], stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            with ServeProcess(cfg) as srv:
                relay.wait_forwards(30, on_timeout=srv.log)
                resolve_other = ("--resolve", f"other.test:{p443}:127.0.0.1")
                site_addr = lambda: curl("-k", *resolve_other, f"https://other.test:{p443}/").stdout  # noqa: E731
                wait_until(lambda: site_addr() == f"addr={PHONE}\n", 15, "nginx up and the site seeing the phone")
                resolve = ("--resolve", f"laptop.test:{p443}:127.0.0.1")
                bad = curl("-k", *resolve, "-u", "alice:wrong", "-o", "/dev/null", "-w", "%{http_code}",
                           "-X", "PROPFIND", f"https://laptop.test:{p443}/radicale/alice/")
                assert bad.stdout == "401", bad
                wait_until(lambda: PHONE in srv.log(), 10, "the phone's address in the laptop's log",
                           on_timeout=srv.log)
                dav = curl("-k", *resolve, "-u", "alice:correct horse", "-X", "PROPFIND", "-H", "Depth: 1",
                           f"https://laptop.test:{p443}/radicale/alice/")
                assert "/radicale/alice/contacts/" in dav.stdout, dav
                around = curl("-k", "--resolve", f"laptop.test:{relay.https_port}:127.0.0.1", "-o", "/dev/null",
                              "-w", "%{http_code}", f"https://laptop.test:{relay.https_port}/radicale/")
                assert around.stdout == "000" and around.returncode != 0, around
                failed = [line for line in srv.log().splitlines() if "401" in line or "failed login" in line.lower()]
                assert failed and all("127.0.0.1 " not in line for line in failed), failed
    finally:
        if nginx is not None and nginx.poll() is None:
            nginx.terminate()
            nginx.wait(10)
