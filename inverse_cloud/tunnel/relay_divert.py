"""The relay-side routing that sslh's transparent mode needs (pure: no I/O, no clock).

In transparent mode sslh connects to its targets (sshd on 127.0.0.1:22, the https forward on 127.0.0.1:44353)
*from the client's own address* (``IP_TRANSPARENT``), so sshd, and through the forward's originator address the
laptop, see the phone's address instead of 127.0.0.1. The targets' replies are addressed to the phone, and would
leave by the default route: they must be handed back to sslh's socket on this machine instead. The replies are
marked (only packets from 127.0.0.0/8 on the targets' ports to a non-loopback address: a connection that comes to
sshd's public address directly answers from that address and is not touched), and the mark selects a routing
table whose only route delivers everything locally. Debian 12's sslh 1.20 supports this (it keeps
CAP_NET_ADMIN after dropping to its user); it sends no PROXY headers.
"""

from __future__ import annotations

__all__ = ["DIVERT_MARK", "DIVERT_TABLE", "divert_chain", "divert_routes"]

DIVERT_MARK = 0x1c      # the fwmark of replies to transparently proxied connections
DIVERT_TABLE = 1443     # the routing table that delivers them locally


def divert_chain(ports: tuple[int, ...]) -> str:
    """The chain (inside ``table ip inverse_cloud``) that marks the targets' replies."""
    listed = ", ".join(str(p) for p in ports)
    return (
        "    chain sslh_divert {\n"
        "        # sslh transparent: replies of its targets go back to sslh on this machine (routing table "
        f"{DIVERT_TABLE})\n"
        "        type route hook output priority mangle; policy accept;\n"
        f"        ip saddr 127.0.0.0/8 ip daddr != 127.0.0.0/8 tcp sport {{ {listed} }} "
        f"meta mark set {DIVERT_MARK:#x}\n"
        "    }\n"
    )


def divert_routes() -> str:
    """Shell lines (idempotent) for the policy route the mark selects; run at boot by the NAT loader."""
    return (
        f"ip rule del fwmark {DIVERT_MARK:#x} lookup {DIVERT_TABLE} 2>/dev/null || true\n"
        f"ip rule add fwmark {DIVERT_MARK:#x} lookup {DIVERT_TABLE}\n"
        f"ip route replace local 0.0.0.0/0 dev lo table {DIVERT_TABLE}\n"
    )
