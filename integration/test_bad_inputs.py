"""Bad inputs and load against the real process (docs/test-matrix.md B1-B7, B11, B12, L2, L3, L4, L6).

Every row checks the same invariants besides its own: a 4xx (or a quiet close) for each bad input, at most
one log line per bad request, no "Traceback" in the server log, never a 5xx, and nothing stored changes.
The server runs with short deadlines so the load rows stay quick: idle 5 s, handshake 3 s, body grace 3 s,
body limit 1 MiB.
"""

from __future__ import annotations

import base64
import contextlib
import os
import re
import select
import socket
import ssl
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from dav_helpers import (
    DOMAIN,
    DavClient,
    Vdirsyncer,
    access_statuses,
    new_uid,
    prop,
    require_root_tools,
    selfsigned_cert,
    storage_snapshot,
    vcard,
    vevent,
)

from inverse_cloud.config import Config, load
from tests.support import ServeProcess, client_handshake, handshake_with_permissive_server, init_instance, wait_until

LIMIT = 1024 * 1024
EXTRA = (f"max_body_bytes = {LIMIT}\nidle_timeout_s = 5.0\nhandshake_timeout_s = 3.0\nbody_grace_s = 3.0\n"
         "auth_delay_s = 0.5\n")
CONTACTS = "/radicale/alice/contacts/"
CALENDAR = "/radicale/alice/calendar/"
AUTH = "Basic " + base64.b64encode(b"alice:correct horse").decode()
SEEDED_CARDS = 200


@dataclass
class Ctx:
    srv: ServeProcess
    cfg: Config
    root: Path
    cafile: Path
    canary: Path
    seeded: dict[str, bytes]

    @property
    def port(self) -> int:
        return self.srv.https_port

    @property
    def storage(self) -> Path:
        return self.cfg.server.storage_dir


@pytest.fixture(scope="module")
def ctx(tmp_path_factory) -> Iterator[Ctx]:
    """One server for the rows, with 200 cards and an event stored, and a canary file outside the storage."""
    require_root_tools()
    root = tmp_path_factory.mktemp("bad")
    cfg_path = init_instance(root / "ic", extra_toml=EXTRA)
    canary = root / "outside-canary.txt"
    canary.write_text(f"CANARY-OUTSIDE-{uuid.uuid4()}\n")
    srv = ServeProcess(cfg_path).start()
    try:
        cafile = selfsigned_cert(root / "ic")
        seeded: dict[str, bytes] = {}
        with DavClient(srv.https_port, cafile) as dav:
            assert dav.put(f"{CONTACTS}seed-0.vcf", vcard("seed-0", "Seeded 0")).status == 201
            event = vevent("seed-event", "Seeded event")
            assert dav.put(f"{CALENDAR}seed-event.ics", event, "text/calendar").status == 201
            # The other cards go straight into the collection folder (Radicale reads them like its own):
            # 199 PUTs would cost the fixture ~10 s.
            folder = load(cfg_path).server.storage_dir / "collection-root" / "alice" / "contacts"
            for i in range(SEEDED_CARDS):
                data = vcard(f"seed-{i}", f"Seeded {i}")
                if i:
                    (folder / f"seed-{i}.vcf").write_bytes(data)
                seeded[f"{CONTACTS}seed-{i}.vcf"] = data
            assert len(dav.hrefs(CONTACTS)) == SEEDED_CARDS
        yield Ctx(srv, load(cfg_path), root, cafile, canary, seeded)
    finally:
        srv.stop()


def sentinel(c: Ctx) -> None:
    """A request whose access line marks 'everything before has been logged'."""
    path = f"/sentinel-{uuid.uuid4().hex}"
    with DavClient(c.port, c.cafile) as dav:
        assert dav.request("GET", path, auth=False).status == 404
    wait_until(lambda: path in c.srv.log(), 10, "the sentinel's log line")


@contextlib.contextmanager
def row(c: Ctx, max_log_lines: int, storage_may_change: bool = False) -> Iterator[None]:
    """The invariants every row shares (see module docstring)."""
    before = storage_snapshot(c.storage)
    canary = c.canary.read_text()
    mark = len(c.srv.log())
    yield
    sentinel(c)
    new = c.srv.log()[mark:]
    lines = [line for line in new.splitlines() if line.strip() and "/sentinel-" not in line]
    assert "Traceback" not in new, new
    assert not [s for s in access_statuses(new) if s >= 500], new
    assert len(lines) <= max_log_lines, "\n".join(lines)
    assert c.canary.read_text() == canary
    if not storage_may_change:
        assert storage_snapshot(c.storage) == before, "stored data changed"


# --- raw TLS ---------------------------------------------------------------------------------------------

def tls_connect(c: Ctx, timeout_s: float = 10) -> ssl.SSLSocket:
    ctx = ssl.create_default_context(cafile=str(c.cafile))
    return ctx.wrap_socket(socket.create_connection(("127.0.0.1", c.port), timeout=timeout_s),
                           server_hostname=DOMAIN)


def poll(sock: ssl.SSLSocket) -> bytes | None:
    """Without blocking: application data the server sent (b"" if it closed), or None if there is none.
    A readable socket alone proves nothing under TLS 1.3: session tickets arrive after the handshake."""
    if not sock.pending() and not select.select([sock], [], [], 0)[0]:
        return None
    timeout = sock.gettimeout()
    sock.setblocking(False)
    try:
        return sock.recv(65536)
    except (ssl.SSLWantReadError, BlockingIOError):
        return None
    except (ConnectionError, ssl.SSLError):
        return b""
    finally:
        sock.settimeout(timeout)


def read_response(sock: ssl.SSLSocket, data: bytes = b"") -> tuple[int, bytes] | None:
    """(status, body) of one response (``data``: its first bytes, if already read), or None if the server
    closed without answering.

    :raises AssertionError: the server neither answered nor closed within the socket's timeout (a hang is
        not a close)."""
    try:
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                return None
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        m = re.search(rb"\r\ncontent-length: *(\d+)", head, re.I)
        while m and len(body) < int(m.group(1)):
            chunk = sock.recv(65536)
            if not chunk:
                break
            body += chunk
    except (ConnectionError, ssl.SSLError):
        if not data:
            return None
        head, _, body = data.partition(b"\r\n\r\n")
    except TimeoutError:
        if b"\r\n\r\n" not in data:
            raise AssertionError(f"no answer and no close within {sock.gettimeout()} s (got {data[:60]!r})") from None
        head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


def raw_request(c: Ctx, data: bytes) -> tuple[int, bytes] | None:
    with tls_connect(c) as sock:
        sock.sendall(data)
        return read_response(sock)


# --- B1 ------------------------------------------------------------------------------------------------

H = b"Host: laptop.test\r\n"
A = f"Authorization: {AUTH}\r\n".encode()
MALFORMED = {
    "bad request line": b"GARBAGE\r\n\r\n",
    "bare LF": b"GET /radicale/ HTTP/1.1\nHost: laptop.test\n\n",
    "obs-fold": b"GET /radicale/ HTTP/1.1\r\n" + H + b"X-A: a\r\n b\r\n\r\n",
    "CL and TE": b"PUT /radicale/alice/contacts/x.vcf HTTP/1.1\r\n" + H + A
                 + b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "double CL": b"PUT /radicale/alice/contacts/x.vcf HTTP/1.1\r\n" + H + A
                 + b"Content-Length: 5\r\nContent-Length: 6\r\n\r\nhello",
    "double Host": b"GET /radicale/ HTTP/1.1\r\n" + H + b"Host: evil.example\r\n\r\n",
    "NUL in header": b"GET /radicale/ HTTP/1.1\r\n" + H + b"X-A: a\x00b\r\n\r\n",
    "10 KB header line": b"GET /radicale/ HTTP/1.1\r\n" + H + b"X-A: " + b"a" * 10240 + b"\r\n\r\n",
    "200 headers": b"GET /radicale/ HTTP/1.1\r\n" + H + b"".join(b"X-H%d: v\r\n" % i for i in range(200)) + b"\r\n",
    "chunk-size 0x": b"PUT /radicale/alice/contacts/x.vcf HTTP/1.1\r\n" + H + A
                     + b"Transfer-Encoding: chunked\r\n\r\n0x5\r\nhello\r\n0\r\n\r\n",
    "huge chunk extension": b"PUT /radicale/alice/contacts/x.vcf HTTP/1.1\r\n" + H + A
                            + b"Transfer-Encoding: chunked\r\n\r\n5;" + b"e" * 20000 + b"\r\nhello\r\n0\r\n\r\n",
    "absolute URI": b"GET https://evil.example/radicale/alice/ HTTP/1.1\r\n" + H + A + b"Connection: close\r\n\r\n",
    "bad version": b"GET /radicale/ HTTP/9.9\r\n" + H + b"\r\n",
    "bad method chars": b"G(E)T /radicale/ HTTP/1.1\r\n" + H + b"\r\n",
}


@pytest.mark.parametrize("name", list(MALFORMED))
def test_b1_malformed_http_gets_400_or_close(ctx, name):
    """B1: each malformed request gets 400 (or the connection is closed, within 10 s: a server that just
    waits fails), one log line at most; the next legitimate request on a fresh connection works."""
    with row(ctx, max_log_lines=1):
        answer = raw_request(ctx, MALFORMED[name])
        assert answer is None or 400 <= answer[0] < 500, answer
    with DavClient(ctx.port, ctx.cafile) as dav:
        assert dav.request("PROPFIND", CONTACTS, headers={"Depth": "0"}).status == 207


# --- B2 ------------------------------------------------------------------------------------------------

def rss_kib(pid: int) -> int:
    m = re.search(r"VmRSS:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text())
    assert m
    return int(m.group(1))


def push_body(c: Ctx, head: bytes, chunk: bytes, total: int) -> tuple[int, tuple[int, bytes] | None]:
    """Send ``head`` then ``chunk`` repeatedly (up to ``total`` bytes) until the server answers or closes.
    Returns (body bytes sent, answer)."""
    sent = 0
    with tls_connect(c, timeout_s=30) as sock:
        sock.sendall(head)
        first = None
        while sent < total:
            first = poll(sock)
            if first is not None:
                break
            try:
                sock.sendall(chunk)
            except (ConnectionError, ssl.SSLError, TimeoutError):
                break
            sent += len(chunk)
        if first == b"":
            return sent, None
        return sent, read_response(sock, first or b"")


@pytest.mark.parametrize("kind", ["declared 101 MB", "chunked 200 MB"])
def test_b2_oversized_bodies_get_413_early(ctx, kind):
    """B2: a PUT declaring 101 MB is answered 413 from its headers, before any body byte is sent; a 200 MB
    chunked PUT is answered 413 while the client is still pushing (the server reads past the limit a little
    so the client gets to read the answer); the bytes pushed stay within the limit plus socket buffers and
    the discard allowance; RSS stays bounded; nothing is stored."""
    rss_before = rss_kib(ctx.srv.pid)
    path = f"{CONTACTS}huge-{new_uid()}.vcf"
    with row(ctx, max_log_lines=1):
        if kind.startswith("declared"):
            head = (f"PUT {path} HTTP/1.1\r\nHost: {DOMAIN}\r\nAuthorization: {AUTH}\r\n"
                    f"Content-Type: text/vcard\r\nContent-Length: {101_000_000}\r\n\r\n").encode()
            # The answer is due on the headers alone; a client pushing the body meanwhile could have it
            # discarded by the reset that closing on unread data draws.
            with tls_connect(ctx, timeout_s=30) as sock:
                sock.sendall(head)
                sent, answer = 0, read_response(sock)
        else:
            head = (f"PUT {path} HTTP/1.1\r\nHost: {DOMAIN}\r\nAuthorization: {AUTH}\r\n"
                    "Content-Type: text/vcard\r\nTransfer-Encoding: chunked\r\n\r\n").encode()
            sent, answer = push_body(ctx, head, b"10000\r\n" + b"y" * 65536 + b"\r\n", 200_000_000)
    rss_after = rss_kib(ctx.srv.pid)
    print(f"\n{kind}: client pushed {sent / 2**20:.1f} MiB before the answer/close; answer "
          f"{answer[0] if answer else 'none (closed)'}; server RSS {rss_before // 1024} -> {rss_after // 1024} MiB")
    assert answer is not None and answer[0] == 413, answer
    assert sent < LIMIT + 16 * 2**20, "the server kept reading far past the limit"
    assert rss_after - rss_before < 64 * 1024, "RSS grew by more than 64 MiB"


# --- B3 ------------------------------------------------------------------------------------------------

def hostile_xml() -> dict[str, bytes]:
    ents = "".join(f'<!ENTITY l{i} "{"".join(f"&l{i - 1};" for _ in range(10))}">' for i in range(1, 10))
    return {
        "billion laughs": (f'<?xml version="1.0"?><!DOCTYPE z [<!ENTITY l0 "lol">{ents}]>'
                           '<propfind xmlns="DAV:"><prop><displayname>&l9;</displayname></prop></propfind>').encode(),
        "external entity": (b'<?xml version="1.0"?><!DOCTYPE x [<!ENTITY xxe SYSTEM "file:///etc/passwd">]>'
                            b'<propfind xmlns="DAV:"><prop><displayname>&xxe;</displayname></prop></propfind>'),
        "deep nesting": b'<propfind xmlns="DAV:"><prop>' + b"<a>" * 120_000 + b"</a>" * 120_000 + b"</prop></propfind>",
        "invalid UTF-8": b'<?xml version="1.0" encoding="utf-8"?><propfind xmlns="DAV:"><prop><displayname>\xff\xfe'
                         b"</displayname></prop></propfind>",
        "not XML": b"{\"json\": true}",
    }


@pytest.mark.parametrize("name", list(hostile_xml()))
def test_b3_hostile_xml_is_refused_without_expansion(ctx, name):
    """B3: PROPFIND, REPORT and PROPPATCH with hostile XML get 400; /etc/passwd never appears in an answer;
    the server is still alive afterwards (deep nesting once killed it)."""
    body = hostile_xml()[name]
    passwd_line = Path("/etc/passwd").read_text().splitlines()[0]
    with row(ctx, max_log_lines=3), DavClient(ctx.port, ctx.cafile) as dav:
        for method in ("PROPFIND", "REPORT", "PROPPATCH"):
            t0 = time.monotonic()
            r = dav.request(method, CONTACTS, body, {"Depth": "1", "Content-Type": "application/xml"})
            print(f"\n{name} {method}: {r.status} in {time.monotonic() - t0:.2f} s")
            assert r.status == 400, (r.status, r.text[:200])
            assert passwd_line not in r.text and "root:" not in r.text
    assert ctx.srv.proc is not None and ctx.srv.proc.poll() is None, "the server died"


# --- B4 ------------------------------------------------------------------------------------------------

SECRET = "SECRET-CONTACT-DATA-4711"
BROKEN_ITEMS = {
    "vCard without END": (CONTACTS, f"BEGIN:VCARD\r\nVERSION:3.0\r\nUID:b1\r\nFN:{SECRET}\r\n".encode()),
    "vCard without UID": (CONTACTS, f"BEGIN:VCARD\r\nVERSION:3.0\r\nFN:{SECRET}\r\nN:x;;;;\r\nEND:VCARD\r\n".encode()),
    "two vCards in one item": (CONTACTS, vcard("b3a", SECRET) + vcard("b3b", SECRET)),
    "invalid base64 PHOTO": (CONTACTS, f"BEGIN:VCARD\r\nVERSION:3.0\r\nUID:b4\r\nFN:{SECRET}\r\n"
                                       "PHOTO;ENCODING=b;TYPE=JPEG:!!!not*base64***\r\nEND:VCARD\r\n".encode()),
    "garbage line": (CONTACTS, f"BEGIN:VCARD\r\nVERSION:3.0\r\nUID:b5\r\n{SECRET}\r\nEND:VCARD\r\n".encode()),
    "binary": (CONTACTS, b"\x00\x01\x02" + SECRET.encode()),
    "nested components": (CONTACTS, b"BEGIN:VCARD\r\nVERSION:3.0\r\nUID:b7\r\nFN:x\r\n" + b"BEGIN:X\r\n" * 20000
                          + b"END:X\r\n" * 20000 + b"END:VCARD\r\n"),
    "UID of another item": (CONTACTS, vcard("seed-1", SECRET)),
    "event without END": (CALENDAR, vevent("b9", SECRET)[:-15]),
    "vCard into a calendar": (CALENDAR, vcard("b10", SECRET)),
    "event without UID": (CALENDAR, vevent("b11", SECRET).replace(b"UID:b11\r\n", b"")),
}


@pytest.mark.parametrize("name", list(BROKEN_ITEMS))
def test_b4_unparsable_items_are_refused_and_nothing_is_stored(ctx, name):
    """B4: each broken vCard/iCalendar PUT gets a 4xx, nothing is stored, the seeded items are intact, and
    the item's content does not appear in the log."""
    collection, data = BROKEN_ITEMS[name]
    mark = len(ctx.srv.log())
    with DavClient(ctx.port, ctx.cafile) as dav:
        with row(ctx, max_log_lines=1):
            ext, ctype = (".vcf", "text/vcard") if collection == CONTACTS else (".ics", "text/calendar")
            r = dav.put(f"{collection}broken-{new_uid()}{ext}", data, ctype)
            assert 400 <= r.status < 500, (r.status, r.text[:200])
        stored = dav.request("GET", f"{CONTACTS}seed-1.vcf").body
        assert (prop(stored, "UID"), prop(stored, "FN")) == ("seed-1", "Seeded 1")
    assert SECRET not in ctx.srv.log()[mark:]


def test_b4_large_but_valid_items_do_not_hurt(ctx):
    """B4: a 100k-line NOTE and a 10000-occurrence RRULE are valid input: stored (or refused with a 4xx),
    never a 5xx; a time-range query over the recurring event answers without a 5xx."""
    note = (b"BEGIN:VCARD\r\nVERSION:3.0\r\nUID:long-note\r\nFN:Long\r\nNOTE:" + b"\r\n x" * 100_000
            + b"\r\nEND:VCARD\r\n")
    rrule = vevent("many", "Many").replace(b"SUMMARY:", b"RRULE:FREQ=MINUTELY;COUNT=10000\r\nSUMMARY:")
    query = (b'<?xml version="1.0"?><C:calendar-query xmlns:D="DAV:" xmlns:C="urn:ietf:params:xml:ns:caldav">'
             b'<D:prop><D:getetag/></D:prop><C:filter><C:comp-filter name="VCALENDAR"><C:comp-filter name="VEVENT">'
             b'<C:time-range start="20270101T000000Z" end="20280101T000000Z"/></C:comp-filter></C:comp-filter>'
             b"</C:filter></C:calendar-query>")
    with row(ctx, max_log_lines=5, storage_may_change=True), DavClient(ctx.port, ctx.cafile) as dav:
        for path, data, ctype in ((f"{CONTACTS}long-note.vcf", note, "text/vcard"),
                                  (f"{CALENDAR}many.ics", rrule, "text/calendar")):
            t0 = time.monotonic()
            r = dav.put(path, data, ctype)
            print(f"\n{path}: {r.status} in {time.monotonic() - t0:.2f} s")
            assert r.status in (201, 204) or 400 <= r.status < 500
        r = dav.request("REPORT", CALENDAR, query, {"Depth": "1", "Content-Type": "application/xml"})
        assert r.status < 500
        dav.request("DELETE", f"{CONTACTS}long-note.vcf")
        dav.request("DELETE", f"{CALENDAR}many.ics")


# --- B5 ------------------------------------------------------------------------------------------------

TRAVERSALS = [
    "/radicale/alice/../bob/",
    "/radicale/alice/%2e%2e/bob/",
    "/radicale/..%5c..%5c..%5cetc%5cpasswd",
    "/radicale/alice/contacts/.Radicale.props",
    "/radicale/alice/contacts/%2e%2e%2f%2e%2e%2f%2e%2e%2f%2e%2e%2fetc%2fpasswd",
    "/radicale/.well-known/../../etc/passwd",
    "/radicale/%2e%2e/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
    "/radicale/bob/",
    "/radicale/bob/contacts/",
    "/radicale/%00/",
]


def test_b5_path_traversal_reads_and_writes_nothing_outside(ctx):
    """B5: traversal paths in GET, PROPFIND and PUT never reach a file outside the storage (canary and
    /etc/passwd never appear; nothing is written outside); other users' collections are 403/404;
    X-Remote-User and X-Script-Name from the client are ignored."""
    outside_before = sorted(p.name for p in ctx.root.iterdir())
    passwd_line = Path("/etc/passwd").read_text().splitlines()[0]
    canary = ctx.canary.read_text().strip()
    with row(ctx, max_log_lines=3 * len(TRAVERSALS) + 3), DavClient(ctx.port, ctx.cafile) as dav:
        for path in TRAVERSALS:
            for method, body in (("GET", None), ("PROPFIND", None), ("PUT", vcard(new_uid(), "Traversal"))):
                target = path + "x.vcf" if method == "PUT" and path.endswith("/") else path
                r = dav.request(method, target, body, {"Depth": "1", "Content-Type": "text/vcard"})
                assert r.status in (400, 401, 403, 404, 405, 409), (method, target, r.status)
                assert canary not in r.text and passwd_line not in r.text
        r = dav.request("PROPFIND", "/radicale/admin/", None, {"X-Remote-User": "admin", "Depth": "0"}, auth=False)
        assert r.status == 401
        r = dav.request("PROPFIND", "/radicale/alice/", None, {"X-Script-Name": "/evil", "Depth": "1"})
        assert r.status == 207 and "/evil" not in r.text and "<href>/radicale/alice/</href>" in r.text
        r = dav.request("PROPFIND", "/radicale/alice/", None, {"X-Remote-User": "bob", "Depth": "0",
                                                              "Authorization": "Basic Ym9iOng="}, auth=False)
        assert r.status == 401
    assert sorted(p.name for p in ctx.root.iterdir()) == outside_before
    assert not (ctx.storage.parent / "etc").exists() and not Path("/etc/x.vcf").exists()


def test_b5_absolute_uri_request_line(ctx):
    """B5: a request line with an absolute URI naming another host is answered 400 (not routed, not a close),
    one log line at most."""
    with row(ctx, max_log_lines=1):
        answer = raw_request(ctx, MALFORMED["absolute URI"])
        assert answer is not None and answer[0] == 400


# --- B6 ------------------------------------------------------------------------------------------------

def basic(user: bytes, password: bytes = b"x") -> str:
    return "Basic " + base64.b64encode(user + b":" + password).decode()


ODD_CREDENTIALS = {
    "wrong password": basic(b"alice", b"wrong"),
    "user a:b": basic(b"a:b"),
    "user @x": basic(b"@x"),
    "2 KB user": basic(b"u" * 2048),
    "non-UTF-8 user": basic(b"\xff\xfe\xfd"),
    "not base64": "Basic !!!!",
    "empty Basic": "Basic ",
    "Bearer": "Bearer abc.def.ghi",
    "Digest": 'Digest username="alice", realm="x", nonce="y", uri="/", response="z"',
}


def served_again(c: Ctx, timeout_s: float = 90) -> None:
    """Alice's PROPFIND answers 207 (after the address's login backoff, if earlier failures set one off)."""
    def ok() -> bool:
        with DavClient(c.port, c.cafile) as dav:
            return dav.request("PROPFIND", "/radicale/alice/", None, {"Depth": "0"}).status == 207

    wait_until(ok, timeout_s, "alice to be served again", interval_s=0.5)


def test_b6_odd_credentials_get_401_with_delay_never_500(ctx):
    """B6: every odd or wrong credential gets 401 with WWW-Authenticate, no sooner than half the failure
    delay (auth_delay_s = 0.5: at least 0.25 s), or, once this address has failed three times, 429 with
    Retry-After (its login backoff); one log line each at most; never a 5xx; the real user is served again
    once the backoff is over."""
    with row(ctx, max_log_lines=len(ODD_CREDENTIALS)), DavClient(ctx.port, ctx.cafile) as dav:
        for name, header in ODD_CREDENTIALS.items():
            t0 = time.monotonic()
            r = dav.request("PROPFIND", "/radicale/alice/", None, {"Authorization": header, "Depth": "0"}, auth=False)
            took = time.monotonic() - t0
            assert r.status in (401, 429), (name, r.status)
            if r.status == 401:
                assert r.headers.get("www-authenticate", "").startswith("Basic"), name
                assert took >= 0.25, f"{name}: answered after {took:.2f} s, without the failed-login delay"
            else:
                assert int(r.headers.get("retry-after", "0")) >= 1, name
            print(f"\n{name}: {r.status} after {took:.2f} s")
    served_again(ctx)


# --- B7 ------------------------------------------------------------------------------------------------

def raw_tcp(c: Ctx, data: bytes, timeout_s: float = 20) -> tuple[bytes, float]:
    """Send bytes on a plain TCP connection to the TLS port; return what came back and when it closed.

    :raises AssertionError: the server had not closed the connection after ``timeout_s``."""
    with socket.create_connection(("127.0.0.1", c.port), timeout=timeout_s) as s:
        if data:
            s.sendall(data)
        t0 = time.monotonic()
        got = b""
        try:
            while chunk := s.recv(4096):
                got += chunk
        except ConnectionError:
            pass
        except TimeoutError:
            raise AssertionError(f"connection still open after {timeout_s} s (got {got[:60]!r})") from None
        return got, time.monotonic() - t0


def test_b7_tls_garbage_is_closed_quietly(ctx):
    """B7: plaintext HTTP, random bytes and an SSLv2-style hello to the TLS port are closed without an
    HTTP answer (closed, not left open: raw_tcp fails after 20 s); a truncated ClientHello and a silent
    connection are closed by the 3 s handshake deadline; an unknown SNI name still gets our certificate;
    no log noise."""
    hello_v2 = bytes.fromhex("802e01030100150000001001008007")  # truncated SSLv2-compatible ClientHello
    with row(ctx, max_log_lines=2):
        for name, data in (("plaintext HTTP", b"GET / HTTP/1.1\r\nHost: laptop.test\r\n\r\n"),
                           ("random bytes", os.urandom(600)), ("SSLv2 hello", hello_v2 + os.urandom(40))):
            got, took = raw_tcp(ctx, data)
            assert b"HTTP/" not in got, name
            print(f"\n{name}: closed after {took:.2f} s")
        for name, data in (("truncated ClientHello", b"\x16\x03\x01\x00\xff\x01\x00\x00\xfb\x03\x03"),
                           ("silent connection", b"")):
            got, took = raw_tcp(ctx, data)
            print(f"{name}: closed after {took:.2f} s (handshake deadline 3 s)")
            assert got == b"" and took < 3 + 10, f"{name} held for {took:.1f} s"
        tls = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        tls.check_hostname, tls.verify_mode = False, ssl.CERT_NONE
        with socket.create_connection(("127.0.0.1", ctx.port), timeout=10) as raw, \
                tls.wrap_socket(raw, server_hostname="unknown.example") as s:
            assert s.version() in ("TLSv1.2", "TLSv1.3")


@pytest.mark.parametrize(("version", "name"), [("TLSv1", "TLSv1"), ("TLSv1_1", "TLSv1.1")])
def test_b7_old_tls_versions_refused(ctx, tmp_path, version, name):
    """B7: a client limited to TLS 1.0 (1.1) cannot complete a handshake with the server, one log line at
    most; the control: the same client completes it with a Python server that allows that version (so the
    refusal is the server's, not this machine's OpenSSL), and, allowed TLS 1.2, with ours."""
    v = getattr(ssl.TLSVersion, version)
    assert handshake_with_permissive_server(tmp_path, v) == name
    with row(ctx, max_log_lines=1), pytest.raises((ssl.SSLError, ConnectionError)):
        client_handshake(ctx.port, v, v)
    assert client_handshake(ctx.port, v, ssl.TLSVersion.TLSv1_2) == "TLSv1.2"


def test_b7_curl_negotiates_tls13_with_an_aead_suite(ctx):
    """B7: default curl negotiates TLS 1.3 with an AEAD suite. (curl on this machine refuses TLS 1.0/1.1
    by itself, even against a server that allows them, so it cannot show our refusal: the Python client
    with its control above does.)"""
    base = ["curl", "-sS", "-o", "/dev/null", "--cacert", str(ctx.cafile), "--resolve",
            f"{DOMAIN}:{ctx.port}:127.0.0.1", f"https://{DOMAIN}:{ctx.port}/"]
    new = subprocess.run([*base, "-w", "%{http_code}", "-v"], capture_output=True, text=True, timeout=30)
    assert new.returncode == 0 and "TLSv1.3" in new.stderr and re.search(r"TLS_(AES_\d+_GCM|CHACHA20)", new.stderr)


# --- B11 -----------------------------------------------------------------------------------------------

def test_b11_missing_or_empty_storage_after_data_is_refused(tmp_path):
    """B11: once data was stored (marker written), a missing or emptied storage folder gives 503 with a
    readable reason and one log line (not one per request), also after a restart; restoring it serves again."""
    cfg_path = init_instance(tmp_path / "ic")
    cafile = selfsigned_cert(tmp_path / "ic")
    storage = load(cfg_path).server.storage_dir
    root_dir = storage / "collection-root"
    with ServeProcess(cfg_path) as srv, DavClient(srv.https_port, cafile) as dav:
        assert dav.put(f"{CONTACTS}keep.vcf", vcard("keep", "Keep Me")).status == 201
        root_dir.rename(tmp_path / "moved-away")
        mark = len(srv.log())
        for _ in range(5):
            r = dav.request("PROPFIND", CONTACTS, headers={"Depth": "1"})
            assert r.status == 503 and "missing" in r.text
            assert r.headers.get("retry-after")
        refusals = [line for line in srv.log()[mark:].splitlines() if "refusing to serve" in line]
        assert len(refusals) == 1 and str(root_dir) in refusals[0]
        assert not root_dir.exists(), "Radicale must not have created an empty root"
    (root_dir).mkdir()
    with ServeProcess(cfg_path) as srv, DavClient(srv.https_port, cafile) as dav:
        r = dav.request("PROPFIND", CONTACTS, headers={"Depth": "1"})
        assert r.status == 503 and "empty" in r.text
    root_dir.rmdir()
    (tmp_path / "moved-away").rename(root_dir)
    with ServeProcess(cfg_path) as srv, DavClient(srv.https_port, cafile) as dav:
        assert prop(dav.request("GET", f"{CONTACTS}keep.vcf").body, "FN") == "Keep Me"
        assert "Traceback" not in srv.log()


# --- B12 -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("args", "path"), [
    (["-u", "alice:correct horse"], "/radicale/"),
    (["-X", "PROPFIND", "-H", "Depth: 1", "-u", "alice:correct horse"], "/radicale/alice/"),
    (["-H", "Host: evil.example"], "/login?next=/x"),
    (["-H", "Host: " + "h" * 6000], "/"),
    (["-X", "PUT", "--data-binary", "BEGIN:VCARD", "-H", "Content-Type: text/vcard"], "/radicale/alice/contacts/x.vcf"),
])
def test_b12_http_port_only_redirects(ctx, args, path):
    """B12: on the HTTP port everything but an ACME token is a 308 to https://<configured domain><path>:
    never the client's Host, never WWW-Authenticate, never DAV, nothing stored."""
    with row(ctx, max_log_lines=1):
        r = subprocess.run(["curl", "-sS", "-D", "-", "-o", "/dev/null", *args,
                            f"http://127.0.0.1:{ctx.srv.http_port}{path}"], capture_output=True, text=True, timeout=30)
    head = r.stdout.lower()
    if "h" * 6000 in " ".join(args):
        assert head.startswith("http/1.1 400") or head.startswith("http/1.1 308") or head.startswith("http/1.0 400")
        return
    assert head.startswith("http/1.1 308"), r.stdout
    assert f"location: https://{DOMAIN}{path}\n".lower() in head
    assert "www-authenticate" not in head and "\ndav:" not in head and "evil" not in head


# --- L6 ------------------------------------------------------------------------------------------------

def test_l6_900_kb_card_round_trips_and_1_1_mb_gets_413(ctx):
    """L6: a 900 KB vCard with a photo is stored and read back with the same photo; a 1.1 MB one gets 413
    and nothing is stored."""
    photo = base64.b64encode(os.urandom(650_000)).decode()
    folded = "\r\n ".join(photo[i:i + 74] for i in range(0, len(photo), 74))

    def card(uid: str, extra: int = 0) -> bytes:
        return (f"BEGIN:VCARD\r\nVERSION:3.0\r\nUID:{uid}\r\nFN:Photo {uid}\r\nN:Photo;;;;\r\n"
                f"PHOTO;ENCODING=b;TYPE=JPEG:{folded}{'A' * extra}\r\nEND:VCARD\r\n").encode()

    big = card("photo-900k")
    assert 880_000 < len(big) < 940_000, len(big)
    with row(ctx, max_log_lines=4, storage_may_change=True), DavClient(ctx.port, ctx.cafile) as dav:
        assert dav.put(f"{CONTACTS}photo-900k.vcf", big).status == 201
        back = dav.request("GET", f"{CONTACTS}photo-900k.vcf").body
        assert prop(back, "PHOTO") is not None and prop(back, "PHOTO").replace(" ", "") == photo  # type: ignore[union-attr]
        too_big = card("photo-1100k", extra=220_000)
        assert len(too_big) > 1_100_000
        before = storage_snapshot(ctx.storage)
        assert dav.put(f"{CONTACTS}photo-1100k.vcf", too_big).status == 413
        assert storage_snapshot(ctx.storage) == before
        assert dav.request("DELETE", f"{CONTACTS}photo-900k.vcf").status in (200, 204)


# --- L2, L3, L4: load that must not stop a legitimate sync -------------------------------------------------

def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def legit_sync(c: Ctx, work: Path) -> float:
    """A fresh vdirsyncer client downloads alice's address book (200+ cards); returns the seconds it took."""
    client = Vdirsyncer(work, c.port, c.cafile, calendar=False)
    client.discover()
    t0 = time.monotonic()
    client.sync(timeout_s=90)
    took = time.monotonic() - t0
    got = client.local("contacts")
    assert all(prop(data, "UID") for data in got.values())
    assert {f"seed-{i}" for i in range(SEEDED_CARDS)} <= set(got), "the legitimate sync lost cards"
    return took


@pytest.mark.slow
def test_l2_slowloris_does_not_stop_a_legitimate_sync(ctx, tmp_path):
    """L2: 100 connections -- 50 trickle a request header one byte a second through TLS, 50 finish the TLS
    handshake and send nothing -- while a vdirsyncer client syncs 200 cards. The sync succeeds; every
    slowloris connection is closed by the server within the idle deadline (5 s) plus margin; the open fd
    count goes back down; no log line per connection."""
    pid = ctx.srv.pid
    baseline = fd_count(pid)
    closed_after: list[float] = []
    lock = threading.Lock()
    stop = threading.Event()

    def slow(trickle: bool) -> None:
        try:
            sock = tls_connect(ctx, timeout_s=30)
        except OSError:
            return
        t0 = time.monotonic()
        request = b"GET /radicale/alice/ HTTP/1.1\r\nHost: laptop.test\r\nX-Slow: " + b"z" * 100
        try:
            for i in range(60):  # bounded: 60 s at most
                if stop.is_set():
                    return
                if trickle:
                    sock.sendall(request[i:i + 1])
                select.select([sock], [], [], 1.0)
                if poll(sock) == b"":
                    break
        except (ConnectionError, ssl.SSLError, TimeoutError, OSError):
            pass
        finally:
            sock.close()
        with lock:
            closed_after.append(time.monotonic() - t0)

    mark = len(ctx.srv.log())
    threads = [threading.Thread(target=slow, args=(i % 2 == 0,), daemon=True) for i in range(100)]
    for t in threads:
        t.start()
    try:
        wait_until(lambda: fd_count(pid) >= baseline + 80 or len(closed_after) > 20, 30, "the slow connections")
        peak = fd_count(pid)
        took = legit_sync(ctx, tmp_path / "legit")
        for t in threads:
            t.join(40)
    finally:
        stop.set()
    print(f"\nlegitimate sync under 100 slowloris connections: {took:.1f} s; fds baseline {baseline}, peak {peak}, "
          f"after {fd_count(pid)}; slowloris closed after max {max(closed_after):.1f} s")
    assert len(closed_after) == 100 and max(closed_after) < 5 + 15
    wait_until(lambda: fd_count(pid) <= baseline + 10, 20, "fds back to the baseline")
    slow_lines = [line for line in ctx.srv.log()[mark:].splitlines() if "aiohttp.access" not in line]
    assert len(slow_lines) <= 5, slow_lines
    assert "Traceback" not in ctx.srv.log()


@pytest.mark.slow
def test_l3_slow_bodies_get_408_and_do_not_stop_a_sync(ctx, tmp_path):
    """L3: 30 PUTs announce 1 MB and send 1 byte a second. Each is cut with 408 once it falls behind the
    minimum rate (grace 3 s); meanwhile a vdirsyncer sync of 200 cards succeeds; nothing is stored."""
    answers: list[int | None] = []
    lock = threading.Lock()

    def slow_put(k: int) -> None:
        try:
            with tls_connect(ctx, timeout_s=30) as sock:
                sock.sendall(f"PUT {CONTACTS}slow-{k}.vcf HTTP/1.1\r\nHost: {DOMAIN}\r\nAuthorization: {AUTH}\r\n"
                             f"Content-Type: text/vcard\r\nContent-Length: 1000000\r\n\r\n".encode())
                answer = None
                for _ in range(30):  # bounded: 30 s
                    select.select([sock], [], [], 1.0)
                    first = poll(sock)
                    if first is not None:
                        answer = read_response(sock, first) if first else None
                        break
                    sock.sendall(b"B")
        except (ConnectionError, ssl.SSLError, OSError):
            answer = None
        with lock:
            answers.append(answer[0] if answer else None)

    before = storage_snapshot(ctx.storage)
    mark = len(ctx.srv.log())
    threads = [threading.Thread(target=slow_put, args=(k,), daemon=True) for k in range(30)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    took = legit_sync(ctx, tmp_path / "legit")
    for t in threads:
        t.join(40)
    print(f"\nlegitimate sync beside 30 slow bodies: {took:.1f} s; slow bodies answered "
          f"{sorted(set(map(str, answers)))} within {time.monotonic() - t0:.1f} s")
    assert len(answers) == 30 and all(a == 408 for a in answers), answers
    wait_until(lambda: ctx.srv.log()[mark:].count('" 408 ') >= 30, 10, "30 access lines with 408")
    new = ctx.srv.log()[mark:]
    assert "Traceback" not in new and not [s for s in access_statuses(new) if s >= 500]
    assert new.count('" 408 ') == 30
    after = storage_snapshot(ctx.storage)
    assert {k: v for k, v in after.items() if "slow-" in k} == {} and after == before


@pytest.mark.slow
def test_l4_brute_force_does_not_stop_the_real_user(ctx, tmp_path):
    """L4: 20 parallel clients guess passwords for 10 s while the real user syncs 200 cards with vdirsyncer.
    Every guess gets 401 (after the delay) or, once the address is in its login backoff, 429; never a 5xx;
    the real sync completes (its credentials are known good, so the backoff does not apply to it); the log
    shows the client address, and repeats are collapsed into a summary line (row L4). That each failure
    waits out the delay is B6's check: here the password hashing of 20 parallel guessers alone takes longer
    than the delay, so this row could not tell."""
    stop = threading.Event()
    statuses: list[int] = []
    lock = threading.Lock()

    def guesser(k: int) -> None:
        with DavClient(ctx.port, ctx.cafile, user="alice", password=f"guess-{k}") as dav:
            for _ in range(200):  # bounded
                if stop.is_set():
                    return
                try:
                    r = dav.request("PROPFIND", "/radicale/alice/", headers={"Depth": "0"})
                except OSError:
                    continue
                with lock:
                    statuses.append(r.status)

    served_again(ctx)  # the real user has synced before (its credentials are known good)
    mark = len(ctx.srv.log())
    threads = [threading.Thread(target=guesser, args=(k,), daemon=True) for k in range(20)]
    deadline = time.monotonic() + 10
    for t in threads:
        t.start()
    try:
        wait_until(lambda: len(statuses) >= 20, 30, "the guessing to start")
        took = legit_sync(ctx, tmp_path / "legit")
        wait_until(lambda: time.monotonic() >= deadline, 30, "10 s of guessing")
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    print(f"\nreal user's sync under 20 guessing clients: {took:.1f} s; guesses answered: {len(statuses)}")
    assert statuses and set(statuses) <= {401, 429} and 401 in statuses, sorted(set(statuses))
    new = ctx.srv.log()[mark:]
    assert "Traceback" not in new
    # Repeats are collapsed: per address, the first failed login of a minute is logged in full, the rest
    # are counted into one summary line when the minute is over (the window may have opened in an earlier
    # test against this server, so even the full line can fall before `mark`).
    failures = [line for line in new.splitlines() if '" 401 ' in line or '" 429 ' in line]
    assert all(line.split("aiohttp.access: ", 1)[1].startswith("127.0.0.1 ") for line in failures)
    assert len(failures) <= 3, f"{len(failures)} lines for {len(statuses)} failed logins: not collapsed"

    def collapsed() -> int | None:
        counts = re.findall(r"aiohttp\.access: 127\.0\.0\.1: (\d+) more failed logins", ctx.srv.log()[mark:])
        total = sum(map(int, counts))
        return total if counts and total + len(failures) >= len(statuses) else None

    # Every failed login is accounted for: in full or in a summary (which comes when its minute is over).
    total = wait_until(collapsed, 150, "summary lines accounting for every failed login")
    print(f"log lines for {len(statuses)} failed logins: {len(failures)} in full, {total} collapsed into summaries")
