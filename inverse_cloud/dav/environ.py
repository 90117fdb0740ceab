"""What crosses from aiohttp into Radicale's WSGI call, checked on the event loop before a worker runs:

* the body, read under a size limit (413 as soon as it is passed) and a minimum-rate deadline (408 for a
  trickle), spooled to a temporary file past 256 KiB;
* the XML pre-check for methods whose body Radicale parses (a DTD, an entity or deep nesting -> 400);
* the environ (pure), with the headers a client must never set stripped;
* the Basic credential Radicale would crash on, refused here.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import sys
import tempfile
import time
import xml.parsers.expat
from collections.abc import Callable
from typing import IO, Any
from urllib.parse import unquote_to_bytes

from aiohttp import web

__all__ = ["SCRIPT_NAME", "WRITE_METHODS", "XML_METHODS", "BodyError", "build_environ", "read_body",
           "server_address", "valid_basic_auth", "xml_problem"]

SCRIPT_NAME = "/radicale"
SPOOL_MAX_MEMORY = 256 * 1024

WRITE_METHODS = frozenset({"PUT", "DELETE", "MKCOL", "MKCALENDAR", "PROPPATCH", "MOVE", "COPY", "POST"})

# Header names (WSGI form) a client must never be able to set: Radicale trusts them as a reverse
# proxy's word.
STRIPPED = frozenset({
    "HTTP_X_REMOTE_USER", "HTTP_X_SCRIPT_NAME", "HTTP_X_REMOTE_ADDR", "HTTP_X_FORWARDED_FOR",
    "HTTP_X_FORWARDED_HOST", "HTTP_X_FORWARDED_PROTO", "HTTP_X_FORWARDED_SERVER",
    "HTTP_X_FORWARDED_PORT", "HTTP_FORWARDED", "HTTP_X_REAL_IP", "HTTP_REMOTE_USER",
    "HTTP_CONTENT_TYPE", "HTTP_CONTENT_LENGTH", "HTTP_PROXY",
})

# Methods whose body Radicale parses as XML. Checked in front of it (docs/test-matrix.md B3): a DTD or entity
# declaration made Radicale answer 500 (defusedxml refuses them by raising), and deep nesting crashed the
# whole process (a C stack overflow, SIGSEGV). Both become 400 here; real clients never send either.
XML_METHODS = frozenset({"PROPFIND", "PROPPATCH", "REPORT", "MKCOL", "MKCALENDAR"})
MAX_XML_DEPTH = 64


class _XmlRefused(Exception):
    pass


def xml_problem(body: IO[bytes]) -> str | None:
    """Why an XML request body must not reach Radicale, or None. Streams through expat (C, no tree)."""

    parser = xml.parsers.expat.ParserCreate()
    depth = 0

    def start(_name: str, _attrs: Any) -> None:
        nonlocal depth
        depth += 1
        if depth > MAX_XML_DEPTH:
            raise _XmlRefused(f"XML nested deeper than {MAX_XML_DEPTH} levels")

    def end(_name: str) -> None:
        nonlocal depth
        depth -= 1

    def no_dtd(*_args: Any) -> None:
        raise _XmlRefused("XML with a DTD or entity declarations")

    parser.StartElementHandler = start
    parser.EndElementHandler = end
    parser.StartDoctypeDeclHandler = no_dtd
    parser.EntityDeclHandler = no_dtd
    try:
        while chunk := body.read(64 * 1024):
            parser.Parse(chunk, False)
        parser.Parse(b"", True)
    except _XmlRefused as exc:
        return str(exc)
    except xml.parsers.expat.ExpatError as exc:
        return f"malformed XML ({xml.parsers.expat.ErrorString(exc.code)}, line {exc.lineno})"
    finally:
        body.seek(0)
    return None


class BodyError(Exception):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


async def read_body(request: web.Request, max_bytes: int, grace_s: float, min_rate_bps: int,
                    clock: Callable[[], float] = time.monotonic) -> IO[bytes]:
    """Read the whole request body into a spooled temporary file.

    The body must keep up a minimum rate after a grace period (Apache ``mod_reqtimeout`` style):
    by ``grace_s + received / min_rate_bps`` seconds after the start, more must have arrived.

    :raises BodyError: 413 past ``max_bytes``; 408 for a body too slow; 400 for a truncated body.
    """
    declared = request.content_length
    if declared is not None and declared > max_bytes:
        raise BodyError(413, f"body of {declared} bytes is over the {max_bytes}-byte limit")
    spool: IO[bytes] = tempfile.SpooledTemporaryFile(max_size=SPOOL_MAX_MEMORY)  # noqa: SIM115
    start = clock()
    received = 0
    try:
        while True:
            remaining = start + grace_s + received / min_rate_bps - clock()
            if remaining <= 0:
                raise BodyError(408, f"request body too slow ({received} bytes in {clock() - start:.0f} s)")
            try:
                async with asyncio.timeout(remaining):
                    chunk = await request.content.readany()
            except TimeoutError:
                raise BodyError(408, f"request body too slow ({received} bytes in {clock() - start:.0f} s)"
                                ) from None
            except ConnectionError:
                # The client went away mid-body: its mistake, not a 500 of ours (nobody gets this answer).
                raise BodyError(400, f"connection closed by the client after {received} body bytes") from None
            if not chunk:
                break
            received += len(chunk)
            if received > max_bytes:
                raise BodyError(413, f"body over the {max_bytes}-byte limit")
            spool.write(chunk)
        if declared is not None and received != declared:
            raise BodyError(400, "request body shorter than Content-Length")
    except BaseException:
        spool.close()
        raise
    spool.seek(0)
    return spool


def build_environ(request: web.Request, body: IO[bytes], body_length: int,
                  remote: tuple[str, int], server: tuple[str, int]) -> dict[str, Any]:
    """The WSGI environ for a request under ``/radicale`` (pure: no I/O)."""
    raw_path = request.raw_path.split("?", 1)[0]
    path_info = raw_path[len(SCRIPT_NAME):] if raw_path.startswith(SCRIPT_NAME) else raw_path
    environ: dict[str, Any] = {
        "REQUEST_METHOD": request.method,
        "SCRIPT_NAME": SCRIPT_NAME,
        # PEP 3333: PATH_INFO is the percent-decoded path as latin-1 text.
        "PATH_INFO": unquote_to_bytes(path_info).decode("latin-1"),
        "QUERY_STRING": request.query_string,
        "SERVER_NAME": server[0],
        "SERVER_PORT": str(server[1]),
        "SERVER_PROTOCOL": f"HTTP/{request.version.major}.{request.version.minor}",
        "REMOTE_ADDR": remote[0],
        "REMOTE_PORT": str(remote[1]),
        "HTTPS": "on",
        "wsgi.version": (1, 0),
        "wsgi.url_scheme": "https",
        "wsgi.input": body,
        "wsgi.errors": sys.stderr,
        "wsgi.multithread": True,
        "wsgi.multiprocess": False,
        "wsgi.run_once": False,
    }
    if request.content_type and "Content-Type" in request.headers:
        environ["CONTENT_TYPE"] = request.headers["Content-Type"]
    if body_length or request.method in WRITE_METHODS:
        environ["CONTENT_LENGTH"] = str(body_length)
    for name, value in request.headers.items():
        key = "HTTP_" + name.upper().replace("-", "_")
        if key in STRIPPED:
            continue
        environ[key] = f"{environ[key]},{value}" if key in environ else value
    return environ


def server_address(host_header: str) -> tuple[str, int]:
    """SERVER_NAME/SERVER_PORT as the client addressed us: the Host header, whose port defaults to 443.

    Not the local listening port: behind the relay a phone talks to port 443 while we listen on another,
    and Radicale compares MOVE destinations with SERVER_PORT (a 502 for every MOVE otherwise).
    """
    host, sep, port = host_header.rpartition(":")
    if sep and port.isdigit() and not port.startswith("0") and int(port) < 65536 and "]" not in port:
        return host, int(port)
    return host_header, 443


def valid_basic_auth(header: str) -> bool:
    """False for a ``Basic`` credential Radicale would crash on (not base64, not UTF-8, no colon)."""
    if not header.startswith("Basic"):
        return True
    token = header[len("Basic"):].strip()
    try:
        decoded = base64.b64decode(token.encode("ascii"), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeError, ValueError):
        return False
    user = decoded.split(":", 1)[0]
    return ":" in decoded and 0 < len(user) <= 256
