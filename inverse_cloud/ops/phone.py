"""Setting up a phone: the page at ``https://<domain>/`` and ``inverse-cloud phone`` in the terminal.

Both show the account's CardDAV/CalDAV URLs, a QR code with ``davx5://user@host/radicale/`` (DAVx5
opens it and asks for the password: the password is never in the QR code, the page or a log), and
what to type into Thunderbird. The page requires the account's own credentials, checked against the
htpasswd file with bcrypt in a small thread pool (good logins cached until the file changes).
"""

from __future__ import annotations

import asyncio
import hashlib
import html
import io
import logging
import os
import random
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import bcrypt
from aiohttp import web

from inverse_cloud.dav.users import BCRYPT_ROUNDS
from inverse_cloud.ops.ready import readiness, ready_line
from inverse_cloud.ops.status import basic_user, collections_of

__all__ = ["Account", "HomePage", "HtpasswdChecker", "PageState", "account", "page_state", "render_html",
           "render_terminal"]

log = logging.getLogger(__name__)

CACHE_TTL_S = 300.0
REALM = "inverse-cloud"


@dataclass(frozen=True)
class Account:
    user: str
    domain: str
    dav_root: str
    carddav: str
    caldav: str
    davx5_link: str
    carddavs_link: str
    caldavs_link: str


def account(user: str, domain: str, port: int = 443) -> Account:
    """The URLs for ``user`` (pure). ``port`` is the public HTTPS port (443 behind the relay)."""
    host = domain if port == 443 else f"{domain}:{port}"
    u = quote(user, safe="")
    root = f"https://{host}/radicale/"
    return Account(
        user=user, domain=domain, dav_root=root,
        carddav=f"{root}{u}/contacts/", caldav=f"{root}{u}/calendar/",
        # DAVx5 maps davx5:// to https and takes the user name from the userinfo.
        davx5_link=f"davx5://{u}@{host}/radicale/",
        carddavs_link=f"carddavs://{u}@{host}/radicale/", caldavs_link=f"caldavs://{u}@{host}/radicale/",
    )


@dataclass(frozen=True)
class PageState:
    """What the home page shows about the running server, for one signed-in user."""

    relay_enabled: bool
    ready: str                                   # the shared "ready for phones: ..." line
    devices: list[tuple[str, str]] = field(default_factory=list)   # (user agent, last sync, UTC ISO)
    cert_until: str = ""
    cert_self_signed: bool = True
    next_renewal: str = ""
    tunnel_state: str = ""
    tunnel_since: str = ""


def page_state(doc: Mapping[str, Any], user: str) -> PageState:
    """The page's view of a status document (see :func:`inverse_cloud.ops.status.snapshot`), with only
    ``user``'s own devices (pure)."""
    cert = doc.get("certificate") or {}
    served = cert.get("served") or {}
    manager = cert.get("manager") or {}
    tunnel = doc.get("tunnel") or {}
    devices = [(str(c.get("user_agent", "-")), str(c.get("last_seen", "")))
               for c in doc.get("clients") or [] if c.get("user") == user]
    return PageState(
        relay_enabled=bool((doc.get("relay") or {}).get("enabled")), ready=ready_line(*readiness(doc)),
        devices=devices, cert_until=str(served.get("not_after", "")),
        cert_self_signed=bool(served.get("self_signed", True)), next_renewal=str(manager.get("next_renewal", "")),
        tunnel_state=str(tunnel.get("state", "")), tunnel_since=str(tunnel.get("connected_since") or ""))


def _state_html(state: PageState) -> str:
    e = html.escape
    rows = "".join(f"<tr><td>{e(agent)}</td><td>{e(seen)}</td></tr>\n" for agent, seen in state.devices)
    devices = (f"<table id=\"devices\"><tr><th>Device (user agent)</th><th>Last sync (UTC)</th></tr>\n{rows}"
               "</table>" if rows else "<p id=\"devices\">No device of yours has synced since the server "
               "started.</p>")
    kind = "self-signed (phones will not trust it)" if state.cert_self_signed else "from the CA"
    cert = f"{kind}, valid until {e(state.cert_until) or 'unknown'}"
    if state.next_renewal:
        cert += f"; next renewal {e(state.next_renewal)}"
    if not state.relay_enabled:
        tunnel = "no relay configured"
    elif state.tunnel_state.lower() == "up" and state.tunnel_since:
        tunnel = f"up since {e(state.tunnel_since)}"
    else:
        tunnel = e(state.tunnel_state or "not started")
    return f"""<h2>State</h2>
<p id="ready"><strong>{e(state.ready)}</strong></p>
<ul>
<li>Certificate: <span id="cert">{cert}</span></li>
<li>Tunnel to the relay: <span id="tunnel">{tunnel}</span></li>
</ul>
<h3>Your devices</h3>
{devices}
"""


def qr_svg(data: str) -> str:
    import segno  # imported on first use: ~1 MiB the server need not carry until someone opens the page

    return str(segno.make(data, error="m").svg_inline(scale=6, title="DAVx5 set-up link", border=4))


def render_html(acct: Account, collections: list[dict[str, Any]] | None = None,
                state: PageState | None = None) -> str:
    """The phone page (pure). Everything shown is escaped; no script, no external resource. ``state``
    (None: not known) adds the ready line, certificate, tunnel and the user's devices."""
    e = html.escape
    if state is None:
        note = "Your contacts and your password are decrypted on the machine that serves this page and nowhere else."
    elif state.relay_enabled:
        note = ("The relay in front of this laptop forwards encrypted bytes only: this page, your contacts and "
                "your password are decrypted on the laptop and nowhere else.")
    else:
        note = ("No relay is configured: this machine serves this page itself, with a self-signed certificate, "
                "and a phone elsewhere cannot reach it. <code>inverse-cloud setup</code> adds a relay.")
    rows = ""
    for c in collections or []:
        url = f"{acct.dav_root}{quote(acct.user, safe='')}/{quote(c['collection'], safe='')}/"
        rows += (f"<tr><td>{e(c['name'])}</td><td>{e(c['type'])}</td><td>{int(c['items'])}</td>"
                 f"<td><code>{e(url)}</code></td></tr>\n")
    table = (f"<table><tr><th>Name</th><th>Type</th><th>Items</th><th>URL</th></tr>\n{rows}</table>"
             if rows else "<p>No collections yet: they are created at the first login.</p>")
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>inverse-cloud: set up {e(acct.user)}'s phone</title>
<style>
body {{ font-family: system-ui, sans-serif; max-width: 46rem; margin: 1.5rem auto; padding: 0 1rem; color: #222; }}
code {{ background: #f2f2f2; padding: .1rem .3rem; word-break: break-all; }}
.qr {{ text-align: center; margin: 1rem 0; }} .qr svg {{ max-width: 16rem; height: auto; }}
table {{ border-collapse: collapse; width: 100%; }} td, th {{ border-bottom: 1px solid #ddd; padding: .3rem;
text-align: left; }}
h2 {{ margin-top: 2rem; }} .note {{ color: #555; font-size: .9rem; }}
</style></head><body>
<h1>Contacts and calendars for <span id="user">{e(acct.user)}</span></h1>
<p>Server: <code id="dav-root">{e(acct.dav_root)}</code> &mdash; user name <code>{e(acct.user)}</code>
and your password.</p>

<h2>Android (DAVx5)</h2>
<div class="qr" id="qr">{qr_svg(acct.davx5_link)}</div>
<p>Scan this with a QR scanner (for example Binary Eye); it opens DAVx5 with the server and user name
filled in, and DAVx5 asks for your password. On the phone itself, tap:
<a id="davx5-link" href="{e(acct.davx5_link)}">{e(acct.davx5_link)}</a>.</p>
<p class="note">By hand: DAVx5 &rarr; + &rarr; <em>Login with URL and user name</em> &rarr; base URL
<code>{e(acct.dav_root)}</code>. Links for other apps:
<a href="{e(acct.carddavs_link)}">{e(acct.carddavs_link)}</a> (contacts),
<a href="{e(acct.caldavs_link)}">{e(acct.caldavs_link)}</a> (calendars).</p>

<h2>Thunderbird</h2>
<ol>
<li>Address book: <em>Address Book &rarr; New Address Book &rarr; Add CardDAV Address Book</em>.
User name <code>{e(acct.user)}</code>, location <code id="carddav">{e(acct.carddav)}</code>.</li>
<li>Calendar: <em>Calendar &rarr; New Calendar &rarr; On the Network</em>. User name <code>{e(acct.user)}</code>,
location <code id="caldav">{e(acct.caldav)}</code>.</li>
</ol>
<p class="note">Typing just <code>{e(acct.domain)}</code> also works: the server answers the
<code>/.well-known/carddav</code> and <code>/.well-known/caldav</code> discovery requests.</p>

{_state_html(state) if state is not None else ""}
<h2>Your collections</h2>
{table}
<p class="note" id="where">{note}</p>
</body></html>
"""


def render_terminal(acct: Account) -> str:
    """``inverse-cloud phone``: the same information for a terminal, with the QR code drawn in text."""
    out = io.StringIO()
    import segno

    segno.make(acct.davx5_link, error="m").terminal(out=out, compact=True, border=2)
    return "\n".join([
        f"Phone set-up for {acct.user} ({acct.domain})",
        "",
        "Android, DAVx5: scan this with a QR scanner (e.g. Binary Eye); DAVx5 opens and asks for the password.",
        out.getvalue().rstrip("\n"),
        f"  link: {acct.davx5_link}",
        f"  by hand: DAVx5 -> + -> Login with URL and user name -> {acct.dav_root}",
        "",
        "Thunderbird:",
        f"  address book: New Address Book -> Add CardDAV Address Book, user {acct.user}, location {acct.carddav}",
        f"  calendar:     New Calendar -> On the Network, user {acct.user}, location {acct.caldav}",
        "",
        f"Other apps: server {acct.dav_root}, user {acct.user}, your password "
        f"(or {acct.carddavs_link} / {acct.caldavs_link}).",
        f"The same page, with the QR code, is at https://{acct.domain}/ (log in as {acct.user}).",
    ])


class HtpasswdChecker:
    """Checks Basic credentials against the htpasswd file Radicale uses (bcrypt entries only).

    bcrypt runs in its own two-thread pool, never on the event loop and never in Radicale's pool.
    Good credentials are cached (by a hash of user and password) for ``CACHE_TTL_S`` or until the
    file's size or mtime changes (``user passwd``/``remove`` take effect at once).
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix="page-auth")
        self._good: dict[str, float] = {}
        self._stamp: tuple[int, int] | None = None
        self._dummy: str | None = None   # made on first use, in a worker thread (bcrypt's ~0.2 s)

    def _file_stamp(self) -> tuple[int, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (st.st_size, st.st_mtime_ns)

    def _hash_of(self, user: str) -> str | None:
        try:
            text = self.path.read_text(encoding="utf-8")
        except OSError:
            return None
        for line in text.splitlines():
            name, sep, hashed = line.partition(":")
            if sep and name == user and hashed.startswith("$2"):
                return hashed.strip()
        return None

    def _dummy_hash(self) -> str:
        if self._dummy is None:
            self._dummy = bcrypt.hashpw(os.urandom(16).hex().encode(), bcrypt.gensalt(BCRYPT_ROUNDS)).decode()
        return self._dummy

    def _check_sync(self, user: str, password: str) -> bool:
        """One bcrypt check whatever the user: against a dummy hash of the same cost when the user is
        unknown (or has no bcrypt entry), and one way out for every failure, so the time taken does
        not tell which user names exist."""
        hashed = self._hash_of(user)
        try:
            matches = bool(bcrypt.checkpw(password.encode("utf-8"), (hashed or self._dummy_hash()).encode("ascii")))
        except (ValueError, UnicodeError):
            matches = False
        return matches and hashed is not None

    async def check(self, user: str, password: str) -> bool:
        stamp = self._file_stamp()
        if stamp != self._stamp:
            self._good.clear()
            self._stamp = stamp
        key = hashlib.sha256(f"{user}\0{password}".encode("utf-8", "surrogateescape")).hexdigest()
        now = time.monotonic()
        if self._good.get(key, 0) > now:
            return True
        loop = asyncio.get_running_loop()
        ok = await loop.run_in_executor(self.executor, self._check_sync, user, password)
        if ok:
            self._good[key] = now + CACHE_TTL_S
        return ok

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)


def _credentials(header: str) -> tuple[str, str] | None:
    import base64
    import binascii

    user = basic_user(header)
    if user is None:
        return None
    try:
        decoded = base64.b64decode(header[6:].strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeError, ValueError):
        return None
    return user, decoded.partition(":")[2]


class HomePage:
    """The authenticated phone page, used as ``DavServer.home_handler``; also a component so its
    thread pool is shut down with the server."""

    name = "phone-page"

    def __init__(self, domain: str, htpasswd: Path, storage_dir: Path, auth_delay_s: float = 1.0,
                 public_port: int = 443, status: Callable[[], Mapping[str, Any]] | None = None) -> None:
        self.domain = domain
        # The running server's status document (cheap, no file access); None: the page shows no state.
        # Not named ``status``: the supervisor's status reporting calls every component's status(), and the
        # page's source is that very report (it would recurse).
        self.state_source = status
        self.checker = HtpasswdChecker(htpasswd)
        self.storage_dir = storage_dir
        self.auth_delay_s = auth_delay_s
        self.public_port = public_port

    async def start(self) -> None:
        return None

    async def aclose(self) -> None:
        self.checker.close()

    def _unauthorized(self, text: str) -> web.Response:
        return web.Response(status=401, text=text, headers={
            "WWW-Authenticate": f'Basic realm="{REALM}", charset="UTF-8"', "Cache-Control": "no-store"})

    async def __call__(self, request: web.Request) -> web.StreamResponse:
        header = request.headers.get("Authorization", "")
        creds = _credentials(header) if header else None
        if creds is None:
            if header:
                await self._delay()
            return self._unauthorized("log in with your DAV user name and password\n")
        user, password = creds
        try:
            ok = await self.checker.check(user, password)
        except RuntimeError:  # the checker's pool is shut down: the server is stopping
            return web.Response(status=503, text="shutting down\n", headers={"Retry-After": "30"})
        if not ok:
            log.info("phone page: failed login for user %r", user[:64])
            await self._delay()
            return self._unauthorized("wrong user name or password\n")
        loop = asyncio.get_running_loop()
        all_colls = await loop.run_in_executor(None, collections_of, self.storage_dir)
        state = page_state(self.state_source(), user) if self.state_source is not None else None
        body = render_html(account(user, self.domain, self.public_port), all_colls.get(user, []), state)
        return web.Response(text=body, content_type="text/html", charset="utf-8", headers={
            # No script, no external load: the SVG is inline, styles are inline.
            "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; img-src data:; "
                                       "frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
            "Cache-Control": "no-store", "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
            "X-Frame-Options": "DENY"})

    async def _delay(self) -> None:
        if self.auth_delay_s > 0:
            await asyncio.sleep(self.auth_delay_s * (0.5 + random.random()))
