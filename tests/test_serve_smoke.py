"""The thinnest end-to-end check: init, serve, a real curl PROPFIND through our TLS, SIGTERM exits 0."""

from __future__ import annotations

import signal
import subprocess

from tests.support import ServeProcess


def test_serve_answers_dav_over_tls_and_stops_on_sigterm(instance):
    """init -> serve -> curl PROPFIND /radicale/alice/ (self-signed TLS) lists the predefined address
    book and calendar -> SIGTERM -> exit code 0."""
    with ServeProcess(instance) as srv:
        out = subprocess.run(
            ["curl", "-sk", "-u", "alice:correct horse", "-X", "PROPFIND", "-H", "Depth: 1",
             f"https://127.0.0.1:{srv.https_port}/radicale/alice/"],
            capture_output=True, text=True, timeout=30, check=True).stdout
        assert "/radicale/alice/contacts/" in out
        assert "/radicale/alice/calendar/" in out
        srv.signal(signal.SIGTERM)
        assert srv.proc is not None
        assert srv.proc.wait(30) == 0, srv.log()
