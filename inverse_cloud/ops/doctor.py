"""``inverse-cloud doctor``: walk the path a phone takes and name the first broken link, with the fix.

The chain, in order (each link is a function returning a :class:`Check`; the walk stops at the first
failure and lists the rest as not checked)::

    config valid -> keys' permissions -> DNS points at the relay -> relay reachable, host key matches
    -> server running -> forwards bound -> public HTTP reaches this process (probe token)
    -> public HTTPS presents *our* key (nobody in between terminates TLS) and a trusted chain
    -> each AAAA record leads there too (ops/doctor_v6.py)
    -> DAV asks for authentication -> CAA pins our ACME account

Tests (and users debugging DNS) can override name resolution like curl: ``--resolve HOST:ADDR`` answers
DNS, ``--connect-to HOST:PORT:ADDR:PORT`` redirects the public probes.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import socket
import ssl
import stat
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from inverse_cloud import config as config_mod
from inverse_cloud.config import Config
from inverse_cloud.errors import ConfigError
from inverse_cloud.ops import doctor_v6
from inverse_cloud.ops.dns_records import dns_records
from inverse_cloud.ops.doctor_options import DoctorOptions, parse_connect_to, parse_resolve
from inverse_cloud.ops.netprobe import describe, dns_addresses, http_request, spki_sha256_of_cert

__all__ = ["Check", "DoctorOptions", "Report", "dns_records", "format_report", "parse_connect_to",
           "parse_resolve", "run_doctor"]

HEALTHY_TUNNEL_STATES = frozenset({"up", "connected", "ready"})


@dataclass
class Check:
    name: str
    state: str  # ok | fail | warn | skip | not checked
    detail: str = ""
    fix: str = ""


@dataclass
class Report:
    checks: list[Check] = field(default_factory=list)
    records: list[str] = field(default_factory=list)
    config_ok: bool = True
    ready: str = ""  # the shared "ready for phones: ..." line

    @property
    def first_broken(self) -> Check | None:
        return next((c for c in self.checks if c.state == "fail"), None)

    @property
    def exit_code(self) -> int:
        if not self.config_ok:
            return 2
        return 1 if any(c.state in ("fail", "warn") for c in self.checks) else 0

    def as_dict(self) -> dict[str, Any]:
        broken = self.first_broken
        return {"ok": self.exit_code == 0, "first_broken": broken.name if broken else None,
                "checks": [c.__dict__ for c in self.checks], "dns_records": self.records, "ready": self.ready}


# --- helpers ------------------------------------------------------------------------------------------

class _Ctx:
    def __init__(self, path: Path, opts: DoctorOptions) -> None:
        self.path = path
        self.opts = opts
        self.cfg: Config | None = None
        self.status: dict[str, Any] | None = None
        self.relay_addrs: list[str] = []

    async def resolve(self, host: str) -> list[str]:
        """Addresses of ``host``: ``--resolve`` overrides, else ``[acme] dns_server``, else the system."""
        override = self.opts.resolve.get(host.lower().rstrip("."))
        if override:
            return list(override)
        # A literal address is its own answer; anything else is a name for the resolver (inet_pton would
        # raise OSError, not ValueError, on a name: every real relay host).
        with contextlib.suppress(ValueError):
            return [str(ipaddress.ip_address(host.strip("[]")))]
        assert self.cfg is not None
        loop = asyncio.get_running_loop()
        if self.cfg.acme.dns_server is not None:
            return await loop.run_in_executor(None, dns_addresses, host, self.cfg.acme.dns_server)
        infos = await loop.getaddrinfo(host, None, type=socket.SOCK_STREAM)
        return sorted({str(i[4][0]) for i in infos})

    async def public_target(self, port: int) -> tuple[str, int]:
        assert self.cfg is not None
        domain = self.cfg.server.domain
        mapped = self.opts.connect_to.get((domain, port))
        if mapped is not None:
            return mapped
        addrs = await self.resolve(domain)
        if not addrs:
            raise OSError(f"{domain} has no address")
        return addrs[0], port


def _account_uri(cfg: Config) -> str:
    try:
        meta = json.loads((cfg.acme.account_dir / "account.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return ""
    uri = (meta.get("accounts") or {}).get(cfg.acme.directory, "")
    return uri if isinstance(uri, str) else ""


# --- the links ----------------------------------------------------------------------------------------

async def check_config(ctx: _Ctx) -> Check:
    try:
        ctx.cfg = config_mod.load(ctx.path)
    except ConfigError as exc:
        return Check("config", "fail", str(exc), f"correct {ctx.path} (or run `inverse-cloud init`)")
    return Check("config", "ok", f"{ctx.path} is valid")


def _mode_problem(path: Path, want: int, is_dir: bool) -> str | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o077:
        return f"{'folder' if is_dir else 'file'} {path} has mode {mode:04o}; run: chmod {want:o} {path}"
    return None


async def check_keys(ctx: _Ctx) -> Check:
    from inverse_cloud.fsutil import access_problem

    cfg = ctx.cfg
    assert cfg is not None
    s = cfg.server
    for folder, what in ((s.data_dir, "the data folder"), (s.state_dir, "the state folder")):
        problem = access_problem(folder, what)
        if problem:
            return Check("keys' permissions", "fail", problem, "")
    dirs = [s.data_dir, cfg.relay.key_file.parent, cfg.acme.account_dir]
    files = [cfg.relay.key_file, cfg.relay.takeover_key_file, s.htpasswd_path]
    if cfg.path is not None:
        files.append(cfg.path)
    if cfg.acme.account_dir.is_dir():
        files += [p for p in sorted(cfg.acme.account_dir.iterdir()) if p.is_file()]
    if s.cert_dir.is_dir():
        tls_keys = sorted(s.cert_dir.glob("*/privkey.pem")) + sorted(s.cert_dir.glob("live/*/privkey.pem"))
        files += tls_keys
        dirs += sorted({k.parent for k in tls_keys})
    for d in dirs:
        problem = _mode_problem(d, 0o700, True)
        if problem:
            return Check("keys' permissions", "fail", problem, f"chmod 700 {d}")
    for f in files:
        problem = _mode_problem(f, 0o600, False)
        if problem:
            return Check("keys' permissions", "fail", problem, f"chmod 600 {f}")
    if cfg.relay.enabled and not cfg.relay.key_file.exists():
        return Check("keys' permissions", "fail", f"no SSH key at {cfg.relay.key_file}",
                     "run `inverse-cloud init --force` or set [relay] key_file")
    return Check("keys' permissions", "ok", f"{len(files)} secret file(s) are 0600 in 0700 folders")


async def check_dns(ctx: _Ctx) -> Check:
    cfg = ctx.cfg
    assert cfg is not None
    if not cfg.relay.enabled:
        from inverse_cloud.ops.ready import is_loopback

        host, port = cfg.server.https_listen
        if is_loopback(f"{host}:{port}"):
            return Check("DNS", "skip", f"no relay configured, and the server listens on {host}:{port}: only "
                         "this machine can reach it, no phone can", "add a relay: inverse-cloud setup")
        return Check("DNS", "skip", f"no relay configured: only devices on this network reach {host}:{port}, "
                     "and they get a self-signed certificate", "add a relay: inverse-cloud setup")
    domain = cfg.server.domain
    try:
        relay = await ctx.resolve(cfg.relay.host)
    except OSError as exc:
        if isinstance(exc, socket.gaierror) and exc.errno == socket.EAI_AGAIN:
            # no answer at all (not "no such name"): this machine is offline or its resolver is down
            return Check("DNS", "fail", f"no DNS answer for the relay host {cfg.relay.host} ({describe(exc)})",
                         "is this machine online? check its network connection and DNS resolver")
        return Check("DNS", "fail", f"the relay host {cfg.relay.host} does not resolve ({describe(exc)})",
                     "check [relay] host in the config")
    ctx.relay_addrs = relay
    try:
        addrs = await ctx.resolve(domain)
    except OSError as exc:
        addrs, why = [], describe(exc)
    else:
        why = "no A/AAAA record"
    want = ", ".join(relay)
    if not addrs:
        return Check("DNS", "fail", f"{domain} does not resolve ({why})",
                     f"add a DNS record: {domain}. A {relay[0] if relay else '<relay address>'}")
    if not set(addrs) & set(relay):
        return Check("DNS", "fail", f"{domain} points at {', '.join(addrs)}, but the relay is {want}",
                     f"change the A/AAAA record of {domain} to {want} (and wait for the old TTL)")
    stray = sorted(set(addrs) - set(relay))
    if stray:
        return Check("DNS", "fail", f"{domain} points at {', '.join(addrs)}; {', '.join(stray)} is not the relay "
                     f"({want}), so some phones go elsewhere", f"remove the records for {', '.join(stray)}")
    return Check("DNS", "ok", f"{domain} -> {', '.join(addrs)} (the relay)")


def _pinned_keys(cfg: Config) -> list[str]:
    keys = []
    if cfg.relay.host_key:
        keys.append(" ".join(cfg.relay.host_key.split()[:2]))
    try:
        for line in cfg.relay.known_hosts_path.read_text(encoding="utf-8").splitlines():
            parts = line.split()
            if len(parts) >= 3 and not line.startswith("#"):
                keys.append(f"{parts[1]} {parts[2]}")
    except OSError:
        pass
    return keys


def _fingerprint(openssh_line: str) -> str:
    import asyncssh

    try:
        return str(asyncssh.import_public_key(openssh_line).get_fingerprint("sha256"))
    except (asyncssh.KeyImportError, ValueError):
        return openssh_line[:30]


async def check_relay(ctx: _Ctx) -> Check:
    import asyncssh

    cfg = ctx.cfg
    assert cfg is not None
    if not cfg.relay.enabled:
        return Check("relay", "skip", "no relay configured")
    where = f"{cfg.relay.host}:{cfg.relay.port}"
    pinned = _pinned_keys(cfg)
    # Ask for the key type we pinned: a server with several host keys would otherwise pick its favourite.
    algs = sorted({p.split()[0] for p in pinned}) or ()
    try:
        key = await asyncio.wait_for(asyncssh.get_server_host_key(
            cfg.relay.host, cfg.relay.port, config=None, server_host_key_algs=algs), ctx.opts.timeout_s)
    except (OSError, TimeoutError, asyncssh.Error) as exc:
        return Check("relay", "fail", f"relay {where} is unreachable ({describe(exc)})",
                     "is the VPS up, sshd running and its port open? (try: ssh -p "
                     f"{cfg.relay.port} {cfg.relay.user}@{cfg.relay.host})")
    if key is None:
        return Check("relay", "fail", f"relay {where} sent no host key", "check the relay's sshd")
    got = key.export_public_key("openssh").decode().split()
    got_line = f"{got[0]} {got[1]}"
    if not pinned:
        return Check("relay", "fail", f"no host key pinned for relay {where}",
                     "run `inverse-cloud relay-setup` (it pins the relay's host key)")
    if got_line not in pinned:
        return Check("relay", "fail", f"relay host key changed: expected {_fingerprint(pinned[0])}, got "
                     f"{_fingerprint(got_line)}",
                     "if you rebuilt the relay: inverse-cloud relay-setup --accept-new-host-key; otherwise "
                     "someone may be impersonating it: do not connect")
    return Check("relay", "ok", f"relay {where} answers with the pinned host key {_fingerprint(got_line)}")


async def check_running(ctx: _Ctx) -> Check:
    from inverse_cloud.ops.control import ControlError, NotRunning, ask_async

    cfg = ctx.cfg
    assert cfg is not None
    try:
        ctx.status = await ask_async(cfg.server.control_socket, "status", timeout_s=ctx.opts.timeout_s)
    except NotRunning as exc:
        return Check("server running", "fail", str(exc),
                     "start it: systemctl --user start inverse-cloud (or inverse-cloud serve)")
    except ControlError as exc:
        return Check("server running", "fail", str(exc), "see: journalctl --user -u inverse-cloud")
    assert ctx.status is not None
    return Check("server running", "ok", f"pid {ctx.status.get('pid')}, up {ctx.status.get('uptime_s')} s")


async def check_forwards(ctx: _Ctx) -> Check:
    cfg = ctx.cfg
    assert cfg is not None and ctx.status is not None
    if not cfg.relay.enabled:
        return Check("forwards bound", "skip", "no relay configured")
    tunnel = ctx.status.get("tunnel")
    if not tunnel:
        return Check("forwards bound", "fail", "the running server reports no tunnel",
                     "restart it after configuring [relay] (systemctl --user restart inverse-cloud)")
    state = str(tunnel.get("state", "unknown"))
    if state.lower() not in HEALTHY_TUNNEL_STATES:
        err = tunnel.get("last_error") or "no error recorded"
        return Check("forwards bound", "fail", f"tunnel is {state}: {err}",
                     "see `inverse-cloud status`; the tunnel retries by itself, the error says what blocks it")
    forwards = tunnel.get("forwards") or []
    unbound = [f for f in forwards if isinstance(f, dict) and f.get("bound") is False]
    if unbound:
        names = ", ".join(f"{f.get('relay_host', '')}:{f.get('relay_port')}" for f in unbound)
        return Check("forwards bound", "fail", f"the relay did not bind {names}: {tunnel.get('last_error') or ''}",
                     "check permitlisten for these ports in the relay's authorized_keys (relay-setup renders it)")
    shown = ", ".join(f"{f.get('name')} relay {f.get('relay_host', '')}:{f.get('relay_port')} -> local "
                      f"{f.get('local_port')}" for f in forwards if isinstance(f, dict))
    return Check("forwards bound", "ok", f"tunnel {state}" + (f": {shown}" if shown else ""))


async def check_public_http(ctx: _Ctx) -> Check:
    from inverse_cloud.ops.control import ControlError, ask_async

    cfg = ctx.cfg
    assert cfg is not None
    domain = cfg.server.domain
    if cfg.acme.challenge == "tls-alpn-01":
        return Check("public HTTP", "skip", "[acme] challenge = tls-alpn-01: the CA validates on port 443 only")
    try:
        probe = await ask_async(cfg.server.control_socket, "probe", timeout_s=ctx.opts.timeout_s)
        target = await ctx.public_target(80)
        status, _h, body, _ = await http_request(target, domain, "GET", f"/.well-known/acme-challenge/{probe['token']}",
                                          ctx.opts.timeout_s)
    except ControlError as exc:
        return Check("public HTTP", "fail", str(exc), "see: journalctl --user -u inverse-cloud")
    except (OSError, TimeoutError) as exc:
        check = Check("public HTTP", "fail", f"http://{domain}/ does not answer ({describe(exc)})",
                      "the relay must forward its port 80 to the tunnel's HTTP port: re-run the NAT part of "
                      "`inverse-cloud relay-setup` on the relay")
    else:
        if status == 200 and body.strip() == str(probe["value"]).encode():
            return Check("public HTTP", "ok", f"http://{domain}/ reaches this process (probe token answered)")
        check = Check("public HTTP", "fail", f"http://{domain}/.well-known/acme-challenge/<probe> answered {status} "
                      "without our probe token: something else answers on the relay's port 80",
                      "stop the other web server on the relay, or forward only /.well-known/acme-challenge/ "
                      "to the tunnel (relay-setup prints the snippet)")
    if cfg.acme.challenge == "auto":
        # Not a warning: "auto" is the setting for a relay whose port 80 is closed (a provider's firewall), and
        # telling that user to forward port 80 sends them after what they cannot and need not change. If
        # TLS-ALPN-01 fails too, no certificate is issued and "public HTTPS" says so.
        return Check("public HTTP", "skip", f"{check.detail}: [acme] challenge = auto, so the CA validates with "
                     "TLS-ALPN-01 on port 443 (port 80 is not needed)")
    return check


async def check_public_https(ctx: _Ctx) -> Check:
    cfg = ctx.cfg
    assert cfg is not None and ctx.status is not None
    domain = cfg.server.domain
    ours = (ctx.status.get("certificate") or {}).get("key_sha256", "")
    no_verify = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    no_verify.check_hostname = False
    no_verify.verify_mode = ssl.CERT_NONE
    try:
        target = await ctx.public_target(443)
        _s, _h, _b, der = await http_request(target, domain, "HEAD", "/", ctx.opts.timeout_s, tls=no_verify)
    except (OSError, TimeoutError, ssl.SSLError) as exc:
        return Check("public HTTPS", "fail", f"https://{domain}/ does not answer ({describe(exc)})",
                     "the relay must forward its port 443 to the tunnel's HTTPS port (relay-setup's NAT rules)")
    if der is None:
        return Check("public HTTPS", "fail", f"https://{domain}/ presented no certificate", "")
    theirs = spki_sha256_of_cert(der)
    if ours and theirs != ours:
        return Check("public HTTPS", "fail", f"https://{domain}/ presents a certificate whose key is not ours "
                     f"(sha256 {theirs[:16]}…, ours {ours[:16]}…): something between the phone and this laptop "
                     "terminates TLS", "check DNS and the relay's forwarding; do not sync until this is fixed")
    verify = ssl.create_default_context(cafile=str(ctx.opts.cafile) if ctx.opts.cafile else None)
    try:
        await http_request(target, domain, "HEAD", "/", ctx.opts.timeout_s, tls=verify)
    except ssl.SSLCertVerificationError as exc:
        served = (ctx.status.get("certificate") or {}).get("served") or {}
        fix = ("no certificate from the CA yet: see `inverse-cloud status` for the last ACME error"
               if served.get("self_signed") else "see `inverse-cloud status` for the certificate and ACME state")
        return Check("public HTTPS", "fail", f"https://{domain}/ presents our key, but phones will not trust it "
                     f"({exc.verify_message or exc.reason})", fix)
    except (OSError, TimeoutError, ssl.SSLError) as exc:
        return Check("public HTTPS", "fail", f"https://{domain}/ failed on the second connection "
                     f"({describe(exc)})", "")
    return Check("public HTTPS", "ok", f"https://{domain}/ presents our key (sha256 {theirs[:16]}…) with a "
                 "trusted chain: nobody in between terminates TLS")


async def check_public_https6(ctx: _Ctx) -> Check:
    assert ctx.cfg is not None and ctx.status is not None
    v = await doctor_v6.check_https6(ctx.cfg, ctx.status, ctx.resolve, ctx.relay_addrs, ctx.opts)
    return Check(doctor_v6.NAME, v.state, v.detail, v.fix)


async def check_dav(ctx: _Ctx) -> Check:
    cfg = ctx.cfg
    assert cfg is not None
    domain = cfg.server.domain
    verify = ssl.create_default_context(cafile=str(ctx.opts.cafile) if ctx.opts.cafile else None)
    try:
        target = await ctx.public_target(443)
        status, hdrs, _b, _ = await http_request(target, domain, "PROPFIND", "/radicale/", ctx.opts.timeout_s,
                                                 tls=verify, headers={"Depth": "0"})
        wk_status, wk_hdrs, _b2, _ = await http_request(target, domain, "PROPFIND", "/.well-known/carddav",
                                                 ctx.opts.timeout_s, tls=verify, headers={"Depth": "0"})
    except (OSError, TimeoutError, ssl.SSLError) as exc:
        return Check("DAV", "fail", f"PROPFIND https://{domain}/radicale/ failed ({describe(exc)})", "")
    if status != 401 or "basic" not in hdrs.get("www-authenticate", "").lower():
        return Check("DAV", "fail", f"PROPFIND /radicale/ without credentials answered {status}, not 401 with "
                     "Basic authentication", "see: journalctl --user -u inverse-cloud")
    if wk_status not in (301, 308) or not wk_hdrs.get("location", "").endswith("/radicale/"):
        return Check("DAV", "fail", f"/.well-known/carddav answered {wk_status}, not a redirect to /radicale/",
                     "something other than inverse-cloud answers on https")
    return Check("DAV", "ok", "PROPFIND /radicale/ asks for credentials (401 Basic); /.well-known/carddav "
                 "redirects to /radicale/")


async def check_caa(ctx: _Ctx) -> Check:
    from inverse_cloud.certs.caa import issuer_domain_for, lookup_caa, recommended_record

    cfg = ctx.cfg
    assert cfg is not None
    if not cfg.relay.enabled or not cfg.acme.enabled:
        return Check("CAA", "skip", "no relay or no ACME: nobody else can pass a challenge for this name")
    issuer = issuer_domain_for(cfg.acme.directory, cfg.acme.caa_issuer)
    account = _account_uri(cfg)
    if not account:
        return Check("CAA", "warn", "no ACME account yet, so no CAA record can be recommended",
                     "wait for the first certificate, then run doctor again")
    verdict = await lookup_caa(cfg.server.domain, issuer, account, cfg.acme.dns_server, method=cfg.acme.caa_methods)
    record = recommended_record(cfg.server.domain, issuer or "<issuer>", account, cfg.acme.caa_methods)
    if verdict.state == "ok":
        return Check("CAA", "ok", f"CAA pins our ACME account: the relay cannot get a certificate ({verdict.detail})")
    if verdict.state == "unknown":
        return Check("CAA", "warn", f"CAA could not be checked: {verdict.detail}", f"publish: {record}")
    return Check("CAA", "fail", f"CAA {verdict.state}: {verdict.detail}; the relay could obtain a certificate "
                 "for this name" if verdict.state != "blocks-us" else f"CAA {verdict.state}: {verdict.detail}",
                 f"publish: {record}")


CHAIN: list[Callable[[_Ctx], Awaitable[Check]]] = [
    check_config, check_keys, check_dns, check_relay, check_running, check_forwards, check_public_http,
    check_public_https, check_public_https6, check_dav, check_caa,
]
NAMES = ["config", "keys' permissions", "DNS", "relay", "server running", "forwards bound", "public HTTP",
         "public HTTPS", doctor_v6.NAME, "DAV", "CAA"]


async def run_doctor(path: Path, opts: DoctorOptions) -> Report:
    """Walk the chain; stop at the first failed link."""
    ctx = _Ctx(path, opts)
    report = Report()
    for i, link in enumerate(CHAIN):
        try:
            check = await link(ctx)
        except Exception as exc:  # boundary: a bug in one link must still produce a report
            check = Check(NAMES[i], "fail", f"check failed unexpectedly: {type(exc).__name__}: {exc}", "")
        report.checks.append(check)
        if check.state == "fail":
            if check.name == "config":
                report.config_ok = False
            report.checks += [Check(n, "not checked") for n in NAMES[i + 1:]]
            break
    from inverse_cloud.ops.ready import readiness, ready_line

    broken = report.first_broken
    if broken is not None:
        report.ready = ready_line(False, f"{broken.name}: {broken.detail}")
    else:
        report.ready = ready_line(*readiness(ctx.status))
    if ctx.cfg is not None and ctx.cfg.relay.enabled:
        if not ctx.relay_addrs:
            with contextlib.suppress(OSError):
                ctx.relay_addrs = await ctx.resolve(ctx.cfg.relay.host)
        report.records = dns_records(ctx.cfg, ctx.relay_addrs, _account_uri(ctx.cfg))
    return report


_MARK = {"ok": "ok  ", "fail": "FAIL", "warn": "warn", "skip": "skip", "not checked": " -- "}


def format_report(report: Report) -> str:
    lines = []
    for c in report.checks:
        lines.append(f"[{_MARK.get(c.state, c.state)}] {c.name}" + (f": {c.detail}" if c.detail else ""))
        if c.fix and c.state in ("fail", "warn"):
            lines.append(f"       fix: {c.fix}")
    broken = report.first_broken
    lines.append("")
    lines.append(f"first broken link: {broken.name}" if broken else
                 ("all links work" if report.exit_code == 0 else "all links work, with warnings"))
    if report.ready:
        lines.append(report.ready)
    if report.records:
        lines.append("")
        lines.append("DNS records for this set-up:")
        lines += [f"  {r}" for r in report.records]
    return "\n".join(lines)
