"""Tunnel decisions (backoff table, error classification), the TCP_QUICKACK hook, and the component's
state machine against an in-process asyncssh server on port 0 standing in for the relay: forwarding with
the relay-seen address registered before the first byte, stale-listen takeover, permitlisten refusal,
wrong host key, rejected key, unreachable relay, lost link -- each logged once, not once per retry."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import asyncssh
import pytest

from inverse_cloud.config import loads
from inverse_cloud.errors import AuthRejected, ForwardRefused, HostKeyMismatch
from inverse_cloud.tunnel import link as tunnel_mod
from inverse_cloud.tunnel.link import (
    BACKOFF_S,
    FORWARD_REFUSED_RETRY_S,
    SLOW_RETRY_S,
    QuickAckConnector,
    Tunnel,
    classify,
    retry_delay,
)
from tests.support import free_port

# --- pure decisions ------------------------------------------------------------------------------------


@pytest.mark.parametrize("attempt,kind,rand,expected", [
    (0, "transient", 0.0, 0.5), (0, "transient", 0.999999, 1.0), (1, "transient", 0.0, 1.0),
    (2, "transient", 1.0, 4.0), (6, "transient", 1.0, 60.0), (50, "transient", 1.0, 60.0),
    (-1, "transient", 1.0, 1.0),
    (0, "fatal", 0.0, SLOW_RETRY_S / 2), (9, "fatal", 1.0, SLOW_RETRY_S),
    (0, "refused", 1.0, FORWARD_REFUSED_RETRY_S),
])
def test_retry_delay_table(attempt, kind, rand, expected):
    assert retry_delay(attempt, kind, rand) == pytest.approx(expected, rel=1e-5)


def test_backoff_is_capped_and_first_retry_is_quick():
    assert BACKOFF_S[0] <= 2 and max(BACKOFF_S) == 60 and list(BACKOFF_S) == sorted(BACKOFF_S)


CTX = dict(relay="relay.example:22", expected_fp="SHA256:aaa (ssh-ed25519)", key_file=Path("/k/id_ed25519"),
           user="ictunnel")


@pytest.mark.parametrize("exc,kind,needle", [
    (asyncssh.HostKeyNotVerifiable("Host key is not trusted"), "fatal",
     "relay host key changed: expected SHA256:aaa (ssh-ed25519), got SHA256:bbb (ssh-rsa); if you rebuilt the "
     "relay run `inverse-cloud relay-setup --accept-new-host-key`"),
    (asyncssh.KeyExchangeFailed("No matching host key format found"), "fatal", "offers no host key of that type"),
    (asyncssh.PermissionDenied("Permission denied"), "fatal",
     "relay relay.example:22 refused our key /k/id_ed25519 for user 'ictunnel'"),
    (ConnectionRefusedError(111, "Connection refused"), "transient", "connection refused"),
    (ConnectionResetError(104, "reset"), "transient", "connection reset"),
    (TimeoutError(), "transient", "timed out"),
    (OSError(113, "No route to host"), "transient", "No route to host"),
    (asyncssh.ConnectionLost("Connection lost"), "transient", "relay closed the connection"),
    (ForwardRefused("relay refused to listen on 127.0.0.1:1 (check permitlisten ...)"), "refused", "permitlisten"),
    (HostKeyMismatch("relay host key changed: x"), "fatal", "relay host key changed: x"),
    (AuthRejected("key rejected"), "fatal", "key rejected"),
])
def test_classify(exc, kind, needle):
    failure = classify(exc, offered_fp="SHA256:bbb (ssh-rsa)", **CTX)
    assert failure.kind == kind
    assert needle in failure.message and "\n" not in failure.message


# --- the QUICKACK hook ---------------------------------------------------------------------------------

@pytest.mark.skipif(not hasattr(socket, "TCP_QUICKACK"), reason="TCP_QUICKACK is Linux-only")
async def test_quickack_rearmed_after_every_read():
    """The connector wraps the protocol asyncssh would use: every read re-arms TCP_QUICKACK on the socket
    (read back with getsockopt) before the data reaches the inner protocol, which sees every byte."""
    received = bytearray()

    class Inner(asyncio.Protocol):
        def connection_made(self, transport):
            self.transport = transport

        def data_received(self, data):
            received.extend(data)

    async def serve(reader, writer):
        for _ in range(5):
            writer.write(b"x" * 1000)
            await writer.drain()
            await asyncio.sleep(0.01)   # separate segments -> separate reads
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    connector = QuickAckConnector()
    transport, inner = await connector.create_connection(Inner, "127.0.0.1", port)
    try:
        assert isinstance(inner, Inner)
        await wait_for(lambda: len(received) >= 5000, 5.0, "5000 bytes through the connector")
        assert bytes(received) == b"x" * 5000
        assert connector.protocol is not None and connector.protocol.rearms >= 2
        sock = transport.get_extra_info("socket")
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK) == 1
    finally:
        transport.close()
        server.close()
        await server.wait_closed()


# --- an in-process relay ---------------------------------------------------------------------------------

class FakeRelay:
    """asyncssh server on 127.0.0.1:0: accepts the tunnel and takeover keys, grants or refuses listens,
    runs a stand-in for the takeover command (which frees the 'held' port)."""

    def __init__(self, host_key: asyncssh.SSHKey, allowed: list[asyncssh.SSHKey]) -> None:
        self.host_key = host_key
        self.allowed = [k.export_public_key() for k in allowed]
        self.refuse_listens = 0          # how many tcpip-forward requests to refuse
        self.refuse_always = False
        self.takeover_runs = 0
        self.listen_requests: list[tuple[str, int]] = []
        self.conns: list[asyncssh.SSHServerConnection] = []
        self.server: asyncssh.SSHAcceptor | None = None
        self.port = 0

    async def start(self) -> None:
        relay = self

        class Server(asyncssh.SSHServer):
            def connection_made(self, conn):
                relay.conns.append(conn)

            def begin_auth(self, username):
                return True

            def public_key_auth_supported(self):
                return True

            def validate_public_key(self, username, key):
                return username == "ictunnel" and key.export_public_key() in relay.allowed

            def server_requested(self, listen_host, listen_port):
                relay.listen_requests.append((listen_host, listen_port))
                if relay.refuse_always or relay.refuse_listens > 0:
                    relay.refuse_listens = max(0, relay.refuse_listens - 1)
                    return False
                return True

        async def process(proc: asyncssh.SSHServerProcess) -> None:
            relay.takeover_runs += 1
            relay.refuse_listens = 0
            proc.stdout.write("inverse-cloud takeover: ended 1 other session(s)\n")
            proc.exit(0)

        self.server = await asyncssh.listen("127.0.0.1", 0, server_host_keys=[self.host_key],
                                            server_factory=Server, process_factory=process)
        self.port = self.server.sockets[0].getsockname()[1]

    async def aclose(self) -> None:
        for c in self.conns:
            c.close()
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


class Peers:
    def __init__(self) -> None:
        self.registered: dict[int, tuple[str, int]] = {}
        self.events: list[tuple[str, int]] = []

    def register(self, local_port, origin):
        self.registered[local_port] = origin
        self.events.append(("register", local_port))

    def unregister(self, local_port):
        self.registered.pop(local_port, None)
        self.events.append(("unregister", local_port))


class EchoTarget:
    """Stands in for the DAV server: an echo listener as 'https', whose handler records the peer mapping
    seen when the first byte arrives."""

    def __init__(self) -> None:
        self.peers = Peers()
        self.https_port = 0
        self.http_port = 0
        self.seen_origin: list[tuple[str, int] | None] = []
        self.servers: list[asyncio.Server] = []

    async def start(self) -> None:
        async def echo(reader, writer):
            src = writer.get_extra_info("peername")[1]
            first = True
            while data := await reader.read(65536):
                if first:
                    self.seen_origin.append(self.peers.registered.get(src))
                    first = False
                writer.write(data)
                await writer.drain()
            writer.write_eof()
            writer.close()

        for attr in ("https_port", "http_port"):
            srv = await asyncio.start_server(echo, "127.0.0.1", 0)
            self.servers.append(srv)
            setattr(self, attr, srv.sockets[0].getsockname()[1])

    async def aclose(self) -> None:
        for s in self.servers:
            s.close()
            await s.wait_closed()


def _write_key(path: Path, key: asyncssh.SSHKey) -> None:
    path.write_bytes(key.export_private_key("openssh"))
    path.chmod(0o600)


@pytest.fixture
async def rig(tmp_path, monkeypatch):
    """Keys, a FakeRelay, an EchoTarget and a config pointing at them; retry delays shortened to 20 ms."""
    monkeypatch.setattr(tunnel_mod, "retry_delay", lambda attempt, kind, rand: 0.02)
    host_key = asyncssh.generate_private_key("ssh-ed25519")
    tun, tko = asyncssh.generate_private_key("ssh-ed25519"), asyncssh.generate_private_key("ssh-ed25519")
    _write_key(tmp_path / "tun", tun)
    _write_key(tmp_path / "tko", tko)
    relay = FakeRelay(host_key, [tun, tko])
    await relay.start()
    target = EchoTarget()
    await target.start()

    def make(**over) -> Tunnel:
        values = dict(host="127.0.0.1", port=relay.port, user="ictunnel", key_file=str(tmp_path / "tun"),
                      takeover_key_file=str(tmp_path / "tko"),
                      host_key=host_key.export_public_key().decode().strip(),
                      https_port=free_port(), http_port=free_port(), keepalive_interval_s=1,
                      keepalive_count_max=3, connect_timeout_s=5)
        values.update(over)
        relay_toml = "\n".join(f"{k} = {v!r}".replace("'", '"') for k, v in values.items())
        cfg = loads(f'[server]\ndomain = "laptop.test"\ndata_dir = "{tmp_path}/data"\n'
                    f'state_dir = "{tmp_path}/state"\n[relay]\n{relay_toml}\n', tmp_path / "config.toml")
        return Tunnel(cfg, target)

    yield make, relay, target
    await relay.aclose()
    await target.aclose()


@contextlib.asynccontextmanager
async def started(t: Tunnel) -> AsyncIterator[Tunnel]:
    """The tunnel, started; closed again however the test ends."""
    await t.start()
    try:
        yield t
    finally:
        await t.aclose()


async def wait_for(pred, timeout_s=10.0, what="condition"):
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not pred():
        if loop.time() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


def tunnel_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "inverse_cloud.tunnel.link" and r.levelno >= logging.INFO]


async def test_forwards_bytes_both_ways_with_origin_registered_first(rig, caplog):
    """Up -> a client connects to the relay's forwarded port and sends 2 MiB then half-closes: the echo
    comes back complete, then EOF; our listener already knew the relay-seen origin when the first byte
    arrived; the mapping is dropped after the connection. One INFO line 'tunnel up'."""
    caplog.set_level(logging.INFO)
    make, relay, target = rig
    async with started(make()) as t:
        await wait_for(lambda: t.state == "up", what="tunnel up")
        port = t.relay.https_port
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        payload = bytes(range(256)) * 8192
        writer.write(payload)
        await writer.drain()
        writer.write_eof()
        echoed = await asyncio.wait_for(reader.read(-1), 30)
        assert echoed == payload
        local_port = writer.get_extra_info("sockname")[1]
        assert target.seen_origin == [("127.0.0.1", local_port)]
        writer.close()
        st = t.status()
        assert st["state"] == "up" and [f["bound"] for f in st["forwards"]] == [True, True]
        assert st["connected_since"] and st["reconnects"] == [] and st["last_error"] is None
        assert [line for line in tunnel_lines(caplog) if "tunnel up" in line] != []
        assert all(line.startswith("[relay=127.0.0.1:") for line in tunnel_lines(caplog))
    assert t.state == "down"


async def test_stale_listen_is_taken_over_then_bound(rig, caplog):
    """The relay refuses the first listen (port held by a dead session): one WARNING 'relay port P still
    held by a previous session; taking over', the takeover key's command runs once, the reconnect binds
    both forwards."""
    caplog.set_level(logging.INFO)
    make, relay, _ = rig
    relay.refuse_listens = 1
    async with started(make()) as t:
        await wait_for(lambda: t.state == "up", what="tunnel up after takeover")
        assert relay.takeover_runs == 1 and t.takeovers == 1
        held = [m for m in tunnel_lines(caplog) if "still held by a previous session; taking over" in m]
        assert held == [f"[relay=127.0.0.1:{relay.port}] relay port {t.relay.https_port} still held by a previous "
                        "session; taking over"]


async def test_listen_refused_after_takeover_names_permitlisten(rig, caplog):
    """Every listen refused (permitlisten mismatch): after the takeover the tunnel is 'failed' with one
    ERROR line naming permitlisten/PermitListen and the exact host:port; retries do not repeat it."""
    caplog.set_level(logging.INFO)
    make, relay, _ = rig
    relay.refuse_always = True
    async with started(make()) as t:
        await wait_for(lambda: relay.takeover_runs >= 3, what="three refusal cycles")
        assert t.state == "failed"
        errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
        assert len(errors) == 1, errors
        assert f"relay refused to listen on 127.0.0.1:{t.relay.https_port} (check permitlisten" in errors[0]
        assert "PermitListen" in errors[0] and "'localhost' is not '127.0.0.1'" in errors[0]
        assert t.status()["last_error"] == errors[0].split("] ", 1)[1]


async def test_wrong_host_key_is_refused_with_both_fingerprints(rig, caplog):
    """B8: the pinned key is another ed25519 key: never connected, state failed, one ERROR line with the
    expected and the received fingerprint and the fix command -- once, however many retries."""
    caplog.set_level(logging.INFO)
    make, relay, _ = rig
    other = asyncssh.generate_private_key("ssh-ed25519").export_public_key().decode().strip()
    async with started(make(host_key=other)) as t:
        await wait_for(lambda: t.attempts >= 3, what="retries")
        assert t.state == "failed" and t.connections == 0
        errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
        assert len(errors) == 1
        want_got = (asyncssh.import_public_key(other).get_fingerprint("sha256"),
                    relay.host_key.get_fingerprint("sha256"))
        assert f"relay host key changed: expected {want_got[0]} (ssh-ed25519), got {want_got[1]} (ssh-ed25519)" \
            in errors[0]
        assert errors[0].endswith("run `inverse-cloud relay-setup --accept-new-host-key`")
        assert relay.listen_requests == []


async def test_rsa_host_key_when_ed25519_pinned_is_refused(tmp_path, rig, caplog):
    """B8: the relay presents only an RSA host key while ed25519 is pinned: refused, one line."""
    caplog.set_level(logging.INFO)
    make, _, _ = rig
    rsa_relay = FakeRelay(asyncssh.generate_private_key("ssh-rsa", key_size=2048), [])
    await rsa_relay.start()
    ed = asyncssh.generate_private_key("ssh-ed25519").export_public_key().decode().strip()
    async with started(make(port=rsa_relay.port, host_key=ed)) as t:
        await wait_for(lambda: t.attempts >= 2, what="retries")
        assert t.state == "failed"
        err = t.status()["last_error"]
        assert err.startswith("relay host key changed: expected SHA256:") and err.count("(ssh-rsa)") == 1, err
        await rsa_relay.aclose()


async def test_rejected_key_names_key_file_and_user(rig, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    make, _, _ = rig
    stranger = asyncssh.generate_private_key("ssh-ed25519")
    _write_key(tmp_path / "stranger", stranger)
    async with started(make(key_file=str(tmp_path / "stranger"))) as t:
        await wait_for(lambda: t.state == "failed", what="failed")
        assert t.status()["last_error"] == (
            f"relay 127.0.0.1:{t.relay.port} refused our key {tmp_path / 'stranger'} for user 'ictunnel'; install "
            f"{tmp_path / 'stranger'}.pub on the relay (run `inverse-cloud relay-setup`)")


async def test_key_file_mode_checked(rig, tmp_path):
    make, _, _ = rig
    (tmp_path / "tun").chmod(0o644)
    async with started(make()) as t:
        await wait_for(lambda: t.state == "failed", what="failed")
        assert "has mode 0644; must be 0600" in t.status()["last_error"]


async def test_empty_host_key_does_not_connect(rig, caplog):
    caplog.set_level(logging.INFO)
    make, relay, _ = rig
    t = make(host_key="")
    await t.start()
    await t.aclose()
    assert t.attempts == 0 and relay.conns == []
    assert t.status()["last_error"] == "relay host key not pinned; run `inverse-cloud relay-setup`"


async def test_unreachable_relay_logs_once_per_outage(rig, caplog):
    caplog.set_level(logging.INFO)
    make, _, _ = rig
    async with started(make(port=free_port())) as t:
        await wait_for(lambda: t.attempts >= 5, what="five attempts")
        lines = tunnel_lines(caplog)
        assert lines == [f"[relay=127.0.0.1:{t.relay.port}] cannot reach relay (connection refused); retrying with "
                         "backoff"]
        assert t.state == "down"


async def test_lost_link_reconnects_and_is_counted(rig, caplog):
    """The relay drops the connection: one WARNING 'relay link lost (...); reconnecting', then up again;
    status lists one reconnect."""
    caplog.set_level(logging.INFO)
    make, relay, _ = rig
    async with started(make()) as t:
        await wait_for(lambda: t.state == "up", what="up")
        relay.conns[-1].close()
        await wait_for(lambda: t.connections == 2 and t.state == "up", what="reconnected")
        lost = [m for m in tunnel_lines(caplog) if "relay link lost" in m]
        assert len(lost) == 1 and lost[0].endswith("; reconnecting")
        assert len(t.status()["reconnects"]) == 1


async def test_sigusr1_reconnects_at_once(rig, caplog):
    """reconnect() (SIGUSR1, e.g. from a network-change hook) drops the link and reconnects without backoff:
    one INFO line 'reconnecting now (SIGUSR1)', no 'relay link lost' line, a second connection."""
    caplog.set_level(logging.INFO)
    make, relay, _ = rig
    async with started(make()) as t:
        await wait_for(lambda: t.state == "up", what="up")
        t.reconnect()
        await wait_for(lambda: t.connections == 2 and t.state == "up", what="reconnected")
        lines = tunnel_lines(caplog)
        assert sum("reconnecting now (SIGUSR1)" in m for m in lines) == 1
        assert not any("relay link lost" in m for m in lines)
        assert relay.listen_requests.count(("127.0.0.1", t.relay.https_port)) == 2


async def test_sighup_leaves_a_healthy_link_alone(rig, caplog):
    """reload() (SIGHUP: certificates/users re-read, `cert renew`) must not drop a link that is up: the ACME
    validation that `cert renew` triggers travels through it. Then reconnect() still works."""
    caplog.set_level(logging.INFO)
    make, relay, _ = rig
    async with started(make()) as t:
        await wait_for(lambda: t.state == "up", what="up")
        t.reload()
        assert t._wake is not None and not t._wake.is_set()   # nothing asked the live link to drop
        assert t.connections == 1 and t.state == "up"
        t.reconnect()
        assert t._wake.is_set()
        await wait_for(lambda: t.connections == 2 and t.state == "up", what="reconnected by SIGUSR1")
        assert not any("SIGHUP" in m for m in tunnel_lines(caplog))
        assert relay.listen_requests.count(("127.0.0.1", t.relay.https_port)) == 2


# --- SSH port fallback (relay sshd behind sslh on 443) ------------------------------------------------

@pytest.mark.parametrize("primary,fallback,last_good,expected", [
    (22, 0, None, (22,)), (22, 443, None, (22, 443)), (22, 443, 443, (443, 22)), (22, 443, 22, (22, 443)),
    (22, 22, None, (22,)), (22, 443, 9999, (22, 443)),
])
def test_ssh_ports_order(primary, fallback, last_good, expected):
    from inverse_cloud.tunnel.policy import ssh_ports

    assert ssh_ports(primary, fallback, last_good) == expected


@pytest.mark.parametrize("exc,moves_on", [
    (ConnectionRefusedError(111, "refused"), True), (TimeoutError(), True), (OSError(101, "unreachable"), True),
    (asyncssh.ConnectionLost("lost"), True), (ConnectionResetError(104, "reset"), True),
    (asyncssh.HostKeyNotVerifiable("not trusted"), False), (asyncssh.PermissionDenied("denied"), False),
    (HostKeyMismatch("x"), False), (asyncssh.KeyExchangeFailed("No matching host key format"), False),
])
def test_only_network_failures_move_on_to_the_next_port(exc, moves_on):
    from inverse_cloud.tunnel.policy import tries_next_port

    assert tries_next_port(exc) is moves_on


@contextlib.asynccontextmanager
async def silent_port() -> AsyncIterator[int]:
    """A port that accepts TCP and never says anything: what a middlebox dropping SSH looks like to a client
    waiting for the server's banner."""
    held: list[asyncio.StreamWriter] = []

    async def hold(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        for w in held:
            w.close()
        server.close()
        await server.wait_closed()


async def test_blocked_ssh_port_falls_back_and_sticks(rig, caplog):
    """[relay] port is a port that never answers SSH (timeout), fallback_port is the relay: the tunnel comes
    up on the fallback with one INFO line naming both ports, status says which port is in use; after the link
    drops, the reconnect goes straight to the fallback port (no second timeout on the blocked one)."""
    caplog.set_level(logging.INFO)
    make, relay, _ = rig
    async with silent_port() as blocked:
        async with started(make(port=blocked, fallback_port=relay.port, connect_timeout_s=1)) as t:
            await wait_for(lambda: t.state == "up", what="tunnel up on the fallback port")
            st = t.status()
            assert st["ssh_port"] == relay.port and st["fallback"] is True
            line = [m for m in tunnel_lines(caplog) if "SSH reaches the relay" in m]
            assert line == [f"[relay=127.0.0.1:{blocked}] SSH reaches the relay on the fallback port {relay.port} "
                            f"(port {blocked}: timed out)"]
            attempts = t.attempts
            relay.conns[-1].close()
            await wait_for(lambda: t.connections == 2 and t.state == "up", what="reconnected")
            assert t.attempts == attempts + 1        # straight to the port that worked
            assert t.ports.in_use == relay.port


async def test_both_ports_failing_name_each(rig, caplog):
    """Neither port reachable: one WARNING naming each port's failure; no fallback in status."""
    caplog.set_level(logging.INFO)
    make, _, _ = rig
    a, b = free_port(), free_port()
    async with started(make(port=a, fallback_port=b)) as t:
        await wait_for(lambda: t.attempts >= 4, what="two rounds over both ports")
        assert tunnel_lines(caplog) == [f"[relay=127.0.0.1:{a}] cannot reach relay (port {a}: connection refused; "
                                        f"port {b}: connection refused); retrying with backoff"]
        assert t.status()["ssh_port"] is None and t.status()["fallback"] is False


async def test_wrong_host_key_on_the_first_port_does_not_fall_back(rig, caplog):
    """A relay that answers with another host key is refused as such; the fallback port is not tried."""
    make, relay, _ = rig
    other = asyncssh.generate_private_key("ssh-ed25519").export_public_key().decode().strip()
    async with started(make(host_key=other, fallback_port=free_port())) as t:
        await wait_for(lambda: t.state == "failed", what="failed on the host key")
        assert t.attempts == 1 and "relay host key changed" in (t.last_error or "")


# --- PROXY protocol on forwarded connections ([relay] proxy_protocol) -----------------------------

async def test_proxy_header_names_the_phone_before_the_first_byte(rig):
    """proxy_protocol on: a forwarded connection starting with a PROXY v1 header is registered under the
    address the header names before the first byte reaches our listener, and the listener never sees the
    header; a connection without a header is closed and nothing reaches the listener. The HTTP forward
    (port 80: ACME and redirects, not behind the SNI router) is never parsed."""
    import dataclasses

    make, relay, target = rig
    plain = make()
    cfg = dataclasses.replace(plain.cfg, relay=dataclasses.replace(plain.cfg.relay, proxy_protocol=True))
    async with started(Tunnel(cfg, target)) as t:
        await wait_for(lambda: t.state == "up", what="tunnel up")
        reader, writer = await asyncio.open_connection("127.0.0.1", t.relay.https_port)
        writer.write(b"PROXY TCP4 198.51.100.7 203.0.113.1 51000 443\r\n")
        await writer.drain()
        writer.write(b"hello")
        assert await asyncio.wait_for(reader.readexactly(5), 10) == b"hello"
        assert target.seen_origin == [("198.51.100.7", 51000)]
        writer.close()

        reader, writer = await asyncio.open_connection("127.0.0.1", t.relay.https_port)
        writer.write(b"\x16\x03\x01 no header: a phone around the router")
        assert await asyncio.wait_for(reader.read(), 10) == b""
        writer.close()
        assert len(target.seen_origin) == 1

        reader, writer = await asyncio.open_connection("127.0.0.1", t.relay.http_port)
        writer.write(b"PROXY TCP4 198.51.100.9 203.0.113.1 1 80\r\n")
        assert await asyncio.wait_for(reader.readexactly(42), 10) == b"PROXY TCP4 198.51.100.9 203.0.113.1 1 80\r\n"
        writer.close()


async def test_without_proxy_protocol_a_header_is_just_data(rig):
    """proxy_protocol off (the default): a PROXY header from a client is passed through unparsed, and the
    address registered is the one the relay saw."""
    make, relay, target = rig
    async with started(make()) as t:
        await wait_for(lambda: t.state == "up", what="tunnel up")
        reader, writer = await asyncio.open_connection("127.0.0.1", t.relay.https_port)
        line = b"PROXY TCP4 198.51.100.7 203.0.113.1 51000 443\r\n"
        writer.write(line)
        assert await asyncio.wait_for(reader.readexactly(len(line)), 10) == line
        assert target.seen_origin == [("127.0.0.1", writer.get_extra_info("sockname")[1])]
        writer.close()
