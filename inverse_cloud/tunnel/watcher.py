"""The link watcher: notices a local network change or a resume from suspend at once and checks the SSH
link then, instead of waiting for keepalives (5 s x 3 by default: ~20 s after the last byte received).

Owned by the :class:`~inverse_cloud.tunnel.link.Tunnel` (built in :mod:`inverse_cloud.app`, started and
closed by the tunnel). The tunnel tells it when a connection is up (:meth:`LinkWatcher.link_up`) and down;
the watcher calls back :meth:`WatchedLink.reconnect_for` (the probe got no answer: drop the link, reconnect
now) or :meth:`WatchedLink.retry_now` (no link, the network changed: skip the rest of a backoff wait).

What happens on a change (decisions in :mod:`inverse_cloud.tunnel.netwatch`, kernel reads in
:mod:`inverse_cloud.tunnel.netlink`):

1. a netlink message (address, route, link) or the resume timer marks "changed";
2. after SETTLE_S (the rest of the burst lands) and within the check budget (a flapping Wi-Fi gets a
   bounded number of checks, always one after its last change), the watcher reads the path state: is the
   connection's local address still there, which route would the kernel use to the relay;
3. the same path as when the connection came up: nothing (a route or address elsewhere changed); the
   connection's local address gone: reconnect now (nothing can reach it again); otherwise (the route
   changed), or after a resume: one keepalive request with a PROBE_TIMEOUT_S deadline; an answer keeps
   the link (and the new state becomes the baseline), no answer reconnects now.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Protocol

import asyncssh

from inverse_cloud.tunnel.netlink import address_present, drain, lookup_route, open_monitor
from inverse_cloud.tunnel.netwatch import (
    PROBE_TIMEOUT_S,
    SETTLE_S,
    TICK_S,
    CheckBudget,
    PathState,
    path_change,
    resumed,
)

__all__ = ["LinkWatcher", "WatchedLink", "probe"]

log = logging.getLogger(__name__)


class WatchedLink(Protocol):
    """What the watcher needs from the tunnel."""

    tag: str

    def reconnect_for(self, reason: str, detail: str) -> None:
        """Drop the live link at once and reconnect; ``reason`` is what status shows."""

    def retry_now(self, why: str) -> None:
        """No link is up: try to connect now instead of waiting out the backoff."""


def _boottime() -> float:
    """A clock that counts a suspend (Linux CLOCK_BOOTTIME; elsewhere the wall clock)."""
    clock = getattr(time, "CLOCK_BOOTTIME", None)
    return time.clock_gettime(clock) if clock is not None else time.time()


async def probe(conn: asyncssh.SSHClientConnection, timeout_s: float) -> bool:
    """Send one keepalive request on ``conn``; True if the relay answered within ``timeout_s``.

    OpenSSH answers ``keepalive@openssh.com`` with a failure message: any answer counts. asyncssh has no
    public call for one global request; this is the one its own keepalive timer makes. A connection that
    closes meanwhile "answers" every pending request itself: that is no answer.
    """
    try:
        async with asyncio.timeout(timeout_s):
            await conn._make_global_request(b"keepalive@openssh.com")
    except (TimeoutError, OSError, asyncssh.Error):
        return False
    return not conn.is_closed()


class LinkWatcher:
    """Watches netlink and the suspend clocks for the tunnel; see the module docstring."""

    def __init__(self, *, netlink: bool = True, tick_s: float = TICK_S,
                 monotonic: Callable[[], float] = time.monotonic, boottime: Callable[[], float] = _boottime,
                 read_state: Callable[[str, str], Awaitable[PathState]] | None = None,
                 budget: CheckBudget | None = None) -> None:
        """:param netlink: watch netlink (False: only the resume check and :meth:`changed` calls)
        :param read_state: reads the path state for (local, relay) addresses (default: the kernel's)
        """
        self._use_netlink = netlink
        self._read_state = read_state or self._kernel_state
        self._tick_s = tick_s
        self._mono = monotonic
        self._boot = boottime
        self._link: WatchedLink | None = None
        self._sock: socket.socket | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._event = asyncio.Event()
        self._changed = False
        self._resume = False
        self._budget = budget or CheckBudget()
        self._conn: asyncssh.SSHClientConnection | None = None
        self._baseline: PathState | None = None
        self.checks = 0
        self.probes = 0

    @property
    def watching(self) -> bool:
        """Whether netlink changes are being watched (False: resume check only)."""
        return self._sock is not None

    def status(self) -> dict[str, bool | int]:
        """For the tunnel's status: netlink watched or not, checks made after changes, probes sent."""
        return {"netlink": self.watching, "checks": self.checks, "probes": self.probes}

    async def start(self, link: WatchedLink) -> None:
        self._link = link
        if self._use_netlink:
            try:
                self._sock = open_monitor()
                asyncio.get_running_loop().add_reader(self._sock.fileno(), self._readable)
            except OSError as exc:
                self._sock = None
                log.info("%s network changes are not watched (netlink: %s); keepalives and the resume check "
                         "still apply", link.tag, exc.strerror or exc)
        self._tasks = [asyncio.create_task(self._run(), name="link-watcher"),
                       asyncio.create_task(self._tick(), name="resume-check")]

    async def aclose(self) -> None:
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._sock is not None:
            asyncio.get_running_loop().remove_reader(self._sock.fileno())
            self._sock.close()
            self._sock = None
        self._conn = self._baseline = None

    # -- from the tunnel --

    def link_up(self, conn: asyncssh.SSHClientConnection) -> None:
        """A new connection is up: its path, as of now, is the baseline."""
        self._conn, self._baseline = conn, None
        self._event.set()

    def link_down(self) -> None:
        self._conn = self._baseline = None

    # -- triggers --

    def _readable(self) -> None:
        assert self._sock is not None
        try:
            changed = drain(self._sock)
        except OSError as exc:
            log.debug("netlink read failed: %s", exc)
            changed = True
        if changed:
            self.changed()

    def changed(self) -> None:
        """Something in the network changed (a netlink message): check the link soon."""
        self._changed = True
        self._event.set()

    async def _tick(self) -> None:
        mono, boot = self._mono(), self._boot()
        while True:
            await asyncio.sleep(self._tick_s)
            now_mono, now_boot = self._mono(), self._boot()
            if resumed(now_mono - mono, now_boot - boot, self._tick_s):
                log.debug("resume check: %.1f s monotonic, %.1f s boot time in one %.0f s tick",
                          now_mono - mono, now_boot - boot, self._tick_s)
                self._resume = True
                self._event.set()
            mono, boot = now_mono, now_boot

    # -- the loop --

    async def _run(self) -> None:
        while True:
            await self._event.wait()
            if self._changed or self._resume:
                await asyncio.sleep(SETTLE_S)     # the rest of the burst (delete, add, routes) lands first
                wait = self._budget.wait_s(self._mono())
                if wait > 0:
                    log.debug("network changing often: next check in %.1f s", wait)
                    await asyncio.sleep(wait)
                self._budget.take(self._mono())
            self._event.clear()
            changed, resume = self._changed, self._resume
            self._changed = self._resume = False
            try:
                await self._check(changed, resume)
            except (OSError, TimeoutError) as exc:   # a kernel read failed: keepalives still apply
                log.debug("link check failed: %s", exc)
            except Exception as exc:  # boundary: the watcher must outlive any one failed check
                log.warning("link check failed: %s: %s; keepalives still apply", type(exc).__name__, exc,
                            exc_info=log.isEnabledFor(logging.DEBUG))

    @staticmethod
    async def _kernel_state(local: str, relay: str) -> PathState:
        return PathState(local_present=address_present(local), route=await lookup_route(relay))

    async def _check(self, changed: bool, resume: bool) -> None:
        assert self._link is not None
        conn = self._conn
        if conn is None:
            if changed or resume:
                self._link.retry_now("network change" if changed else "resume")
            return
        local, relay = conn.get_extra_info("sockname")[0], conn.get_extra_info("peername")[0]
        if self._baseline is None:       # a connection just made: on the path as it is now
            self._baseline = await self._read_state(local, relay)
            return
        if not (changed or resume):
            return
        self.checks += 1
        state = await self._read_state(local, relay)
        change = path_change(self._baseline, state, local)
        if change is None and not resume:
            log.debug("%s network change does not touch the link's path", self._link.tag)
            return
        if change is not None and not state.local_present:
            # The kernel drops whatever arrives for an address it no longer has: nothing can reach this
            # connection again, so the probe's deadline (PROBE_TIMEOUT_S) would only add to the outage.
            self._link.reconnect_for(change.reason, f"{change.detail}: the connection cannot outlive it")
            return
        why = change.detail if change is not None else "resumed from suspend (or the process was frozen)"
        self.probes += 1
        answered = await probe(conn, PROBE_TIMEOUT_S)
        if conn is not self._conn or conn.is_closed():
            return                                  # the link was replaced or closed meanwhile: the tunnel knows
        if answered:
            self._baseline = state
            log.info("%s %s; the relay still answers: link kept", self._link.tag, why)
            return
        self._link.reconnect_for(change.reason if change is not None else "resume",
                                 f"{why}; no answer to a probe within {PROBE_TIMEOUT_S:g} s")
