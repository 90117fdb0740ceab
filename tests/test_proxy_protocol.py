"""PROXY protocol v1/v2 header parsing (inverse_cloud/tunnel/proxy_protocol.py), as a table: complete
headers, every incomplete prefix, and what must be refused."""

from __future__ import annotations

import ipaddress

import pytest

from inverse_cloud.tunnel.proxy_protocol import V2_SIGNATURE, ProxyHeaderError, parse_proxy_header

TLS = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"   # the start of a ClientHello


def v2(cmd: int, fam: int, body: bytes) -> bytes:
    return V2_SIGNATURE + bytes([0x20 | cmd, fam]) + len(body).to_bytes(2, "big") + body


V2_TCP4 = v2(1, 0x11, ipaddress.IPv4Address("198.51.100.7").packed + ipaddress.IPv4Address("203.0.113.1").packed
             + (51000).to_bytes(2, "big") + (443).to_bytes(2, "big"))
V2_TCP6 = v2(1, 0x21, ipaddress.IPv6Address("2001:db8::7").packed + ipaddress.IPv6Address("2001:db8::1").packed
             + (51001).to_bytes(2, "big") + (443).to_bytes(2, "big"))
V2_TCP4_TLV = v2(1, 0x11, V2_TCP4[16:] + b"\x04\x00\x02ab")     # a TLV after the addresses is skipped


@pytest.mark.parametrize(("header", "origin"), [
    (b"PROXY TCP4 198.51.100.7 203.0.113.1 51000 443\r\n", ("198.51.100.7", 51000)),
    (b"PROXY TCP6 2001:db8::7 2001:db8::1 51001 443\r\n", ("2001:db8::7", 51001)),
    (b"PROXY UNKNOWN\r\n", None),
    (b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n", None),
    (V2_TCP4, ("198.51.100.7", 51000)),
    (V2_TCP6, ("2001:db8::7", 51001)),
    (V2_TCP4_TLV, ("198.51.100.7", 51000)),
    (v2(0, 0x00, b""), None),                                    # LOCAL (a health check)
    (v2(1, 0x00, b""), None),                                    # PROXY with AF_UNSPEC
])
def test_complete_headers(header, origin):
    assert parse_proxy_header(header + TLS) == (origin, len(header))
    for cut in range(len(header)):                               # every incomplete prefix asks for more
        assert parse_proxy_header(header[:cut]) == (None, 0), cut


@pytest.mark.parametrize("data", [
    TLS,                                                          # a phone's TLS without a header
    b"GET / HTTP/1.1\r\n",
    b"PROXY TCP4 198.51.100.7 203.0.113.1 51000\r\n",             # a field missing
    b"PROXY TCP4 2001:db8::7 203.0.113.1 51000 443\r\n",          # family and address disagree
    b"PROXY TCP4 198.51.100.7 203.0.113.1 99999 443\r\n",         # port out of range
    b"PROXY TCP4 198.51.100.7 203.0.113.1 +5 443\r\n",
    b"PROXY TCP5 198.51.100.7 203.0.113.1 1 2\r\n",
    b"PROXY " + b"1" * 120,                                       # no CRLF within 107 bytes
    b"PRXY TCP4",
    V2_SIGNATURE[:11] + b"X",
    v2(1, 0x11, b"\x01\x02"),                                     # IPv4 block too short
    v2(1, 0x31, b""),                                             # AF_UNIX: not from a TCP router
    V2_SIGNATURE + b"\x11\x11\x00\x00",                           # version 1 in a v2 header
    V2_SIGNATURE + b"\x2f\x11\x00\x00",                           # unknown command
])
def test_refused(data):
    with pytest.raises(ProxyHeaderError):
        parse_proxy_header(data)


def test_empty_asks_for_more():
    assert parse_proxy_header(b"") == (None, 0)
