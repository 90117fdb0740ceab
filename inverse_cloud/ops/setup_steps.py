"""The steps of ``inverse-cloud setup`` (see :mod:`inverse_cloud.ops.setup`). Each takes the
:class:`Context`, does its work through the code the single commands use (``init``, ``relay-setup``,
``cert caa``, ``service install``, ``phone``), and returns the one line that says what it did; a step that
cannot finish raises :class:`SetupError` with what it saw and what to do, and a rerun starts there."""

from __future__ import annotations

import argparse
import contextlib
import io
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from inverse_cloud import config as config_mod
from inverse_cloud.config import Config
from inverse_cloud.errors import InverseCloudError
from inverse_cloud.ops.setup_dns import Nameserver, a_record_view, authoritative_servers, caa_view, wait_for
from inverse_cloud.tunnel import relay_files

if TYPE_CHECKING:
    from inverse_cloud.ops.setup import Lines
    from inverse_cloud.ops.setup_dnsapi import DnsApi

__all__ = ["ALWAYS", "RUN", "Context", "SetupError"]

POLL_S = 2.0          # between DNS queries / status questions while waiting
ALWAYS = frozenset({"phone"})   # shown on every run, even when done before


class SetupError(InverseCloudError):
    """A step could not finish; rerunning ``setup`` continues from it."""


@dataclass
class Context:
    args: argparse.Namespace
    cfg_path: Path
    answers: dict[str, str]
    password: str
    out: Lines
    interactive: bool
    ready: bool = False

    def cfg(self) -> Config:
        return config_mod.load(self.cfg_path)

    @property
    def relay_host(self) -> str:
        return self.answers["relay"].partition(":")[0]

    @property
    def relay_port(self) -> int:
        port = self.answers["relay"].partition(":")[2]
        return int(port) if port else 22

    def wait(self, view: Callable[[], tuple[bool, str]]) -> tuple[bool, str]:
        last = [""]

        def show(line: str) -> None:
            last[0] = line
            self.out.progress(line)

        ok = wait_for(view, self.args.wait, POLL_S, show, time.monotonic, time.sleep)  # CLI poll period
        self.out.end()
        return ok, last[0]


def _quiet(fn: Callable[[], Any]) -> tuple[Any, str]:
    """Run ``fn`` with its stdout captured (a step prints one line, not the command's whole output)."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        result = fn()
    return result, buf.getvalue()


# --- init --------------------------------------------------------------------------------------------

def step_init(ctx: Context) -> str:
    from inverse_cloud.ops.init import cmd_init
    from inverse_cloud.tunnel.commands import set_config_value

    a, args = ctx.answers, ctx.args
    ctx.cfg_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    with tempfile.NamedTemporaryFile("w", dir=ctx.cfg_path.parent, prefix=".pw-", encoding="utf-8") as pw:
        pw.write(ctx.password)
        pw.flush()
        ns = argparse.Namespace(
            config=str(ctx.cfg_path), data_dir=args.data_dir, state_dir=args.state_dir, domain=a["domain"],
            user=a["user"], password_file=pw.name, https_listen=args.https_listen, http_listen=args.http_listen,
            relay=f"{a['tunnel_user']}@{a['relay']}", acme_email=a["email"], acme_directory=args.acme_directory,
            acme_ca_bundle=args.acme_ca_bundle, non_interactive=True, force=False)
        _quiet(lambda: cmd_init(ns))
    text = ctx.cfg_path.read_text(encoding="utf-8")
    if args.staging:
        text = set_config_value(text, "acme", "staging", "true")
    if args.acme_caa_issuer:
        text = set_config_value(text, "acme", "caa_issuer", f'"{args.acme_caa_issuer}"')
    if args.dns_server:
        text = set_config_value(text, "acme", "dns_server", f'"{args.dns_server}"')
    config_mod.loads(text, ctx.cfg_path)
    ctx.cfg_path.write_text(text, encoding="utf-8")
    cfg = ctx.cfg()
    return (f"wrote {ctx.cfg_path}; DAV user {a['user']!r}; data in {cfg.server.data_dir}"
            + ("; ACME staging" if args.staging else ""))


# --- relay -------------------------------------------------------------------------------------------

def _relay_args(ctx: Context) -> argparse.Namespace:
    """The relay-setup arguments of the chosen variant (setup's defaults for the rest)."""
    a = ctx.answers
    return argparse.Namespace(client_alive_interval=15, client_alive_count_max=3, authorized_keys_file="",
                              nat=a.get("nat", "nft"), ipv6=a.get("ipv6") == "yes",
                              ssh_on_443=a.get("ssh_on_443") == "yes", proxy_protocol=False)


def _relay_flags(ns: argparse.Namespace) -> str:
    return "".join([f" --nat {ns.nat}" if ns.nat != "nft" else "", " --ipv6" if ns.ipv6 else "",
                    " --ssh-on-443" if ns.ssh_on_443 else ""])


# What a variant sets in [relay] when on, and the default it goes back to when turned off again (else the tunnel
# would ask the relay for a [::] forward, or expect PROXY headers or an sslh, that the new relay side lacks).
_OFF = (("fallback_port", 443, 0), ("listen_host6", "::", ""), ("proxy_protocol", True, False))


def relay_settings(cfg: Config, spec: relay_files.RelaySpec) -> dict[str, int | str | bool]:
    """The [relay] settings the relay side of ``spec`` expects: relay-setup's, plus the reset of what a variant
    that is off now had set (pure)."""
    from inverse_cloud.tunnel.commands import wanted_settings

    wanted = wanted_settings(spec)
    for key, on, default in _OFF:
        if key not in wanted and getattr(cfg.relay, key) == on:
            wanted[key] = default
    return wanted


def step_relay(ctx: Context) -> str:
    from inverse_cloud.tunnel.commands import (
        adopt_settings,
        apply_over_ssh,
        fetch_host_key,
        fingerprint,
        pin_host_key,
        settings_changes,
        spec_for,
    )

    cfg = ctx.cfg()
    admin = ctx.answers["relay_admin"]
    ns = _relay_args(ctx)
    flags = _relay_flags(ns)
    where = "" if ctx.cfg_path == config_mod.default_config_path() else f" --config {ctx.cfg_path}"
    done = (f"relay side left to you: `inverse-cloud relay-setup{where} --output DIR{flags}`, DIR/setup.sh on the "
            f"relay as root, then `inverse-cloud relay-setup{where} --adopt DIR`")
    if admin != "none":
        spec = spec_for(cfg, ns)
        script = relay_files.bundle(spec, ns.nat)["setup.sh"]
        ctx.out.progress(f"applying the relay side{flags} on {ctx.relay_host} as {admin} (over ssh)")
        try:
            _quiet(lambda: apply_over_ssh(f"{admin}@{ctx.relay_host}:{ctx.relay_port}", script))
        finally:
            ctx.out.end()
        # Only now that setup.sh succeeded there: the laptop's [relay] settings that go with it.
        changes = settings_changes(cfg, relay_settings(cfg, spec))
        _quiet(lambda: adopt_settings(cfg, changes))
        done = (f"relay side{flags} applied on {ctx.relay_host} as {admin} (tunnel login {cfg.relay.user})"
                + "".join(f"; [relay] {key} = {literal}" for key, literal in changes.items()))
    offered = fetch_host_key(cfg.relay.host, cfg.relay.port, cfg.relay.connect_timeout_s)
    pin_host_key(ctx.cfg(), offered, yes=ctx.args.yes or not ctx.interactive, accept_new=False)
    return f"{done}; host key {fingerprint(offered)} pinned"


# --- dns ---------------------------------------------------------------------------------------------

def relay_addresses(host: str) -> list[str]:
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except OSError as exc:
        from inverse_cloud.ops.netprobe import describe

        raise SetupError(f"the relay {host} does not resolve ({describe(exc)})") from None
    return sorted({str(i[4][0]) for i in infos})


def dns_api(ctx: Context) -> DnsApi | None:
    """The --dns provider (saved with the answers; the token is read from its file on every run)."""
    from inverse_cloud.ops.setup_dnsapi import DnsApi, parse_options, read_token

    provider = ctx.answers.get("dns", "")
    if not provider:
        return None
    options = parse_options([o for o in ctx.answers.get("dns_options", "").split("\n") if o])
    token_file = ctx.answers.get("dns_token_file", "")
    return DnsApi(provider, options, read_token(token_file) if token_file else "")


def _servers(ctx: Context, domain: str) -> list[Nameserver]:
    if ctx.args.dns_server:
        host, port = config_mod.parse_hostport(ctx.args.dns_server)
        return [Nameserver(host, host, port)]
    try:
        return authoritative_servers(domain)
    except OSError as exc:
        raise SetupError(str(exc)) from None


def step_dns(ctx: Context) -> str:
    from inverse_cloud.ops.dns_records import dns_records

    cfg = ctx.cfg()
    addresses = relay_addresses(cfg.relay.host)
    relay = [a for a in addresses if ":" not in a]
    if not relay:
        raise SetupError(f"the relay {cfg.relay.host} has no IPv4 address; the relay's NAT rules cover IPv4 only")
    # IPv6 only with --ipv6: without it the relay side covers IPv4, and a half-working AAAA record makes phones
    # on IPv6 fail now and then; an AAAA record seen at the servers is then reported as not the relay.
    relay6 = [a for a in addresses if ":" in a] if ctx.answers.get("ipv6") == "yes" else []
    if ctx.answers.get("ipv6") == "yes" and not relay6:
        raise SetupError(f"the relay {cfg.relay.host} has no IPv6 address (its name has no AAAA record); give it "
                         "one, or run `inverse-cloud setup --no-ipv6`")
    d = cfg.server.domain
    records = [r for r in dns_records(cfg, relay, "") if " A " in r] + [f"{d}. AAAA {a}" for a in relay6]
    api = dns_api(ctx)
    which = "(A and AAAA: the relay forwards IPv4 and IPv6)" if relay6 else \
        "(and no AAAA record: the relay forwards IPv4 only)"
    if api is not None:
        ctx.out.progress(f"creating {d} A {', '.join(relay)}{' AAAA ' if relay6 else ''}{', '.join(relay6)} "
                         f"through {api.provider}")
        api.replace(d, "A", relay)
        if relay6:
            api.replace(d, "AAAA", relay6)
        ctx.out.note(f"created at {api.provider} {which}:")
    else:
        ctx.out.note(f"publish at your DNS provider {which}:")
    for record in records:
        ctx.out.note(f"    {record}")
    servers = _servers(ctx, d)
    want = relay + relay6
    ctx.out.note(f"waiting until {', '.join(map(str, servers))} answer{'s' if len(servers) == 1 else ''} "
                 f"{d} with {', '.join(want)}")
    ok, seen = ctx.wait(lambda: a_record_view(d, servers, want, need_v6=bool(relay6)))
    if not ok:
        what = "A and AAAA records" if relay6 else "A record"
        raise SetupError(f"the {what} of {d} {'are' if relay6 else 'is'} not visible after {ctx.args.wait:g} s "
                         f"({seen}); publish {'them' if relay6 else 'it'}, then run `inverse-cloud setup` again")
    return f"{d} -> {', '.join(want)} at every authoritative server"


# --- ACME account and CAA ----------------------------------------------------------------------------

def _issuer_and_account(cfg: Config) -> tuple[str, str]:
    from inverse_cloud.certs.acme_client import AccountStore
    from inverse_cloud.certs.caa import issuer_domain_for

    issuer = issuer_domain_for(cfg.acme.directory, cfg.acme.caa_issuer)
    if not issuer:
        raise SetupError(f"the CAA issuer domain of {cfg.acme.directory} is not known: set [acme] caa_issuer "
                         "in the config (or give setup --acme-caa-issuer), then run setup again")
    return issuer, AccountStore(cfg.acme.account_dir).account_uri(cfg.acme.directory)


def _ensure_account(ctx: Context, cfg: Config) -> tuple[str, str]:
    """(issuer, account URI): the registered account, registered now when there is none (first run, or its
    file was removed since)."""
    from inverse_cloud.certs.commands import _acme_off, _register_account

    if not cfg.acme.enabled:
        raise _acme_off(cfg)
    issuer, account = _issuer_and_account(cfg)
    if not account:
        ctx.out.progress(f"registering an ACME account at {cfg.acme.directory}")
        with contextlib.redirect_stderr(io.StringIO()):
            account = _register_account(cfg)
        ctx.out.end()
    return issuer, account


def step_account(ctx: Context) -> str:
    return f"ACME account {_ensure_account(ctx, ctx.cfg())[1]}"


def step_caa(ctx: Context) -> str:
    """Print the CAA record (here, not in the account step: a rerun after Ctrl-C at this wait shows it
    again), then wait until every authoritative server has it."""
    from inverse_cloud.certs.caa import recommended_record

    cfg = ctx.cfg()
    issuer, account = _ensure_account(ctx, cfg)
    record = recommended_record(cfg.server.domain, issuer, account, cfg.acme.caa_methods)
    api = dns_api(ctx)
    if api is not None:
        ctx.out.progress(f"creating the CAA record of {cfg.server.domain} through {api.provider}")
        api.replace(cfg.server.domain, "CAA", [record.split(" CAA ", 1)[1]])
        ctx.out.note(f"created at {api.provider}: only this account may get certificates for the name, so the "
                     "relay cannot:")
    else:
        ctx.out.note("publish this CAA record too: only this account may get certificates for the name, so "
                     "the relay cannot:")
    ctx.out.note(f"    {record}")
    servers = _servers(ctx, cfg.server.domain)
    ctx.out.note(f"waiting until {', '.join(map(str, servers))} answer{'s' if len(servers) == 1 else ''} "
                 f"{cfg.server.domain} with it")
    ok, seen = ctx.wait(lambda: caa_view(cfg.server.domain, servers, issuer, account))
    if not ok:
        raise SetupError(f"the CAA record of {cfg.server.domain} is not visible after {ctx.args.wait:g} s "
                         f"({seen}); publish it, then run `inverse-cloud setup` again")
    return f"CAA pins account {account.rsplit('/', 1)[-1]} at every authoritative server"


# --- start -------------------------------------------------------------------------------------------

def _status(cfg: Config) -> dict[str, Any] | None:
    from inverse_cloud.ops.control import ControlError, ask

    try:
        doc = ask(cfg.server.control_socket, "status", timeout_s=5)
    except ControlError:
        return None
    return doc if isinstance(doc, dict) else None


def step_start(ctx: Context) -> str:
    from inverse_cloud.ops import commands as ops_commands

    cfg = ctx.cfg()
    running = _status(cfg)
    if running is not None:
        return f"the server already runs (pid {running.get('pid')})"
    if ops_commands._user_manager_reachable():
        ns = argparse.Namespace(config=str(ctx.cfg_path), action="install", unit_dir=None, no_systemctl=False)
        code, _text = _quiet(lambda: ops_commands.cmd_service(ns))
        if code != 0:
            raise SetupError("service install failed; see `inverse-cloud service status`")
        user = ctx.answers["user"]
        import getpass

        linger = subprocess.run(["loginctl", "enable-linger", getpass.getuser()], capture_output=True, text=True,
                                timeout=30, check=False)
        lingering = "linger on" if linger.returncode == 0 else f"linger not enabled ({linger.stderr.strip()})"
        how = f"user unit installed and started, {lingering} (for {user})"
    else:
        serve = "inverse-cloud serve" + ("" if ctx.cfg_path == config_mod.default_config_path()
                                         else f" --config {ctx.cfg_path}")
        ctx.out.note(f"no systemd user manager answers here, so no service is installed: run `{serve}` in "
                     "another terminal (setup waits for it; `inverse-cloud service install` later adds the unit)")
        how = "started by hand"
    ok, seen = ctx.wait(lambda: (True, "the server answers") if _status(cfg) else
                        (False, "waiting for the server to answer on its control socket"))
    if not ok:
        raise SetupError(f"the server did not start within {ctx.args.wait:g} s; see journalctl --user -u "
                         "inverse-cloud (or serve's output), then run setup again")
    return how


# --- the first certificate ---------------------------------------------------------------------------

def _cert_view(cfg: Config) -> tuple[bool, str]:
    doc = _status(cfg)
    if doc is None:
        return False, "the server does not answer"
    served = (doc.get("certificate") or {}).get("served") or {}
    tunnel = (doc.get("tunnel") or {}).get("state", "not started")
    manager = (doc.get("certificate") or {}).get("manager") or {}
    if served and not served.get("self_signed"):
        return True, f"certificate {served.get('serial')} valid until {served.get('not_after')}"
    error = f"; last error: {manager['last_error']}" if manager.get("last_error") else ""
    return False, f"tunnel {tunnel}; certificate: {manager.get('state', 'waiting')}{error}"


def step_certificate(ctx: Context) -> str:
    cfg = ctx.cfg()
    ok, seen = ctx.wait(lambda: _cert_view(cfg))
    if not ok:
        raise SetupError(f"no certificate from the CA after {ctx.args.wait:g} s ({seen}); "
                         "`inverse-cloud doctor` names the broken link; then run setup again")
    return seen


# --- phone -------------------------------------------------------------------------------------------

def step_phone(ctx: Context) -> str:
    from inverse_cloud.ops.phone import account, render_terminal
    from inverse_cloud.ops.ready import readiness, ready_line

    cfg = ctx.cfg()
    print(render_terminal(account(ctx.answers["user"], cfg.server.domain)), flush=True)
    ctx.ready, because = readiness(_status(cfg))
    return ready_line(ctx.ready, because)


RUN: dict[str, Callable[[Context], str]] = {
    "init": step_init, "relay": step_relay, "dns": step_dns, "account": step_account, "caa": step_caa,
    "start": step_start, "certificate": step_certificate, "phone": step_phone,
}
