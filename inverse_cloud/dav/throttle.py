"""Per-address limits on requests whose credentials are not known good (password guessing).

What fail2ban would do from the log, in-process and at once, keyed by the address the relay saw:

* at most ``MAX_IN_FLIGHT`` unverified requests per address at a time (waiting for a worker included),
  so one address can never hold all of Radicale's unverified slots: the rest answer 429 at once,
  without a thread or a bcrypt check;
* after ``FREE_FAILURES`` failed logins an address waits before its next unverified request, the wait
  doubling with each further failure (table below); a success from the address forgives its failures,
  and failures older than ``FORGET_S`` are forgotten.

Known-good credentials never pass through here: a phone that has synced keeps syncing from a guessing
address. Many addresses guessing at once (a botnet) are bounded only by the shared unverified slots.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["AddressThrottle", "backoff_s"]

MAX_IN_FLIGHT = 2
FREE_FAILURES = 3
FORGET_S = 600.0
MAX_TRACKED = 10_000

# failures beyond FREE_FAILURES -> seconds before the next unverified request from the address
_BACKOFF_S = (1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 60.0)


def backoff_s(failures: int) -> float:
    """Seconds an address waits after ``failures`` failed logins (pure)."""
    beyond = failures - FREE_FAILURES
    if beyond <= 0:
        return 0.0
    return _BACKOFF_S[min(beyond, len(_BACKOFF_S)) - 1]


@dataclass
class _Source:
    in_flight: int = 0
    failures: int = 0
    last_failure: float = 0.0


class AddressThrottle:
    """Admission of unverified requests per client address (see the module docstring)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._sources: dict[str, _Source] = {}

    def retry_after(self, address: str) -> float:
        """0 when a new unverified request from ``address`` may start now, else seconds to wait."""
        src = self._sources.get(address)
        if src is None:
            return 0.0
        now = self.clock()
        if src.failures and now - src.last_failure > FORGET_S:
            src.failures = 0
        wait = src.last_failure + backoff_s(src.failures) - now
        if wait > 0:
            return wait
        return 1.0 if src.in_flight >= MAX_IN_FLIGHT else 0.0

    def begin(self, address: str) -> None:
        if address not in self._sources and len(self._sources) >= MAX_TRACKED:
            self._prune()
        self._sources.setdefault(address, _Source()).in_flight += 1

    def end(self, address: str, *, failed: bool, succeeded: bool) -> None:
        src = self._sources.get(address)
        if src is None:
            return
        src.in_flight = max(0, src.in_flight - 1)
        if failed:
            src.failures += 1
            src.last_failure = self.clock()
        elif succeeded:
            src.failures = 0
        if not src.in_flight and not src.failures:
            del self._sources[address]

    def _prune(self) -> None:
        now = self.clock()
        for address, src in list(self._sources.items()):
            if not src.in_flight and now - src.last_failure > FORGET_S:
                del self._sources[address]
