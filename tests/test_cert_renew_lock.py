"""`inverse-cloud cert renew` beside a running server: the server holds the certificate lock, so the command
asks it (request file + SIGHUP) and reports its answer, placing no order of its own; and the state file the
two share, when it is corrupt."""

from __future__ import annotations

import http.server
import json
import logging
import signal
import subprocess
import sys
import textwrap
import threading

from inverse_cloud import config as config_mod
from inverse_cloud.certs.manager import StateFiles
from inverse_cloud.tunnel.commands import set_config_value

# Stands in for `inverse-cloud serve`: holds the certificate lock as "serve" and, on SIGHUP, answers the
# renew request the way the manager does (a check recorded in the state file: not due).
FAKE_SERVER = textwrap.dedent("""
    import datetime as dt, json, signal, sys, time
    from pathlib import Path
    from inverse_cloud import config
    from inverse_cloud.certs.manager import StateFiles
    from inverse_cloud.certs.policy import RenewalState

    files = StateFiles(config.load(Path(sys.argv[1])))
    fd = files.try_lock("serve")
    assert fd is not None
    seen = []

    def on_hup(signum, frame):
        seen.append(json.loads(files.request.read_text()))
        now = dt.datetime.now(dt.UTC)
        files.save_state(RenewalState(last_check_at=now, next_renewal_at=now + dt.timedelta(days=30),
                                      next_action="wait"))

    signal.signal(signal.SIGHUP, on_hup)
    print("ready", flush=True)
    deadline = time.monotonic() + 60
    while not seen and time.monotonic() < deadline:
        time.sleep(0.05)  # waiting for the signal handler, bounded
    print(json.dumps(seen[0]) if seen else "no request", flush=True)
""")


class CountingHandler(http.server.BaseHTTPRequestHandler):
    requests: list[str] = []

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        CountingHandler.requests.append(self.path)
        self.send_response(503)
        self.end_headers()

    do_POST = do_HEAD = do_GET  # noqa: N815

    def log_message(self, *args: object) -> None:
        pass


def test_cert_renew_with_serve_holding_the_lock_asks_it_and_orders_nothing(instance):
    """A stand-in server holds the lock; `cert renew` writes the request (force false), sends SIGHUP to that
    pid, reports 'not due for renewal' from the state the server wrote, exits 0; the ACME directory (a local
    counting HTTP server) got no request at all: no second order."""
    CountingHandler.requests = []
    acme = http.server.ThreadingHTTPServer(("127.0.0.1", 0), CountingHandler)
    threading.Thread(target=acme.serve_forever, daemon=True).start()
    text = instance.read_text()
    text = set_config_value(text, "acme", "enabled", "true")
    text = set_config_value(text, "acme", "directory", f'"http://127.0.0.1:{acme.server_address[1]}/directory"')
    instance.write_text(text)
    try:
        with subprocess.Popen([sys.executable, "-c", FAKE_SERVER, str(instance)], stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, text=True) as server:
            try:
                assert server.stdout is not None and server.stdout.readline().strip() == "ready"
                files = StateFiles(config_mod.load(instance))
                assert files.holder() == (server.pid, "serve")
                out = subprocess.run([sys.executable, "-m", "inverse_cloud.cli", "cert", "renew", "--config",
                                      str(instance)], capture_output=True, text=True, timeout=60, check=False)
                assert out.returncode == 0, out
                assert f"asked the running server (pid {server.pid}) to check the certificate" in out.stderr
                assert "is not due for renewal" in out.stdout, out
                request = json.loads(server.stdout.readline())
                assert request["force"] is False
                assert server.wait(30) == 0
            finally:
                if server.poll() is None:
                    server.send_signal(signal.SIGTERM)
                    server.wait(30)
    finally:
        acme.shutdown()
        acme.server_close()
    assert CountingHandler.requests == []


def test_a_corrupt_state_file_is_one_warning_and_a_clean_history(instance, caplog):
    """acme-state.json that is not JSON (a crash mid-write by another tool, a disk error): loading it logs
    one WARNING naming the file and starts with a clean failure history instead of failing."""
    caplog.set_level(logging.INFO)
    files = StateFiles(config_mod.load(instance))
    files.root.mkdir(parents=True, exist_ok=True)
    files.state.write_text('{"failures": 3, "last_err')
    state = files.load_state()
    assert state.failures == 0 and state.last_error == ""
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and warnings[0].startswith(f"renewal state {files.state} unreadable (")
    assert warnings[0].endswith("; starting with a clean failure history")
