"""The link watcher's decisions, pure: did a network change touch the SSH connection's path, may we check
now, and was the process suspended. No I/O and no clock here: :mod:`inverse_cloud.tunnel.watcher` acts on
the answers, :mod:`inverse_cloud.tunnel.netlink` reads the kernel's state.

The watcher does not interpret single netlink messages. Any address, route or link message only says
"something changed"; the watcher then asks the kernel for the route it would use to the relay now and
whether the connection's local address still exists, and compares that with what it saw when the
connection came up (:func:`path_change`). This is the shape of Tailscale's link monitor (netmon): events
are a trigger, the state is re-read. A changed path means a probe (one keepalive request with a short
deadline), never a reconnect by itself: a Wi-Fi that drops for a second and comes back with the same
address keeps its connection.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["CHECK_BURST", "CHECK_REFILL_S", "PROBE_TIMEOUT_S", "RESUME_JUMP_S", "SETTLE_S", "TICK_S",
           "CheckBudget", "PathChange", "PathState", "Route", "path_change", "resumed"]

# After the first netlink message of a burst, wait this long before reading the state: an address change
# is a delete, an add and one or more route messages within a few milliseconds.
SETTLE_S = 0.2
# How long the probe (a keepalive request on the live link) may take before the link counts as dead. A
# relay on the far side of a phone network answers in well under a second; a dead path never does.
PROBE_TIMEOUT_S = 1.0
# Checks after network changes: a burst of CHECK_BURST at once, then one per CHECK_REFILL_S. A Wi-Fi that
# flaps 10 times in 5 s gets at most 3 + 5 / 2 = 5.5, so at most 6 checks (and so at most 6 reconnects); a
# check is always made after the last change, at most CHECK_REFILL_S later.
CHECK_BURST = 3
CHECK_REFILL_S = 2.0
# The resume check: a timer every TICK_S; a suspend shows as the boot-time clock (which counts suspend)
# running ahead of the monotonic clock (which does not), a frozen process (SIGSTOP, a stalled VM) as the
# monotonic clock running past the tick. Either by more than RESUME_JUMP_S means "probe now".
TICK_S = 2.0
RESUME_JUMP_S = 3.0


@dataclass(frozen=True)
class Route:
    """The kernel's answer to "how would you send to the relay now" (RTM_GETROUTE): the outgoing interface
    index, the next hop (None: on-link) and the source address it would choose."""

    oif: int | None
    gateway: str | None
    prefsrc: str | None

    def describe(self) -> str:
        via = f"via {self.gateway} " if self.gateway else ""
        return f"{via}dev #{self.oif} src {self.prefsrc}"


@dataclass(frozen=True)
class PathState:
    """What the connection's path looks like: does its local address still exist on this host, and the
    route the kernel would use to the relay (None: no route at all)."""

    local_present: bool
    route: Route | None


@dataclass(frozen=True)
class PathChange:
    """Why the connection's path may be broken: ``reason`` is ``address change`` or ``route change`` (what
    status shows if the probe then fails), ``detail`` says what changed, for the log."""

    reason: str
    detail: str


def path_change(baseline: PathState, now: PathState, local: str) -> PathChange | None:
    """How the connection's path differs from ``baseline``; None if it is the same.

    :param baseline: the state when the connection came up (or when a probe last confirmed it)
    :param now: the state after a network change
    :param local: the connection's local address (for the message)
    """
    if not now.local_present:
        return PathChange("address change", f"local address {local} gone")
    if now.route is None:
        return PathChange("route change", "no route to the relay")
    if baseline.route != now.route:
        before = baseline.route.describe() if baseline.route else "none"
        return PathChange("route change", f"route to the relay changed ({before} -> {now.route.describe()})")
    return None


@dataclass
class CheckBudget:
    """A token bucket for checks after network changes (pure: every call takes ``now``)."""

    burst: int = CHECK_BURST
    refill_s: float = CHECK_REFILL_S
    tokens: float = float(CHECK_BURST)
    at: float | None = None

    def _refill(self, now: float) -> None:
        if self.at is not None:
            self.tokens = min(float(self.burst), self.tokens + max(0.0, now - self.at) / self.refill_s)
        self.at = now

    def wait_s(self, now: float) -> float:
        """Seconds until a check is allowed (0: now)."""
        self._refill(now)
        return 0.0 if self.tokens >= 1 else (1 - self.tokens) * self.refill_s

    def take(self, now: float) -> None:
        """Spend one check (call only when :meth:`wait_s` said 0)."""
        self._refill(now)
        self.tokens = max(0.0, self.tokens - 1)


def resumed(mono_delta_s: float, boot_delta_s: float, tick_s: float = TICK_S,
            jump_s: float = RESUME_JUMP_S) -> bool:
    """Whether one tick of the resume timer spans a suspend or a freeze (pure).

    :param mono_delta_s: monotonic seconds since the previous tick (does not count a suspend)
    :param boot_delta_s: boot-time seconds since the previous tick (counts a suspend)
    """
    return boot_delta_s - mono_delta_s > jump_s or mono_delta_s - tick_s > jump_s
