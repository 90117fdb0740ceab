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
from inverse_cloud.errors import AuthRejected, ConfigError, ForwardRefused, HostKeyMismatch, TunnelError
from inverse_cloud.tunnel.link import (
    BACKOFF_S,
    FORWARD_REFUSED_RETRY_S,
    SLOW_RETRY_S,
    Failure,
    QuickAckConnector,
    Tunnel,
    classify,
    quickack_supported,
    retry_delay,
)
from tests.support import free_port, wait_for

# --- pure decisions ------------------------------------------------------------------------------------


@pytest.mark.parametrize("attempt,kind,rand,expected", [
    (0, "transient", 0.0, 0.5), (0, "transient", 0.999999, 1.0), (1, "transient", 0.0, 1.0),
    (2, "transient", 1.0, 4.0), (6, "transient", 1.0, 60.0), (50, "transient", 1.0, 60.0),
    (-1, "transient", 1.0, 1.0), (3, "transient", 1.0, 8.0), (4, "transient", 1.0, 16.0),
    (5, "transient", 0.0, 16.0), (5, "transient", 0.5, 24.0), (6, "transient", 0.0, 30.0),
    (0, "refused", 0.0, FORWARD_REFUSED_RETRY_S / 2),
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


@pytest.mark.parametrize("exc,message", [
    (ConnectionRefusedError(111, "Connection refused"), "connection refused"),
    (ConnectionResetError(104, "reset"), "connection reset"),
    (TimeoutError(), "timed out"),
    (OSError(113, "No route to host"), "No route to host"),
])
def test_classify_network_errors_in_exact_words(exc, message):
    """The words status and the log show for a network error are exactly these (no more, no less)."""
    assert classify(exc, offered_fp=None, **CTX) == Failure("transient", message)


FIX = "if you rebuilt the relay run `inverse-cloud relay-setup --accept-new-host-key`"


@pytest.mark.parametrize("exc,offered,kind,message", [
    (asyncssh.HostKeyNotVerifiable("x"), "SHA256:bbb (ssh-rsa)", "fatal",
     f"relay host key changed: expected SHA256:aaa (ssh-ed25519), got SHA256:bbb (ssh-rsa); {FIX}"),
    (asyncssh.HostKeyNotVerifiable("x"), None, "fatal",
     f"relay host key changed: expected SHA256:aaa (ssh-ed25519), got a key that could not be read; {FIX}"),
    (asyncssh.KeyExchangeFailed("No matching HOST KEY format"), None, "fatal",
     f"relay host key changed: expected SHA256:aaa (ssh-ed25519), but the relay offers no host key of that type; "
     f"{FIX}"),
    (asyncssh.KeyExchangeFailed("No matching kex"), None, "transient", "relay closed the connection (No matching kex)"),
    (asyncssh.PermissionDenied("Permission denied"), None, "fatal",
     "relay relay.example:22 refused our key /k/id_ed25519 for user 'ictunnel'; install /k/id_ed25519.pub on the "
     "relay (run `inverse-cloud relay-setup`)"),
    (asyncssh.ConnectionLost(""), None, "transient", "relay closed the connection (ConnectionLost)"),
    (OSError("plain"), None, "transient", "plain"),
    (OSError(), None, "transient", "OSError"),
    (TunnelError("tunnel thing"), None, "transient", "tunnel thing"),
    (ConfigError("relay key /k is missing"), None, "fatal", "relay key /k is missing"),
    (ValueError("weird"), None, "transient", "ValueError: weird"),
])
def test_classify_exact_lines(exc, offered, kind, message):
    """The whole line each failure becomes (what status and the log show), and its retry schedule."""
    assert classify(exc, offered_fp=offered, **CTX) == Failure(kind, message)


# --- the QUICKACK hook ---------------------------------------------------------------------------------

@pytest.mark.skipif(not hasattr(socket, "TCP_QUICKACK"), reason="TCP_QUICKACK is Linux-only")
async def test_quickack_rearmed_after_every_read():
    """The connector wraps the protocol asyncssh would use: every read re-arms TCP_QUICKACK on the socket
    (read back with getsockopt) before the data reaches the inner protocol, which sees every byte."""
    received = bytearray()
    got_more, checked = asyncio.Event(), asyncio.Event()

    class Inner(asyncio.Protocol):
        def connection_made(self, transport):
            self.transport = transport

        def data_received(self, data):
            received.extend(data)
            got_more.set()

    async def serve(reader, writer):
        for i in range(5):
            writer.write(b"x" * 1000)
            await writer.drain()
            # The next segment is sent only once this one was read: five reads, however loaded the machine.
            while len(received) < 1000 * (i + 1):
                got_more.clear()
                await asyncio.wait_for(got_more.wait(), 10)
        await checked.wait()   # keep the connection (and the socket option) until the test has read it
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    connector = QuickAckConnector()
    transport, inner = await connector.create_connection(Inner, "127.0.0.1", port)
    try:
        assert isinstance(inner, Inner)
        await wait_for(lambda: len(received) >= 5000, 5.0, "5000 bytes through the connector")
        assert bytes(received) == b"x" * 5000
        assert connector.protocol is not None and connector.protocol.rearms >= 5
        sock = transport.get_extra_info("socket")
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK) == 1
    finally:
        checked.set()
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
        self.refuse_hosts: set[str] = set()     # listen hosts always refused (a Match block without [::])
        self.reject_auth = 0             # how many public-key logins to refuse (any key)
        self.hang_takeover = False       # the takeover command never ends
        self.hang_takeover_login = False  # a login with the takeover key never gets an answer
        self.hang_logins = False          # no login gets an answer
        self.takeover_runs = 0
        self.takeover_commands: list[str | None] = []   # the command each takeover session asked for
        self.takeover_output = "inverse-cloud takeover: ended 1 other session(s)\n"
        self.takeover_exit = 0
        self.logins: list[bytes] = []    # the public key of each accepted key check, in order
        self.listen_requests: list[tuple[str, int]] = []
        self.conns: list[asyncssh.SSHServerConnection] = []
        self.server: asyncssh.SSHAcceptor | None = None
        self.port = 0

    async def start(self, port: int = 0) -> None:
        relay = self

        class Server(asyncssh.SSHServer):
            def connection_made(self, conn):
                relay.conns.append(conn)

            def begin_auth(self, username):
                return True

            def public_key_auth_supported(self):
                return True

            async def validate_public_key(self, username, key):
                if relay.reject_auth > 0:
                    relay.reject_auth -= 1
                    return False
                if relay.hang_logins or (relay.hang_takeover_login and key.export_public_key() == relay.allowed[-1]):
                    await asyncio.Event().wait()   # until the client gives up and the connection closes
                ok = username == "ictunnel" and key.export_public_key() in relay.allowed
                if ok:
                    relay.logins.append(key.export_public_key())
                return ok

            def server_requested(self, listen_host, listen_port):
                relay.listen_requests.append((listen_host, listen_port))
                if listen_host in relay.refuse_hosts:
                    return False
                if relay.refuse_always or relay.refuse_listens > 0:
                    relay.refuse_listens = max(0, relay.refuse_listens - 1)
                    return False
                return True

        async def process(proc: asyncssh.SSHServerProcess) -> None:
            relay.takeover_runs += 1
            relay.takeover_commands.append(proc.command)
            if relay.hang_takeover:
                await asyncio.Event().wait()   # until the client gives up and the connection closes
            relay.refuse_listens = 0
            proc.stdout.write(relay.takeover_output)
            proc.exit(relay.takeover_exit)

        self.server = await asyncssh.listen("127.0.0.1", port, server_host_keys=[self.host_key],
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


def patch_tunnel(monkeypatch, name: str, value) -> None:
    """Set ``name`` in every loaded tunnel module that defines it: the reconnect loop reads it from its own
    module's globals, whichever module of the package that is."""
    import sys

    modules = [m for n, m in list(sys.modules.items()) if n.startswith("inverse_cloud.tunnel") and hasattr(m, name)]
    assert modules, f"no tunnel module defines {name}"
    for module in modules:
        monkeypatch.setattr(module, name, value)


class Backoff:
    """Stands in for ``retry_delay`` in the loop: records every (attempt, kind) the loop asks about and the
    real schedule's answer, then makes the loop wait ``delay_s`` instead (20 ms unless a test says)."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, str]] = []
        self.real: list[float] = []
        self.delay_s = 0.02

    def __call__(self, attempt: int, kind: str, rand: float) -> float:
        assert 0 <= rand < 1
        self.calls.append((attempt, kind))
        self.real.append(retry_delay(attempt, kind, rand))
        return self.delay_s


@pytest.fixture
def backoff(monkeypatch) -> Backoff:
    recorder = Backoff()
    patch_tunnel(monkeypatch, "retry_delay", recorder)
    return recorder


@pytest.fixture
async def rig(tmp_path, backoff):
    """Keys, a FakeRelay, an EchoTarget and a config pointing at them; retry delays shortened to 20 ms
    (the ``backoff`` fixture records what the loop asked for)."""
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




def tunnel_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "inverse_cloud.tunnel.link" and r.levelno >= logging.INFO]


async def test_forwards_bytes_both_ways_with_origin_registered_first(rig, caplog, monkeypatch):
    """Up -> a client connects to the relay's forwarded port and sends 2 MiB then half-closes: the echo
    comes back complete, then EOF; our listener already knew the relay-seen origin when the first byte
    arrived; the mapping is dropped after the connection (its linger shortened to 50 ms). One INFO line
    'tunnel up'."""
    caplog.set_level(logging.INFO)
    patch_tunnel(monkeypatch, "PEER_LINGER_S", 0.05)
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
        registered = [p for what, p in target.peers.events if what == "register"]
        assert len(registered) == 1
        await wait_for(lambda: target.peers.registered == {}, what="the peer mapping dropped")
        assert target.peers.events == [("register", registered[0]), ("unregister", registered[0])]
        await wait_for(lambda: t.active_channels == 0, what="the channel counted as closed")
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
        assert errors[0].endswith("`inverse-cloud relay-setup` prints them)"), errors[0]
        assert t.status()["last_error"] == errors[0].split("] ", 1)[1]
        held = [m for m in tunnel_lines(caplog) if "still held by a previous session" in m]
        assert len(held) == 1, held          # once per outage, not once per refusal cycle


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
        assert t.status()["last_error"] == (f"relay key {tmp_path / 'tun'} has mode 0644; must be 0600 (run: chmod "
                                            f"600 {tmp_path / 'tun'})")


async def test_an_unreadable_key_file_is_named_as_the_relay_key(rig, tmp_path):
    make, _, _ = rig
    (tmp_path / "tun").write_text("not a key\n")
    async with started(make()) as t:
        await wait_for(lambda: t.state == "failed", what="failed")
        assert t.status()["last_error"].startswith(f"relay key {tmp_path / 'tun'} cannot be read: ")


async def test_empty_host_key_does_not_connect(rig, caplog):
    caplog.set_level(logging.INFO)
    make, relay, _ = rig
    t = make(host_key="")
    await t.start()
    assert t.state == "failed"
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


# --- the reconnect schedule through the loop ------------------------------------------------------------

async def test_backoff_grows_with_each_consecutive_failure(rig, backoff):
    """Relay unreachable: each attempt asks the schedule with the next attempt number (0, 1, 2, ...), as
    a transient failure, and the real schedule would have waited 0.5-1 s, 1-2 s, 2-4 s, 4-8 s."""
    make, _, _ = rig
    async with started(make(port=free_port())) as t:
        await wait_for(lambda: len(backoff.calls) >= 4, what="four failed attempts")
        assert backoff.calls[:4] == [(0, "transient"), (1, "transient"), (2, "transient"), (3, "transient")]
        for delay, base in zip(backoff.real[:4], BACKOFF_S, strict=False):
            assert base / 2 <= delay <= base
        assert t.state == "down"


async def test_flapping_link_keeps_its_backoff(rig, backoff):
    """Two rejected logins (attempts 0 and 1, 'fatal'), then up, then the relay drops the link at once
    (up for less than STABLE_S): the next wait continues the count (attempt 2), and so does the one after
    (a refused login: attempt 3); it does not start over."""
    make, relay, _ = rig
    relay.reject_auth = 2
    async with started(make()) as t:
        await wait_for(lambda: t.state == "up", what="up after two rejected logins")
        assert backoff.calls == [(0, "fatal"), (1, "fatal")]
        relay.reject_auth = 1                 # and the first login after the drop is refused
        relay.conns[-1].close()
        await wait_for(lambda: len(backoff.calls) >= 4, what="the drop and the refused login handled")
        assert backoff.calls[2:4] == [(2, "transient"), (3, "fatal")]    # the count goes on: no fresh start


async def test_stable_link_that_drops_is_retried_at_once_and_backoff_starts_over(rig, backoff, monkeypatch):
    """A link up for at least STABLE_S (shortened to 0) drops: the loop does not wait the schedule's delay
    (300 s here) but reconnects at once, and the count starts over: the next failure (a rejected login)
    asks for attempt 0."""
    patch_tunnel(monkeypatch, "STABLE_S", 0.0)
    make, relay, _ = rig
    relay.reject_auth = 1
    async with started(make()) as t:
        await wait_for(lambda: t.state == "up", what="up after one rejected login")
        assert backoff.calls == [(0, "fatal")]
        backoff.delay_s = 300.0
        relay.reject_auth = 1
        relay.conns[-1].close()
        await wait_for(lambda: len(backoff.calls) >= 3, what="an immediate reconnect, refused")
        assert backoff.calls[1:] == [(1, "transient"), (0, "fatal")]


async def test_sighup_on_a_link_that_is_not_up_retries_at_once(rig, backoff, caplog):
    """Relay unreachable and the next attempt 300 s away: reload() (SIGHUP) makes the next attempt now,
    with one INFO line 'retrying now (SIGHUP)'."""
    caplog.set_level(logging.INFO)
    backoff.delay_s = 300.0
    make, _, _ = rig
    async with started(make(port=free_port())) as t:
        await wait_for(lambda: len(backoff.calls) >= 1, what="the first failure")
        t.reload()
        await wait_for(lambda: len(backoff.calls) >= 2, what="a second attempt after SIGHUP")
        assert sum("retrying now (SIGHUP)" in m for m in tunnel_lines(caplog)) == 1


# --- takeover failures, a local listener that is down, closing a frozen link ---------------------------

async def test_rejected_takeover_key_is_one_warning_then_the_link_comes_up(rig, tmp_path, caplog):
    """The first listen is refused and the relay does not accept the takeover key: one WARNING 'takeover
    of the stale session failed: ... refused the takeover key ...; waiting for the relay to drop it', the
    takeover command never ran, and once the port is free the forwards bind."""
    caplog.set_level(logging.INFO)
    make, relay, _ = rig
    tko = asyncssh.read_private_key(str(tmp_path / "tko")).export_public_key()
    relay.allowed.remove(tko)
    relay.refuse_listens = 1
    async with started(make()) as t:
        await wait_for(lambda: t.state == "up", what="up once the port is free")
        failed = [m for m in tunnel_lines(caplog) if "takeover of the stale session failed" in m]
        assert len(failed) == 1, tunnel_lines(caplog)
        assert "refused the takeover key" in failed[0] and "for user 'ictunnel'" in failed[0]
        assert failed[0].endswith("waiting for the relay to drop it (ClientAlive)")
        assert relay.takeover_runs == 0 and t.takeovers == 1


async def test_rejected_takeover_key_line_names_the_takeover_key_file(rig, tmp_path, caplog):
    """The WARNING for a rejected takeover key names the takeover key file and its .pub, the one to install."""
    caplog.set_level(logging.INFO)
    make, relay, _ = rig
    relay.allowed.remove(asyncssh.read_private_key(str(tmp_path / "tko")).export_public_key())
    relay.refuse_listens = 1
    async with started(make()) as t:
        await wait_for(lambda: t.state == "up", what="up once the port is free")
        failed = [m for m in tunnel_lines(caplog) if "takeover of the stale session failed" in m]
        assert f"refused the takeover key {tmp_path / 'tko'} for user 'ictunnel'; install {tmp_path / 'tko'}.pub" \
            in failed[0]


async def test_hanging_takeover_times_out_with_one_warning(rig, caplog, monkeypatch):
    """The takeover command never ends: after TAKEOVER_TIMEOUT_S (shortened to 0.3 s) one WARNING
    'takeover ... failed: timed out', and the loop goes on (the next listen is granted: up)."""
    caplog.set_level(logging.INFO)
    patch_tunnel(monkeypatch, "TAKEOVER_TIMEOUT_S", 0.3)
    make, relay, _ = rig
    relay.refuse_listens, relay.hang_takeover = 1, True
    async with started(make()) as t:
        await wait_for(lambda: t.state == "up", what="up after the timed-out takeover")
        failed = [m for m in tunnel_lines(caplog) if "takeover of the stale session failed" in m]
        assert len(failed) == 1 and "failed: timed out;" in failed[0], tunnel_lines(caplog)
        assert relay.takeover_runs == 1


async def test_connection_while_the_local_listener_is_down_is_refused_cleanly(rig, monkeypatch):
    """Our HTTPS listener is down: a connection through the relay is closed without data, its peer mapping
    is released at once, no channel stays counted, the link stays up; with the listener back on the same
    port, the next connection is forwarded."""
    patch_tunnel(monkeypatch, "PEER_LINGER_S", 0.05)
    make, relay, target = rig
    async with started(make()) as t:
        await wait_for(lambda: t.state == "up", what="up")
        https = target.servers[0]
        https.close()
        await https.wait_closed()
        reader, writer = await asyncio.open_connection("127.0.0.1", t.relay.https_port)
        writer.write(b"hello")
        assert await asyncio.wait_for(reader.read(), 10) == b""
        writer.close()
        await wait_for(lambda: len(target.peers.events) == 2, what="register + unregister")
        assert target.peers.registered == {} and target.peers.events[1][0] == "unregister"
        assert t.active_channels == 0 and t.state == "up"

        async def echo(r, w):
            w.write(await r.read(5))
            await w.drain()
            w.close()

        target.servers[0] = await asyncio.start_server(echo, "127.0.0.1", target.https_port)
        reader, writer = await asyncio.open_connection("127.0.0.1", t.relay.https_port)
        writer.write(b"again")
        assert await asyncio.wait_for(reader.read(), 10) == b"again"
        writer.close()


async def test_aclose_on_a_frozen_link_ends_within_close_timeout(rig):
    """The relay stops reading (a frozen link; keepalives far off): aclose() cannot get the forwards'
    cancellation confirmed, gives up after CLOSE_TIMEOUT_S and aborts; it returns, state 'down'."""
    make, relay, _ = rig
    t = make(keepalive_interval_s=600)
    await t.start()
    try:
        await wait_for(lambda: t.state == "up", what="up")
        relay.conns[-1]._transport.pause_reading()
    finally:
        await asyncio.wait_for(t.aclose(), 30)
    assert t.state == "down" and t.status()["forwards"][0]["bound"] is False


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


# --- small pieces of the component, by their effect -------------------------------------------------------

def _tunnel_function(name: str):
    """A module-level helper of the tunnel package, wherever the package keeps it."""
    import sys

    for mod_name, module in list(sys.modules.items()):
        if mod_name.startswith("inverse_cloud.tunnel") and hasattr(module, name):
            return getattr(module, name)
    raise AssertionError(f"no tunnel module defines {name}")


@pytest.mark.parametrize(("text", "line"), [
    ("Keepalive timeout", "no answer to keepalives"), ("Connection timed out", "no answer to keepalives"),
    ("read TIMEOUT", "no answer to keepalives"), ("Connection reset by peer", "connection reset"),
    ("SSH keepalive lost", "no answer to keepalives"),
    ("Disconnected by peer", "Disconnected by peer"), ("", "ConnectionLost"),
])
def test_why_a_link_went_down_in_words(text, line):
    assert _tunnel_function("describe_lost")(asyncssh.ConnectionLost(text)) == line


@pytest.mark.parametrize(("listen", "connect"), [("0.0.0.0", "127.0.0.1"), ("::", "::1"), ("", "127.0.0.1"),
                                                 ("127.0.0.2", "127.0.0.2"), ("::1", "::1")])
def test_forwarded_connections_go_to_a_connectable_address(listen, connect):
    assert _tunnel_function("_connect_host")(listen) == connect


async def test_status_names_everything_a_user_needs(rig, caplog):
    """status() while up: the relay, user, pinned fingerprint, when it connected (ISO UTC, seconds), each
    forward with the relay side and our local port, bound; no reconnects, no takeovers. reload() on a link
    that is up logs nothing; reconnect() logs one line with the relay tag."""
    caplog.set_level(logging.INFO)
    make, relay, target = rig
    t = make()
    t.reconnect()     # before start: nothing to wake, nothing logged
    t.reload()
    assert tunnel_lines(caplog) == []
    async with started(t):
        await wait_for(lambda: t.state == "up", what="up")
        st = t.status()
        assert st["relay"] == f"127.0.0.1:{relay.port}" and st["user"] == "ictunnel"
        assert st["host_key_fingerprint"] == f"{relay.host_key.get_fingerprint('sha256')} (ssh-ed25519)"
        assert len(st["connected_since"]) == 25 and st["connected_since"].endswith("+00:00")
        assert st["forwards"] == [
            {"name": "https", "relay_port": t.relay.https_port, "relay_host": "127.0.0.1",
             "local_port": target.https_port, "bound": True},
            {"name": "http", "relay_port": t.relay.http_port, "relay_host": "127.0.0.1",
             "local_port": target.http_port, "bound": True}]
        assert st["takeovers"] == 0 and st["reconnects"] == [] and st["state"] == "up"
        t.reload()
        t.reconnect()
        await wait_for(lambda: t.connections == 2 and t.state == "up", what="reconnected")
        assert [m for m in tunnel_lines(caplog) if "now (" in m] == [
            f"[relay=127.0.0.1:{relay.port}] reconnecting now (SIGUSR1)"]
        assert len(t.status()["reconnects"]) == 1 and len(t.status()["reconnects"][0]) == 25


async def test_takeover_line_is_the_commands_last_line(rig, caplog):
    """The takeover command's last output line is logged as it is, with the relay tag."""
    caplog.set_level(logging.INFO)
    make, relay, _ = rig
    relay.refuse_listens = 1
    async with started(make()) as t:
        await wait_for(lambda: t.state == "up", what="up after takeover")
        line = f"[relay=127.0.0.1:{relay.port}] inverse-cloud takeover: ended 1 other session(s)"
        assert line in tunnel_lines(caplog) and t.status()["takeovers"] == 1


async def test_listen_host6_binds_a_second_pair_of_forwards_on_ipv6(rig, caplog):
    """[relay] listen_host6 (here ::1, the loopback stand-in for the relay's "::"): the tunnel asks the relay for
    both forwards on the IPv4 listen host and again on the IPv6 one; a client on the IPv6 forward reaches our
    listener with its own IPv6 address as the origin; status lists four bound forwards, the up line names both."""
    caplog.set_level(logging.INFO)
    make, relay, target = rig
    async with started(make(listen_host6="::1")) as t:
        await wait_for(lambda: t.state == "up", what="tunnel up")
        https, http = t.relay.https_port, t.relay.http_port
        assert sorted(relay.listen_requests) == sorted([("127.0.0.1", https), ("127.0.0.1", http),
                                                        ("::1", https), ("::1", http)])
        reader, writer = await asyncio.open_connection("::1", https)
        writer.write(b"over v6")
        writer.write_eof()
        assert await asyncio.wait_for(reader.read(-1), 30) == b"over v6"
        assert target.seen_origin == [("::1", writer.get_extra_info("sockname")[1])]
        writer.close()
        st = t.status()
        assert [(f["relay_host"], f["bound"]) for f in st["forwards"]] == [
            ("127.0.0.1", True), ("127.0.0.1", True), ("::1", True), ("::1", True)]
        up = [line for line in tunnel_lines(caplog) if "tunnel up" in line]
        assert up and f"[::1]:{https} -> local" in up[-1] and f"127.0.0.1:{https} -> local" in up[-1], up


async def test_refused_ipv6_forwards_leave_ipv4_up(rig, caplog):
    """The relay refuses the [::1] pair (its Match block was not updated for listen_host6), also after the
    takeover: one ERROR line names [::1]:port and the fix, the tunnel is up with both IPv4 forwards bound
    (IPv4 phones keep syncing), and status shows the IPv6 ones unbound. Two reconnects (the relay drops the
    link, then SIGUSR1) meet the same refusal: still one ERROR line, the repeats at DEBUG, no second takeover
    (the IPv4 pair bound, so no stale session holds the ports). After a SIGHUP the next refusal is an ERROR
    line again (the user may have changed the relay and asked to look again), and so it is after the pair
    bound in between."""
    caplog.set_level(logging.DEBUG)
    make, relay, _ = rig
    relay.refuse_hosts = {"::1"}

    def errors() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]

    def refusals(level: int) -> list[str]:
        return [r.getMessage() for r in caplog.records if r.levelno == level
                and f"relay refused to listen on [::1]:{https}: phones on IPv6" in r.getMessage()]

    async with started(make(listen_host6="::1")) as t:
        https = t.relay.https_port
        await wait_for(lambda: t.state == "up", what="tunnel up on IPv4")
        assert relay.takeover_runs == 1
        st = t.status()
        assert [(f["relay_host"], f["bound"]) for f in st["forwards"]] == [
            ("127.0.0.1", True), ("127.0.0.1", True), ("::1", False), ("::1", False)], st
        assert len(errors()) == 1 and refusals(logging.ERROR) == errors() and "IPv4 works" in errors()[0], errors()
        relay.conns[-1].close()                                  # the relay drops the link
        await wait_for(lambda: t.connections == 2 and t.state == "up", what="second session up")
        t.reconnect()                                            # SIGUSR1
        await wait_for(lambda: t.connections == 3 and t.state == "up", what="third session up")
        assert len(errors()) == 1, errors()
        assert len(refusals(logging.DEBUG)) == 2 and relay.takeover_runs == 1
        t.reload()                                               # SIGHUP: look again
        t.reconnect()
        await wait_for(lambda: t.connections == 4 and t.state == "up", what="fourth session up")
        assert len(refusals(logging.ERROR)) == 2 == len(errors()), errors()
        relay.refuse_hosts = set()                               # the relay fixed: the IPv6 pair binds
        t.reconnect()
        await wait_for(lambda: t.connections == 5 and all(f["bound"] for f in t.status()["forwards"]),
                       what="all four forwards bound")
        relay.refuse_hosts = {"::1"}                             # and broken again: a new ERROR line
        t.reconnect()
        await wait_for(lambda: t.connections == 6 and t.state == "up", what="sixth session up")
        assert len(refusals(logging.ERROR)) == 3 == len(errors()), errors()


def test_the_tunnel_loads_asyncssh_without_pyopenssl():
    """asyncssh imports pyOpenSSL when it is installed (acme needs it), for X.509 SSH certificates, which the
    tunnel never uses (it pins an ed25519 host key and logs in with its own key). Importing the tunnel in a
    fresh interpreter leaves pyOpenSSL unloaded, the tunnel's key handling still works, and pyOpenSSL still
    imports afterwards for the ACME order code."""
    import subprocess
    import sys

    script = """
import sys
import inverse_cloud.tunnel.link
import asyncssh
print("loaded:", "OpenSSL" in sys.modules)
key = asyncssh.generate_private_key("ssh-ed25519")
print("key:", key.export_public_key().decode().split()[0])
import OpenSSL.crypto
print("later:", OpenSSL.crypto.__name__)
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                         check=True).stdout
    assert "loaded: False" in out, out
    assert "key: ssh-ed25519" in out, out
    assert "later: OpenSSL.crypto" in out, out


async def test_each_takeover_runs_the_takeover_command_with_the_takeover_key(rig, caplog):
    """A refused listen: the takeover logs in with the takeover key (not the tunnel key) and asks for the
    command "takeover"; the tunnel comes up with the tunnel key. A second stale port later: a second
    takeover, counted (2)."""
    caplog.set_level(logging.INFO)
    make, relay, _ = rig
    tunnel_key, takeover_key = relay.allowed
    relay.refuse_listens = 1
    async with started(make()) as t:
        await wait_for(lambda: t.state == "up", what="up after the takeover")
        assert relay.takeover_commands == ["takeover"]
        # asyncssh asks about a key before it checks the signature: one login can be two entries in a row
        logins = [k for i, k in enumerate(relay.logins) if i == 0 or relay.logins[i - 1] != k]
        assert logins == [tunnel_key, takeover_key, tunnel_key]
        relay.refuse_listens = 1
        relay.conns[-1].close()
        await wait_for(lambda: t.takeovers == 2 and t.state == "up" and len(relay.takeover_commands) == 2,
                       what="a second takeover and the link up again")
        assert relay.takeover_commands == ["takeover", "takeover"]
        held = [m for m in tunnel_lines(caplog) if "still held by a previous session" in m]
        assert len(held) == 2, held          # the link was up in between: a new outage, a new line


async def test_a_takeover_without_output_logs_its_exit_status(rig, caplog):
    """The takeover command prints nothing and exits 3: one INFO line '<tag> takeover exited with 3' (not a
    failure: the command ran), and the link comes up."""
    caplog.set_level(logging.INFO)
    make, relay, _ = rig
    relay.refuse_listens, relay.takeover_output, relay.takeover_exit = 1, "", 3
    async with started(make()) as t:
        await wait_for(lambda: t.state == "up", what="up after the takeover")
        assert f"{t.tag} takeover exited with 3" in tunnel_lines(caplog)
        assert not [m for m in tunnel_lines(caplog) if "takeover of the stale session failed" in m]


async def test_an_unsafe_takeover_key_is_named_as_the_takeover_key(rig, caplog, tmp_path):
    """The takeover key file is group-readable: one WARNING, with the tag, naming 'relay takeover key', its
    path and the chmod; the relay is left to drop the stale session, and the link comes up after it."""
    caplog.set_level(logging.INFO)
    make, relay, _ = rig
    (tmp_path / "tko").chmod(0o640)
    relay.refuse_listens = 1
    async with started(make()) as t:
        await wait_for(lambda: t.state == "up", what="up once the stale port is free")
        warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING
                  and "takeover of the stale session failed" in r.getMessage()]
        assert warned == [f"{t.tag} takeover of the stale session failed: relay takeover key {tmp_path / 'tko'} has "
                          f"mode 0640; must be 0600 (run: chmod 600 {tmp_path / 'tko'}); waiting for the relay to "
                          "drop it (ClientAlive)"], warned
        assert relay.takeover_commands == []


async def test_retry_now_and_sigusr1_say_why_in_the_log_and_in_status(rig, caplog):
    """retry_now during a backoff: one INFO line '<tag> retrying now (<why>)'. SIGUSR1 on a live link: status's
    last reconnect says 'requested (SIGUSR1)'."""
    caplog.set_level(logging.INFO)
    make, relay, _ = rig
    async with silent_port() as blocked:
        async with started(make(port=blocked, connect_timeout_s=1)) as t:
            await wait_for(lambda: t.attempts >= 1 and t.state != "connecting", what="a failed attempt")
            t.retry_now("the network changed")
            assert f"{t.tag} retrying now (the network changed)" in tunnel_lines(caplog)
    async with started(make()) as t:
        await wait_for(lambda: t.state == "up", what="up")
        t.reconnect()
        await wait_for(lambda: t.connections == 2 and t.state == "up", what="reconnected")
        assert t.status()["last_reconnect"]["reason"] == "requested (SIGUSR1)"


async def test_a_takeover_login_that_hangs_times_out_too(rig, caplog, monkeypatch):
    """The relay never answers the takeover key's login: after TAKEOVER_TIMEOUT_S (0.3 s) one WARNING
    'takeover ... failed: timed out', no takeover command ran, and the loop goes on (up)."""
    caplog.set_level(logging.INFO)
    patch_tunnel(monkeypatch, "TAKEOVER_TIMEOUT_S", 0.3)
    make, relay, _ = rig
    relay.refuse_listens, relay.hang_takeover_login = 1, True
    async with started(make(connect_timeout_s=60)) as t:     # the takeover's own bound, not the dial's
        await wait_for(lambda: t.state == "up", what="up after the timed-out takeover login")
        failed = [m for m in tunnel_lines(caplog) if "takeover of the stale session failed" in m]
        assert len(failed) == 1 and "failed: timed out;" in failed[0], tunnel_lines(caplog)
        assert relay.takeover_commands == []


async def test_status_keeps_a_days_reconnects_and_names_the_last_one_and_the_watch(rig, caplog):
    """status() on a wall clock the test sets: reconnects less than a day old are listed, one exactly a day old
    is not; the last reconnect has its time (ISO, UTC) and reason; no link watcher -> network_watch None."""
    make, relay, _ = rig
    now = [1_800_000_000.0]
    t = make()
    t._clock = lambda: now[0]
    t.reconnects = [now[0] - 86400, now[0] - 86399]
    t.last_reconnect = (now[0] - 60, "address change")
    st = t.status()
    assert st["reconnects"] == ["2027-01-14T08:00:01+00:00"]
    assert st["last_reconnect"] == {"at": "2027-01-15T07:59:00+00:00", "reason": "address change"}
    assert st["network_watch"] is None
    t.last_reconnect = None
    assert t.status()["last_reconnect"] is None
    assert st["state"] == "down" and st["host_key_fingerprint"] is None and st["connected_since"] is None
    assert Tunnel(t.cfg, t.target, quickack=False).quickack is False
    assert Tunnel(t.cfg, t.target).quickack is quickack_supported()


async def test_after_a_requested_reconnect_the_next_failure_is_reported_again(rig, caplog):
    """SIGUSR1 drops a live link: while the new login hangs, the state is exactly 'connecting'; once logins are
    refused for good, that failure is not taken for another requested drop: 'failed' with its ERROR line."""
    caplog.set_level(logging.INFO)
    make, relay, _ = rig
    async with started(make(connect_timeout_s=2)) as t:
        await wait_for(lambda: t.state == "up", what="up")
        relay.hang_logins = True
        t.reconnect()
        await wait_for(lambda: t.state == "connecting" and t.connections == 1, what="connecting again")
        relay.hang_logins, relay.reject_auth = False, 10_000
        await wait_for(lambda: t.state == "failed", timeout_s=20, what="the refused login reported")
        assert [r for r in caplog.records if r.name == "inverse_cloud.tunnel.link" and r.levelno == logging.ERROR]


async def test_a_relay_that_stops_answering_is_noticed_by_keepalive(rig, caplog):
    """The relay's side stops reading (a dead path: nothing is refused, nothing arrives): the tunnel's SSH
    keepalive (1 s x 3 here) gives up and the link is reported lost."""
    caplog.set_level(logging.INFO)
    make, relay, _ = rig
    async with started(make(keepalive_interval_s=1, keepalive_count_max=3)) as t:
        await wait_for(lambda: t.state == "up", what="up")
        relay.conns[-1]._transport.pause_reading()
        await wait_for(lambda: t.state != "up", timeout_s=20, what="keepalive noticing the dead link")
        assert any("relay link lost" in m for m in tunnel_lines(caplog)), tunnel_lines(caplog)


async def test_a_lost_link_stays_down_with_one_line_while_the_relay_is_gone(rig, caplog):
    """Up, then the relay goes away (its listener closed, the session cut): the state is 'down' with one
    WARNING 'relay link lost (...); reconnecting' and no 'cannot reach relay' line; each retry updates
    last_error; every retry logs its delay at DEBUG with the tag and the reason. Once the relay is back, status
    names why the link was lost."""
    caplog.set_level(logging.DEBUG, "inverse_cloud.tunnel.link")
    make, relay, _ = rig
    async with started(make()) as t:
        await wait_for(lambda: t.state == "up", what="up")
        port = relay.port
        assert relay.server is not None
        relay.server.close()
        relay.conns[-1].close()
        await wait_for(lambda: t.state == "down" and t.attempts >= 3, timeout_s=20, what="three failed retries")
        lines = tunnel_lines(caplog)
        assert [m for m in lines if "relay link lost" in m] == [
            f"{t.tag} relay link lost (relay closed the connection); reconnecting"], lines
        assert not [m for m in lines if "cannot reach relay" in m], lines
        assert t.last_error is not None and "refused" in t.last_error
        st = t.status()
        assert st["connected_since"] is None and not any(f["bound"] for f in st["forwards"]), st
        debug = [r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG
                 and r.name == "inverse_cloud.tunnel.link" and "next attempt in" in r.getMessage()]
        assert debug and all(m.startswith(f"{t.tag} next attempt in ") for m in debug), debug
        assert debug[-1].endswith(f"({t.last_error})"), debug
        await relay.start(port)            # back on the same port
        await wait_for(lambda: t.state == "up" and t.connections == 2, timeout_s=20, what="up again")
        assert t.status()["last_reconnect"]["reason"] == "relay closed"


async def test_a_requested_drop_and_a_stable_link_lost_retry_without_waiting(rig, monkeypatch, caplog):
    """The delay the loop waits before the next attempt: 0 after SIGUSR1 (and the attempt count starts over),
    0 after a link that had been up for STABLE_S is lost."""
    patch_tunnel(monkeypatch, "STABLE_S", 0.0)
    make, relay, _ = rig
    t = make()
    waits: list[float] = []
    real_sleep = t._sleep_or_wake

    async def recorded(delay_s: float) -> None:
        waits.append(delay_s)
        await real_sleep(delay_s)

    t._sleep_or_wake = recorded  # type: ignore[method-assign]
    caplog.set_level(logging.DEBUG, "inverse_cloud.tunnel.link")
    async with started(t):
        await wait_for(lambda: t.state == "up", what="up")
        t.reconnect()
        await wait_for(lambda: t.connections == 2 and t.state == "up", what="reconnected")
        assert waits == [0.0]
        assert f"{t.tag} next attempt in 0.0 s (reconnect requested)" in [r.getMessage() for r in caplog.records]
        relay.conns[-1].close()
        await wait_for(lambda: t.connections == 3 and t.state == "up", what="reconnected after the loss")
        assert waits == [0.0, 0.0]


async def test_a_relay_that_only_listens_on_ipv6_is_named_with_brackets(rig, caplog):
    """[relay] listen_host is an IPv6 address and every listen is refused: the final ERROR names [::1]:port."""
    caplog.set_level(logging.INFO)
    make, relay, _ = rig
    relay.refuse_always = True
    async with started(make(listen_host="::1")) as t:
        await wait_for(lambda: relay.takeover_runs >= 1 and t.state == "failed", what="failed")
        errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
        assert errors and f"relay refused to listen on [::1]:{t.relay.https_port} (check permitlisten" in errors[0]


async def test_the_up_line_names_each_forward_and_the_host_key(rig, caplog):
    caplog.set_level(logging.INFO)
    make, relay, target = rig
    async with started(make()) as t:
        await wait_for(lambda: t.state == "up", what="up")
        https, http = t.relay.https_port, t.relay.http_port
        assert [m for m in tunnel_lines(caplog) if "tunnel up" in m] == [
            f"{t.tag} tunnel up: 127.0.0.1:{https} -> local :{target.https_port}, 127.0.0.1:{http} -> local "
            f":{target.http_port} (relay host key {relay.host_key.get_fingerprint('sha256')} (ssh-ed25519))"]


async def test_after_sigusr1_the_backoff_count_starts_over(rig, backoff):
    """Two rejected logins (attempts 0, 1), up; SIGUSR1 drops the link and the next login is refused: that
    failure asks for attempt 0 again (the requested drop reset the count)."""
    make, relay, _ = rig
    relay.reject_auth = 2
    async with started(make()) as t:
        await wait_for(lambda: t.state == "up", what="up after two rejected logins")
        relay.reject_auth = 1
        t.reconnect()
        await wait_for(lambda: len(backoff.calls) >= 4, what="the requested drop and the refused login")
        assert backoff.calls[2][1] == "transient" and backoff.calls[3] == (0, "fatal"), backoff.calls


async def test_the_tunnel_connection_goes_through_the_quickack_connector_where_supported(rig):
    make, relay, _ = rig
    async with started(make()) as t:
        await wait_for(lambda: t.state == "up", what="up")
        if quickack_supported():
            assert isinstance(t._connector, QuickAckConnector) and t._connector.protocol is not None
        else:
            assert t._connector is None
