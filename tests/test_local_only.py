"""Laptop-only mode (no relay) is said as it is: doctor, status, phone and the phone page never suggest that
phones can reach a server that listens on 127.0.0.1 with a self-signed certificate."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from inverse_cloud.ops.doctor import DoctorOptions, format_report, run_doctor
from inverse_cloud.ops.phone import PageState, account, page_state, render_html
from tests.support import ServeProcess

CLI = [sys.executable, "-m", "inverse_cloud.cli"]
ARTIFACTS = Path(os.environ.get("INVERSE_CLOUD_ARTIFACTS", Path(__file__).resolve().parent.parent / "test-artifacts"))


async def test_doctor_does_not_promise_the_local_network(instance):
    """No relay, listeners on 127.0.0.1: doctor says only this machine can reach the server (not 'phones
    reach this laptop on the local network') and ends with 'ready for phones: no, because ...'."""
    report = await run_doctor(instance, DoctorOptions(timeout_s=5))
    dns = next(c for c in report.checks if c.name == "DNS")
    assert "local network" not in dns.detail, dns
    assert "only this machine can reach it" in dns.detail, dns
    text = format_report(report)
    assert "ready for phones: no, because " in text, text


def test_phone_warns_before_the_qr_code(instance):
    """`phone` with no relay: the first line warns that the name does not lead here and the certificate is
    self-signed; the last line is the ready line."""
    out = subprocess.run([*CLI, "phone", "--config", str(instance)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert lines[0].startswith("WARNING: no relay is configured") and "self-signed" in lines[0], lines[0]
    assert lines[-1].startswith("ready for phones: no, because the server is not running"), lines[-1]


def test_page_text_depends_on_the_relay():
    """The page's note talks about a relay only when there is one."""
    acct = account("alice", "laptop.test")
    local = render_html(acct, [], PageState(relay_enabled=False, ready="ready for phones: no, because x"))
    assert "relay in front" not in local and "No relay is configured" in local
    relayed = render_html(acct, [], PageState(relay_enabled=True, ready="ready for phones: yes",
                                              tunnel_state="up", tunnel_since="2026-12-01T08:00:00Z",
                                              cert_until="2027-02-01T00:00:00Z", cert_self_signed=False,
                                              next_renewal="2027-01-01T00:00:00+00:00",
                                              devices=[("DAVx5/4.4.3-ose", "2026-12-01T09:00:00Z")]))
    assert "relay in front of this laptop" in relayed
    assert "up since 2026-12-01T08:00:00Z" in relayed and "from the CA, valid until 2027-02-01" in relayed
    assert "next renewal 2027-01-01" in relayed and "DAVx5/4.4.3-ose" in relayed
    assert "ready for phones: yes" in relayed


def test_page_state_shows_only_the_users_own_devices():
    doc = {"relay": {"enabled": False}, "clients": [
        {"user": "alice", "user_agent": "DAVx5", "last_seen": "t1"},
        {"user": "bob", "user_agent": "Thunderbird", "last_seen": "t2"}]}
    assert page_state(doc, "alice").devices == [("DAVx5", "t1")]


def test_home_page_state_in_headless_chromium(instance):
    """A device syncs (PROPFIND with DAVx5's user agent), then Chromium opens the signed-in page (screenshot
    kept in test-artifacts/home-page-state.png): it lists that device, the self-signed certificate, no
    tunnel, and 'ready for phones: no, because no relay is configured'; no word of a relay in front."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.fail("chromium is missing: apt-get install chromium")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / "home-page-state.png"
    shot.unlink(missing_ok=True)
    with ServeProcess(instance) as srv:
        subprocess.run(["curl", "-sk", "-u", "alice:correct horse", "-X", "PROPFIND", "-H", "Depth: 1",
                        "-A", "DAVx5/4.4.3-ose", f"https://127.0.0.1:{srv.https_port}/radicale/alice/"],
                       check=True, capture_output=True, timeout=30)
        url = f"https://alice:correct%20horse@127.0.0.1:{srv.https_port}/"
        flags = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--ignore-certificate-errors",
                 "--hide-scrollbars", f"--user-data-dir={instance.parent / 'chromium'}"]
        dom = subprocess.run([*flags, "--dump-dom", url], capture_output=True, text=True, timeout=120).stdout
        subprocess.run([*flags, "--window-size=900,1800", f"--screenshot={shot}", url], capture_output=True,
                       text=True, timeout=120)
    assert "DAVx5/4.4.3-ose" in dom.split('id="devices"', 1)[1], dom[-3000:]
    assert "ready for phones: no, because no relay is configured" in dom
    assert "self-signed" in dom.split('id="cert"', 1)[1].split("</span>", 1)[0]
    assert "no relay configured" in dom.split('id="tunnel"', 1)[1].split("</span>", 1)[0]
    assert "relay in front" not in dom
    assert shot.exists() and shot.stat().st_size > 10_000, "no screenshot written"
