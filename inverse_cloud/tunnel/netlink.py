"""The kernel side of the link watcher: Linux rtnetlink over the stdlib ``socket.AF_NETLINK`` (no
pyroute2: we need one subscription and one query, about a hundred lines, and a dependency for that is
more to keep up than the code).

* :func:`open_monitor`: a non-blocking socket subscribed to address, route and link changes (IPv4 and
  IPv6); :func:`drain` reads what is queued and says whether anything of interest came.
* :func:`lookup_route`: RTM_GETROUTE for one address (what ``ip route get ADDR`` prints): outgoing
  interface, gateway, source address.
* :func:`address_present`: whether an address still exists on this host (a bind to it succeeds).

Message layouts: rtnetlink(7), netlink(7); ``include/uapi/linux/rtnetlink.h`` for the numbers.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import itertools
import socket
import struct

from inverse_cloud.tunnel.netwatch import Route

__all__ = ["address_present", "drain", "lookup_route", "message_types", "open_monitor", "parse_route_reply",
           "route_request"]

# Multicast groups (the RTMGRP_* bit masks of rtnetlink.h).
RTMGRP_LINK = 0x1
RTMGRP_IPV4_IFADDR = 0x10
RTMGRP_IPV4_ROUTE = 0x40
RTMGRP_IPV6_IFADDR = 0x100
RTMGRP_IPV6_ROUTE = 0x400
GROUPS = RTMGRP_LINK | RTMGRP_IPV4_IFADDR | RTMGRP_IPV4_ROUTE | RTMGRP_IPV6_IFADDR | RTMGRP_IPV6_ROUTE

NLMSG_ERROR = 2
NLM_F_REQUEST = 1
RTM_NEWLINK, RTM_DELLINK = 16, 17
RTM_NEWADDR, RTM_DELADDR = 20, 21
RTM_NEWROUTE, RTM_DELROUTE, RTM_GETROUTE = 24, 25, 26
CHANGES = frozenset({RTM_NEWLINK, RTM_DELLINK, RTM_NEWADDR, RTM_DELADDR, RTM_NEWROUTE, RTM_DELROUTE})
RTA_DST, RTA_OIF, RTA_GATEWAY, RTA_PREFSRC = 1, 4, 5, 7

_NLMSGHDR = struct.Struct("=IHHII")     # length, type, flags, sequence, port id
_RTMSG = struct.Struct("=BBBBBBBBI")    # family, dst_len, src_len, tos, table, protocol, scope, type, flags
_RTATTR = struct.Struct("=HH")          # length, type
# How long the kernel may take to answer a route query (it answers while handling the request; this only
# bounds a kernel that does not).
LOOKUP_TIMEOUT_S = 1.0
_seq = itertools.count(1)


def _align(n: int) -> int:
    return (n + 3) & ~3


def open_monitor() -> socket.socket:
    """A non-blocking rtnetlink socket subscribed to address, route and link changes.

    :raises OSError: no rtnetlink here (not Linux, or a sandbox without it).
    """
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC,
                         socket.NETLINK_ROUTE)
    try:
        sock.bind((0, GROUPS))
    except OSError:
        sock.close()
        raise
    return sock


def message_types(data: bytes) -> list[int]:
    """The message types in one datagram from a netlink socket (pure)."""
    out = []
    offset = 0
    while offset + _NLMSGHDR.size <= len(data):
        length, kind, _, _, _ = _NLMSGHDR.unpack_from(data, offset)
        if length < _NLMSGHDR.size:
            break
        out.append(kind)
        offset += _align(length)
    return out


def drain(sock: socket.socket) -> bool:
    """Read everything queued on the monitor socket; True if an address, route or link changed (or the
    kernel dropped messages because we read too slowly: something changed, we do not know what)."""
    changed = False
    while True:
        try:
            data = sock.recv(65536)
        except BlockingIOError:
            return changed
        except OSError as exc:
            if exc.errno == errno.ENOBUFS:
                changed = True
                continue
            raise
        if not data:
            return changed
        changed = changed or any(kind in CHANGES for kind in message_types(data))


def route_request(address: str, seq: int) -> bytes:
    """An RTM_GETROUTE request for ``address`` (pure)."""
    ip = ipaddress.ip_address(address)
    family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
    raw = ip.packed
    attr = _RTATTR.pack(_RTATTR.size + len(raw), RTA_DST) + raw
    body = _RTMSG.pack(family, len(raw) * 8, 0, 0, 0, 0, 0, 0, 0) + attr
    return _NLMSGHDR.pack(_NLMSGHDR.size + len(body), RTM_GETROUTE, NLM_F_REQUEST, seq, 0) + body


def parse_route_reply(data: bytes, seq: int) -> tuple[bool, Route | None]:
    """``(answered, route)`` from one datagram (pure): ``answered`` is False if ``data`` holds no answer to
    request ``seq``; ``route`` is None if the kernel has no route (network or host unreachable).

    :raises OSError: the kernel answered with another error.
    """
    offset = 0
    while offset + _NLMSGHDR.size <= len(data):
        length, kind, _, got_seq, _ = _NLMSGHDR.unpack_from(data, offset)
        if length < _NLMSGHDR.size:
            break
        payload = data[offset + _NLMSGHDR.size:offset + length]
        offset += _align(length)
        if got_seq != seq:
            continue
        if kind == NLMSG_ERROR:
            code = -struct.unpack_from("=i", payload)[0]
            if code in (errno.ENETUNREACH, errno.EHOSTUNREACH, errno.EINVAL):
                return True, None
            raise OSError(code, f"route lookup: {errno.errorcode.get(code, code)}")
        if kind != RTM_NEWROUTE or len(payload) < _RTMSG.size:
            continue
        family = payload[0]
        oif: int | None = None
        gateway = prefsrc = None
        pos = _RTMSG.size
        while pos + _RTATTR.size <= len(payload):
            alen, atype = _RTATTR.unpack_from(payload, pos)
            if alen < _RTATTR.size:
                break
            value = payload[pos + _RTATTR.size:pos + alen]
            if atype == RTA_OIF and len(value) >= 4:
                oif = struct.unpack_from("=I", value)[0]
            elif atype in (RTA_GATEWAY, RTA_PREFSRC):
                text = socket.inet_ntop(family, value)
                gateway, prefsrc = (text, prefsrc) if atype == RTA_GATEWAY else (gateway, text)
            pos += _align(alen)
        return True, Route(oif=oif, gateway=gateway, prefsrc=prefsrc)
    return False, None


async def lookup_route(address: str) -> Route | None:
    """The route the kernel would use to ``address`` now; None if it has none.

    :raises OSError: no rtnetlink, or the kernel refused the query.
    :raises TimeoutError: no answer within LOOKUP_TIMEOUT_S.
    """
    loop = asyncio.get_running_loop()
    seq = next(_seq)
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC,
                       socket.NETLINK_ROUTE) as sock:
        sock.bind((0, 0))
        await loop.sock_sendall(sock, route_request(address, seq))
        async with asyncio.timeout(LOOKUP_TIMEOUT_S):
            while True:
                answered, route = parse_route_reply(await loop.sock_recv(sock, 65536), seq)
                if answered:
                    return route


def address_present(address: str) -> bool:
    """Whether ``address`` is still one of this host's addresses (binding a UDP socket to it succeeds).

    :raises OSError: the check itself failed for another reason.
    """
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        try:
            sock.bind((address, 0))
        except OSError as exc:
            if exc.errno == errno.EADDRNOTAVAIL:
                return False
            raise
    return True
