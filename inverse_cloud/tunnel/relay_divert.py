"""The relay-side routing that sslh's transparent mode needs (pure: no I/O, no clock).

In transparent mode sslh connects to its targets (sshd on 127.0.0.1:22, the https forward on 127.0.0.1:44353)
*from the client's own address* (``IP_TRANSPARENT``), so sshd, and through the forward's originator address the
laptop, see the phone's address instead of 127.0.0.1. The targets' replies are addressed to the phone, and would
leave by the default route: they must be handed back to sslh's socket on this machine instead. The replies are
marked (only packets from 127.0.0.0/8 on the targets' ports to a non-loopback address: a connection that comes to
sshd's public address directly answers from that address and is not touched), and the mark selects a routing
table whose only route delivers everything locally. Debian 12's sslh 1.20 supports this (it keeps
CAP_NET_ADMIN after dropping to its user); it sends no PROXY headers.

IPv6 (``--ipv6``): sslh 1.20 connects transparently only to a target address of the client's own family (its
connect loop skips the others). So its targets are named ``localhost``, which the relay's /etc/hosts maps to
both 127.0.0.1 and ::1: an IPv4 phone goes to 127.0.0.1, an IPv6 phone to ::1, where sshd (listening on ``::``
by default) and the laptop's second forward pair on ``[::]`` answer. Their replies from ::1 are marked in the
``ip6`` table the same way, and an ``ip -6`` rule and route deliver them locally.
"""

from __future__ import annotations

__all__ = ["DIVERT_MARK", "DIVERT_TABLE", "divert_chain", "divert_routes", "localhost_check"]

DIVERT_MARK = 0x1c      # the fwmark of replies to transparently proxied connections
DIVERT_TABLE = 1443     # the routing table that delivers them locally


def divert_chain(ports: tuple[int, ...], *, ipv6: bool = False) -> str:
    """The chain (inside ``table ip inverse_cloud``, or ``table ip6 inverse_cloud`` with ``ipv6``) that marks
    the targets' replies."""
    listed = ", ".join(str(p) for p in ports)
    match = "ip6 saddr ::1 ip6 daddr != ::1" if ipv6 else "ip saddr 127.0.0.0/8 ip daddr != 127.0.0.0/8"
    return (
        "    chain sslh_divert {\n"
        "        # sslh transparent: replies of its targets go back to sslh on this machine (routing table "
        f"{DIVERT_TABLE})\n"
        "        type route hook output priority mangle; policy accept;\n"
        f"        {match} tcp sport {{ {listed} }} meta mark set {DIVERT_MARK:#x}\n"
        "    }\n"
    )


def divert_routes(*, ipv6: bool = False) -> str:
    """Shell lines (idempotent) for the policy route the mark selects (and its IPv6 twin with ``ipv6``); run at
    boot by the NAT loader."""
    families = ("ip", "ip -6") if ipv6 else ("ip",)
    return "".join(
        f"{ip} rule del fwmark {DIVERT_MARK:#x} lookup {DIVERT_TABLE} 2>/dev/null || true\n"
        f"{ip} rule add fwmark {DIVERT_MARK:#x} lookup {DIVERT_TABLE}\n"
        f"{ip} route replace local {'::/0' if ip != 'ip' else '0.0.0.0/0'} dev lo table {DIVERT_TABLE}\n"
        for ip in families)


def localhost_check() -> str:
    """setup.sh lines: refuse a relay whose ``localhost`` does not resolve to both loopback addresses (sslh's
    targets with ``--ipv6``: one family missing would leave those phones unable to connect)."""
    return (
        "case \"$(getent ahosts localhost | awk '{print $1}' | sort -u | tr '\\n' ' ')\" in\n"
        "    *'127.0.0.1 '*'::1 '*|*'::1 '*'127.0.0.1 '*) ;;\n"
        "    *) echo \"localhost must resolve to both 127.0.0.1 and ::1 (sslh's targets with --ipv6): add the line "
        "'::1 localhost' or '127.0.0.1 localhost' that /etc/hosts lacks\" >&2; exit 1;;\n"
        "esac\n"
    )
