"""The relay variant for a relay whose 80/443 already serve a web site: nginx with the `stream` + `ssl_preread`
block and the port-80 vhost that relay-setup renders (nginx-stream.conf, nginx-http.conf), in front of the
real tunnel. Only the listen ports and the existing site's address are substituted for loopback test ports.

Checks: the laptop's name is routed to the tunnel and the certificate the phone sees is the laptop's own
(no TLS termination on the relay); another name reaches the existing site; port 80 reaches our HTTP app;
with the laptop offline, 443 closes the connection and 80 closes it too -- never an HTTP error page.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from relay_sshd import TEST_USER, configure, relay_sshd, sshd_available

from tests.support import ServeProcess, free_port, init_instance, served_certificate_serial, wait_until

NGINX = "/usr/sbin/nginx"
STREAM_MODULE = "/usr/lib/nginx/modules/ngx_stream_module.so"


def curl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["curl", "-s", "--max-time", "10", *args], capture_output=True, text=True, timeout=30)


def test_nginx_sni_routing_variant(tmp_path):
    """nginx with the rendered nginx-stream.conf / nginx-http.conf in front of the tunnel (listen ports and the
    existing site's address moved to loopback test ports). Expected: laptop.test on 443 reaches our DAV (a
    PROPFIND lists alice's address book) with the laptop's own certificate (same serial as the laptop's
    listener: no TLS termination on the relay); other.test reaches the existing site; port 80 answers our
    308; once the laptop is gone (forwards released), 443 fails without an HTTP answer and 80 closes with an
    empty reply (curl exit 52), never an nginx error page."""
    assert sshd_available() is None, sshd_available()
    assert os.path.exists(NGINX), "nginx missing: apt-get install nginx"
    assert os.path.exists(STREAM_MODULE), "nginx stream module missing: apt-get install libnginx-mod-stream"
    cfg = init_instance(tmp_path / "ic", relay=f"{TEST_USER}@127.0.0.1:{free_port()}")
    configure(cfg, "relay", keepalive_interval_s=2)
    p443, p80, other = free_port(), free_port(), free_port()
    # the relay's existing HTTPS site, moved to 127.0.0.1:<other> as nginx-stream.conf tells the user to
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                    "-subj", "/CN=other.test", "-days", "1", "-keyout", str(tmp_path / "o.key"), "-out",
                    str(tmp_path / "o.crt")], check=True, capture_output=True)
    site = subprocess.Popen(["openssl", "s_server", "-quiet", "-www", "-accept", f"127.0.0.1:{other}", "-cert",
                             str(tmp_path / "o.crt"), "-key", str(tmp_path / "o.key")],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    nginx: subprocess.Popen[bytes] | None = None
    try:
        with relay_sshd(cfg) as relay:
            stream = (relay.bundle / "nginx-stream.conf").read_text()
            http = (relay.bundle / "nginx-http.conf").read_text()
            stream = stream.replace("listen 443;", f"listen 127.0.0.1:{p443};").replace(
                "default 127.0.0.1:8443;", f"default 127.0.0.1:{other};")
            http = http.replace("listen 80;", f"listen 127.0.0.1:{p80};")
            assert f"127.0.0.1:{relay.https_port}" in stream and f"127.0.0.1:{relay.http_port}" in http
            d = tmp_path / "nginx"
            d.mkdir()
            conf = d / "nginx.conf"
            conf.write_text(f"load_module {STREAM_MODULE};\nuser root;\nworker_processes 1;\npid {d}/nginx.pid;\n"
                            f"error_log {d}/error.log warn;\nevents {{ worker_connections 64; }}\n{stream}\n"
                            f"http {{\n access_log off;\n client_body_temp_path {d}/body;\n proxy_temp_path {d}/proxy;"
                            f"\n{http}\n}}\n")
            check = subprocess.run([NGINX, "-t", "-c", str(conf)], capture_output=True, text=True)
            assert check.returncode == 0, check.stderr
            nginx = subprocess.Popen([NGINX, "-c", str(conf), "-g", "daemon off;"], stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            with ServeProcess(cfg) as srv:
                relay.wait_forwards(30, on_timeout=srv.log)
                wait_until(lambda: curl("-k", "-o", "/dev/null", "-w", "%{http_code}", "--resolve",
                                        f"other.test:{p443}:127.0.0.1", f"https://other.test:{p443}/").stdout == "200",
                           15, "nginx up")
                dav = curl("-k", "--resolve", f"laptop.test:{p443}:127.0.0.1", "-u", "alice:correct horse", "-X",
                           "PROPFIND", "-H", "Depth: 1", f"https://laptop.test:{p443}/radicale/alice/")
                assert "/radicale/alice/contacts/" in dav.stdout, dav
                assert served_certificate_serial("127.0.0.1", p443, "laptop.test") == \
                    served_certificate_serial("127.0.0.1", srv.https_port, "laptop.test")
                other_site = curl("-k", "--resolve", f"other.test:{p443}:127.0.0.1", f"https://other.test:{p443}/")
                assert "s_server" in other_site.stdout
                redirect = curl("-o", "/dev/null", "-w", "%{http_code} %{redirect_url}", "--resolve",
                                f"laptop.test:{p80}:127.0.0.1", f"http://laptop.test:{p80}/x")
                assert redirect.stdout == "308 https://laptop.test/x", redirect
            wait_until(lambda: not relay.forwards_bound(), 15, "forwards gone with the laptop")
            offline = curl("-k", "-o", "/dev/null", "-w", "%{http_code}", "--resolve", f"laptop.test:{p443}:127.0.0.1",
                           f"https://laptop.test:{p443}/radicale/")
            assert offline.stdout == "000" and offline.returncode != 0, offline
            offline80 = curl("-o", "/dev/null", "-w", "%{http_code}", "--resolve", f"laptop.test:{p80}:127.0.0.1",
                             f"http://laptop.test:{p80}/.well-known/acme-challenge/x")
            assert offline80.stdout == "000" and offline80.returncode == 52, offline80   # empty reply: closed
    finally:
        for proc in (nginx, site):
            if proc is not None and proc.poll() is None:
                proc.terminate()
                proc.wait(10)
    assert Path(tmp_path / "nginx" / "error.log").exists()
