"""sd_notify against a real AF_UNIX datagram socket the test owns, and the generated user unit checked by
`systemd-analyze verify`."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from inverse_cloud.ops.systemd import Notifier, SystemdComponent, render_unit, short_summary, watchdog_interval_s
from tests.support import ServeProcess, wait_until


class Receiver:
    """A datagram socket standing in for systemd's notify socket; records (time, message)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.05)
        self.got: list[tuple[float, str]] = []

    def drain(self) -> list[str]:
        while True:
            try:
                data = self.sock.recv(4096)
            except (TimeoutError, BlockingIOError):
                return [m for _, m in self.got]
            self.got.append((time.monotonic(), data.decode()))

    def has(self, text: str) -> bool:
        return any(text in m for m in self.drain())

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def receiver(tmp_path):
    r = Receiver(tmp_path / "notify.sock")
    try:
        yield r
    finally:
        r.close()


@pytest.mark.parametrize("env,pid,expected", [
    ({}, 10, None),
    ({"WATCHDOG_USEC": "30000000"}, 10, 15.0),
    ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "10"}, 10, 15.0),
    ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "11"}, 10, None),  # meant for another process
    ({"WATCHDOG_USEC": "0"}, 10, None),
    ({"WATCHDOG_USEC": "abc"}, 10, None),
])
def test_watchdog_interval(env, pid, expected):
    assert watchdog_interval_s(env, pid) == expected


def test_notifier_without_socket_is_silent():
    n = Notifier(address="")
    assert not n.enabled and n.notify("READY=1") is False


def test_abstract_socket_address(tmp_path):
    """`@name` in NOTIFY_SOCKET is an abstract socket (leading NUL)."""
    name = f"inverse-cloud-test-{os.getpid()}-{time.monotonic_ns()}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(b"\0" + name.encode())
    sock.settimeout(5)
    try:
        n = Notifier(address="@" + name)
        assert n.notify("STATUS=hello")
        assert sock.recv(100) == b"STATUS=hello"
        n.close()
    finally:
        sock.close()


async def test_watchdog_is_fed_from_the_event_loop(receiver):
    """WATCHDOG=1 arrives every WATCHDOG_USEC/2; while the loop is blocked (a hung loop) none arrives,
    so systemd would kill and restart the process."""
    comp = SystemdComponent(Notifier(str(receiver.path)), lambda: "tunnel up", env={"WATCHDOG_USEC": "100000"})
    await comp.start()
    try:
        deadline = time.monotonic() + 5
        while receiver.drain().count("WATCHDOG=1") < 3 and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        time.sleep(0.5)  # noqa: ASYNC251 -- deliberately block the loop: the hung loop under test
        # Once the loop runs again, pings resume: poll (deadline) for one that arrived after the block.
        unblocked = time.monotonic()
        deadline = unblocked + 5
        while not any(m == "WATCHDOG=1" and t > unblocked for t, m in receiver.got) and time.monotonic() < deadline:
            receiver.drain()
            await asyncio.sleep(0.02)
        comp.ready()
        comp.stopping()
    finally:
        await comp.aclose()
    msgs = receiver.drain()
    times = [t for t, m in receiver.got if m == "WATCHDOG=1"]
    assert len(times) >= 4, msgs
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    assert max(gaps) >= 0.45, f"pings continued while the loop was blocked: {gaps}"
    assert "STATUS=starting" in msgs
    assert "READY=1\nSTATUS=tunnel up" in msgs
    assert "STOPPING=1\nSTATUS=stopping" in msgs


def test_short_summary():
    doc = {"relay": {"enabled": True}, "tunnel": {"state": "up"},
           "certificate": {"served": {"not_after": "2027-02-01T00:00:00Z", "self_signed": False}},
           "clients": [{"last_seen": "2026-11-25T10:00:00Z", "user": "alice"}]}
    assert short_summary(doc) == ("tunnel up, certificate valid until 2027-02-01, last sync 2026-11-25T10:00:00Z "
                                  "by alice")
    assert short_summary({"relay": {"enabled": False}}) == "no relay (local only)"


def test_serve_sends_ready_status_watchdog_stopping(instance, receiver):
    """serve under a NOTIFY_SOCKET the test owns: READY=1 (with a STATUS line) arrives after the listeners
    accept TLS, WATCHDOG=1 keeps arriving, STATUS says what it does, SIGTERM sends STOPPING=1 and exits 0.
    Prints the time from process start to READY."""
    env = {"NOTIFY_SOCKET": str(receiver.path), "WATCHDOG_USEC": "400000"}
    srv = ServeProcess(instance, env=env)
    t0 = time.monotonic()
    with srv:
        wait_until(lambda: receiver.has("READY=1"), 30, "READY=1", on_timeout=srv.log)
        ready_at = next(t for t, m in receiver.got if "READY=1" in m)
        print(f"\nserve -> READY=1: {(ready_at - t0) * 1000:.0f} ms")
        wait_until(lambda: receiver.drain().count("WATCHDOG=1") >= 3, 10, "three watchdog pings")
        srv.signal(signal.SIGTERM)
        assert srv.proc is not None and srv.proc.wait(30) == 0, srv.log()
    msgs = receiver.drain()
    ready = next(m for m in msgs if "READY=1" in m)
    assert "STATUS=no relay (local only), self-signed certificate until" in ready
    assert msgs.index(ready) < len(msgs) - 1
    assert any(m.startswith("STOPPING=1") for m in msgs)
    assert msgs.index(next(m for m in msgs if m.startswith("STOPPING=1"))) > msgs.index(ready)


def _verify(unit: Path, tmp_path: Path, user: bool) -> subprocess.CompletedProcess[str]:
    runtime = tmp_path / "xdg-runtime"
    runtime.mkdir(mode=0o700, exist_ok=True)
    env = {**os.environ, "XDG_RUNTIME_DIR": str(runtime), "SYSTEMD_LOG_LEVEL": "notice"}
    args = ["systemd-analyze", *(["--user"] if user else []), "verify", str(unit)]
    return subprocess.run(args, capture_output=True, text=True, timeout=60, env=env)


@pytest.mark.parametrize("user", [False, True], ids=["system-mode", "user-mode"])
def test_generated_unit_passes_systemd_analyze_verify(tmp_path, user):
    """The unit written by `service install` passes `systemd-analyze verify` with no warning at all
    (an unknown or misspelt option would print one)."""
    if not shutil.which("systemd-analyze"):
        pytest.fail("systemd-analyze is missing: apt-get install systemd")
    unit = tmp_path / "inverse-cloud.service"
    cfg = tmp_path / "my config" / "config.toml"
    unit.write_text(render_unit(cfg, python=sys.executable, stop_timeout_s=15))
    out = _verify(unit, tmp_path, user)
    assert out.returncode == 0, out.stderr
    assert out.stderr.strip() == "", out.stderr
    text = unit.read_text()
    for line in ("Type=notify", "WatchdogSec=30", "Restart=on-failure", "NoNewPrivileges=yes",
                 "Environment=MALLOC_ARENA_MAX=1", "WantedBy=default.target",
                 f"ExecStart={sys.executable} -m inverse_cloud.cli serve --config '{cfg}'"):
        assert line in text


def test_verify_catches_a_bad_unit(tmp_path):
    """Guard for the test above: systemd-analyze does complain about a misspelt option."""
    if not shutil.which("systemd-analyze"):
        pytest.fail("systemd-analyze is missing: apt-get install systemd")
    unit = tmp_path / "inverse-cloud.service"
    unit.write_text(render_unit(tmp_path / "c.toml").replace("WatchdogSec=", "WatchdogSecs="))
    assert "Unknown key" in _verify(unit, tmp_path, True).stderr


def test_service_install_and_uninstall_write_the_unit(instance, tmp_path):
    """`service install --unit-dir D --no-systemctl` writes D/inverse-cloud.service (0644) for this config,
    prints how to start it and the linger hint; `service status` finds it; `uninstall` removes it."""
    cli = [sys.executable, "-m", "inverse_cloud.cli", "service"]
    unit_dir = tmp_path / "units"
    common = ["--config", str(instance), "--unit-dir", str(unit_dir), "--no-systemctl"]
    out = subprocess.run([*cli, "install", *common], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    unit = unit_dir / "inverse-cloud.service"
    assert f"--config {instance.absolute()}" in unit.read_text()
    assert oct(unit.stat().st_mode & 0o777) == "0o644"
    assert "systemctl --user daemon-reload && systemctl --user enable --now inverse-cloud.service" in out.stdout
    assert "loginctl enable-linger" in out.stdout
    st = subprocess.run([*cli, "status", *common], capture_output=True, text=True, timeout=60)
    assert st.returncode == 0 and str(unit) in st.stdout
    un = subprocess.run([*cli, "uninstall", *common], capture_output=True, text=True, timeout=60)
    assert un.returncode == 0 and not unit.exists()
    st2 = subprocess.run([*cli, "status", *common], capture_output=True, text=True, timeout=60)
    assert st2.returncode == 2 and "not installed" in st2.stdout
