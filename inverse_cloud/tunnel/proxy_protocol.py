"""The PROXY protocol header (HAProxy's spec, versions 1 and 2), parsed (pure) on connections that arrive
through the tunnel when the relay's SNI router (nginx ``stream`` with ``proxy_protocol on``) sends one:
the laptop then sees each phone's address instead of the router's 127.0.0.1.

Only connections arriving through the tunnel's HTTPS forward are ever parsed, and only with ``[relay]
proxy_protocol = true``; a phone connecting to the laptop's listener directly is never asked for a header,
so it cannot claim another address. With the option on, a forwarded connection without a valid header is
closed (the relay is misconfigured, or something reaches the forwarded port around the router).
"""

from __future__ import annotations

import ipaddress

__all__ = ["MAX_HEADER", "ProxyHeaderError", "parse_proxy_header"]

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V1_MAX = 107          # the spec's longest v1 line, CRLF included
MAX_HEADER = 16 + 65535


class ProxyHeaderError(ValueError):
    """The bytes are not a PROXY protocol header (the message says why, in a few words)."""


def parse_proxy_header(buf: bytes) -> tuple[tuple[str, int] | None, int]:
    """``(origin, consumed)`` for a complete header at the start of ``buf``: origin is the client's (address,
    port), or None for a LOCAL/UNKNOWN header (a health check: keep the router's address). ``(None, 0)``
    when more bytes are needed.

    :raises ProxyHeaderError: not a PROXY header, or a malformed one.
    """
    if buf[:1] == b"P":
        return _parse_v1(buf)
    if buf[:1] == b"\r":
        return _parse_v2(buf)
    if not buf:
        return None, 0
    raise ProxyHeaderError("no PROXY protocol header")


def _parse_v1(buf: bytes) -> tuple[tuple[str, int] | None, int]:
    if b"PROXY "[:len(buf)] != buf[:6]:
        raise ProxyHeaderError("no PROXY protocol header")
    end = buf.find(b"\r\n", 0, V1_MAX)
    if end < 0:
        if len(buf) >= V1_MAX:
            raise ProxyHeaderError("PROXY v1 line too long")
        return None, 0
    parts = buf[:end].decode("ascii", "replace").split(" ")
    if len(parts) >= 2 and parts[1] == "UNKNOWN":
        return None, end + 2
    if len(parts) != 6 or parts[1] not in ("TCP4", "TCP6"):
        raise ProxyHeaderError("malformed PROXY v1 line")
    try:
        src = ipaddress.ip_address(parts[2])
        ipaddress.ip_address(parts[3])
        sport, dport = int(parts[4]), int(parts[5])
    except ValueError:
        raise ProxyHeaderError("malformed PROXY v1 addresses") from None
    if (src.version == 4) != (parts[1] == "TCP4") or not (0 <= sport <= 65535 and 0 <= dport <= 65535) \
            or parts[4] != str(sport):
        raise ProxyHeaderError("malformed PROXY v1 addresses")
    return (str(src), sport), end + 2


def _parse_v2(buf: bytes) -> tuple[tuple[str, int] | None, int]:
    if V2_SIGNATURE[:len(buf)] != buf[:12]:
        raise ProxyHeaderError("no PROXY protocol header")
    if len(buf) < 16:
        return None, 0
    ver_cmd, fam, length = buf[12], buf[13], int.from_bytes(buf[14:16], "big")
    if ver_cmd >> 4 != 2 or ver_cmd & 0xF not in (0, 1):
        raise ProxyHeaderError("unsupported PROXY v2 version or command")
    if len(buf) < 16 + length:
        return None, 0
    body, total = buf[16:16 + length], 16 + length
    if ver_cmd & 0xF == 0:         # LOCAL
        return None, total
    if fam == 0x11:                # TCP over IPv4
        if length < 12:
            raise ProxyHeaderError("short PROXY v2 IPv4 block")
        return (str(ipaddress.IPv4Address(body[0:4])), int.from_bytes(body[8:10], "big")), total
    if fam == 0x21:                # TCP over IPv6
        if length < 36:
            raise ProxyHeaderError("short PROXY v2 IPv6 block")
        return (str(ipaddress.IPv6Address(body[0:16])), int.from_bytes(body[32:34], "big")), total
    if fam & 0xF0 == 0:            # AF_UNSPEC: keep the router's address
        return None, total
    raise ProxyHeaderError("unsupported PROXY v2 address family")
