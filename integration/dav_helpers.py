"""Shared pieces of the integration tests that drive real clients against ``inverse-cloud serve``:

* :class:`DavClient`: a small HTTPS client (stdlib ``http.client``) that verifies the server's
  certificate for ``laptop.test`` while connecting to 127.0.0.1 (no name resolution needed);
* :class:`Vdirsyncer`: one real ``vdirsyncer`` client (its own config, status and local vdirs) for an
  address book and a calendar. vdirsyncer resolves names itself, so it runs in a private mount namespace
  (``unshare -m``, root) where ``/etc/hosts`` maps ``laptop.test`` to 127.0.0.1; the real file is untouched;
* item generators, a storage snapshot, ``radicale --verify-storage`` and a throwaway CA.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import http.client
import os
import re
import shutil
import socket
import ssl
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from tests.support import ThrowawayCA

DOMAIN = "laptop.test"
USER, PASSWORD = "alice", "correct horse"


def require_root_tools() -> None:
    """Fail (never skip) with a clear message when the test machine lacks what these tests need."""
    missing = [t for t in ("vdirsyncer", "curl", "unshare") if shutil.which(t) is None]
    if missing:
        raise AssertionError(f"missing tools {missing}: apt-get install -y vdirsyncer curl util-linux")
    if os.geteuid() != 0:
        raise AssertionError("these tests need root (unshare -m for a private /etc/hosts and tmpfs); CI runs as root")


def selfsigned_cert(config_root: Path) -> Path:
    return config_root / "state" / "tls" / "selfsigned" / "fullchain.pem"


# --- HTTPS client ---------------------------------------------------------------------------------

class VerifiedConn(http.client.HTTPSConnection):
    """Connects to 127.0.0.1 but verifies the certificate (and sends SNI) for ``laptop.test``."""

    def __init__(self, port: int, context: ssl.SSLContext, timeout: float) -> None:
        super().__init__("127.0.0.1", port, context=context, timeout=timeout)
        self._ctx = context

    def connect(self) -> None:
        raw = socket.create_connection(("127.0.0.1", self.port), self.timeout)
        try:
            self.sock = self._ctx.wrap_socket(raw, server_hostname=DOMAIN)
        except BaseException:
            raw.close()
            raise


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", "replace")


@dataclass
class DavClient:
    """One keep-alive HTTPS connection; reconnects when the server closed it."""

    port: int
    cafile: Path
    user: str = USER
    password: str = PASSWORD
    timeout: float = 30.0
    _conn: VerifiedConn | None = field(default=None, repr=False)

    def _context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.cafile))

    @property
    def auth(self) -> str:
        import base64

        return "Basic " + base64.b64encode(f"{self.user}:{self.password}".encode()).decode()

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None,
                auth: bool = True) -> Response:
        hdrs = {"Host": DOMAIN, **(headers or {})}
        if auth:
            hdrs.setdefault("Authorization", self.auth)
        for attempt in range(2):
            if self._conn is None:
                self._conn = VerifiedConn(self.port, self._context(), self.timeout)
            r: http.client.HTTPResponse | None = None
            try:
                self._conn.request(method, path, body=body, headers=hdrs)
                r = self._conn.getresponse()
                data = r.read()
                if r.will_close:
                    self.close()
                return Response(r.status, {k.lower(): v for k, v in r.getheaders()}, data)
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
                # A keep-alive connection the server had closed: retry once on a fresh one (idempotent use only).
                self.close()
                if attempt:
                    raise
            except BaseException:
                # Any other failure (server killed mid-response, timeout, TLS error): release the socket now,
                # not whenever the garbage collector reaches the response (a ResourceWarning under -W error).
                self.close()
                raise
            finally:
                # The response holds a second reference (makefile) to the socket; close it explicitly so that
                # closing the connection really closes the descriptor.
                if r is not None:
                    r.close()
        raise AssertionError("unreachable")

    def peer_serial(self) -> int:
        from cryptography import x509

        assert self._conn is not None and self._conn.sock is not None
        der = self._conn.sock.getpeercert(binary_form=True)  # type: ignore[union-attr]
        return int(x509.load_der_x509_certificate(der).serial_number)

    def put(self, path: str, data: bytes, content_type: str = "text/vcard; charset=utf-8") -> Response:
        return self.request("PUT", path, data, {"Content-Type": content_type})

    def hrefs(self, collection: str) -> set[str]:
        """Item hrefs in a collection (PROPFIND Depth 1)."""
        r = self.request("PROPFIND", collection, b'<?xml version="1.0"?><propfind xmlns="DAV:"><prop><getetag/>'
                         b"</prop></propfind>", {"Depth": "1", "Content-Type": "application/xml"})
        assert r.status == 207, (r.status, r.text[:300])
        return {h for h in re.findall(r"<href>([^<]+)</href>", r.text) if h != collection}

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def __enter__(self) -> DavClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --- items --------------------------------------------------------------------------------------------

def vcard(uid: str, name: str, note: str = "") -> bytes:
    lines = ["BEGIN:VCARD", "VERSION:3.0", f"UID:{uid}", f"FN:{name}", f"N:{name};;;;",
             f"EMAIL:{uid}@example.org"]
    if note:
        lines.append(f"NOTE:{note}")
    lines.append("END:VCARD")
    return ("\r\n".join(lines) + "\r\n").encode()


def vevent(uid: str, summary: str, day: int = 1) -> bytes:
    start = dt.datetime(2027, 1, 1, 9, 0) + dt.timedelta(days=day)
    fmt = "%Y%m%dT%H%M%SZ"
    lines = ["BEGIN:VCALENDAR", "VERSION:2.0", "PRODID:-//inverse-cloud tests//EN", "BEGIN:VEVENT",
             f"UID:{uid}", "DTSTAMP:20270101T000000Z", f"DTSTART:{start.strftime(fmt)}",
             f"DTEND:{(start + dt.timedelta(hours=1)).strftime(fmt)}", f"SUMMARY:{summary}", "END:VEVENT",
             "END:VCALENDAR"]
    return ("\r\n".join(lines) + "\r\n").encode()


def prop(data: bytes, name: str) -> str | None:
    """The value of the first ``NAME:`` property of a vCard/iCalendar text (unfolded)."""
    text = data.decode("utf-8", "replace").replace("\r\n ", "").replace("\n ", "")
    m = re.search(rf"^{name}(?:;[^:\r\n]*)?:(.*?)\r?$", text, re.M)
    return m.group(1) if m else None


def new_uid() -> str:
    return str(uuid.uuid4())


# --- vdirsyncer -------------------------------------------------------------------------------------

class Vdirsyncer:
    """A real vdirsyncer client for alice's ``contacts`` and ``calendar`` at https://laptop.test:PORT."""

    def __init__(self, work: Path, port: int, cafile: Path, user: str = USER, password: str = PASSWORD,
                 calendar: bool = True) -> None:
        require_root_tools()
        self.work = work
        self.contacts = work / "contacts"
        self.calendars = work / "calendars"
        for d in (self.contacts, self.calendars, work / "status"):
            d.mkdir(parents=True, exist_ok=True)
        pairs = ["contacts"] + (["calendar"] if calendar else [])
        cfg = [f'[general]\nstatus_path = "{work}/status/"\n']
        remote = (f'url = "https://{DOMAIN}:{port}/radicale/"\nusername = "{user}"\npassword = "{password}"\n'
                  f'verify = "{cafile}"\n')
        cfg.append(f'[pair contacts]\na = "contacts_local"\nb = "contacts_remote"\ncollections = ["contacts"]\n'
                   f'conflict_resolution = "b wins"\n[storage contacts_local]\ntype = "filesystem"\n'
                   f'path = "{self.contacts}/"\nfileext = ".vcf"\n[storage contacts_remote]\ntype = "carddav"\n'
                   f"{remote}")
        if calendar:
            cfg.append(f'[pair calendar]\na = "calendar_local"\nb = "calendar_remote"\ncollections = ["calendar"]\n'
                       f'conflict_resolution = "b wins"\n[storage calendar_local]\ntype = "filesystem"\n'
                       f'path = "{self.calendars}/"\nfileext = ".ics"\n[storage calendar_remote]\n'
                       f"type = \"caldav\"\n{remote}")
        self.config = work / "config"
        self.config.write_text("\n".join(cfg))
        hosts = work / "hosts"
        hosts.write_text(f"127.0.0.1 {DOMAIN}\n" + Path("/etc/hosts").read_text())
        self.prefix = ["unshare", "-m", "sh", "-c", 'mount --bind "$0" /etc/hosts && exec "$@"', str(hosts)]
        self.pairs = pairs

    def command(self, *args: str, verbosity: str = "WARNING") -> list[str]:
        return [*self.prefix, "vdirsyncer", "-c", str(self.config), "--verbosity", verbosity, *args]

    def run(self, *args: str, timeout_s: float = 120) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(self.command(*args), capture_output=True, text=True, timeout=timeout_s,
                              input="y\n" * 10)
        if proc.returncode != 0:
            raise AssertionError(f"vdirsyncer {' '.join(args)} failed ({proc.returncode}):\n"
                                 f"{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
        return proc

    def discover(self) -> None:
        self.run("discover")

    def sync(self, timeout_s: float = 120) -> None:
        self.run("sync", timeout_s=timeout_s)

    def start_sync(self, verbosity: str = "WARNING") -> subprocess.Popen[str]:
        return subprocess.Popen(self.command("sync", verbosity=verbosity), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)

    def local(self, kind: str = "contacts") -> dict[str, bytes]:
        """UID -> content of the local vdir items."""
        folder = (self.contacts if kind == "contacts" else self.calendars) / kind
        out: dict[str, bytes] = {}
        for f in folder.glob("*.*"):
            data = f.read_bytes()
            uid = prop(data, "UID")
            assert uid is not None, f"{f} has no UID"
            assert uid not in out, f"duplicate UID {uid} in {folder}"
            out[uid] = data
        return out

    def folder(self, kind: str = "contacts") -> Path:
        return (self.contacts if kind == "contacts" else self.calendars) / kind

    def write_item(self, kind: str, uid: str, data: bytes) -> None:
        """Create or edit an item locally (vdir: one file per item, any name)."""
        folder = self.folder(kind)
        for f in folder.glob("*.*"):
            if prop(f.read_bytes(), "UID") == uid:
                f.write_bytes(data)
                return
        (folder / f"{uid}{'.vcf' if kind == 'contacts' else '.ics'}").write_bytes(data)

    def delete_item(self, kind: str, uid: str) -> None:
        for f in self.folder(kind).glob("*.*"):
            if prop(f.read_bytes(), "UID") == uid:
                f.unlink()
                return
        raise AssertionError(f"{uid} not in {self.folder(kind)}")


# --- storage checks ------------------------------------------------------------------------------------

def storage_snapshot(storage_dir: Path) -> dict[str, str]:
    """sha256 of every stored file, minus Radicale's caches and locks (which reads may touch)."""
    out: dict[str, str] = {}
    for p in storage_dir.rglob("*"):
        rel = p.relative_to(storage_dir).as_posix()
        if p.is_file() and ".Radicale.cache" not in rel and not p.name.endswith(".lock") \
                and not p.name.startswith(".Radicale.tmp"):
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def verify_storage(storage_dir: Path, work: Path) -> str:
    """Run ``radicale --verify-storage`` on ``storage_dir`` with a generated config; return its output.

    :raises AssertionError: verification failed.
    """
    cfg = work / "radicale-verify.conf"
    cfg.write_text(f"[storage]\nfilesystem_folder = {storage_dir}\n[logging]\nlevel = info\n")
    env = {k: v for k, v in os.environ.items() if k != "RADICALE_CONFIG"}
    proc = subprocess.run([sys.executable, "-m", "radicale", "--verify-storage", "-C", str(cfg)],
                          capture_output=True, text=True, timeout=120, env=env)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"radicale --verify-storage failed:\n{out[-3000:]}"
    return out


def item_files(collection_dir: Path) -> dict[str, bytes]:
    """name -> bytes of the items stored in one collection folder on disk."""
    return {p.name: p.read_bytes() for p in collection_dir.iterdir()
            if p.is_file() and not p.name.startswith(".")}


# --- a throwaway CA ---------------------------------------------------------------------------------

# The throwaway CA lives in tests.support (tests/test_tls.py uses it too).
LocalCA = ThrowawayCA


# --- server log ----------------------------------------------------------------------------------------

def log_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def access_statuses(text: str) -> list[int]:
    """HTTP statuses of the access-log lines in a server log."""
    return [int(m.group(1)) for m in re.finditer(r'aiohttp\.access: \S+ "[^"]*" (\d{3}) ', text)]


def wait_for_log(srv: object, needle: str, timeout_s: float = 30, start: int = 0) -> None:
    from tests.support import wait_until

    wait_until(lambda: needle in srv.log()[start:], timeout_s, f"{needle!r} in the server log",  # type: ignore[attr-defined]
               on_timeout=srv.log)  # type: ignore[attr-defined]


def monotonic_ms() -> float:
    return time.monotonic() * 1000
