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


async def serve(app: web.Application) -> tuple[web.AppRunner, int]:
    runner = web.AppRunner(app, keepalive_timeout=5, handle_signals=False)
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


async def test_truncated_body_gets_400(dav):
    app, _, base, _ = dav
    port = int(base.rsplit(":", 1)[1])
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"PUT /radicale/alice/contacts/a.vcf HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nshort")
    writer.write_eof()
    data = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    assert app.calls == []
    # aiohttp may notice the early EOF first (connection closed without an answer) or we answer 400.
    assert data == b"" or data.startswith(b"HTTP/1.1 400"), data[:80]


async def test_trickling_body_gets_408_and_never_reaches_radicale():
    """A body that falls behind grace + received/min_rate is cut with 408 and the connection closed."""
    app = RecordingApp()
    bridge = make_bridge(app, body_grace_s=1.0, body_min_rate_bps=100)
    runner, port = await serve(make_https_app(bridge))
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"PUT /radicale/alice/contacts/a.vcf HTTP/1.1\r\nHost: x\r\nContent-Length: 10000\r\n\r\n")
        read = asyncio.ensure_future(reader.read())
        for _ in range(100):  # one byte every 50 ms: 20 B/s, far below 100 B/s; bounded at 5 s
            if read.done():
                break
            writer.write(b"z")
            await asyncio.sleep(0.05)
        # The answer comes, and then the connection is closed (no lingering on a refused body).
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
    app, _, base, _ = dav
    port = int(base.rsplit(":", 1)[1])
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"PUT /radicale/alice/contacts/a.vcf HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                 b"3\r\nabc\r\n")
    await writer.drain()
    await asyncio.sleep(0.2)  # let the handler start reading the body before the broken part arrives
    writer.write(tail)
    data = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    assert data.startswith((b"HTTP/1.1 400", b"HTTP/1.1 408")), data[:80]
    assert app.calls == []


async def test_client_leaving_mid_body_is_not_logged_as_500(dav, caplog):
    import logging

    app, _, base, _ = dav
    port = int(base.rsplit(":", 1)[1])
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"PUT /radicale/alice/contacts/a.vcf HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\nabc")
    await writer.drain()
    await asyncio.sleep(0.2)  # the handler is now waiting for the rest of the body
    writer.transport.abort()
    with caplog.at_level(logging.INFO):
        await asyncio.sleep(0.3)  # let the server notice the closed connection
    assert app.calls == []
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or "Error handling" in r.getMessage()]



# --- failed logins collapsed per address (reliability.md L4) ------------------------------------------------

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


async def test_repeated_failed_logins_are_one_line_and_a_summary(caplog):
    """Five wrong passwords from one address: one access line in full, then one summary line with the
    count when the window closes; 401s without credentials (a client's first, unauthenticated try) are
    logged one by one as ordinary requests."""
    logger_class = access_logger_class(PeerDirectory())
    logger_class.failures = FailedLoginDigest(window_s=0.5)  # type: ignore[attr-defined]
    runner, port = await _serve_denying(logger_class)
    caplog.set_level("INFO", logger="aiohttp.access")
    try:
        await _fail_logins(port, 5)
        async with aiohttp.ClientSession() as s:
            for _ in range(2):
                async with s.get(f"http://127.0.0.1:{port}/radicale/") as r:
                    assert r.status == 401
        deadline = asyncio.get_running_loop().time() + 10
        while "4 more failed logins" not in caplog.text:
            assert asyncio.get_running_loop().time() < deadline, caplog.text
            await asyncio.sleep(0.05)  # poll interval while the summary's window closes
    finally:
        await runner.cleanup()
    lines = [r.getMessage() for r in caplog.records if r.name == "aiohttp.access"]
    assert len([line for line in lines if '" 401 ' in line]) == 1 + 2, lines
    summary = [line for line in lines if "more failed logins" in line]
    assert summary == [summary[0]] and summary[0].startswith("127.0.0.1: 4 more failed logins"), lines


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
