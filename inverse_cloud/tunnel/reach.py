"""Which relay SSH port the link uses: ``[relay] port``, else ``[relay] fallback_port`` (the relay's sshd
behind sslh on 443, for networks that block outbound SSH). The port that worked last is tried first, so a
laptop in such a network pays the blocked port's connect timeout once, not on every reconnect."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

from inverse_cloud.config import RelayConfig
from inverse_cloud.errors import TunnelError
from inverse_cloud.tunnel.policy import ssh_ports, tries_next_port

__all__ = ["PortChooser"]

log = logging.getLogger("inverse_cloud.tunnel.link")

T = TypeVar("T")


class PortChooser:
    """Remembers the port in use; :meth:`connect` walks the ports for one connection attempt."""

    def __init__(self, relay: RelayConfig, tag: str, describe: Callable[[BaseException], str]) -> None:
        self.primary, self.fallback, self.tag = relay.port, relay.fallback_port, tag
        self._describe = describe
        self.in_use: int | None = None   # the port of the current (or last) link

    @property
    def on_fallback(self) -> bool:
        return self.in_use is not None and self.in_use != self.primary

    async def connect(self, connect_port: Callable[[int], Awaitable[T]], *, remember: bool = True) -> T:
        """``connect_port(port)`` on each port in turn, moving on only when the network let no SSH session
        through (:func:`~inverse_cloud.tunnel.policy.tries_next_port`); other errors propagate at once.

        :raises TunnelError: naming each port's failure, when every port failed that way.
        """
        ports = ssh_ports(self.primary, self.fallback, self.in_use)
        failures: list[str] = []
        for i, port in enumerate(ports):
            try:
                result = await connect_port(port)
            except Exception as exc:
                if len(ports) == 1 or not tries_next_port(exc):
                    raise
                failures.append(f"port {port}: {self._describe(exc)}")
                if i + 1 < len(ports):
                    log.debug("%s SSH on port %d failed (%s); trying port %d", self.tag, port, exc, ports[i + 1])
                    continue
                raise TunnelError("; ".join(failures)) from exc
            if remember and port != self.in_use:
                how = "the fallback port" if port != self.primary else "the SSH port"
                log.info("%s SSH reaches the relay on %s %d%s", self.tag, how, port,
                         f" ({'; '.join(failures)})" if failures else "")
            if remember:
                self.in_use = port
            return result
        raise AssertionError("unreachable")
