"""systemd integration without a dependency: the sd_notify protocol and the user unit.

sd_notify(3) is one datagram per message to the ``AF_UNIX`` socket named in ``$NOTIFY_SOCKET`` (a path,
or an abstract name starting with ``@``). We send ``READY=1`` once every component has started (the
listeners are bound and a certificate is loaded; the tunnel may still be connecting, which ``STATUS=``
says), ``STATUS=...`` whenever the one-line summary changes, ``WATCHDOG=1`` every ``WATCHDOG_USEC/2``
from a task on the event loop (so a hung loop stops feeding it and systemd restarts us), and
``STOPPING=1`` when shutdown begins. Outside systemd every call is a no-op.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shlex
import socket
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["Notifier", "SystemdComponent", "render_unit", "unit_path", "watchdog_interval_s"]

log = logging.getLogger(__name__)

UNIT_NAME = "inverse-cloud.service"
STATUS_INTERVAL_S = 5.0


def watchdog_interval_s(env: dict[str, str] | os._Environ[str], pid: int) -> float | None:
    """Seconds between ``WATCHDOG=1`` pings (half of ``WATCHDOG_USEC``), or None when no watchdog is
    armed for this process (``WATCHDOG_PID`` names another one, or the value is missing/invalid). Pure."""
    usec = env.get("WATCHDOG_USEC", "")
    wpid = env.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) <= 0:
        return None
    if wpid and (not wpid.isdigit() or int(wpid) != pid):
        return None
    return int(usec) / 1_000_000 / 2


class Notifier:
    """Sends sd_notify messages. Silent (and harmless) when ``$NOTIFY_SOCKET`` is unset."""

    def __init__(self, address: str | None = None) -> None:
        address = address if address is not None else os.environ.get("NOTIFY_SOCKET", "")
        self.address: str | bytes | None = None
        if address.startswith("@"):
            self.address = b"\0" + address[1:].encode()
        elif address.startswith("/"):
            self.address = address
        self._sock: socket.socket | None = None
        self.sent: list[str] = []  # the last messages, for debugging and tests

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def notify(self, message: str) -> bool:
        """Send one message (``"READY=1"``, ``"STATUS=..."``); False if it could not be delivered."""
        if self.address is None:
            return False
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._sock.setblocking(False)
            self._sock.sendto(message.encode("utf-8", "replace"), self.address)
        except OSError as exc:
            log.debug("sd_notify %r failed: %s", message[:40], exc)
            return False
        self.sent = [*self.sent[-20:], message]
        return True

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


class SystemdComponent:
    """Component: feeds the watchdog and keeps ``STATUS=`` current. Hook :meth:`ready` and
    :meth:`stopping` to the supervisor's ``on_ready``/``on_stopping``."""

    name = "systemd-notify"

    def __init__(self, notifier: Notifier, summary: Callable[[], str],
                 env: dict[str, str] | os._Environ[str] | None = None) -> None:
        self.notifier = notifier
        self.summary = summary
        self.env = env if env is not None else os.environ
        self._tasks: list[asyncio.Task[None]] = []
        self._last_status = ""
        self.ready_sent = False

    async def start(self) -> None:
        if not self.notifier.enabled:
            return
        interval = watchdog_interval_s(self.env, os.getpid())
        if interval is not None:
            self._tasks.append(asyncio.create_task(self._feed_watchdog(interval), name="sd-watchdog"))
        self.notifier.notify("STATUS=starting")

    def ready(self) -> None:
        if not self.notifier.enabled:
            return
        self.ready_sent = True
        self._push_status(force=True, extra="READY=1\n")
        self._tasks.append(asyncio.create_task(self._refresh_status(), name="sd-status"))

    def stopping(self) -> None:
        self.notifier.notify("STOPPING=1\nSTATUS=stopping")

    def _push_status(self, force: bool = False, extra: str = "") -> None:
        try:
            line = self.summary()
        except Exception as exc:  # boundary: a broken summary must not stop the watchdog task
            line = f"status unavailable ({type(exc).__name__})"
        line = line.replace("\n", " ")[:200]
        if force or line != self._last_status:
            self._last_status = line
            self.notifier.notify(f"{extra}STATUS={line}")

    async def _feed_watchdog(self, interval_s: float) -> None:
        while True:
            self.notifier.notify("WATCHDOG=1")
            await asyncio.sleep(interval_s)

    async def _refresh_status(self) -> None:
        while True:
            await asyncio.sleep(STATUS_INTERVAL_S)
            self._push_status()

    async def aclose(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
        self.notifier.close()


def short_summary(status: dict[str, Any]) -> str:
    """The ``STATUS=`` line: "tunnel up, certificate valid until 2027-01-01, 2 users" (pure)."""
    parts = []
    relay = status.get("relay") or {}
    tunnel = status.get("tunnel")
    if relay.get("enabled"):
        parts.append(f"tunnel {tunnel.get('state', 'unknown')}" if tunnel else "tunnel not started")
    else:
        parts.append("no relay (local only)")
    served = (status.get("certificate") or {}).get("served")
    if served:
        until = str(served.get("not_after", ""))[:10]
        parts.append(f"self-signed certificate until {until}" if served.get("self_signed")
                     else f"certificate valid until {until}")
    clients = status.get("clients") or []
    if clients:
        parts.append(f"last sync {clients[0].get('last_seen', '')} by {clients[0].get('user', '')}")
    return ", ".join(parts)


# --- the unit file ------------------------------------------------------------------------------------

def unit_path() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME", "")
    root = Path(base) if base and os.path.isabs(base) else Path.home() / ".config"
    return root / "systemd" / "user" / UNIT_NAME


def _quote(arg: str) -> str:
    # systemd.service(5) "Command lines": C-style quoting; shlex covers spaces/quotes, and a literal
    # '%' or '$' must be doubled so systemd does not expand a specifier or variable.
    return shlex.quote(arg).replace("%", "%%").replace("$", "$$")


def render_unit(config_path: Path, *, python: str = sys.executable, watchdog_s: int = 30, restart_s: int = 5,
                stop_timeout_s: float = 15.0) -> str:
    """The text of ``inverse-cloud.service`` (a systemd *user* unit). Pure.

    Sandboxing uses only options that work in a user manager without extra privileges (seccomp
    filters and NoNewPrivileges); mount-namespace options (ProtectSystem=, PrivateTmp=) need
    unprivileged user namespaces, which some kernels forbid, and are left out so the unit starts
    everywhere.
    """
    exec_start = " ".join(_quote(a) for a in (python, "-m", "inverse_cloud.cli", "serve", "--config",
                                               str(config_path)))
    lines = [
        "# Written by `inverse-cloud service install`; re-run it after moving the config or the venv.",
        "[Unit]",
        "Description=inverse-cloud: contacts and calendars on this laptop, reachable through the relay",
        "StartLimitIntervalSec=300",
        "StartLimitBurst=10",
        "",
        "[Service]",
        "Type=notify",
        "NotifyAccess=main",
        f"ExecStart={exec_start}",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "Restart=on-failure",
        f"RestartSec={restart_s}",
        # A hung event loop stops feeding the watchdog: systemd kills and restarts us.
        f"WatchdogSec={watchdog_s}",
        "TimeoutStartSec=90",
        # Requests in flight get [server] shutdown_timeout_s; then the rest of the shutdown.
        f"TimeoutStopSec={int(stop_timeout_s) + 15}",
        # Python + a few threads under one GIL: one malloc arena keeps RSS flat without measurable cost
        # (the process sets the same cap itself at start, for every other way it is started).
        "Environment=MALLOC_ARENA_MAX=1",
        # Two descriptors per tunnelled connection: the default soft limit of 1024 ran out at ~500 idle
        # connections. The process raises its soft limit to this hard one at start too.
        "LimitNOFILE=65536",
        "Environment=PYTHONUNBUFFERED=1",
        "SyslogIdentifier=inverse-cloud",
        "UMask=0077",
        "NoNewPrivileges=yes",
        "LockPersonality=yes",
        "RestrictRealtime=yes",
        "RestrictSUIDSGID=yes",
        "RestrictNamespaces=yes",
        "SystemCallArchitectures=native",
        "SystemCallFilter=@system-service",
        "SystemCallErrorNumber=EPERM",
        "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6 AF_NETLINK",
    ]
    lines += ["", "[Install]", "WantedBy=default.target", ""]
    return "\n".join(lines)
