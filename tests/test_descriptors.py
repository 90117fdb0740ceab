"""Descriptor exhaustion: idle connections must fill caps, never the descriptor table.

The open-files limit is raised at start, the unit sets LimitNOFILE=, the tunnel refuses channels over
the cap in total and per relay-seen address before spending a descriptor (a channel counts from its
acceptance, TLS handshake included), and asyncio's accept errors are one log line per interval."""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
from pathlib import Path

import asyncssh
import pytest

from inverse_cloud.config import loads
from inverse_cloud.log import RepeatLimiter
from inverse_cloud.tunnel import admission
from inverse_cloud.tunnel.link import Tunnel
from tests.test_tunnel import EchoTarget


def test_open_files_soft_limit_is_raised_to_the_hard_limit():
    """A process started with soft 256 / hard 4096 runs with 4096 after raise_open_files_limit()."""
    code = ("import resource; resource.setrlimit(resource.RLIMIT_NOFILE, (256, 4096));"
            "from inverse_cloud.dav.server import raise_open_files_limit; print(raise_open_files_limit(),"
            " resource.getrlimit(resource.RLIMIT_NOFILE))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "(256, 4096) (4096, 4096)", out.stdout


def test_unit_sets_limit_nofile(tmp_path):
    from inverse_cloud.ops import systemd

    assert "LimitNOFILE=65536" in systemd.render_unit(tmp_path / "config.toml").splitlines()


def _tunnel(tmp_path: Path, target: EchoTarget, max_connections: int) -> Tunnel:
    cfg = loads(f'[server]\ndomain = "laptop.test"\ndata_dir = "{tmp_path}/data"\nstate_dir = "{tmp_path}/s"\n'
                f'max_connections = {max_connections}\n[relay]\nhost = "127.0.0.1"\n', tmp_path / "config.toml")
    return Tunnel(cfg, target)


async def test_tunnel_refuses_channels_over_the_per_address_and_total_caps(tmp_path, caplog):
    """Channels from one relay-seen address beyond PER_ADDRESS_CHANNELS, and from anyone beyond
    max_connections, are refused before a socket is made (no descriptor spent); closing one makes room
    again; the refusals are one WARNING line. Before, every channel was accepted."""
    target = EchoTarget()
    await target.start()
    t = _tunnel(tmp_path, target, max_connections=admission.PER_ADDRESS_CHANNELS + 4)
    ends = []
    try:
        for _ in range(admission.PER_ADDRESS_CHANNELS):
            ends.append(await t.handoff.accept("https", "203.0.113.9", 40000))
        for _ in range(5):
            with pytest.raises(asyncssh.ChannelOpenError, match="per-address cap"):
                await t.handoff.accept("https", "203.0.113.9", 40001)
        for i in range(4):
            ends.append(await t.handoff.accept("https", f"198.51.100.{i}", 40000))
        with pytest.raises(asyncssh.ChannelOpenError, match="the cap"):
            await t.handoff.accept("https", "198.51.100.99", 40000)
        ends.pop(0).local.close()
        await wait_until_async(lambda: t._admission.total < admission.PER_ADDRESS_CHANNELS + 4)
        ends.append(await t.handoff.accept("https", "203.0.113.9", 40002))
    finally:
        for end in ends:
            end.local.close()
        # The echo handlers see EOF and close their side: wait for that before stopping the target.
        await wait_until_async(lambda: t._admission.total == 0 and not any(
            srv._active_count for srv in target.servers))  # type: ignore[attr-defined]
        await target.aclose()
    refusals = [r for r in caplog.records if "refusing tunnel connections" in r.getMessage()]
    assert len(refusals) == 1, [r.getMessage() for r in refusals]


async def wait_until_async(pred, timeout_s: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not pred():
        assert loop.time() < deadline, "timed out"
        await asyncio.sleep(0.01)  # poll interval


def test_accept_errors_are_one_line_per_interval():
    """asyncio's 'socket.accept() out of system resource', 1000 times in a burst: one line, then the
    next after the interval names how many were dropped (the issue saw 5,865 lines in 6 s)."""
    now = [0.0]
    limiter = RepeatLimiter(interval_s=10, clock=lambda: now[0])

    def record(msg: str) -> logging.LogRecord:
        return logging.LogRecord("asyncio", logging.ERROR, __file__, 1, msg, None, None)

    passed = [r for r in (record("socket.accept() out of system resource\nsocket: <x>") for _ in range(1000))
              if limiter.filter(r)]
    assert len(passed) == 1
    assert limiter.filter(record("something else"))
    now[0] = 10.5
    last = record("socket.accept() out of system resource")
    assert limiter.filter(last) and "999 more like it" in last.getMessage()
