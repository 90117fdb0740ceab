"""LocalHandoff: each forwarded channel is connected to the right listener of ours, from a source port that is
registered with the peer directory before the first byte, and is counted and released (tunnel/handoff.py).

The listeners here are plain asyncio servers: the HTTPS one on 127.0.0.1 only, the HTTP one on ::1 only, so a
channel handed to the wrong listener, port or address family is refused and the test fails."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from types import SimpleNamespace

import asyncssh
import pytest

from inverse_cloud.tunnel import handoff
from inverse_cloud.tunnel.admission import ChannelAdmission
from inverse_cloud.tunnel.handoff import LocalHandoff
from tests.support import wait_for


class Peers:
    def __init__(self) -> None:
        self.mapping: dict[int, tuple[str, int]] = {}
        self.unregistered: list[int] = []

    def register(self, local_port: int, origin: tuple[str, int]) -> None:
        self.mapping[local_port] = origin

    def unregister(self, local_port: int) -> None:
        self.unregistered.append(local_port)
        self.mapping.pop(local_port, None)


class Listener:
    """A server that records the peer (address, port) of each connection it accepts."""

    def __init__(self) -> None:
        self.peers: list[tuple[str, int]] = []
        self.writers: list[asyncio.StreamWriter] = []
        self.server: asyncio.Server | None = None

    async def start(self, host: str) -> int:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.peers.append(writer.get_extra_info("peername")[:2])
            self.writers.append(writer)

        self.server = await asyncio.start_server(handle, host, 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        for w in self.writers:
            w.close()
            with contextlib.suppress(OSError):
                await w.wait_closed()
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()


@pytest.fixture
async def rig():
    asyncio.get_running_loop().set_debug(True)   # asyncio then refuses a blocking socket in sock_connect
    https, http = Listener(), Listener()
    https_port, http_port = await https.start("127.0.0.1"), await http.start("::1")
    peers = Peers()
    cfg = SimpleNamespace(server=SimpleNamespace(https_listen=("0.0.0.0", 8443), http_listen=("::", 8080)),
                          relay=SimpleNamespace(proxy_protocol=False))
    target = SimpleNamespace(https_port=https_port, http_port=http_port, peers=peers)
    admission = ChannelAdmission(max_total=2, per_address=1)
    h = LocalHandoff(cfg, target, admission)
    ends: list = []

    async def accept(name: str, host: str, port: int):
        end = await h.accept(name, host, port)
        ends.append(end)
        return end

    yield SimpleNamespace(handoff=h, accept=accept, https=https, http=http, peers=peers, admission=admission,
                          target=target)
    for end in ends:
        if end.local is not None and end.local.transport is not None:
            end.local.transport.close()
    await wait_for(lambda: h.active_channels == 0, 10, "every channel released")
    await https.close()
    await http.close()


async def test_each_forward_reaches_its_own_listener_from_a_registered_port(rig):
    """An "https" channel goes to the HTTPS listener over IPv4 (0.0.0.0 -> 127.0.0.1), an "http" channel to the
    HTTP listener over IPv6 (:: -> ::1); each listener sees the source port that was registered for the phone's
    relay-seen address before it connected. Two open channels count two."""
    h = rig.handoff
    a = await h.factory("https")("198.51.100.30", 50001)
    b = await rig.accept("http", "2001:db8::31", 50002)
    await wait_for(lambda: rig.https.peers and rig.http.peers, 10)
    (host_a, port_a), (host_b, port_b) = rig.https.peers[0], rig.http.peers[0]
    assert host_a == "127.0.0.1" and host_b == "::1"
    assert rig.peers.mapping == {port_a: ("198.51.100.30", 50001), port_b: ("2001:db8::31", 50002)}
    assert h.active_channels == 2 and rig.admission.total == 2
    a.local.transport.close()
    await wait_for(lambda: h.active_channels == 1, 10)
    assert rig.admission.total == 1 and port_a in rig.peers.mapping   # the mapping lingers for the access log
    b.local.transport.close()
    await wait_for(lambda: h.active_channels == 0, 10)


async def test_the_mapping_is_dropped_after_the_linger_unless_the_port_was_reused(rig, monkeypatch):
    """After a channel closes its mapping stays PEER_LINGER_S, then goes; a port registered again meanwhile (a
    newer channel from the same source port) keeps its mapping."""
    monkeypatch.setattr(handoff, "PEER_LINGER_S", 0.05)
    h = rig.handoff
    a = await rig.accept("https", "198.51.100.30", 50001)
    await wait_for(lambda: rig.https.peers, 10)
    port_a = rig.https.peers[0][1]
    a.local.transport.close()
    await wait_for(lambda: port_a in rig.peers.unregistered, 10)
    assert port_a not in rig.peers.mapping
    b = await rig.accept("https", "198.51.100.31", 50003)
    await wait_for(lambda: len(rig.https.peers) == 2, 10)
    port_b = rig.https.peers[1][1]
    h._registered[port_b] = object()      # as a newer channel bound to the same source port would
    b.local.transport.close()
    await wait_for(lambda: h.active_channels == 0, 10)
    loop = asyncio.get_running_loop()
    done = loop.create_future()
    loop.call_later(0.2, done.set_result, None)   # past the (patched) linger: the drop has run by then
    await done
    assert port_b in rig.peers.mapping and port_b not in rig.peers.unregistered


async def test_over_the_cap_is_refused_before_a_socket_is_spent(rig):
    """The admission cap (2 in all, 1 per address here) refuses the third channel with OPEN_RESOURCE_SHORTAGE
    and its reason; no connection reaches the listener and nothing is registered for it."""
    h = rig.handoff
    await rig.accept("https", "198.51.100.30", 1)
    await rig.accept("https", "198.51.100.31", 2)
    with pytest.raises(asyncssh.ChannelOpenError) as caught:
        await h.accept("https", "198.51.100.32", 3)
    assert caught.value.code == asyncssh.OPEN_RESOURCE_SHORTAGE
    assert "tunnel connections open (the cap" in caught.value.reason
    await wait_for(lambda: len(rig.https.peers) == 2, 10)
    assert len(rig.peers.mapping) == 2 and h.active_channels == 2


async def test_a_listener_that_is_down_refuses_the_channel_and_releases_everything(rig):
    """Our HTTP listener is down: the channel is refused with OPEN_CONNECT_FAILED naming the local listener, the
    phone's address no longer holds an admission slot, and the source port's mapping is dropped at once."""
    await rig.http.close()
    rig.http.writers.clear()
    probe = socket.socket(socket.AF_INET6)
    try:   # the port is really closed now
        assert probe.connect_ex(("::1", rig.target.http_port)) != 0
    finally:
        probe.close()
    with pytest.raises(asyncssh.ChannelOpenError) as caught:
        await rig.handoff.accept("http", "2001:db8::31", 50002)
    assert caught.value.code == asyncssh.OPEN_CONNECT_FAILED and caught.value.reason.startswith("local listener:")
    assert rig.admission.total == 0 and rig.admission.admit("2001:db8::31") is None
    assert rig.peers.mapping == {} and len(rig.peers.unregistered) == 1
    assert rig.handoff.active_channels == 0
    rig.http.server = await asyncio.start_server(lambda r, w: None, "::1", 0)   # for the fixture's close
