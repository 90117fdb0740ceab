"""The relay's IPv6 path for the default (DNAT) variant, as nftables text (pure: no I/O, no clock).

IPv4 maps public 443/80 onto the forwards sshd binds on 127.0.0.1 (DNAT, with ``route_localnet``). IPv6 has no
``route_localnet``: a packet from outside DNAT-ed to ``::1`` is dropped by the kernel (the phone gets "network
unreachable"). So for IPv6 the laptop binds the same two forwards a second time on an IPv6 address of the relay
(``[relay] listen_host6``, ``"::"`` by default: sshd binds it IPv6-only), and an ``ip6`` table redirects public
[v6]:443/80 onto them. The client address is kept, as with DNAT on IPv4.

Those forwards listen on a public address, so the table also keeps the intent of the IPv4 loopback rule: from
outside, only connections this table redirected may reach the forwarded ports; a phone cannot bypass 443.
"""

from __future__ import annotations

from inverse_cloud.tunnel.relay_divert import divert_chain

__all__ = ["ip6_forward_target", "nftables6_rules", "permit6"]


def permit6(listen_host6: str, ports: tuple[int, ...]) -> list[str]:
    """``[host]:port`` for PermitListen / permitlisten (sshd compares the host as text: "::" is "::")."""
    return [f"[{listen_host6}]:{p}" for p in ports] if listen_host6 else []


def ip6_forward_target(listen_host6: str, port: int) -> str:
    """The nft action that maps a public [v6] port onto a forward bound on ``listen_host6``: ``redirect`` (to
    the address the packet came to, or ``::1`` from the relay itself) for ``"::"``, else a DNAT to that address."""
    if listen_host6 == "::":
        return f"redirect to :{port}"
    return f"dnat to [{listen_host6}]:{port}"


def nftables6_rules(domain: str, listen_host6: str, https_port: int, http_port: int, *, map_443: bool = True,
                    divert_ports: tuple[int, ...] = ()) -> str:
    """The ``ip6 inverse_cloud`` table: public [v6]:443 -> the https forward (unless sslh owns 443,
    ``map_443`` False), [v6]:80 -> the http forward, in PREROUTING (phones) and OUTPUT (the relay itself);
    an input rule drops what reaches the forwarded ports from outside without having been mapped. With
    ``divert_ports`` (a transparent sslh's targets), their replies from ::1 are marked for local delivery
    (:mod:`inverse_cloud.tunnel.relay_divert`)."""
    https, http = ip6_forward_target(listen_host6, https_port), ip6_forward_target(listen_host6, http_port)
    pre443 = f"        fib daddr type local tcp dport 443 {https}\n" if map_443 else ""
    out443 = f"        fib daddr type local ip6 daddr != ::1 tcp dport 443 {https}\n" if map_443 else ""
    return (
        f"# IPv6 for {domain}: public [v6]:443/80 -> the forwards the laptop binds on [{listen_host6}]\n"
        "table ip6 inverse_cloud\n"
        "delete table ip6 inverse_cloud\n"
        "table ip6 inverse_cloud {\n"
        "    chain prerouting {\n"
        "        type nat hook prerouting priority dstnat; policy accept;\n"
        + pre443 +
        f"        fib daddr type local tcp dport 80 {http}\n"
        "    }\n"
        "    chain output {\n"
        "        type nat hook output priority -100; policy accept;\n"
        + out443 +
        f"        fib daddr type local ip6 daddr != ::1 tcp dport 80 {http}\n"
        "    }\n"
        "    chain input {\n"
        "        # The forwards listen on a public address: from outside only what this table mapped gets there.\n"
        "        type filter hook input priority filter; policy accept;\n"
        f"        iif != \"lo\" tcp dport {{ {https_port}, {http_port} }} ct status & dnat == 0 drop\n"
        "    }\n"
        + (divert_chain(divert_ports, ipv6=True) if divert_ports else "") +
        "}\n"
    )
