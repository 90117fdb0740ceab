"""What crosses from aiohttp into Radicale (dav/environ.py), in this process with exact expectations: the WSGI
environ's keys and values, the Host header's port, the XML pre-check's depth count and DTD refusal, and
read_body's limit at its boundary and its spool."""

from __future__ import annotations

import io
import sys
from typing import Any

import pytest
from aiohttp.test_utils import make_mocked_request
from multidict import CIMultiDict

from inverse_cloud.dav import environ as env_mod
from inverse_cloud.dav.environ import BodyError, build_environ, read_body, server_address, xml_problem


def _request(method: str, path: str, headers: list[tuple[str, str]]) -> Any:
    return make_mocked_request(method, path, headers=CIMultiDict(headers))


def test_the_environ_radicale_gets_is_pep_3333_with_our_fixed_facts():
    body = io.BytesIO(b"<x/>")
    request = _request("PROPFIND", "/radicale/alice/caf%C3%A9/?a=1?b", [
        ("Host", "dav.example.org"), ("Content-Type", "text/xml"), ("X-Dup", "one"), ("X-Dup", "two"),
        ("X-Forwarded-For", "6.6.6.6"), ("Depth", "1")])
    environ = build_environ(request, body, 4, ("198.51.100.7", 40123), ("dav.example.org", 443))
    assert environ == {
        "REQUEST_METHOD": "PROPFIND", "SCRIPT_NAME": "/radicale", "PATH_INFO": "/alice/caf\xc3\xa9/",
        "QUERY_STRING": "a=1?b", "SERVER_NAME": "dav.example.org", "SERVER_PORT": "443",
        "SERVER_PROTOCOL": "HTTP/1.1", "REMOTE_ADDR": "198.51.100.7", "REMOTE_PORT": "40123", "HTTPS": "on",
        "wsgi.version": (1, 0), "wsgi.url_scheme": "https", "wsgi.input": body, "wsgi.errors": sys.stderr,
        "wsgi.multithread": True, "wsgi.multiprocess": False, "wsgi.run_once": False,
        "CONTENT_TYPE": "text/xml", "CONTENT_LENGTH": "4",
        "HTTP_HOST": "dav.example.org", "HTTP_X_DUP": "one,two", "HTTP_DEPTH": "1",
    }


def test_a_path_outside_the_script_name_is_passed_whole_and_no_content_type_means_none():
    environ = build_environ(_request("GET", "/.well-known/carddav", []), io.BytesIO(), 0, ("::1", 1),
                            ("h", 8443))
    assert environ["PATH_INFO"] == "/.well-known/carddav" and environ["SERVER_PORT"] == "8443"
    assert environ["SERVER_NAME"] == "h"
    assert "CONTENT_TYPE" not in environ and "CONTENT_LENGTH" not in environ


@pytest.mark.parametrize(("host", "expected"), [
    ("dav.example.org", ("dav.example.org", 443)),
    ("dav.example.org:8443", ("dav.example.org", 8443)),
    ("dav.example.org:65535", ("dav.example.org", 65535)),
    ("dav.example.org:65536", ("dav.example.org:65536", 443)),     # not a port
    ("dav.example.org:0443", ("dav.example.org:0443", 443)),       # a leading zero is not a port either
    ("[2001:db8::1]", ("[2001:db8::1]", 443)),
    ("[2001:db8::1]:8443", ("[2001:db8::1]", 8443)),
])
def test_the_host_headers_port(host, expected):
    assert server_address(host) == expected


def test_xml_depth_counts_open_elements_not_elements_seen():
    """Many siblings are fine (closing an element takes a level back); MAX_XML_DEPTH levels are fine, one more
    is refused."""
    wide = b"<a>" + b"<b><c/></b>" * (3 * env_mod.MAX_XML_DEPTH) + b"</a>"
    assert xml_problem(io.BytesIO(wide)) is None
    n = env_mod.MAX_XML_DEPTH
    assert xml_problem(io.BytesIO(b"<e>" * n + b"</e>" * n)) is None
    assert xml_problem(io.BytesIO(b"<e>" * (n + 1) + b"</e>" * (n + 1))) == f"XML nested deeper than {n} levels"
    # down one level and up two: n + 1 open at once, although no run of opening tags is longer than n
    zigzag = b"<e>" * n + b"</e>" + b"<e><e>" + b"</e>" * (n + 1)
    assert xml_problem(io.BytesIO(zigzag)) == f"XML nested deeper than {n} levels"


def test_xml_larger_than_one_read_is_checked_whole_and_rewound():
    body = io.BytesIO(b"<a>" + b"<b/>" * 40_000 + b"<c></a>")      # malformed past the first 64 KiB
    problem = xml_problem(body)
    assert problem is not None and problem.startswith("malformed XML (mismatched tag, line 1)")
    assert body.tell() == 0


def test_a_dtd_with_an_entity_is_refused_before_the_entity_is_used():
    doc = b'<!DOCTYPE a [<!ENTITY e "x">]><a>&e;</a>'
    assert xml_problem(io.BytesIO(doc)) == "XML with a DTD or entity declarations"


def test_a_body_error_is_its_reason():
    err = BodyError(413, "body of 9 bytes is over the 8-byte limit")
    assert (err.status, err.reason, str(err)) == (413, "body of 9 bytes is over the 8-byte limit",
                                                  "body of 9 bytes is over the 8-byte limit")


class Pieces:
    def __init__(self, *pieces: bytes) -> None:
        self.pieces = list(pieces)

    async def readany(self) -> bytes:
        return self.pieces.pop(0) if self.pieces else b""


async def test_a_declared_length_over_the_limit_is_refused_before_reading_and_at_the_limit_read():
    over = make_mocked_request("PUT", "/radicale/x", headers={"Content-Length": "9"}, payload=Pieces(b"x" * 9))
    with pytest.raises(BodyError) as err:
        await read_body(over, 8, 5.0, 1)
    assert (err.value.status, err.value.reason) == (413, "body of 9 bytes is over the 8-byte limit")
    assert over.content.pieces == [b"x" * 9]                  # not a byte read
    exact = make_mocked_request("PUT", "/radicale/x", headers={"Content-Length": "8"}, payload=Pieces(b"x" * 8))
    body = await read_body(exact, 8, 5.0, 1)
    try:
        assert body.read() == b"x" * 8
    finally:
        body.close()


async def test_a_body_past_the_spool_size_goes_to_disk_and_a_small_one_stays_in_memory():
    size = env_mod.SPOOL_MAX_MEMORY + 1
    big = make_mocked_request("PUT", "/radicale/x", headers={"Content-Length": str(size)},
                              payload=Pieces(b"x" * size))
    spooled = await read_body(big, 10 * size, 5.0, 1)
    small = make_mocked_request("PUT", "/radicale/x", headers={"Content-Length": "3"}, payload=Pieces(b"abc"))
    kept = await read_body(small, 10, 5.0, 1)
    try:
        assert spooled._rolled is True and kept._rolled is False   # type: ignore[attr-defined]
        assert len(spooled.read()) == size and kept.read() == b"abc"
    finally:
        spooled.close()
        kept.close()


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Stalled:
    """A body whose ``first`` piece arrives ``late`` seconds after the start (on the test's clock), then nothing."""

    def __init__(self, clock: Clock, first: bytes, late: float) -> None:
        self.clock, self.first, self.late = clock, first, late

    async def readany(self) -> bytes:
        if self.first:
            self.clock.now += self.late
            chunk, self.first = self.first, b""
            return chunk
        import asyncio

        await asyncio.Event().wait()
        return b""


async def test_a_body_slower_than_the_minimum_rate_is_an_exact_408():
    """grace 5 s, 1 byte/s: 3 bytes arrive at 7.95 s, so the next must come by 8 s (5 + 3); nothing does: the
    read times out 0.05 s later and the answer is 408 'request body too slow (3 bytes in 8 s)'."""
    import asyncio

    clock = Clock()
    request = make_mocked_request("PUT", "/radicale/x", headers={}, payload=Stalled(clock, b"abc", 7.95))
    with pytest.raises(BodyError) as err:
        await asyncio.wait_for(read_body(request, 100, 5.0, 1, clock=clock), 10)
    assert (err.value.status, err.value.reason) == (408, "request body too slow (3 bytes in 8 s)")


async def test_a_deadline_already_past_is_408_without_waiting():
    clock = Clock()

    class Late:
        async def readany(self) -> bytes:
            clock.now += 10.0           # the first piece arrives 10 s late: past the 5 s grace
            return b"ab"

    request = make_mocked_request("PUT", "/radicale/x", headers={}, payload=Late())
    with pytest.raises(BodyError) as err:
        await read_body(request, 100, 5.0, 1, clock=clock)
    assert (err.value.status, err.value.reason) == (408, "request body too slow (2 bytes in 10 s)")


async def test_a_client_gone_mid_body_and_a_short_body_are_exact_400s():
    class Gone:
        async def readany(self) -> bytes:
            raise ConnectionResetError("reset by peer")

    request = make_mocked_request("PUT", "/radicale/x", headers={"Content-Length": "5"}, payload=Gone())
    with pytest.raises(BodyError) as err:
        await read_body(request, 100, 5.0, 1)
    assert (err.value.status, err.value.reason) == (400, "connection closed by the client after 0 body bytes")
    short = make_mocked_request("PUT", "/radicale/x", headers={"Content-Length": "5"}, payload=Pieces(b"abc"))
    with pytest.raises(BodyError) as err:
        await read_body(short, 100, 5.0, 1)
    assert (err.value.status, err.value.reason) == (400, "request body shorter than Content-Length")


async def test_an_undeclared_body_may_be_exactly_the_limit_and_not_a_byte_more():
    ok = make_mocked_request("PUT", "/radicale/x", headers={}, payload=Pieces(b"abcd", b"efgh"))
    body = await read_body(ok, 8, 5.0, 1)
    try:
        assert body.read() == b"abcdefgh"
    finally:
        body.close()
    over = make_mocked_request("PUT", "/radicale/x", headers={}, payload=Pieces(b"abcd", b"efghi"))
    with pytest.raises(BodyError) as err:
        await read_body(over, 8, 5.0, 1)
    assert (err.value.status, err.value.reason) == (413, "body over the 8-byte limit")


@pytest.mark.parametrize(("user", "valid"), [("a", True), ("a" * 256, True), ("a" * 257, False), ("", False)])
def test_basic_user_names_are_one_to_256_characters(user, valid):
    import base64

    token = base64.b64encode(f"{user}:pass:word".encode()).decode()
    assert env_mod.valid_basic_auth(f"Basic {token}") is valid


def test_basic_credentials_must_be_strict_base64():
    import base64

    token = base64.b64encode(b"alice:pw").decode()
    assert env_mod.valid_basic_auth(f"Basic {token}")
    assert not env_mod.valid_basic_auth(f"Basic {token[:4]}*{token[4:]}")      # a stray character
    assert not env_mod.valid_basic_auth("Basic " + base64.b64encode(b"alice-no-colon").decode())
    assert not env_mod.valid_basic_auth("Basic " + base64.b64encode(b"\xff\xfe:pw").decode())
    assert env_mod.valid_basic_auth("Bearer abc")      # not Basic: Radicale answers it itself
