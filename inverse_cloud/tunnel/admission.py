"""Which tunnel channels are accepted: a cap in total and per client address (the address the relay saw).

Each accepted channel costs two descriptors on the laptop (the tunnel's loopback socket and the one our
listener accepts) from the moment it is accepted, long before a TLS handshake finishes. So the cap is
enforced here, where the channel arrives, and counts every channel from acceptance to close, the
handshake included: idle connections to the relay's public port can fill the cap but never the
descriptor table, and one address can hold only ``per_address`` of it (nginx's ``limit_conn``).
Refusals are logged as one WARNING line per interval with their count.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

__all__ = ["ChannelAdmission", "PER_ADDRESS_CHANNELS"]

log = logging.getLogger(__name__)

# A household behind one NAT: a few phones and laptops, each with 1-4 connections, with room to spare.
PER_ADDRESS_CHANNELS = 32
WARN_INTERVAL_S = 60.0


class ChannelAdmission:
    def __init__(self, max_total: int, per_address: int = PER_ADDRESS_CHANNELS, *, tag: str = "",
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.max_total, self.per_address, self.tag, self.clock = max_total, per_address, tag, clock
        self.total = 0
        self._by_address: dict[str, int] = {}
        self._refused = 0
        self._last_warn = -WARN_INTERVAL_S

    def admit(self, address: str) -> str | None:
        """Count one channel from ``address`` and return None, or refuse it: the reason, logged at most
        once per WARN_INTERVAL_S."""
        held = self._by_address.get(address, 0)
        if self.total >= self.max_total:
            reason = f"{self.total} tunnel connections open (the cap, [server] max_connections)"
        elif held >= self.per_address:
            reason = f"{address} holds {held} tunnel connections (the per-address cap)"
        else:
            self.total += 1
            self._by_address[address] = held + 1
            return None
        self._refused += 1
        now = self.clock()
        if now - self._last_warn >= WARN_INTERVAL_S:
            log.warning("%s refusing tunnel connections: %s; %d refused since the last such line", self.tag,
                        reason, self._refused)
            self._last_warn, self._refused = now, 0
        return reason

    def release(self, address: str) -> None:
        held = self._by_address.get(address, 0)
        if held <= 1:
            self._by_address.pop(address, None)
        else:
            self._by_address[address] = held - 1
        self.total = max(0, self.total - 1)
