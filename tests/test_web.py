"""In-process tests of the two aiohttp apps and the pieces they share: redirect rules, the ACME token
store, the HTTP listener's refusal to do anything DAV-like, header stripping, the REMOTE_ADDR hook,
the body limits and the storage guard. Radicale is replaced by a WSGI app that records its environ,
except in the last test, which runs the real one through the bridge."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from multidict import CIMultiDict

from inverse_cloud.dav.environ import build_environ, valid_basic_auth
from inverse_cloud.dav.web import (
    ChallengeStore,
    FailedLoginDigest,
    PeerDirectory,
    StorageGuard,
    access_logger_class,
    flush_failed_logins,
    make_http_app,
    make_https_app,
    redirect_target,
)
from inverse_cloud.dav.wsgi import RadicaleBridge, WsgiResult
from tests.support import wait_for

BASIC_ALICE = "Basic YWxpY2U6Y29ycmVjdCBob3JzZQ=="  # alice:correct horse


class RecordingApp:
    """A WSGI app that answers 200 with a JSON dump of the environ it got (minus the file objects)."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        body = environ["wsgi.input"].read()
        seen = {k: v for k, v in environ.items() if isinstance(v, str)}
        seen["body_length"] = str(len(body))
        self.calls.append(seen)
        start_response("200 OK", [("Content-Type", "application/json")])
        return [json.dumps(seen).encode()]


async def serve(app: web.Application, shutdown_timeout_s: float = 60.0) -> tuple[web.AppRunner, int]:
    runner = web.AppRunner(app, keepalive_timeout=5, handle_signals=False, shutdown_timeout=shutdown_timeout_s)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return runner, port


@pytest.fixture
async def http_server() -> AsyncIterator[tuple[ChallengeStore, str]]:
    challenges = ChallengeStore()
    runner, port = await serve(make_http_app(challenges, "laptop.test", 443))
    try:
        yield challenges, f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


def make_bridge(app: Any, peers: PeerDirectory | None = None, **kw: Any) -> RadicaleBridge:
    params: dict[str, Any] = dict(threads=2, max_body_bytes=64 * 1024, body_grace_s=1.0, body_min_rate_bps=1024,
                                  auth_delay_s=0.0)
    params.update(kw)
    return RadicaleBridge(app, remote_of=(peers or PeerDirectory()).remote_of, **params)


async def _until(predicate: Callable[[], object], what: str, timeout_s: float = 10.0) -> None:
    await wait_for(predicate, timeout_s, what)


@pytest.fixture
async def dav() -> AsyncIterator[tuple[RecordingApp, PeerDirectory, str, RadicaleBridge]]:
    app, peers = RecordingApp(), PeerDirectory()
    bridge = make_bridge(app, peers)
    runner, port = await serve(make_https_app(bridge))
    try:
        yield app, peers, f"http://127.0.0.1:{port}", bridge
    finally:
        await runner.cleanup()
        bridge.close()


# --- redirect rules (pure) ------------------------------------------------------------------------

@pytest.mark.parametrize(("port", "path", "expected"), [
    (443, "/", "https://laptop.test/"),
    (443, "/radicale/alice/?a=1", "https://laptop.test/radicale/alice/?a=1"),
    (8443, "/x", "https://laptop.test:8443/x"),
    (443, "//evil.example/x", "https://laptop.test/"),
    (443, "https://evil.example/", "https://laptop.test/"),
    (443, "", "https://laptop.test/"),
])
def test_redirect_target(port, path, expected):
    """Always the configured domain; a path that could be read as another host becomes '/'."""
    assert redirect_target("laptop.test", port, path) == expected


# --- HTTP listener: ACME tokens and 308 only --------------------------------------------------------

async def test_acme_token_store_serves_set_tokens_only(http_server):
    """A token set through the API is served verbatim; after remove() it is a 404; unknown tokens 404."""
    challenges, base = http_server
    challenges.set("tok-123_AZ", "tok-123_AZ.thumbprint")
    assert len(challenges) == 1
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{base}/.well-known/acme-challenge/tok-123_AZ") as r:
            assert r.status == 200
            assert await r.text() == "tok-123_AZ.thumbprint"
        async with s.head(f"{base}/.well-known/acme-challenge/tok-123_AZ") as r:
            assert r.status == 200
        async with s.get(f"{base}/.well-known/acme-challenge/other") as r:
            assert r.status == 404
        async with s.get(f"{base}/.well-known/acme-challenge/") as r:
            assert r.status == 404
        async with s.get(f"{base}/.well-known/acme-challenge/tok-123_AZ/x") as r:
            assert r.status == 404
        challenges.remove("tok-123_AZ")
        challenges.remove("never-set")
        async with s.get(f"{base}/.well-known/acme-challenge/tok-123_AZ") as r:
            assert r.status == 404
    assert len(challenges) == 0


@pytest.mark.parametrize(("method", "path", "headers"), [
    ("GET", "/radicale/", {"Authorization": BASIC_ALICE}),
    ("PROPFIND", "/radicale/alice/", {"Depth": "1", "Authorization": BASIC_ALICE}),
    ("PUT", "/radicale/alice/contacts/x.vcf", {}),
    ("OPTIONS", "/", {}),
    ("GET", "/.well-known/carddav", {}),
    ("POST", "/.well-known/acme-challenge/tok", {}),
    ("GET", "/", {"Host": "evil.example"}),
    ("GET", "/x?y=1", {"Host": "h" * 4000}),
])
async def test_http_listener_only_redirects_to_configured_domain(http_server, method, path, headers):
    """Everything but an ACME GET is a 308 to https://<configured domain><path>: never the client's Host,
    never WWW-Authenticate, never a DAV header, and Radicale is never involved."""
    _, base = http_server
    async with aiohttp.ClientSession() as s:
        async with s.request(method, base + path, headers=headers, allow_redirects=False, data=b"x" * 10) as r:
            assert r.status == 308
            assert r.headers["Location"] == "https://laptop.test" + path
            assert "WWW-Authenticate" not in r.headers
            assert "DAV" not in r.headers
            assert "evil" not in (await r.text())


async def test_http_listener_refuses_scheme_relative_redirect(http_server):
    """A request target of '//evil.example/' must not become Location: https://laptop.test//evil..."""
    _, base = http_server
    reader, writer = await asyncio.open_connection("127.0.0.1", int(base.rsplit(":", 1)[1]))
    writer.write(b"GET //evil.example/x HTTP/1.1\r\nHost: evil.example\r\nConnection: close\r\n\r\n")
    head = (await asyncio.wait_for(reader.read(4096), 5)).decode()
    writer.close()
    assert head.startswith("HTTP/1.1 308")
    assert "Location: https://laptop.test/\r\n" in head


# --- HTTPS app: discovery redirects -----------------------------------------------------------------

@pytest.mark.parametrize(("method", "path", "status", "location"), [
    ("GET", "/.well-known/carddav", 301, "/radicale/"),
    ("PROPFIND", "/.well-known/carddav", 301, "/radicale/"),
    ("PROPFIND", "/.well-known/caldav", 301, "/radicale/"),
    ("PROPFIND", "/", 301, "/radicale/"),
    ("GET", "/", 301, "/radicale/"),
    ("GET", "/etc/passwd", 404, None),
])
async def test_https_discovery_redirects(dav, method, path, status, location):
    """RFC 6764 well-known URIs and Thunderbird's PROPFIND / go to /radicale/ (DAVx5 keeps the method)."""
    app, _, base, _ = dav
    async with aiohttp.ClientSession() as s:
        async with s.request(method, base + path, allow_redirects=False) as r:
            assert r.status == status
            assert r.headers.get("Location") == location
    assert app.calls == []


async def test_home_handler_serves_get_root_only():
    async def home(request: web.Request) -> web.StreamResponse:
        return web.Response(text="phone page")

    bridge = make_bridge(RecordingApp())
    runner, port = await serve(make_https_app(bridge, home))
    try:
        async with aiohttp.ClientSession() as s:
            async with s.get(f"http://127.0.0.1:{port}/") as r:
                assert r.status == 200 and await r.text() == "phone page"
            async with s.request("PROPFIND", f"http://127.0.0.1:{port}/", allow_redirects=False) as r:
                assert r.status == 301
    finally:
        await runner.cleanup()
        bridge.close()


# --- the bridge: environ, stripping, REMOTE_ADDR ----------------------------------------------------

async def test_spoofable_headers_never_reach_radicale(dav):
    """X-Remote-User, X-Script-Name, X-Forwarded-* and friends are dropped; SCRIPT_NAME is ours."""
    app, _, base, _ = dav
    spoof = {"X-Remote-User": "admin", "X-Script-Name": "/evil", "X-Forwarded-For": "1.2.3.4",
             "X-Forwarded-Host": "evil.example", "X-Forwarded-Proto": "http", "Forwarded": "for=1.2.3.4",
             "X-Real-IP": "1.2.3.4", "Remote-User": "admin", "X-Remote-Addr": "1.2.3.4", "Proxy": "http://x",
             "Authorization": BASIC_ALICE, "X-Other": "kept"}
    async with aiohttp.ClientSession() as s:
        async with s.request("PROPFIND", f"{base}/radicale/alice/%40x?q=1", headers=spoof) as r:
            assert r.status == 200
            seen = await r.json()
    for key in ("HTTP_X_REMOTE_USER", "HTTP_X_SCRIPT_NAME", "HTTP_X_FORWARDED_FOR", "HTTP_X_FORWARDED_HOST",
                "HTTP_X_FORWARDED_PROTO", "HTTP_FORWARDED", "HTTP_X_REAL_IP", "HTTP_REMOTE_USER",
                "HTTP_X_REMOTE_ADDR", "HTTP_PROXY", "REMOTE_USER"):
        assert key not in seen, key
    assert "1.2.3.4" not in json.dumps(seen) and "evil" not in json.dumps(seen)
    assert seen["HTTP_X_OTHER"] == "kept"
    assert seen["HTTP_AUTHORIZATION"] == BASIC_ALICE
    assert seen["SCRIPT_NAME"] == "/radicale"
    assert seen["PATH_INFO"] == "/alice/@x"
    assert seen["QUERY_STRING"] == "q=1"
    assert seen["REMOTE_ADDR"] == "127.0.0.1"
    assert seen["wsgi.url_scheme"] == "https"


async def test_remote_addr_comes_from_peer_directory(dav):
    """A loopback connection whose source port the tunnel registered gets the relay's view of the client
    as REMOTE_ADDR; after unregister it is the socket peer again."""
    app, peers, base, _ = dav
    port = int(base.rsplit(":", 1)[1])

    async def propfind_from_registered_port(register: bool) -> dict[str, Any]:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=("127.0.0.1", 0))
        local_port = writer.get_extra_info("sockname")[1]
        if register:
            peers.register(local_port, ("203.0.113.7", 51234))
        writer.write(b"PROPFIND /radicale/ HTTP/1.1\r\nHost: laptop.test\r\nConnection: close\r\n\r\n")
        data = await asyncio.wait_for(reader.read(), 5)
        writer.close()
        peers.unregister(local_port)
        return json.loads(data.split(b"\r\n\r\n", 1)[1])

    seen = await propfind_from_registered_port(True)
    assert (seen["REMOTE_ADDR"], seen["REMOTE_PORT"]) == ("203.0.113.7", "51234")
    seen = await propfind_from_registered_port(False)
    assert seen["REMOTE_ADDR"] == "127.0.0.1"


def test_peer_directory_only_maps_loopback():
    peers = PeerDirectory()
    peers.register(40000, ("198.51.100.1", 1))
    assert peers.resolve(("127.0.0.1", 40000)) == ("198.51.100.1", 1)
    assert peers.resolve(("::1", 40000, 0, 0)) == ("198.51.100.1", 1)
    assert peers.resolve(("192.0.2.9", 40000)) == ("192.0.2.9", 40000)
    assert peers.resolve(None) == ("unknown", 0)


@pytest.mark.parametrize(("header", "ok"), [
    (BASIC_ALICE, True),
    ("", True),
    ("Bearer abc", True),
    ("Basic !!!!", False),
    ("Basic /w==", False),                      # not UTF-8
    ("Basic YWxpY2U=", False),                  # "alice": no colon
    ("Basic OnB3", False),                      # ":pw": empty user
    ("Basic " + "YWFh" * 200 + "OnB3", False),  # 600-byte user name
])
def test_valid_basic_auth(header, ok):
    assert valid_basic_auth(header) is ok


async def test_malformed_basic_credentials_get_401_without_calling_radicale(dav):
    app, _, base, _ = dav
    async with aiohttp.ClientSession() as s:
        for value in ("Basic !!!!", "Basic /w==", "Basic YWxpY2U="):
            async with s.request("PROPFIND", f"{base}/radicale/alice/", headers={"Authorization": value}) as r:
                assert r.status == 401
                assert r.headers["WWW-Authenticate"].startswith("Basic")
    assert app.calls == []


# --- body limits -------------------------------------------------------------------------------------

async def test_declared_oversized_body_gets_413_without_calling_radicale(dav):
    app, _, base, _ = dav
    async with aiohttp.ClientSession() as s:
        async with s.put(f"{base}/radicale/alice/contacts/a.vcf", data=b"x" * (64 * 1024 + 1),
                         headers={"Authorization": BASIC_ALICE}) as r:
            assert r.status == 413
    assert app.calls == []


async def test_chunked_body_over_limit_is_cut_at_the_limit(dav):
    """A chunked upload without a length is answered 413 once the limit is passed, long before the client
    has sent everything (it keeps sending: the server must not wait for the end)."""
    app, _, base, _ = dav
    port = int(base.rsplit(":", 1)[1])
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"PUT /radicale/alice/contacts/a.vcf HTTP/1.1\r\nHost: x\r\nAuthorization: " + BASIC_ALICE.encode()
                 + b"\r\nTransfer-Encoding: chunked\r\n\r\n")
    chunk = b"%x\r\n%s\r\n" % (16 * 1024, b"y" * 16 * 1024)
    sent = 0
    response = b""
    read = asyncio.ensure_future(reader.read(4096))
    for _ in range(64 * 10):  # up to 10 MiB if the server never answered
        if read.done():
            break
        try:
            writer.write(chunk)
            await writer.drain()
        except ConnectionError:
            break
        sent += 16 * 1024
        await asyncio.sleep(0)
    response = await asyncio.wait_for(read, 5)
    writer.close()
    assert response.startswith(b"HTTP/1.1 413"), response[:100]
    assert sent < 2 * 1024 * 1024, f"server let the client send {sent} bytes past a 64 KiB limit"
    assert app.calls == []


async def test_body_cut_short_by_eof_is_closed_without_reaching_radicale(dav, caplog):
    """Content-Length 100, 5 bytes, then the client's EOF: aiohttp ends the connection without an answer
    (the client can no longer send the rest, so no status would help it), within the deadline rather than
    hanging; Radicale is never called and nothing is logged as an error."""
    import logging

    app, _, base, bridge = dav
    port = int(base.rsplit(":", 1)[1])
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"PUT /radicale/alice/contacts/a.vcf HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nshort")
    writer.write_eof()
    data = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    assert data == b""
    await _until(lambda: bridge.active == 0, "the handler to end")
    assert app.calls == []
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_trickling_body_gets_408_and_never_reaches_radicale():
    """A body that falls behind grace + received/min_rate is cut with 408 and the connection closed."""
    app = RecordingApp()
    bridge = make_bridge(app, body_grace_s=1.0, body_min_rate_bps=100)
    runner, port = await serve(make_https_app(bridge))
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"PUT /radicale/alice/contacts/a.vcf HTTP/1.1\r\nHost: x\r\nContent-Length: 10000\r\n\r\n")
        read = asyncio.ensure_future(reader.read())
        for _ in range(10):  # one byte every 50 ms (20 B/s, far below 100 B/s), then silence
            writer.write(b"z")
            await asyncio.sleep(0.05)  # the trickle's pace, not a wait for the server
        # The answer comes, and then the connection is closed (no lingering on a refused body). The client
        # has stopped writing by then: a byte sent after the server's close would draw a reset that can
        # discard the 408 before it is read.
        data = await asyncio.wait_for(read, 15)
        writer.close()
        assert data.startswith(b"HTTP/1.1 408"), data[:80]
        assert app.calls == []
    finally:
        await runner.cleanup()
        bridge.close()


def test_build_environ_content_length_for_writes():
    """Write methods always carry CONTENT_LENGTH (Radicale reads exactly that many bytes)."""
    from aiohttp.test_utils import make_mocked_request

    req = make_mocked_request("PUT", "/radicale/alice/contacts/a%20b.vcf", headers={"Content-Type": "text/vcard"})
    env = build_environ(req, open(os.devnull, "rb"), 0, ("203.0.113.1", 5), ("laptop.test", 443))  # noqa: SIM115
    env["wsgi.input"].close()
    assert env["CONTENT_LENGTH"] == "0"
    assert env["CONTENT_TYPE"] == "text/vcard"
    assert env["PATH_INFO"] == "/alice/contacts/a b.vcf"
    assert env["REMOTE_ADDR"] == "203.0.113.1"


# --- the storage guard -----------------------------------------------------------------------------

def test_storage_guard_states(tmp_path):
    """No marker: anything goes. After data was stored once (marker written by note_success), a missing,
    empty or unreadable store is refused."""
    storage, marker = tmp_path / "collections", tmp_path / ".has-data"
    guard = StorageGuard(storage, marker)
    assert guard.problem() is None
    root = storage / "collection-root"
    root.mkdir(parents=True)
    guard.note_success(None, WsgiResult(201, "Created", [], b""))  # type: ignore[arg-type]
    assert not marker.exists(), "an empty store is not data"
    (root / "alice").mkdir()
    guard.note_success(None, WsgiResult(500, "", [], b""))  # type: ignore[arg-type]
    assert not marker.exists(), "a failed request proves nothing"
    guard.note_success(None, WsgiResult(201, "Created", [], b""))  # type: ignore[arg-type]
    assert marker.exists() and (marker.stat().st_mode & 0o777) == 0o600
    assert guard.problem() is None
    # A fresh guard (new process) reads the marker.
    guard = StorageGuard(storage, marker)
    (root / "alice").rmdir()
    (root / ".Radicale.lock").write_text("")
    assert "is empty" in (guard.problem() or "")
    root.rename(tmp_path / "moved")
    assert "is missing" in (guard.problem() or "")


async def test_storage_guard_gate_returns_503_and_logs_once(tmp_path, caplog):
    storage, marker = tmp_path / "collections", tmp_path / ".has-data"
    marker.write_text("x")
    guard = StorageGuard(storage, marker)
    app = RecordingApp()
    bridge = make_bridge(app, gate=guard.gate)
    runner, port = await serve(make_https_app(bridge))
    try:
        async with aiohttp.ClientSession() as s:
            for _ in range(3):
                async with s.request("PROPFIND", f"http://127.0.0.1:{port}/radicale/alice/",
                                     headers={"Authorization": BASIC_ALICE}) as r:
                    assert r.status == 503
                    assert "missing" in await r.text()
    finally:
        await runner.cleanup()
        bridge.close()
    assert app.calls == []
    lines = [r for r in caplog.records if r.name == "inverse_cloud.dav.web"]
    assert len(lines) == 1 and str(storage) in lines[0].getMessage()


# --- the real Radicale through the bridge ----------------------------------------------------------

async def test_real_radicale_hrefs_carry_the_script_name(tmp_path):
    """Radicale built from our config answers PROPFIND with hrefs under /radicale/ and creates the
    predefined address book and calendar."""
    from inverse_cloud import config
    from inverse_cloud.dav import users
    from inverse_cloud.dav.radicale_app import build_application

    cfg = config.loads(f'[server]\ndomain = "laptop.test"\ndata_dir = "{tmp_path}"\nstate_dir = "{tmp_path}/s"\n')
    users.add_user(cfg.server.htpasswd_path, "alice", "correct horse")
    bridge = make_bridge(await asyncio.to_thread(build_application, cfg))
    runner, port = await serve(make_https_app(bridge))
    try:
        async with aiohttp.ClientSession() as s:
            async with s.request("PROPFIND", f"http://127.0.0.1:{port}/radicale/alice/",
                                 headers={"Authorization": BASIC_ALICE, "Depth": "1"}) as r:
                assert r.status == 207
                text = await r.text()
            async with s.request("PROPFIND", f"http://127.0.0.1:{port}/radicale/alice/",
                                 headers={"Authorization": "Basic YWxpY2U6d3Jvbmc=", "Depth": "1"}) as r:
                assert r.status == 401
    finally:
        await runner.cleanup()
        bridge.close()
    assert "<href>/radicale/alice/contacts/</href>" in text
    assert "<href>/radicale/alice/calendar/</href>" in text


# --- inputs Radicale would answer with 500 (or crash on) ----------------------------------------------

@pytest.mark.parametrize(("host", "expected"), [
    ("laptop.test", ("laptop.test", 443)),
    ("laptop.test:8443", ("laptop.test", 8443)),
    ("[::1]:8443", ("[::1]", 8443)),
    ("[::1]", ("[::1]", 443)),
    ("laptop.test:99999", ("laptop.test:99999", 443)),
    ("laptop.test:", ("laptop.test:", 443)),
])
def test_server_address_is_what_the_client_addressed(host, expected):
    """SERVER_PORT comes from the Host header (default 443), not from the local listening port."""
    from inverse_cloud.dav.environ import server_address

    assert server_address(host) == expected


LAUGHS = (b'<?xml version="1.0"?><!DOCTYPE l [<!ENTITY a "aaaaaaaaaa"><!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;">'
          b'<!ENTITY c "&b;&b;&b;&b;&b;&b;&b;&b;">]><propfind xmlns="DAV:"><prop><displayname>&c;</displayname>'
          b"</prop></propfind>")
XXE = (b'<?xml version="1.0"?><!DOCTYPE x [<!ENTITY x SYSTEM "file:///etc/passwd">]>'
       b'<propfind xmlns="DAV:"><prop><displayname>&x;</displayname></prop></propfind>')
DEEP = b'<propfind xmlns="DAV:">' + b"<a>" * 100_000 + b"</a>" * 100_000 + b"</propfind>"


@pytest.mark.parametrize(("body", "problem"), [
    (LAUGHS, "DTD"),
    (XXE, "DTD"),
    (b'<!DOCTYPE propfind><propfind xmlns="DAV:"/>', "DTD"),
    (DEEP, "nested deeper"),
    (b'<propfind xmlns="DAV:"><prop><displayname>\xff\xfe</displayname></prop></propfind>', "malformed XML"),
    (b"<propfind", "malformed XML"),
    (b'<?xml version="1.0"?><propfind xmlns="DAV:"><allprop/></propfind>', None),
])
def test_xml_problem(body, problem):
    import io

    from inverse_cloud.dav.environ import xml_problem

    found = xml_problem(io.BytesIO(body))
    assert (found is None) if problem is None else (problem in (found or "")), found


async def test_hostile_xml_is_400_before_radicale(tmp_path, caplog):
    """Entity declarations (Radicale: 500 plus a traceback on the root logger) and 100k-deep nesting
    (Radicale: the whole process died of a C stack overflow) are answered 400 by the bridge; a normal
    PROPFIND still works afterwards and no traceback is logged."""
    from inverse_cloud import config
    from inverse_cloud.dav import users
    from inverse_cloud.dav.radicale_app import build_application

    cfg = config.loads(f'[server]\ndomain = "laptop.test"\ndata_dir = "{tmp_path}"\nstate_dir = "{tmp_path}/s"\n')
    users.add_user(cfg.server.htpasswd_path, "alice", "correct horse")
    bridge = make_bridge(await asyncio.to_thread(build_application, cfg), max_body_bytes=4 * 1024 * 1024)
    runner, port = await serve(make_https_app(bridge))
    url = f"http://127.0.0.1:{port}/radicale/alice/"
    headers = {"Authorization": BASIC_ALICE, "Depth": "1", "Content-Type": "application/xml"}
    try:
        async with aiohttp.ClientSession() as s:
            for method in ("PROPFIND", "REPORT", "PROPPATCH"):
                for body in (LAUGHS, XXE, DEEP):
                    async with s.request(method, url, data=body, headers=headers) as r:
                        assert r.status == 400, (method, r.status)
                        assert "root:" not in await r.text()
            async with s.request("PROPFIND", url, headers=headers) as r:
                assert r.status == 207
    finally:
        await runner.cleanup()
        bridge.close()
    assert not [r for r in caplog.records if "Traceback" in r.getMessage() or r.exc_info]


async def test_radicale_tracebacks_become_one_note(tmp_path, caplog):
    """An unexpected exception inside the WSGI app that Radicale logs as a traceback on the root logger
    ends up as the exception line in the bridge's single ERROR line, never as a traceback."""
    import logging
    import traceback

    def crashing_app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        try:
            raise ValueError("boom in storage")
        except ValueError:
            logging.error("%s", traceback.format_exc())
        start_response("500 Internal Server Error", [("Content-Type", "text/plain")])
        return [b"A server error occurred."]

    bridge = make_bridge(crashing_app)
    runner, port = await serve(make_https_app(bridge))
    try:
        async with aiohttp.ClientSession() as s:
            async with s.get(f"http://127.0.0.1:{port}/radicale/alice/", headers={"Authorization": BASIC_ALICE}) as r:
                assert r.status == 500
    finally:
        await runner.cleanup()
        bridge.close()
    visible = [r for r in caplog.records if r.levelno >= logging.INFO]
    assert not [r for r in visible if "Traceback" in r.getMessage()]
    errors = [r.getMessage() for r in visible if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "ValueError: boom in storage" in errors[0]


@pytest.mark.parametrize("tail", [b"zz\r\nhello\r\n0\r\n\r\n", b"5\r\nhelloXX0\r\n\r\n"])
async def test_broken_chunk_framing_after_the_headers_is_400_not_500(dav, tail):
    """Chunk framing that breaks in a later packet (after the handler started reading the body) ends in a
    4xx and a closed connection -- aiohttp does not fail the body stream, so it is the body deadline's 408
    -- never a 5xx."""
    app, _, base, bridge = dav
    port = int(base.rsplit(":", 1)[1])
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"PUT /radicale/alice/contacts/a.vcf HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                 b"3\r\nabc\r\n")
    await writer.drain()
    await _until(lambda: bridge.active == 1, "the handler reading the body")  # before the broken part arrives
    writer.write(tail)
    data = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    assert data.startswith((b"HTTP/1.1 400", b"HTTP/1.1 408")), data[:80]
    assert app.calls == []


async def test_client_leaving_mid_body_is_not_logged_as_500(dav, caplog):
    """The client resets the connection while the handler waits for the rest of the body: the handler ends
    (the bridge counts no request in flight), Radicale was never called, nothing is logged as an error."""
    import logging

    caplog.set_level(logging.INFO)
    app, _, base, bridge = dav
    port = int(base.rsplit(":", 1)[1])
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"PUT /radicale/alice/contacts/a.vcf HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\nabc")
    await writer.drain()
    await _until(lambda: bridge.active == 1, "the handler waiting for the rest of the body")
    writer.transport.abort()
    await _until(lambda: bridge.active == 0, "the handler to notice the closed connection")
    assert app.calls == []
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or "Error handling" in r.getMessage()]



# --- failed logins collapsed per address (docs/test-matrix.md L4) ------------------------------------------------

def test_failed_login_digest_windows():
    now = [100.0]
    d = FailedLoginDigest(window_s=60, max_sources=2, clock=lambda: now[0])
    assert d.admit("192.0.2.1") == (True, 0)            # the first is written in full
    assert [d.admit("192.0.2.1") for _ in range(3)] == [(False, 0)] * 3
    assert d.window("192.0.2.1") == (100.0, 3)
    assert d.admit("198.51.100.7") == (True, 0)         # another address has its own window
    assert d.admit("203.0.113.9") == (True, 0)          # over max_sources: written, not tracked
    assert d.window("203.0.113.9") is None
    now[0] += 61
    # The window closed without its summary having run: the next failure reports the 3 first.
    assert d.admit("192.0.2.1") == (True, 3)
    assert d.close("192.0.2.1", 100.0) == 0             # a late summary of the old window reports nothing
    assert d.admit("192.0.2.1") == (False, 0)
    assert d.close("192.0.2.1", 161.0) == 1
    assert d.window("192.0.2.1") is None


async def _deny(_request: web.Request) -> web.Response:
    return web.Response(status=401, headers={"WWW-Authenticate": 'Basic realm="x"'})


async def _serve_denying(logger_class: Any) -> tuple[web.AppRunner, int]:
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", _deny)
    runner = web.AppRunner(app, access_log_class=logger_class, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]


async def _fail_logins(port: int, n: int) -> None:
    async with aiohttp.ClientSession() as s:
        for _ in range(n):
            async with s.get(f"http://127.0.0.1:{port}/radicale/", headers={"Authorization": "Basic eDp5"}) as r:
                assert r.status == 401


async def test_pending_failed_login_summaries_are_written_at_shutdown(caplog):
    """A server stopping inside a window writes its pending count (DavServer.aclose calls the flush)."""
    logger_class = access_logger_class(PeerDirectory())
    logger_class.failures = FailedLoginDigest(window_s=3600)  # type: ignore[attr-defined]
    runner, port = await _serve_denying(logger_class)
    caplog.set_level("INFO", logger="aiohttp.access")
    try:
        await _fail_logins(port, 3)
    finally:
        await runner.cleanup()
    assert "more failed logins" not in caplog.text
    flush_failed_logins(logger_class)
    assert "127.0.0.1: 2 more failed logins within 3600 s" in caplog.text
    flush_failed_logins(logger_class)  # nothing left: written once
    assert caplog.text.count("more failed logins") == 1


async def test_repeated_failed_logins_are_one_line_and_a_summary(caplog, monkeypatch):
    """Five wrong passwords from one address: one access line in full, then one summary line with the
    count when the window closes; 401s without credentials (a client's first, unauthenticated try) are
    logged one by one as ordinary requests. The window's clock is frozen, so however slow the requests the
    five fall into one 60 s window; the summary's timer is captured (it is due at the window's end, 60 s
    from its start) and run by the test."""
    now = [500.0]
    logger_class = access_logger_class(PeerDirectory())
    logger_class.failures = FailedLoginDigest(window_s=60, clock=lambda: now[0])  # type: ignore[attr-defined]
    loop = asyncio.get_running_loop()
    timers: list[tuple[float, Callable[[], None]]] = []
    real_call_later = loop.call_later

    def call_later(delay: float, callback: Callable[..., Any], *args: Any, **kw: Any) -> asyncio.TimerHandle:
        if getattr(callback, "__qualname__", "").startswith("AccessLogger._schedule_summary"):
            timers.append((delay, callback))
            return real_call_later(3600, lambda: None)
        return real_call_later(delay, callback, *args, **kw)

    monkeypatch.setattr(loop, "call_later", call_later)
    runner, port = await _serve_denying(logger_class)
    caplog.set_level("INFO", logger="aiohttp.access")
    try:
        await _fail_logins(port, 5)
        async with aiohttp.ClientSession() as s:
            for _ in range(2):
                async with s.get(f"http://127.0.0.1:{port}/radicale/") as r:
                    assert r.status == 401
        assert "more failed logins" not in caplog.text
        assert [delay for delay, _ in timers] == [60.0]
        timers[0][1]()
    finally:
        await runner.cleanup()
    lines = [r.getMessage() for r in caplog.records if r.name == "aiohttp.access"]
    assert len([line for line in lines if '" 401 ' in line]) == 1 + 2, lines
    summary = [line for line in lines if "more failed logins" in line]
    assert len(summary) == 1 and summary[0].startswith("127.0.0.1: 4 more failed logins within 60 s"), lines


class AuthApp:
    """A WSGI app standing in for Radicale's login: 200 for alice's password, 401 otherwise."""

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        environ["wsgi.input"].read()
        if environ.get("HTTP_AUTHORIZATION") == BASIC_ALICE:
            start_response("200 OK", [("Content-Type", "text/plain")])
            return [b"ok"]
        start_response("401 Unauthorized", [("WWW-Authenticate", 'Basic realm="x"')])
        return [b"no"]


async def _status(base: str, authorization: str | None) -> int:
    headers = {"Authorization": authorization} if authorization else {}
    async with aiohttp.ClientSession() as s:
        async with s.request("PROPFIND", f"{base}/radicale/alice/", headers=headers) as r:
            return r.status


async def test_wrong_credentials_wait_at_least_half_the_auth_delay():
    """auth_delay_s = 0.4: a wrong password and a malformed Basic header are each answered 401 no sooner
    than 0.2 s (the delay is auth_delay_s * (0.5 + random))."""
    bridge = make_bridge(AuthApp(), auth_delay_s=0.4)
    runner, port = await serve(make_https_app(bridge))
    loop = asyncio.get_running_loop()
    try:
        for credentials in ("Basic YWxpY2U6d3Jvbmc=", "Basic !!!!"):   # alice:wrong; not base64
            start = loop.time()
            assert await _status(f"http://127.0.0.1:{port}", credentials) == 401
            assert loop.time() - start >= 0.2, credentials
    finally:
        await runner.cleanup()
        bridge.close()


async def test_right_credentials_and_a_first_unauthenticated_try_are_not_delayed():
    """auth_delay_s = 60: a wrong password is held back (still unanswered when the others are done), while
    alice's right password (200) and a request without credentials (401, a client's first try) are
    answered at once, next to it."""
    bridge = make_bridge(AuthApp(), auth_delay_s=60)
    runner, port = await serve(make_https_app(bridge), shutdown_timeout_s=0.1)  # the held-back 401 is cut
    base = f"http://127.0.0.1:{port}"
    wrong = asyncio.ensure_future(_status(base, "Basic YWxpY2U6d3Jvbmc="))
    try:
        assert await asyncio.wait_for(_status(base, BASIC_ALICE), 20) == 200
        assert await asyncio.wait_for(_status(base, None), 20) == 401
        assert not wrong.done()
    finally:
        wrong.cancel()
        await asyncio.gather(wrong, return_exceptions=True)
        await runner.cleanup()
        bridge.close()


# --- the worker pool: unverified credentials get half of it; Radicale's answers mapped --------------------

class GateApp:
    """Wrong credentials wait inside the app until ``release`` is set (a slow password check), then 401;
    alice's right password is answered 200 at once. Records how many requests were inside at once."""

    def __init__(self) -> None:
        import threading

        self.release = threading.Event()
        self.lock = threading.Lock()
        self.inside = 0
        self.most_inside = 0

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        environ["wsgi.input"].read()
        if environ.get("HTTP_AUTHORIZATION") == BASIC_ALICE:
            start_response("200 OK", [("Content-Type", "text/plain")])
            return [b"ok"]
        with self.lock:
            self.inside += 1
            self.most_inside = max(self.most_inside, self.inside)
        try:
            self.release.wait(30)
        finally:
            with self.lock:
                self.inside -= 1
        start_response("401 Unauthorized", [("WWW-Authenticate", 'Basic realm="x"')])
        return [b"no"]


async def test_guessing_cannot_take_the_workers_of_a_known_good_user():
    """4 worker threads: requests with credentials not yet seen to work may hold at most 2 of them. Alice
    logs in once (200: her credentials are now known good); 5 guesses from one address then arrive while
    the check is slow: 2 stall inside it, the other 3 are over the address's in-flight bound and get 429 at
    once; only 2 are ever inside the app, and alice is still answered at once; released, the two inside
    get their 401."""
    app = GateApp()
    bridge = make_bridge(app, threads=4)
    runner, port = await serve(make_https_app(bridge), shutdown_timeout_s=1)
    base = f"http://127.0.0.1:{port}"
    try:
        assert await asyncio.wait_for(_status(base, BASIC_ALICE), 20) == 200
        import base64

        guesses = [asyncio.ensure_future(_status(base, "Basic " + base64.b64encode(f"alice:guess{i}".encode())
                                                 .decode())) for i in range(5)]
        await _until(lambda: app.inside == 2, "two guesses inside the app")
        assert await asyncio.wait_for(_status(base, BASIC_ALICE), 20) == 200
        assert app.most_inside == 2
        assert sorted(g.result() for g in guesses if g.done()) == [429] * 3
        app.release.set()
        assert sorted(await asyncio.wait_for(asyncio.gather(*guesses), 30)) == [401, 401, 429, 429, 429]
        assert app.most_inside == 2
    finally:
        app.release.set()
        await runner.cleanup()
        bridge.close()


def _answering(status: str, note: str = "") -> Callable[..., Iterable[bytes]]:
    import logging

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        environ["wsgi.input"].read()
        if note:
            logging.getLogger("radicale").error("%s", note)
        start_response(status, [("Content-Type", "text/plain")])
        return [b"from radicale"]

    return app


@pytest.mark.parametrize(("method", "status", "note", "expected", "error_line"), [
    # Radicale's "remote destination not supported" for a MOVE/COPY is the client's wrong Destination.
    ("MOVE", "502 Bad Gateway", "", 403, None),
    ("COPY", "502 Bad Gateway", "", 403, None),
    ("GET", "502 Bad Gateway", "", 502, "Radicale answered 502 to GET /radicale/alice/x.vcf: no details"),
    # A write that failed for lack of space is a 507 with one line saying so.
    ("PUT", "500 Internal Server Error", "Failed to write: [Errno 28] No space left on device", 507,
     "no space left on device; PUT /radicale/alice/x.vcf refused with 507"),
    ("GET", "500 Internal Server Error", "Failed to read: [Errno 28] No space left on device", 500,
     "Radicale answered 500 to GET /radicale/alice/x.vcf: Failed to read: [Errno 28] No space left on device"),
])
async def test_radicale_5xx_answers_are_mapped_or_logged_once(caplog, method, status, note, expected, error_line):
    import logging

    caplog.set_level(logging.INFO)
    bridge = make_bridge(_answering(status, note))
    runner, port = await serve(make_https_app(bridge))
    try:
        async with aiohttp.ClientSession() as s:
            headers = {"Authorization": BASIC_ALICE, "Destination": "https://elsewhere.example/x.vcf"}
            async with s.request(method, f"http://127.0.0.1:{port}/radicale/alice/x.vcf", headers=headers,
                                 data=b"BEGIN:VCARD" if method == "PUT" else None) as r:
                assert r.status == expected
                text = await r.text()
    finally:
        await runner.cleanup()
        bridge.close()
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR and r.name.startswith("inverse")]
    if error_line is None:
        assert errors == [] and text == "Destination is not on this server\n"
    else:
        assert len(errors) == 1 and error_line in errors[0], errors
    if expected == 507:
        assert text == "Insufficient Storage: the server's disk is full; nothing was changed\n"


# --- hardening: inputs from the internet that must get a clear 4xx, never a 5xx ----------------------

async def test_duplicate_authorization_headers_get_400_without_calling_radicale(dav):
    """A valid Basic header followed by a second Authorization header (garbage, Bearer): Radicale
    would get both joined by a comma and answer 500, with an ERROR line per request. Both orders get
    400 here, and Radicale never runs."""
    app, _peers, url, _bridge = dav
    async with aiohttp.ClientSession() as s:
        for second in ("garbage", "Bearer abc", BASIC_ALICE):
            for headers in ([("Authorization", BASIC_ALICE), ("Authorization", second)],
                            [("Authorization", second), ("Authorization", BASIC_ALICE)]):
                async with s.request("PROPFIND", f"{url}/radicale/alice/",
                                     headers=CIMultiDict(headers)) as r:
                    assert r.status == 400, (headers, r.status)
    assert app.calls == []


async def test_duplicate_authorization_headers_with_real_radicale_are_400_not_500(tmp_path, caplog):
    """The same attack against the real Radicale: 400 and no ERROR line."""
    from inverse_cloud import config
    from inverse_cloud.dav import users
    from inverse_cloud.dav.radicale_app import build_application

    cfg = config.loads(f'[server]\ndomain = "laptop.test"\ndata_dir = "{tmp_path}"\nstate_dir = "{tmp_path}/s"\n')
    users.add_user(cfg.server.htpasswd_path, "alice", "correct horse")
    bridge = make_bridge(await asyncio.to_thread(build_application, cfg))
    runner, port = await serve(make_https_app(bridge))
    try:
        async with aiohttp.ClientSession() as s:
            statuses = []
            for pair in [(BASIC_ALICE, "garbage"), (BASIC_ALICE, "Bearer abc"), ("garbage", BASIC_ALICE),
                         ("Bearer abc", BASIC_ALICE), ("Basic", BASIC_ALICE)]:
                headers = CIMultiDict([("Authorization", pair[0]), ("Authorization", pair[1])])
                async with s.request("PROPFIND", f"http://127.0.0.1:{port}/radicale/alice/",
                                     headers=headers) as r:
                    statuses.append(r.status)
            assert statuses == [400] * 5, statuses
    finally:
        await runner.cleanup()
        bridge.close()
    assert not [r for r in caplog.records if r.levelname == "ERROR"], caplog.text


async def _raw_exchange(port: int, request: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()
        async with asyncio.timeout(10):
            return await reader.read()
    finally:
        writer.close()


@pytest.mark.parametrize("path", [b"/radicale/", b"/", b"/radicale/.web"])
async def test_http09_request_line_is_refused(dav, path):
    """``GET /radicale/`` with no HTTP version (HTTP/0.9 style) was answered ``HTTP/0.9 200`` by the
    bridge (and ``302 /radicale/.web`` by Radicale's web UI). It gets 400 and the connection is closed;
    nothing reaches Radicale."""
    app, _peers, url, _bridge = dav
    port = int(url.rsplit(":", 1)[1])
    answer = await _raw_exchange(port, b"GET " + path + b"\r\n\r\n")
    assert answer.split(b"\r\n", 1)[0].split(b" ")[1] == b"400", answer[:200]
    assert app.calls == []


async def test_every_https_response_carries_hsts(dav):
    """Strict-Transport-Security on DAV answers, redirects, 404s and refusals alike: a browser that
    saw the site once never again follows a plain-HTTP link to it (where the relay could show a fake
    phone page)."""
    app, _peers, url, _bridge = dav
    async with aiohttp.ClientSession() as s:
        for method, path, headers in [("PROPFIND", "/radicale/alice/", {"Authorization": BASIC_ALICE}),
                                      ("GET", "/.well-known/carddav", {}), ("GET", "/nothing", {}),
                                      ("GET", "/radicale/", {"Authorization": "Basic !!"})]:
            async with s.request(method, f"{url}{path}", headers=headers, allow_redirects=False) as r:
                hsts = r.headers.get("Strict-Transport-Security", "")
                assert hsts.startswith("max-age=") and int(hsts.split("=")[1].split(";")[0]) >= 15552000, (
                    method, path, r.status, hsts)


async def test_http_listener_sends_no_hsts(http_server):
    """HSTS over plain HTTP is ignored by browsers (RFC 6797 section 7.2) and must not be sent there."""
    _challenges, url = http_server
    async with aiohttp.ClientSession() as s, s.get(f"{url}/x", allow_redirects=False) as r:
        assert "Strict-Transport-Security" not in r.headers


@pytest.mark.parametrize("web_ui", [False, True])
async def test_radicale_web_ui_is_served_only_when_configured(tmp_path, web_ui):
    """Radicale's web interface (which can delete collections once logged in) is not served at
    /radicale/.web/ unless [server] web_ui = true."""
    from inverse_cloud import config
    from inverse_cloud.dav.radicale_app import build_application

    extra = "web_ui = true\n" if web_ui else ""
    cfg = config.loads(f'[server]\ndomain = "laptop.test"\ndata_dir = "{tmp_path}"\nstate_dir = "{tmp_path}/s"\n'
                       + extra)
    from inverse_cloud.dav import users

    users.add_user(cfg.server.htpasswd_path, "alice", "correct horse")
    bridge = make_bridge(await asyncio.to_thread(build_application, cfg))
    runner, port = await serve(make_https_app(bridge))
    try:
        async with aiohttp.ClientSession() as s:
            async with s.get(f"http://127.0.0.1:{port}/radicale/.web/") as r:
                status, text = r.status, await r.text()
            async with s.get(f"http://127.0.0.1:{port}/radicale/.web/js/main.js") as r:
                script = await r.text()
    finally:
        await runner.cleanup()
        bridge.close()
    if web_ui:
        assert status == 200 and "<html" in text.lower()
        assert "LoginScene" in script
    else:
        # Radicale's "none" web backend: a one-line text answer, no page, no script.
        assert status == 200 and "<" not in text, text[:200]
        assert "LoginScene" not in script


async def test_access_log_escapes_control_characters_from_the_client(caplog):
    """A path with percent-encoded ESC, CR and LF, and a user agent with a C1 control and a bidi override,
    are logged with those characters escaped (``\\x1b``), never raw: no terminal escapes in
    ``journalctl``, no fake second line for a fail2ban filter."""
    bridge = make_bridge(RecordingApp())
    runner = web.AppRunner(make_https_app(bridge), handle_signals=False,
                           access_log_class=access_logger_class(PeerDirectory()))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    caplog.set_level("INFO", logger="aiohttp.access")
    try:
        async with aiohttp.ClientSession() as s:
            fake = "%0a1.2.3.4: 9 more failed logins within 60 s"
            async with s.get(f"http://127.0.0.1:{port}/radicale/%1b[31mred%0d%0a{fake}", headers={
                    "Authorization": BASIC_ALICE, "User-Agent": "evil\u0085\u202eagent"}) as r:
                assert r.status < 500
    finally:
        await runner.cleanup()
        bridge.close()
    lines = [r.getMessage() for r in caplog.records if r.name == "aiohttp.access"]
    assert len(lines) == 1, lines
    line = lines[0]
    assert line.isprintable(), repr(line)
    assert "\\x1b[31mred\\x0d\\x0a" in line and "\\x85\\u202e" in line, line


# --- what Radicale logs during a request becomes that request's note ---------------------------------------

def _logging_app(*messages: str) -> Callable[..., Iterable[bytes]]:
    import logging

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        environ["wsgi.input"].read()
        for m in messages:
            logging.getLogger("radicale").warning("%s", m)
        start_response("400 Bad Request", [("Content-Type", "text/plain")])
        return [b"bad"]

    return app


async def test_radicale_log_lines_become_at_most_four_short_notes(caplog):
    """Radicale's lines during a request are not logged on their own: they become the request's notes, at
    most 4, each its first line cut to 200 characters; a vobject parse error never quotes the contact's line;
    a traceback is reduced to its exception line."""
    import logging

    caplog.set_level(logging.DEBUG)
    seen: list[WsgiResult] = []
    messages = ("Failed to parse line: TEL;secret:+49 170 1234567", "first line\nsecond line", "x" * 300,
                "Traceback (most recent call last):\n  File x\nValueError: boom", "fifth")
    bridge = RadicaleBridge(_logging_app(*messages), threads=2, max_body_bytes=1024, body_grace_s=1,
                            body_min_rate_bps=1024, auth_delay_s=0, remote_of=PeerDirectory().remote_of,
                            on_response=lambda request, result: seen.append(result))
    runner, port = await serve(make_https_app(bridge))
    try:
        async with aiohttp.ClientSession() as s:
            async with s.request("PUT", f"http://127.0.0.1:{port}/radicale/alice/c/x.vcf", data=b"x",
                                 headers={"Authorization": BASIC_ALICE}) as r:
                assert r.status == 400
    finally:
        await runner.cleanup()
        bridge.close()
    assert seen[0].notes == ["Failed to parse line (line not logged)", "first line", "x" * 200, "ValueError: boom"]
    radicale_records = [r for r in caplog.records if r.name == "radicale"]
    assert radicale_records == []
    assert not any("+49 170" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize(("depth", "problem"), [(64, None), (65, "XML nested deeper than 64 levels")])
def test_xml_depth_limit_is_64_levels(depth, problem):
    import io

    from inverse_cloud.dav.wsgi import xml_problem

    body = b"<a>" * depth + b"</a>" * depth
    assert xml_problem(io.BytesIO(body)) == problem


def test_xml_problem_messages_and_the_body_is_rewound():
    import io

    from inverse_cloud.dav.wsgi import xml_problem

    dtd = io.BytesIO(b'<!DOCTYPE x [<!ENTITY e "v">]><x/>')
    assert xml_problem(dtd) == "XML with a DTD or entity declarations" and dtd.tell() == 0
    assert xml_problem(io.BytesIO(b"<a><b></a>")) == "malformed XML (mismatched tag, line 1)"
    ok = io.BytesIO(b"<a>" + b"x" * 100_000 + b"</a>")
    assert xml_problem(ok) is None and ok.tell() == 0


def test_is_storage_full(tmp_path):
    import errno

    from inverse_cloud.dav.wsgi import is_storage_full

    assert is_storage_full(None, [f"write failed: [Errno {errno.ENOSPC}] whatever"], 10)
    assert is_storage_full(None, [f"x: {os.strerror(errno.ENOSPC)}"], 10)
    assert is_storage_full(None, [f"x: {os.strerror(errno.EDQUOT)}"], 10)
    assert not is_storage_full(None, ["some other failure"], 10)
    assert not is_storage_full(tmp_path, ["some other failure"], 10)          # plenty of space here
    assert is_storage_full(tmp_path, ["some other failure"], 1 << 62)        # more than any disk
    assert not is_storage_full(tmp_path / "missing", ["some other failure"], 1 << 62)
