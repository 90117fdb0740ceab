"""Faults of reliability.md 3.b on the real path: `inverse-cloud serve` -> chaos proxy -> real sshd (configured
by relay-setup) -> curl on the relay's forwarded HTTPS port. Each test breaks something, polls with a deadline
until a PROPFIND through the relay works again, and checks what was logged. Timings are printed, never
asserted beyond generous deadlines.

These tests use their own relay user (``icfault``): a takeover ends every other session of the tunnel user
on the machine, which must not hit another test's relay running at the same time.
"""

from __future__ import annotations

import base64
import contextlib
import re
import signal
import socket
import ssl
import subprocess
import time
from pathlib import Path

import pytest
from chaos_proxy import ChaosProxy
from relay_sshd import configure, relay_sshd, sshd_available

from inverse_cloud.testing import ServeProcess, free_port, init_instance, wait_until

USER = "icfault"
PASSWORD = "correct horse"


def propfind(port: int, max_time: float = 3) -> bool:
    out = subprocess.run(
        ["curl", "-s", "-k", "--max-time", str(max_time), "--resolve", f"laptop.test:{port}:127.0.0.1", "-u",
         f"alice:{PASSWORD}", "-X", "PROPFIND", "-H", "Depth: 1", f"https://laptop.test:{port}/radicale/alice/"],
        capture_output=True, text=True, timeout=max_time + 10, check=False)
    return "/radicale/alice/contacts/" in out.stdout


def local_ok(srv: ServeProcess) -> bool:
    return propfind(srv.https_port)


@contextlib.contextmanager
def stack(tmp_path: Path, *, client_alive: tuple[int, int] = (2, 3), keepalive: tuple[float, int] = (1, 3),
          proxy: bool = True):
    """serve -> [chaos proxy] -> sshd; yields (serve, relay, proxy) once both forwards are bound."""
    missing = sshd_available()
    assert missing is None, missing
    sshd_port = free_port()
    cfg = init_instance(tmp_path / "ic", relay=f"{USER}@127.0.0.1:{sshd_port}")
    configure(cfg, "relay", keepalive_interval_s=keepalive[0], keepalive_count_max=keepalive[1],
              connect_timeout_s=3)
    with relay_sshd(cfg, user=USER, client_alive_interval=client_alive[0],
                    client_alive_count_max=client_alive[1]) as relay:
        with ChaosProxy(sshd_port) if proxy else contextlib.nullcontext() as px:
            if px is not None:
                configure(cfg, "relay", port=px.port)
            with ServeProcess(cfg) as srv:
                relay.wait_forwards(30, on_timeout=lambda: srv.log() + relay.log())
                assert propfind(relay.https_port), srv.log()
                yield srv, relay, px


def recover(srv: ServeProcess, relay, what: str, t0: float, deadline_s: float = 40) -> float:
    """Poll a PROPFIND through the relay until it works; print and return seconds since t0."""
    wait_until(lambda: propfind(relay.https_port), deadline_s, f"sync through the relay after {what}",
               interval_s=0.2, on_timeout=lambda: srv.log()[-4000:] + "\n--- sshd ---\n" + relay.log()[-3000:])
    took = time.monotonic() - t0
    print(f"\n[tunnel-faults] {what}: sync works again after {took:.2f} s")
    return took


def tunnel_lines(srv: ServeProcess) -> list[str]:
    return [line for line in srv.log().splitlines() if "inverse_cloud.tunnel" in line]


@pytest.mark.slow
def test_f1_reset_link_reconnects_at_once(tmp_path):
    """F1: RST both ends of the SSH connection -> one line 'relay link lost (connection reset);
    reconnecting' -> reconnect (first retry within 1 s) -> sync works; no takeover needed."""
    with stack(tmp_path) as (srv, relay, px):
        t0 = time.monotonic()
        assert px.reset() >= 1
        recover(srv, relay, "RST (F1)", t0, 20)
        lines = tunnel_lines(srv)
        assert sum("relay link lost (connection reset); reconnecting" in line for line in lines) == 1, lines
        assert not any("taking over" in line for line in lines)


@pytest.mark.slow
def test_f2_frozen_link_detected_by_keepalive_then_recovers(tmp_path):
    """F2: the link freezes (no RST, no FIN): client keepalive (1 s x 3) declares it dead -> the freeze
    ends -> reconnect (with a takeover if the relay still holds the port) -> sync works; exactly one sshd
    session holds the forwarded port afterwards (no stale listener)."""
    with stack(tmp_path) as (srv, relay, px):
        t0 = time.monotonic()
        px.set_mode("freeze")
        wait_until(lambda: any("relay link lost (no answer to keepalives)" in line for line in tunnel_lines(srv)),
                   20, "keepalive to declare the frozen link dead", interval_s=0.1, on_timeout=srv.log)
        print(f"\n[tunnel-faults] frozen link declared dead after {time.monotonic() - t0:.2f} s")
        px.set_mode("pass")
        recover(srv, relay, "8 s freeze (F2)", t0)
        wait_until(lambda: len(relay.holders()) == 1, 15, "a single holder of the forwarded port")


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["cut", "rebind"])
def test_network_change_takes_over_the_stale_session(tmp_path, mode):
    """Stale-port takeover and F5: the old path dies silently (cut; rebind = new connections also come from
    another source address, as after a network change) while the relay keeps the dead session with
    ClientAlive 15 s x 3; a phone keeps connecting to the port every 0.5 s meanwhile (which kept the seed
    stack's port held for good). The client notices via keepalive, reconnects, its listen is refused ->
    'still held by a previous session; taking over' -> the takeover key ends the old session -> forwards
    bound -> sync works well before the relay's own ClientAlive would have fired."""
    with stack(tmp_path, client_alive=(15, 3)) as (srv, relay, px):
        old = relay.holders()
        t0 = time.monotonic()
        px.set_mode(mode)
        took = recover(srv, relay, f"network change ({mode}) with a stale relay session", t0, 40)
        lines = tunnel_lines(srv)
        assert any("still held by a previous session; taking over" in line for line in lines), "\n".join(lines)
        assert any(re.search(r"takeover: ended [1-9]\d* other session", line) for line in lines), "\n".join(lines)
        new = relay.holders()
        assert new and new != old
        print(f"[tunnel-faults] recovered in {took:.2f} s; relay ClientAlive alone would need ~45 s")
        px.set_mode("pass")


@pytest.mark.slow
def test_f3_sshd_listener_killed_session_killed_and_new_host_key(tmp_path):
    """F3 (a) killing the sshd listener leaves the tunnel up (same session, no reconnect); (b) killing the
    session child -> reconnect -> sync works; (c) relay restarted with a NEW host key -> refused with one
    line naming both fingerprints and the fix; local HTTPS keeps serving; (B8) an RSA-only relay when
    ed25519 is pinned is refused too."""
    with stack(tmp_path, proxy=False) as (srv, relay, _):
        holder = relay.holders()
        relay.kill_listener()
        assert propfind(relay.https_port) and relay.holders() == holder
        assert not any("relay link lost" in line for line in tunnel_lines(srv))
        relay.start()                                          # listener back, old session untouched
        t0 = time.monotonic()
        assert relay.kill_session() == holder
        recover(srv, relay, "killed relay session (F3b)", t0, 20)
        relay.restart(new_host_key=True)
        wait_until(lambda: any("relay host key changed: expected SHA256:" in line for line in tunnel_lines(srv)),
                   20, "host key mismatch line", on_timeout=srv.log)
        bad = [line for line in tunnel_lines(srv) if "relay host key changed" in line]
        assert len(bad) == 1 and ", got SHA256:" in bad[0]
        assert bad[0].endswith("run `inverse-cloud relay-setup --accept-new-host-key`")
        assert local_ok(srv) and not relay.forwards_bound()
        relay.new_host_key("rsa")
        relay.restart()
        srv.stop()          # a refused host key is retried only every ~5 min: start afresh instead
        srv.start()
        wait_until(lambda: any("relay host key changed" in line and "(ssh-rsa)" in line for line in tunnel_lines(srv)),
                   30, "RSA host key refused", on_timeout=srv.log)
        assert local_ok(srv) and not relay.forwards_bound()


@pytest.mark.slow
def test_f4_short_suspend_keeps_the_session(tmp_path):
    """F4 variant A: relay ClientAlive 5 s x 3 (15 s), client keepalive 2 s x 3; SIGSTOP serve for 6 s,
    SIGCONT: the same relay session still holds the port, nothing was logged as lost, sync works."""
    with stack(tmp_path, client_alive=(5, 3), keepalive=(2, 3), proxy=False) as (srv, relay, _):
        holder = relay.holders()
        srv.signal(signal.SIGSTOP)
        try:
            end = time.monotonic() + 6
            while time.monotonic() < end:
                time.sleep(0.1)   # the suspend itself is the condition under test
        finally:
            srv.signal(signal.SIGCONT)
        t0 = time.monotonic()
        recover(srv, relay, "6 s SIGSTOP (F4 A)", t0, 20)
        assert relay.holders() == holder
        assert not any("relay link lost" in line for line in tunnel_lines(srv)), tunnel_lines(srv)


@pytest.mark.slow
def test_f4_long_suspend_reconnects(tmp_path):
    """F4 variant B: relay ClientAlive 1 s x 3 drops the session during an 8 s SIGSTOP; after SIGCONT the
    client sees the link gone, reconnects, and a sync started right after works within the deadline."""
    with stack(tmp_path, client_alive=(1, 3), keepalive=(2, 3), proxy=False) as (srv, relay, _):
        holder = relay.holders()
        srv.signal(signal.SIGSTOP)
        try:
            wait_until(lambda: relay.holders() != holder, 20, "relay dropping the suspended session",
                       interval_s=0.1)
        finally:
            srv.signal(signal.SIGCONT)
        t0 = time.monotonic()
        recover(srv, relay, "SIGSTOP past the relay's ClientAlive (F4 B)", t0, 30)
        assert any("relay link lost" in line for line in tunnel_lines(srv))


@pytest.mark.slow
def test_f14_permitlisten_mismatch_is_one_line_and_local_keeps_serving(tmp_path):
    """F14: authorized_keys permits 'localhost:P' while the client asks for 127.0.0.1:P: after the takeover
    attempt one ERROR line names the address and permitlisten/PermitListen; local HTTPS keeps serving."""
    missing = sshd_available()
    assert missing is None, missing
    sshd_port = free_port()
    cfg = init_instance(tmp_path / "ic", relay=f"{USER}@127.0.0.1:{sshd_port}")
    configure(cfg, "relay", keepalive_interval_s=1, keepalive_count_max=3, connect_timeout_s=3)
    with relay_sshd(cfg, user=USER) as relay:
        keys = relay.bundle / "authorized_keys"
        keys.write_text(keys.read_text().replace(f'permitlisten="127.0.0.1:{relay.https_port}"',
                                                 f'permitlisten="localhost:{relay.https_port}"'))
        with ServeProcess(cfg) as srv:
            wait_until(lambda: any("relay refused to listen on" in line for line in tunnel_lines(srv)), 30,
                       "the permitlisten line", on_timeout=srv.log)
            lines = [line for line in tunnel_lines(srv) if "relay refused to listen on" in line]
            assert len(lines) == 1, lines
            assert f"relay refused to listen on 127.0.0.1:{relay.https_port} (check permitlisten" in lines[0]
            assert "ERROR" in lines[0] and "PermitListen" in lines[0]
            assert local_ok(srv)


def _https(port: int, requests: list[bytes], timeout: float = 10) -> list[bytes]:
    """Send HTTP/1.1 requests one after another on one TLS connection; return each raw response head+body."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    out = []
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as raw, \
            ctx.wrap_socket(raw, server_hostname="laptop.test") as s:
        for req in requests:
            s.sendall(req)
            buf = b""
            while b"\r\n\r\n" not in buf:
                chunk = s.recv(65536)
                if not chunk:
                    raise ConnectionResetError("closed before a response")
                buf += chunk
            head, _, body = buf.partition(b"\r\n\r\n")
            m = re.search(rb"content-length: *(\d+)", head, re.I)
            need = int(m.group(1)) if m else 0
            while len(body) < need:
                chunk = s.recv(65536)
                if not chunk:
                    break
                body += chunk
            out.append(head + b"\r\n\r\n" + body)
    return out


def _req(method: str, path: str, body: bytes = b"", extra: str = "") -> bytes:
    auth = base64.b64encode(f"alice:{PASSWORD}".encode()).decode()
    return (f"{method} {path} HTTP/1.1\r\nHost: laptop.test\r\nAuthorization: Basic {auth}\r\n{extra}"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


@pytest.mark.slow
def test_f15_response_lost_after_commit_no_duplicate(tmp_path):
    """F15: the link drops right after Radicale committed a PUT, before the response reaches the phone (the
    proxy in front of the relay's port resets the connection instead of delivering the first response
    bytes). The phone retries the same PUT with If-None-Match: * -> 412 (it was stored) -> exactly one
    item with that UID, byte-identical to what was sent."""
    with stack(tmp_path, proxy=False) as (srv, relay, _):
        with ChaosProxy(relay.https_port) as phone_link:
            uid = "f15-0001"
            card = (f"BEGIN:VCARD\r\nVERSION:3.0\r\nUID:{uid}\r\nFN:F15 Canary\r\nN:Canary;F15;;;\r\n"
                    "END:VCARD\r\n").encode()
            path = f"/radicale/alice/contacts/{uid}.vcf"
            put = _req("PUT", path, card, "Content-Type: text/vcard\r\nIf-None-Match: *\r\n")
            warm = _req("PROPFIND", "/radicale/alice/contacts/", b"", "Depth: 0\r\n")

            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
            with socket.create_connection(("127.0.0.1", phone_link.port), timeout=10) as raw, \
                    ctx.wrap_socket(raw, server_hostname="laptop.test") as s:
                s.sendall(warm)                          # handshake and session tickets are over after this
                got = b""
                while b"</multistatus>" not in got:
                    chunk = s.recv(65536)
                    assert chunk, "warm-up request failed"
                    got += chunk
                phone_link.reset_on_next_response()
                s.sendall(put)
                lost = False
                try:
                    lost = s.recv(65536) == b""
                except (ConnectionResetError, ssl.SSLError, OSError):
                    lost = True
                assert lost, "the response got through: the fault was not injected"
            retry = _https(phone_link.port, [put])[0]
            status = int(retry.split(b" ", 2)[1])
            print(f"\n[tunnel-faults] F15: retried PUT after the lost response -> {status}")
            assert status in (412, 201)
            listing = _https(phone_link.port, [_req("PROPFIND", "/radicale/alice/contacts/", b"", "Depth: 1\r\n")])[0]
            assert listing.count(f"{uid}.vcf".encode()) == 1
            stored = _https(phone_link.port, [_req("GET", path)])[0].partition(b"\r\n\r\n")[2]
            assert stored.count(f"UID:{uid}".encode()) == 1 and b"FN:F15 Canary" in stored
