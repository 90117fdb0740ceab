"""Radicale called through WSGI in the test process (no HTTP, no TLS), with small DAV helpers.

``radicale_app(folder, storage_type)`` builds Radicale (in the plugin's ScopedApplication, as
build_application does) with the options that matter to storage as inverse-cloud sets them
(use_mtime_and_size_for_item_cache, fsync on), a plain-text user file and owner_only rights,
on any ``[storage] type``: the plugin and stock ``multifilesystem`` side by side.
"""

from __future__ import annotations

import base64
import io
import re
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

__all__ = ["Dav", "collection_tokens_masked", "radicale_app", "vcard"]

DAV_NS = "{DAV:}"
USER, PASSWORD = "alice", "pw"


def radicale_app(folder: Path, storage_type: str, **storage: str) -> Any:
    import radicale.app
    import radicale.config

    folder.mkdir(parents=True, exist_ok=True)
    users = folder.parent / f"{folder.name}.users"
    users.write_text(f"{USER}:{PASSWORD}\n")
    configuration = radicale.config.load([])
    configuration.update({
        "auth": {"type": "htpasswd", "htpasswd_filename": str(users), "htpasswd_encryption": "plain"},
        "rights": {"type": "owner_only"},
        "storage": {"type": storage_type, "filesystem_folder": str(folder / "collections"),
                    "use_mtime_and_size_for_item_cache": "True", **storage},
        "server": {"delay_on_error": "0"},
        "logging": {"level": "error"},
    }, "test", privileged=True)
    app = radicale.app.Application(configuration)
    # The plugin locks per collection root and learns each request's root from this wrapper, as served.
    scoped = getattr(app._storage, "scoped", None)
    return scoped(app) if scoped is not None else app


def collection_tokens_masked(body: bytes) -> bytes:
    """``body`` with the sync-token, the CTag and each collection's (href ending in /) etag replaced by T."""
    body = re.sub(rb"(<(?:\w+:)?(?:sync-token|getctag)>)[^<]*", rb"\1T", body)

    def etag_masked(m: re.Match[bytes]) -> bytes:
        return re.sub(rb"(<getetag>)[^<]*", rb"\1T", m.group(0))

    return re.sub(rb"<response><href>[^<]*/</href>.*?</response>", etag_masked, body, flags=re.S)


def vcard(uid: str, fn: str = "Someone") -> str:
    return f"BEGIN:VCARD\r\nVERSION:3.0\r\nUID:{uid}\r\nFN:{fn}\r\nN:{fn};;;;\r\nEND:VCARD\r\n"


class Dav:
    """Requests to one Radicale WSGI app as USER. Paths are Radicale paths (no /radicale prefix)."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.auth = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()

    def request(self, method: str, path: str, body: bytes | str = b"", **headers: str) -> tuple[int, bytes]:
        data = body.encode() if isinstance(body, str) else body
        env: dict[str, Any] = {
            "REQUEST_METHOD": method, "SCRIPT_NAME": "", "PATH_INFO": path, "QUERY_STRING": "",
            "SERVER_NAME": "localhost", "SERVER_PORT": "443", "SERVER_PROTOCOL": "HTTP/1.1",
            "REMOTE_ADDR": "127.0.0.1", "wsgi.url_scheme": "https", "wsgi.input": io.BytesIO(data),
            "wsgi.errors": sys.stderr, "CONTENT_LENGTH": str(len(data)), "HTTP_AUTHORIZATION": self.auth}
        for k, v in headers.items():
            key = k.upper().replace("-", "_")
            env[key if key in ("CONTENT_TYPE",) else "HTTP_" + key] = v
        status: list[str] = []
        out = b"".join(self.app(env, lambda s, h, e=None: status.append(s)))
        return int(status[0].split()[0]), out

    def mkcol(self, path: str, tag: str = "addressbook") -> int:
        ns = "urn:ietf:params:xml:ns:carddav" if tag == "addressbook" else "urn:ietf:params:xml:ns:caldav"
        body = (f'<?xml version="1.0"?><d:mkcol xmlns:d="DAV:" xmlns:x="{ns}"><d:set><d:prop><d:resourcetype>'
                f'<d:collection/><x:{tag}/></d:resourcetype></d:prop></d:set></d:mkcol>')
        return self.request("MKCOL", path, body)[0]

    def put(self, path: str, text: str, **headers: str) -> int:
        return self.request("PUT", path, text, content_type="text/vcard", **headers)[0]

    def get(self, path: str) -> tuple[int, bytes]:
        return self.request("GET", path)

    def delete(self, path: str) -> int:
        return self.request("DELETE", path)[0]

    def move(self, path: str, to: str) -> int:
        return self.request("MOVE", path, destination=f"https://localhost{to}")[0]

    def listing(self, path: str) -> dict[str, str]:
        """href -> etag of the items a PROPFIND Depth 1 lists."""
        body = '<?xml version="1.0"?><d:propfind xmlns:d="DAV:"><d:prop><d:getetag/></d:prop></d:propfind>'
        status, out = self.request("PROPFIND", path, body, depth="1")
        assert status == 207, (status, out[:300])
        result = {}
        for resp in ET.fromstring(out).iter(f"{DAV_NS}response"):  # noqa: S314 (the in-process server's answer)
            href = resp.findtext(f"{DAV_NS}href") or ""
            etag = resp.findtext(f".//{DAV_NS}getetag")
            if not href.endswith("/") and etag:
                result[href] = etag
        return result

    def multiget(self, path: str, hrefs: list[str], report: str = "addressbook") -> dict[str, tuple[int, str]]:
        """href -> (status, etag) from an addressbook-multiget (``report="calendar"``: a calendar-multiget)."""
        ns = "urn:ietf:params:xml:ns:carddav" if report == "addressbook" else "urn:ietf:params:xml:ns:caldav"
        body = (f'<?xml version="1.0"?><c:{report}-multiget xmlns:d="DAV:" xmlns:c="{ns}">'
                '<d:prop><d:getetag/></d:prop>' + "".join(f"<d:href>{h}</d:href>" for h in hrefs)
                + f"</c:{report}-multiget>")
        status, out = self.request("REPORT", path, body, depth="1")
        assert status == 207, (status, out[:300])
        return _responses(out)

    def sync(self, path: str, token: str = "") -> tuple[int, str, dict[str, tuple[int, str]]]:
        """(status, new token, href -> (status, etag)) of a sync-collection from ``token``."""
        body = ('<?xml version="1.0"?><d:sync-collection xmlns:d="DAV:"><d:sync-token>' + token
                + '</d:sync-token><d:sync-level>1</d:sync-level><d:prop><d:getetag/></d:prop></d:sync-collection>')
        status, out = self.request("REPORT", path, body, depth="1")
        if status != 207:
            return status, "", {"error": (status, out.decode(errors="replace"))}
        m = re.search(rb"sync-token>([^<]+)<", out)
        assert m, out[:300]
        return status, m.group(1).decode(), _responses(out)


def _responses(out: bytes) -> dict[str, tuple[int, str]]:
    """href -> (status, etag) of a multistatus: the response's own status (a 404), else its propstat's."""
    result = {}
    for resp in ET.fromstring(out).iter(f"{DAV_NS}response"):  # noqa: S314 (the in-process server's answer)
        href = resp.findtext(f"{DAV_NS}href") or ""
        status_text = resp.findtext(f"{DAV_NS}status") or resp.findtext(f".//{DAV_NS}status") or "HTTP/1.1 0"
        result[href] = (int(status_text.split()[1]), resp.findtext(f".//{DAV_NS}getetag") or "")
    return result
