"""The control socket and `inverse-cloud status`: in-process socket tests, the pure health decision, and
the real command against a running `serve`."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import socket
import stat
import subprocess
import sys

import pytest

from inverse_cloud.errors import StartupError
from inverse_cloud.ops.control import ControlError, ControlServer, NotRunning, ask_async
from inverse_cloud.ops.status import SyncTracker, assess, basic_user, collections_of, format_text
from tests.support import ServeProcess


async def _server(path):
    srv = ControlServer(path)

    async def echo(req):
        return {"echo": req.get("x")}

    async def boom(_req):
        raise ControlError("nope, and a reason")

    srv.register("echo", echo)
    srv.register("boom", boom)
    await srv.start()
    return srv


async def test_socket_is_private_and_answers_json(tmp_path):
    """The socket is created 0600 in a 0700 folder; a command gets its result; an unknown command and a
    failing command get one-line errors; closing removes the file."""
    path = tmp_path / "run" / "ctl.sock"
    srv = await _server(path)
    try:
        assert stat.S_ISSOCK(path.lstat().st_mode)
        assert stat.S_IMODE(path.lstat().st_mode) == 0o600
        assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
        assert await ask_async(path, "echo", x=5) == {"echo": 5}
        with pytest.raises(ControlError, match="unknown command 'status'.*known: boom, echo"):
            await ask_async(path, "status")
        with pytest.raises(ControlError, match="nope, and a reason"):
            await ask_async(path, "boom")
    finally:
        await srv.aclose()
    assert not path.exists()
    with pytest.raises(NotRunning, match="not running"):
        await ask_async(path, "echo")


async def test_garbage_request_gets_error_line_and_connection_survives(tmp_path):
    """A line that is not JSON gets {"ok": false}; the same connection then still answers."""
    path = tmp_path / "ctl.sock"
    srv = await _server(path)
    try:
        reader, writer = await asyncio.open_unix_connection(str(path))
        writer.write(b"this is not json\n")
        await writer.drain()
        first = json.loads(await reader.readline())
        writer.write(b'{"cmd": "echo", "x": "again"}\n')
        await writer.drain()
        second = json.loads(await reader.readline())
        writer.close()
        await writer.wait_closed()
    finally:
        await srv.aclose()
    assert first["ok"] is False and "bad request" in first["error"]
    assert second == {"ok": True, "result": {"echo": "again"}}


async def test_stale_socket_is_replaced_but_live_one_refuses_start(tmp_path):
    """A socket file nobody listens on (crash leftover) is removed at start; a second server on a live
    socket refuses to start with a one-line StartupError."""
    path = tmp_path / "ctl.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()  # file remains, nobody listens
    srv = await _server(path)
    try:
        assert await ask_async(path, "echo", x=1) == {"echo": 1}
        with pytest.raises(StartupError, match="already running"):
            await ControlServer(path).start()
        assert await ask_async(path, "echo", x=2) == {"echo": 2}
    finally:
        await srv.aclose()


def test_basic_user_never_returns_password():
    assert basic_user("Basic YWxpY2U6c2VjcmV0") == "alice"
    assert basic_user("Basic !!!") is None
    assert basic_user("Bearer x") is None
    assert basic_user("Basic " + "YWxpY2U=") is None  # no colon


def test_sync_tracker_keeps_last_success_per_client():
    """Only authenticated successes count; the newest client is listed first; writes are counted."""
    t = iter([100.0, 200.0, 300.0, 400.0])
    tracker = SyncTracker(clock=lambda: next(t))

    class Req:
        def __init__(self, method, agent, auth="Basic YWxpY2U6c2VjcmV0"):
            self.method, self.path = method, "/radicale/alice/contacts/"
            self.headers = {"Authorization": auth, "User-Agent": agent}

    class Res:
        def __init__(self, status):
            self.status = status

    tracker.note(Req("PROPFIND", "DAVx5"), Res(207))
    tracker.note(Req("PUT", "Thunderbird"), Res(201))
    tracker.note(Req("PUT", "DAVx5"), Res(201))
    tracker.note(Req("PUT", "DAVx5"), Res(401))  # failure: ignored
    tracker.note(Req("GET", "curl", auth=""), Res(200))  # anonymous: ignored
    snap = tracker.snapshot()
    assert [c["user_agent"] for c in snap] == ["DAVx5", "Thunderbird"]
    assert snap[0]["requests"] == 2 and snap[0]["writes"] == 1
    assert snap[0]["last_seen"] == "1970-01-01T00:05:00Z"
    assert "secret" not in json.dumps(snap)


def test_collections_are_counted_from_storage(tmp_path):
    root = tmp_path / "collection-root" / "alice"
    (root / "contacts").mkdir(parents=True)
    (root / "contacts" / ".Radicale.props").write_text('{"tag": "VADDRESSBOOK", "D:displayname": "People"}')
    for i in range(3):
        (root / "contacts" / f"{i}.vcf").write_text("BEGIN:VCARD\nEND:VCARD\n")
    (root / "contacts" / ".Radicale.cache").mkdir()
    (root / "calendar").mkdir()
    (root / "calendar" / ".Radicale.props").write_text('{"tag": "VCALENDAR"}')
    assert collections_of(tmp_path) == {"alice": [
        {"collection": "calendar", "type": "calendar", "name": "calendar", "items": 0},
        {"collection": "contacts", "type": "addressbook", "name": "People", "items": 3},
    ]}


NOW = dt.datetime(2026, 11, 25, 12, 0, 0)


def _doc(**over):
    doc = {
        "relay": {"enabled": True, "host": "relay", "port": 22}, "acme_enabled": True,
        "tunnel": {"state": "up", "connected_since": "2026-11-25T10:00:00Z", "reconnects": 0},
        "certificate": {"served": {"serial": "ab", "not_after": "2027-02-01T00:00:00Z", "self_signed": False},
                        "manager": {"last_error": ""}},
        "storage": {"problem": None}, "components": {},
    }
    doc.update(over)
    return doc


@pytest.mark.parametrize("over,health,fragment", [
    ({}, "healthy", None),
    ({"tunnel": {"state": "reconnecting", "last_error": "relay refused port 44353"}}, "degraded",
     "tunnel is reconnecting: relay refused port 44353"),
    ({"tunnel": None}, "degraded", "no tunnel component"),
    ({"certificate": {"served": {"not_after": "2026-11-28T00:00:00Z", "self_signed": False}}}, "degraded",
     "expires in 2.5 days"),
    # A short-lived certificate (1 h) with 40 min left is not due yet; with 5 min left it is overdue.
    ({"certificate": {"served": {"not_before": "2026-11-25T11:20:00Z", "not_after": "2026-11-25T12:40:00Z",
                                 "self_signed": False}}}, "healthy", None),
    ({"certificate": {"served": {"not_before": "2026-11-25T11:05:00Z", "not_after": "2026-11-25T12:05:00Z",
                                 "self_signed": False}}}, "degraded", "expires in 0.0 days"),
    ({"certificate": {"served": {"not_after": "2026-11-01T00:00:00Z", "self_signed": False}}}, "degraded",
     "expired"),
    ({"certificate": {"served": {"not_after": "2027-11-01T00:00:00Z", "self_signed": True}}}, "degraded",
     "self-signed"),
    ({"relay": {"enabled": False}, "tunnel": None, "acme_enabled": False,
      "certificate": {"served": {"not_after": "2027-11-01T00:00:00Z", "self_signed": True}}}, "local only", None),
    ({"storage": {"problem": "storage folder /x is empty"}}, "degraded", "storage folder /x is empty"),
    ({"components": {"acme": {"healthy": False, "last_error": "CA unreachable"}}}, "degraded", "CA unreachable"),
])
def test_assess(over, health, fragment):
    """The health decision is a pure function of the status document and `now`."""
    got, problems, _notes = assess(_doc(**over), NOW)
    assert got == health
    if fragment:
        assert any(fragment in p for p in problems), problems
    else:
        assert problems == []


def test_status_command_against_running_server(instance, tmp_path):
    """serve -> one authenticated PROPFIND with a DAVx5 user agent -> `status` (exit 0, text names the
    user, the collections, the client and the plaintext line) and `status --json` (parses, same facts);
    after SIGTERM `status` exits 2 and says not running."""
    sock = tmp_path / "ctl" / "s.sock"
    text = instance.read_text().replace("[server]\n", f'[server]\ncontrol_socket = "{sock}"\n', 1)
    instance.write_text(text)
    cli = [sys.executable, "-m", "inverse_cloud.cli"]
    with ServeProcess(instance) as srv:
        subprocess.run(["curl", "-sk", "-u", "alice:correct horse", "-X", "PROPFIND", "-H", "Depth: 1",
                        "-A", "DAVx5/4.4.3-ose", f"https://127.0.0.1:{srv.https_port}/radicale/alice/"],
                       check=True, capture_output=True, timeout=30)
        assert stat.S_IMODE(sock.lstat().st_mode) == 0o600
        out = subprocess.run([*cli, "status", "--config", str(instance)], capture_output=True, text=True,
                             timeout=30)
        assert out.returncode == 0, out.stdout + out.stderr
        # No relay in this instance: nothing is broken, but phones cannot reach it, and status says so.
        assert "LOCAL ONLY" in out.stdout and "HEALTHY" not in out.stdout
        assert "ready for phones: no, because no relay is configured" in out.stdout
        assert "DAV user alice: calendar (calendar, 0 items), contacts (addressbook, 0 items)" in out.stdout
        assert "alice with 'DAVx5/4.4.3-ose'" in out.stdout
        assert "plaintext only here: TLS ends in this process" in out.stdout
        js = subprocess.run([*cli, "status", "--json", "--config", str(instance)], capture_output=True,
                            text=True, timeout=30)
        doc = json.loads(js.stdout)
        assert js.returncode == 0 and doc["health"] == "local only" and doc["ready_for_phones"] is False
        assert doc["pid"] == srv.pid
        assert doc["clients"][0]["user_agent"] == "DAVx5/4.4.3-ose"
        assert doc["certificate"]["served"]["self_signed"] is True
        assert len(doc["certificate"]["key_sha256"]) == 64
        assert "correct horse" not in js.stdout
        assert srv.stop() == 0
    assert not sock.exists()
    gone = subprocess.run([*cli, "status", "--config", str(instance)], capture_output=True, text=True, timeout=30)
    assert gone.returncode == 2 and "not running" in gone.stdout
    gone_json = subprocess.run([*cli, "status", "--json", "--config", str(instance)], capture_output=True,
                               text=True, timeout=30)
    assert gone_json.returncode == 2 and json.loads(gone_json.stdout)["health"] == "not running"


def test_format_text_renders_tunnel_and_manager_fields():
    doc = _doc(version="0.1.0", domain="laptop.test", pid=1, started_at="x", health="healthy", problems=[],
               notes=[], dav={}, clients=[], plaintext="plaintext only here")
    doc["certificate"]["manager"] = {"next_renewal": "2027-01-01T00:00:00Z", "last_error": "", "caa": "ok"}
    text = format_text(doc)
    assert "tunnel:       up to relay:22 (since 2026-11-25T10:00:00Z; 0 reconnect(s))" in text
    assert "next renewal 2027-01-01T00:00:00Z" in text
    assert "last ACME error: none" in text


def test_format_text_shows_the_last_reconnect_reason():
    doc = _doc(version="0.1.0", domain="laptop.test", pid=1, started_at="x", health="healthy", problems=[],
               notes=[], dav={}, clients=[], plaintext="plaintext only here")
    doc["tunnel"].update(reconnects=["2026-11-25T10:00:00+00:00"],
                         last_reconnect={"at": "2026-11-25T10:00:00+00:00", "reason": "address change"})
    assert "1 reconnect(s) in the last day; last reconnect: address change at 2026-11-25T10:00:00+00:00" \
        in format_text(doc)


def test_format_text_says_when_the_tunnel_uses_the_fallback_port():
    doc = _doc(version="0.1.0", domain="laptop.test", pid=1, started_at="x", health="healthy", problems=[],
               notes=[], dav={}, clients=[], plaintext="plaintext only here")
    doc["tunnel"].update(ssh_port=443, fallback=True)
    text = format_text(doc)
    assert "tunnel:       up to relay:443 (fallback port: 22 not reachable from this network; since " in text


def test_status_with_broken_config_exits_2(tmp_path):
    bad = tmp_path / "c.toml"
    bad.write_text("[server]\ndomain = 3\n")
    out = subprocess.run([sys.executable, "-m", "inverse_cloud.cli", "status", "--config", str(bad)],
                         capture_output=True, text=True, timeout=30, env={**os.environ})
    assert out.returncode == 2
    assert "[server] domain" in out.stderr and "Traceback" not in out.stderr


async def test_too_long_socket_path_is_one_line(tmp_path):
    """A state_dir deep enough to pass the AF_UNIX limit gets a StartupError naming the limit and the fix."""
    deep = tmp_path / ("d" * 60) / ("e" * 60) / "ctl.sock"
    with pytest.raises(StartupError, match="limited to 107 bytes: set \\[server\\] control_socket"):
        await ControlServer(deep).start()
