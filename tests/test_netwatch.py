"""The link watcher's pure decisions (netwatch), the netlink message layouts (netlink), and the reason a
reconnect is shown with (policy.lost_reason)."""

from __future__ import annotations

import asyncio
import socket
import struct

import pytest

from inverse_cloud.tunnel import netlink
from inverse_cloud.tunnel.netwatch import (
    CHECK_BURST,
    CHECK_REFILL_S,
    CheckBudget,
    PathChange,
    PathState,
    Route,
    path_change,
    resumed,
)
from inverse_cloud.tunnel.policy import lost_reason

WIFI = Route(oif=3, gateway="192.168.1.1", prefsrc="192.168.1.20")
TETHER = Route(oif=5, gateway="172.20.10.1", prefsrc="172.20.10.2")
SAME_WIFI_NEW_SRC = Route(oif=3, gateway="192.168.1.1", prefsrc="192.168.1.33")
BASE = PathState(local_present=True, route=WIFI)


@pytest.mark.parametrize("now,expected", [
    (PathState(True, WIFI), None),                                          # e.g. a route elsewhere changed
    (PathState(False, WIFI), PathChange("address change", "local address 192.168.1.20 gone")),
    (PathState(False, None), PathChange("address change", "local address 192.168.1.20 gone")),
    (PathState(True, None), PathChange("route change", "no route to the relay")),
    (PathState(True, TETHER), PathChange("route change", "route to the relay changed (via 192.168.1.1 dev #3 "
                                         "src 192.168.1.20 -> via 172.20.10.1 dev #5 src 172.20.10.2)")),
    (PathState(True, SAME_WIFI_NEW_SRC), PathChange("route change", "route to the relay changed (via "
                                                    "192.168.1.1 dev #3 src 192.168.1.20 -> via 192.168.1.1 "
                                                    "dev #3 src 192.168.1.33)")),
])
def test_path_change_table(now, expected):
    assert path_change(BASE, now, "192.168.1.20") == expected


def test_path_change_from_a_baseline_without_route():
    """A connection made while the route lookup failed: any route now counts as a change (probe)."""
    got = path_change(PathState(True, None), PathState(True, WIFI), "192.168.1.20")
    assert got is not None and got.reason == "route change" and "none -> via 192.168.1.1" in got.detail


def test_check_budget_burst_then_one_per_refill():
    """Three checks at once, then the fourth waits a full refill; after that one per refill interval."""
    b = CheckBudget()
    for _ in range(CHECK_BURST):
        assert b.wait_s(100.0) == 0
        b.take(100.0)
    assert b.wait_s(100.0) == pytest.approx(CHECK_REFILL_S)
    assert b.wait_s(100.0 + CHECK_REFILL_S / 2) == pytest.approx(CHECK_REFILL_S / 2)
    assert b.wait_s(100.0 + CHECK_REFILL_S) == 0
    b.take(100.0 + CHECK_REFILL_S)
    assert b.wait_s(100.0 + CHECK_REFILL_S) == pytest.approx(CHECK_REFILL_S)


def test_check_budget_refills_to_burst_only():
    b = CheckBudget()
    b.take(0.0)
    assert b.wait_s(10_000.0) == 0
    assert b.tokens == CHECK_BURST


def test_check_budget_bounds_a_flapping_wifi():
    """10 flaps in 5 s, each asking for a check as soon as the budget allows: at most burst + 5 s / refill
    checks happen within the 5 s (the bound the flapping integration test relies on)."""
    b = CheckBudget()
    t, checks = 0.0, 0
    events = [i * 0.5 for i in range(10)]
    for ev in events:
        t = max(t, ev)
        t += b.wait_s(t)
        b.take(t)
        checks += 1
        if t > 5.0:
            break
    assert checks <= CHECK_BURST + int(5.0 / CHECK_REFILL_S) + 1


@pytest.mark.parametrize("mono,boot,expected", [
    (2.0, 2.0, False),      # an ordinary tick
    (2.5, 2.5, False),      # a busy loop, a little late
    (2.0, 62.0, True),      # suspended for a minute: boot time counts it, monotonic does not
    (62.0, 62.0, True),     # frozen (SIGSTOP, a stalled VM) for a minute
    (2.0, 4.9, False),      # 2.9 s of suspend: under the 3 s threshold
    (2.0, 5.1, True),
])
def test_resumed_table(mono, boot, expected):
    assert resumed(mono, boot, tick_s=2.0, jump_s=3.0) is expected


@pytest.mark.parametrize("message,reason", [
    ("no answer to keepalives", "keepalive timeout"),
    ("relay closed the connection", "relay closed"),
    ("relay closed the connection (Connection lost)", "relay closed"),
    ("Connection lost", "relay closed"),
    ("connection reset", "connection reset"),
    ("Connection reset by peer", "connection reset"),
    ("Disconnected by the relay", "relay closed"),
    ("[Errno 32] Broken pipe", "relay closed"),        # the relay ended the session while we were frozen
    ("something new", "something new"),
])
def test_lost_reason_table(message, reason):
    assert lost_reason(message) == reason


# --- netlink layouts ------------------------------------------------------------------------------------

def _reply(seq: int, kind: int, payload: bytes) -> bytes:
    return struct.pack("=IHHII", 16 + len(payload), kind, 0, seq, 0) + payload


def _attr(kind: int, value: bytes) -> bytes:
    raw = struct.pack("=HH", 4 + len(value), kind) + value
    return raw + b"\0" * (-len(raw) % 4)


def test_route_request_layout():
    """RTM_GETROUTE, NLM_F_REQUEST, an rtmsg for AF_INET/32 and one RTA_DST with the address."""
    req = netlink.route_request("10.99.7.1", 7)
    length, kind, flags, seq, _ = struct.unpack_from("=IHHII", req)
    assert (length, kind, flags, seq) == (len(req), netlink.RTM_GETROUTE, netlink.NLM_F_REQUEST, 7)
    assert req[16] == socket.AF_INET and req[17] == 32
    assert req[28:36] == struct.pack("=HH", 8, netlink.RTA_DST) + socket.inet_aton("10.99.7.1")
    v6 = netlink.route_request("fd00::1", 8)
    assert v6[16] == socket.AF_INET6 and v6[17] == 128 and len(v6) == 16 + 12 + 4 + 16


def test_parse_route_reply_reads_oif_gateway_prefsrc_and_skips_other_sequences():
    rtmsg = struct.pack("=BBBBBBBBI", socket.AF_INET, 32, 0, 0, 254, 0, 0, 1, 0)
    body = (rtmsg + _attr(netlink.RTA_OIF, struct.pack("=I", 4)) + _attr(netlink.RTA_GATEWAY,
            socket.inet_aton("192.0.2.1")) + _attr(netlink.RTA_PREFSRC, socket.inet_aton("192.0.2.2")))
    other = _reply(41, netlink.RTM_NEWROUTE, rtmsg)
    assert netlink.parse_route_reply(other + _reply(42, netlink.RTM_NEWROUTE, body), 42) == (
        True, Route(oif=4, gateway="192.0.2.1", prefsrc="192.0.2.2"))
    assert netlink.parse_route_reply(other, 42) == (False, None)


@pytest.mark.parametrize("code,expected", [(101, (True, None)), (113, (True, None))])   # ENETUNREACH, EHOSTUNREACH
def test_parse_route_reply_unreachable_is_no_route(code, expected):
    assert netlink.parse_route_reply(_reply(5, netlink.NLMSG_ERROR, struct.pack("=i", -code) + b"\0" * 16), 5) \
        == expected


def test_parse_route_reply_other_error_raises():
    with pytest.raises(OSError, match="EPERM"):
        netlink.parse_route_reply(_reply(5, netlink.NLMSG_ERROR, struct.pack("=i", -1) + b"\0" * 16), 5)


def test_message_types_of_a_batch():
    data = _reply(0, netlink.RTM_DELADDR, b"x" * 8) + _reply(0, netlink.RTM_NEWROUTE, b"")
    assert netlink.message_types(data) == [netlink.RTM_DELADDR, netlink.RTM_NEWROUTE]
    assert netlink.message_types(b"\0" * 3) == []


def test_kernel_route_and_address_checks_on_loopback():
    """The real kernel: the route to 127.0.0.1 leaves on lo with source 127.0.0.1; 127.0.0.1 exists on this
    host, a TEST-NET-3 address does not."""
    route = asyncio.run(netlink.lookup_route("127.0.0.1"))
    assert route is not None and route.prefsrc == "127.0.0.1" and route.gateway is None
    assert route.oif == socket.if_nametoindex("lo")
    assert netlink.address_present("127.0.0.1") is True
    assert netlink.address_present("203.0.113.77") is False
