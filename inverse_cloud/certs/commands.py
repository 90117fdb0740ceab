"""``inverse-cloud cert status | renew [--force] | caa``.

``cert status`` reads the files (certificate store, renewal state, account) and asks a running server over
the control socket whether it runs, so it works either way. ``cert renew`` asks a running server over the
control socket (verb ``cert-renew``) and waits for the renewal state file to record the check; with no server
running it does the work itself, with a temporary HTTP-01 listener on ``[server] http_listen`` and, when
``[acme] challenge`` allows tls-alpn-01, a temporary TLS listener on ``[server] https_listen`` that answers only
the CA's ``acme-tls/1`` handshakes with the challenge certificate (and closes every connection). With ACME off,
``renew`` and ``caa`` say so and touch nothing (no account key is created).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import signal
import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from inverse_cloud import config as config_mod
from inverse_cloud.config import Config
from inverse_cloud.errors import AcmeError

__all__ = ["add_commands"]

RENEW_WAIT_S = 300.0

if TYPE_CHECKING:
    from inverse_cloud.certs.store import TLSManager
    from inverse_cloud.dav.web import ChallengeStore


@dataclass
class _StandaloneTarget:
    """``cert renew`` with no server running: challenges on a temporary listener, the served certificate
    not checked by a handshake (https_port 0)."""

    challenges: ChallengeStore
    tls: TLSManager
    https_port: int = 0


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser
                 ) -> None:
    p = sub.add_parser("cert", parents=[common], help="the TLS certificate: status, renew, CAA record",
                       description="The TLS certificate: what is served and when it renews, an early renewal, "
                                   "and the CAA record that pins issuance to our ACME account.")
    csub = p.add_subparsers(dest="cert_command", required=True, metavar="ACTION")
    s = csub.add_parser("status", parents=[common], help="served certificate, next renewal, last error, CAA",
                        description="The certificate (as the running server serves it, else from the files), "
                                    "the next renewal, the last error and the CAA state.")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.set_defaults(func=cmd_status)
    r = csub.add_parser("renew", parents=[common], help="check now and renew if due (--force: renew anyway)",
                        description="Check the certificate now and renew it if due; a running server does it "
                                    "itself (asked over the control socket), otherwise this command does.")
    r.add_argument("--force", action="store_true", help="renew even if the certificate is not due "
                   "(still honours the CA's Retry-After)")
    r.add_argument("--timeout", type=float, default=RENEW_WAIT_S, metavar="S",
                   help=f"how long to wait for a running server's answer (default {RENEW_WAIT_S:.0f})")
    r.set_defaults(func=cmd_renew)
    c = csub.add_parser("caa", parents=[common], help="print the CAA record that pins our ACME account",
                        description="Print the CAA record to publish (with our ACME account's accounturi) and "
                                    "what DNS shows now. Registers the account first if there is none yet.")
    c.set_defaults(func=cmd_caa)


# --- status -----------------------------------------------------------------------------------------

def _disk_cert(cfg: Config) -> dict[str, Any] | None:
    from cryptography import x509

    chain = cfg.server.cert_dir / "current" / "fullchain.pem"
    try:
        leaf = x509.load_pem_x509_certificates(chain.read_bytes())[0]
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        return {"error": f"{chain} unreadable ({exc})"}
    try:
        names = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
            x509.DNSName)
    except x509.ExtensionNotFound:
        names = []
    return {"serial": format(leaf.serial_number, "x"), "names": names, "issuer": leaf.issuer.rfc4514_string(),
            "not_before": leaf.not_valid_before_utc.isoformat(), "not_after": leaf.not_valid_after_utc.isoformat(),
            "path": str(chain.resolve())}


def status_document(cfg: Config) -> dict[str, Any]:
    """What ``cert status`` shows, from the files only."""
    from inverse_cloud.certs.acme_client import AccountStore
    from inverse_cloud.certs.caa import issuer_domain_for, recommended_record
    from inverse_cloud.certs.manager import StateFiles
    from inverse_cloud.certs.policy import next_attempt_at

    files = StateFiles(cfg)
    state = files.load_state()
    holder = files.holder()
    # The control socket answers whether or not ACME runs (the lock file exists only with ACME on).
    from inverse_cloud.ops.control import ControlError, ask

    try:
        live = ask(cfg.server.control_socket, "status", timeout_s=5)
        running: dict[str, Any] = {"running": True, "pid": live.get("pid"),
                                   "served": (live.get("certificate") or {}).get("served")}
    except ControlError:
        running = {"running": bool(holder and holder[1] == "serve"), "pid": holder[0] if holder else None}
    account = AccountStore(cfg.acme.account_dir).account_uri(cfg.acme.directory)
    issuer = issuer_domain_for(cfg.acme.directory, cfg.acme.caa_issuer)
    now = dt.datetime.now(dt.UTC)
    nxt = next_attempt_at(state, now)

    def iso(t: dt.datetime | None) -> str:
        return t.isoformat() if t else ""

    return {
        "domain": cfg.server.domain, "acme_enabled": cfg.acme.enabled, "directory": cfg.acme.directory,
        "server": running,
        "certificate": _disk_cert(cfg),
        "next_renewal": iso(state.next_renewal_at), "next_action": state.next_action,
        "last_check": iso(state.last_check_at), "last_success": iso(state.last_success_at),
        "failures": state.failures, "last_error": state.last_error,
        "next_attempt": iso(nxt) if nxt and nxt > now else "",
        "account": account,
        "caa": {"state": state.caa_state or "not checked", "detail": state.caa_detail,
                "checked_at": iso(state.caa_checked_at),
                "record": recommended_record(cfg.server.domain, issuer, account, cfg.acme.caa_methods)
                           if issuer and account else ""},
    }


def cmd_status(args: argparse.Namespace) -> int:
    cfg = config_mod.load_config(args)
    doc = status_document(cfg)
    if args.json:
        print(json.dumps(doc, indent=1))
        return 0 if doc["certificate"] and not doc["failures"] else 1
    cert = doc["certificate"]
    srv = doc["server"]
    print(f"domain:       {doc['domain']} (ACME {'on' if doc['acme_enabled'] else 'off'}, {doc['directory']})")
    print(f"server:       {'running, pid ' + str(srv['pid']) if srv['running'] else 'not running'}")
    if cert is None:
        print("certificate:  none issued yet (a self-signed stand-in is served)")
    elif "error" in cert:
        print(f"certificate:  {cert['error']}")
    else:
        print(f"certificate:  serial {cert['serial']} for {', '.join(cert['names'])}, valid {cert['not_before']} "
              f"to {cert['not_after']}")
        print(f"              issued by {cert['issuer']}")
    if doc["next_renewal"]:
        print(f"next renewal: {doc['next_renewal']} ({doc['next_action'] or 'wait'})")
    print(f"last success: {doc['last_success'] or 'never'}; last check: {doc['last_check'] or 'never'}")
    if doc["failures"]:
        print(f"failures:     {doc['failures']} in a row; next attempt {doc['next_attempt'] or 'now'}")
        print(f"last error:   {doc['last_error']}")
    print(f"ACME account: {doc['account'] or 'none yet'}")
    caa_doc = doc["caa"]
    print(f"CAA:          {caa_doc['state']}" + (f": {caa_doc['detail']}" if caa_doc["detail"] else "")
          + (f" (checked {caa_doc['checked_at']})" if caa_doc["checked_at"] else ""))
    if caa_doc["state"] != "ok" and caa_doc["record"]:
        print(f"              publish: {caa_doc['record']}")
    return 0 if cert and "error" not in cert and not doc["failures"] else 1


# --- renew ------------------------------------------------------------------------------------------

def _acme_off(cfg: Config) -> AcmeError:
    why = "[acme] enabled = false" if cfg.relay.enabled else "no relay is configured, so ACME is off by default"
    return AcmeError(f"{cfg.path}: ACME is off ({why}): the server serves a self-signed certificate, there is no "
                     "account and nothing to renew; set [acme] enabled = true (with a relay) to get one")


def _server_answer(cfg: Config, cmd: str, **params: Any) -> Any | None:
    """The running server's answer to ``cmd`` over the control socket; None when no server runs.

    :raises AcmeError: the server runs but refused the command (its answer says why).
    """
    from inverse_cloud.ops.control import ControlError, NotRunning, ask

    try:
        return ask(cfg.server.control_socket, cmd, timeout_s=10, **params)
    except NotRunning:
        return None
    except ControlError as exc:
        if "unknown command" in str(exc):
            raise AcmeError(f"the running server was started without ACME; restart it to use the current "
                            f"config (systemctl --user restart inverse-cloud): {exc}") from None
        raise AcmeError(f"the running server did not take the request: {exc}") from None


def cmd_renew(args: argparse.Namespace) -> int:
    from inverse_cloud.certs.manager import StateFiles

    cfg = config_mod.load_config(args)
    if not cfg.acme.enabled:
        raise _acme_off(cfg)
    files = StateFiles(cfg)
    answer = _server_answer(cfg, "cert-renew", force=args.force)
    if answer is not None:
        requested = dt.datetime.fromisoformat(answer["requested_at"])
        print(f"asked the running server to check the certificate{' (forced)' if args.force else ''}",
              file=sys.stderr)
        return _wait_for_check(cfg, files, requested, args.timeout)
    holder = files.holder()
    if holder is not None and holder[1] != "serve":
        raise AcmeError(f"another `inverse-cloud cert` command (pid {holder[0]}) is obtaining a certificate; "
                        "wait for it to finish")
    if holder is not None:
        return _renew_via_server(cfg, files, holder[0], args.force, args.timeout)
    return asyncio.run(_renew_standalone(cfg, args.force))


def _renew_via_server(cfg: Config, files: Any, pid: int, force: bool, timeout_s: float) -> int:
    from inverse_cloud.fsutil import atomic_write

    requested = dt.datetime.now(dt.UTC)
    atomic_write(files.request, json.dumps({"force": force, "at": requested.isoformat()}).encode(), mode=0o600)
    try:
        os.kill(pid, signal.SIGHUP)
    except ProcessLookupError:
        raise AcmeError(f"the server (pid {pid}) is gone; run `inverse-cloud cert renew` again") from None
    print(f"asked the running server (pid {pid}) to check the certificate{' (forced)' if force else ''}",
          file=sys.stderr)
    return _wait_for_check(cfg, files, requested, timeout_s)


def _wait_for_check(cfg: Config, files: Any, requested: dt.datetime, timeout_s: float) -> int:
    deadline = time.monotonic() + timeout_s
    while True:
        state = files.load_state()
        if state.last_check_at is not None and state.last_check_at >= requested:
            return _report(cfg, state, requested)
        if time.monotonic() > deadline:
            raise AcmeError(f"no answer from the server within {timeout_s:.0f} s; see its log "
                            "(journalctl --user -u inverse-cloud)")
        time.sleep(0.2)  # CLI polling interval while the server works


def _report(cfg: Config, state: Any, since: dt.datetime) -> int:
    if state.last_success_at is not None and state.last_success_at >= since:
        print(f"certificate for {cfg.server.domain} renewed: serial {state.last_serial}")
        return 0
    if state.last_failure_at is not None and state.last_failure_at >= since:
        print(f"inverse-cloud: {state.last_error}", file=sys.stderr)
        return 1
    when = state.next_renewal_at.isoformat() if state.next_renewal_at else "unknown"
    if state.next_action == "wait" and state.failures:
        print(f"not retrying yet: {state.failures} failure(s), next attempt {when} "
              f"(last error: {state.last_error})")
        return 1
    print(f"certificate for {cfg.server.domain} is not due for renewal (next renewal {when}); "
          "`cert renew --force` renews anyway")
    return 0


async def _tls_alpn_listener(cfg: Config, tls: TLSManager) -> asyncio.Server:
    """``[server] https_listen`` for the CA's TLS-ALPN-01 handshakes while ``cert renew`` runs without a server:
    the listening context's SNI callback hands ``acme-tls/1`` handshakes for a pending name the challenge
    certificate (certs/tls_alpn.py); every connection is closed once its handshake is over (nothing is served)."""
    from inverse_cloud.dav.listeners import bind_socket

    async def close(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    sock = bind_socket(*cfg.server.https_listen, "[server] https_listen")
    return await asyncio.start_server(close, sock=sock, ssl=tls.listening_context, ssl_handshake_timeout=10)


async def _renew_standalone(cfg: Config, force: bool) -> int:
    """No server running: obtain/renew here, answering HTTP-01 on ``[server] http_listen`` meanwhile (and
    TLS-ALPN-01 on ``[server] https_listen`` when ``[acme] challenge`` allows it)."""
    from aiohttp import web

    from inverse_cloud.certs.manager import CertManager
    from inverse_cloud.certs.store import CertStore, TLSManager
    from inverse_cloud.dav.listeners import bind_socket
    from inverse_cloud.dav.web import ChallengeStore, make_http_app

    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGHUP, lambda: None)  # the lock file names us; a stray SIGHUP must not kill
    tls = TLSManager(CertStore(cfg.server.cert_dir), cfg.server.domain)
    await loop.run_in_executor(None, tls.load)
    challenges = ChallengeStore()
    sock = bind_socket(*cfg.server.http_listen, "[server] http_listen")
    runner = web.AppRunner(make_http_app(challenges, cfg.server.domain), handle_signals=False)
    await runner.setup()
    site = web.SockSite(runner, sock)
    await site.start()
    alpn_server = await _tls_alpn_listener(cfg, tls) if "tls-alpn-01" in cfg.acme.challenge_methods else None
    server = _StandaloneTarget(challenges, tls)
    manager = CertManager(cfg, server)
    files = manager.files
    try:
        lock = await loop.run_in_executor(None, files.try_lock, "cli")
        if lock is None:
            raise AcmeError("another inverse-cloud process took the certificate lock; try again")
        manager._lock_fd = lock
        manager.state = await loop.run_in_executor(None, files.load_state)
        manager._account = await loop.run_in_executor(None, manager.driver.accounts.account_uri,
                                                      cfg.acme.directory)
        since = dt.datetime.now(dt.UTC)
        manager.request_check(force)
        await manager.check()
        code = _report(cfg, manager.state, since)
        if code == 0 and manager.state.last_success_at is not None and manager.state.last_success_at >= since:
            print("stored; `inverse-cloud serve` uses it (a running server: send SIGHUP)", file=sys.stderr)
        return code
    finally:
        await manager.aclose()
        if alpn_server is not None:
            alpn_server.close()
            await alpn_server.wait_closed()
        await runner.cleanup()
        loop.remove_signal_handler(signal.SIGHUP)


# --- caa --------------------------------------------------------------------------------------------

def cmd_caa(args: argparse.Namespace) -> int:
    from inverse_cloud.certs.acme_client import AccountStore
    from inverse_cloud.certs.caa import evaluate, issuer_domain_for, lookup_caa_sync, recommended_record

    cfg = config_mod.load_config(args)
    if not cfg.acme.enabled:
        raise _acme_off(cfg)  # before anything that would create an account key
    directory = cfg.acme.directory
    account = AccountStore(cfg.acme.account_dir).account_uri(directory)
    if not account:
        account = _register_account(cfg)
    issuer = issuer_domain_for(directory, cfg.acme.caa_issuer)
    if not issuer:
        print(f"inverse-cloud: the CAA issuer domain of {directory} is not known here: set [acme] caa_issuer to "
              "the value your CA documents (Let's Encrypt: letsencrypt.org); with a placeholder:", file=sys.stderr)
        print(recommended_record(cfg.server.domain, "ISSUER-DOMAIN", account, cfg.acme.caa_methods))
        return 1
    print(recommended_record(cfg.server.domain, issuer, account, cfg.acme.caa_methods))
    try:
        records, owner = lookup_caa_sync(cfg.server.domain, cfg.acme.dns_server)
    except OSError as exc:
        print(f"; DNS now: unknown ({exc})")
        return 0
    verdict = evaluate(records, issuer, account, owner, cfg.acme.caa_methods)
    print(f"; DNS now: {verdict.state}: {verdict.detail}" + (f" (records at {owner})" if owner else ""))
    if not verdict.is_ok:
        print("; publish the record above at your DNS provider; keep the account key "
              f"({cfg.acme.account_dir}/account-key.pem) backed up: a new key needs a new record")
    return 0


def _register_account(cfg: Config) -> str:
    """Register (or look up) the account for the persisted key, outside a running server."""
    from inverse_cloud.certs.acme_client import AcmeDriver
    from inverse_cloud.certs.manager import StateFiles

    files = StateFiles(cfg)
    holder = files.holder()
    if holder is not None:
        raise AcmeError(f"no ACME account yet and a server (pid {holder[0]}) is running: it creates the account "
                        "with its first order; run `inverse-cloud cert caa` again after that")

    async def register() -> str:
        driver = AcmeDriver(cfg.acme, cfg.server.domain)
        loop = asyncio.get_running_loop()
        fd = await loop.run_in_executor(None, files.try_lock, "cli")
        if fd is None:
            raise AcmeError("another inverse-cloud process holds the certificate lock; try again")
        try:
            return await driver.ensure_account()
        finally:
            await driver.aclose()
            os.close(fd)

    uri = asyncio.run(register())
    print(f"registered ACME account {uri} at {cfg.acme.directory}", file=sys.stderr)
    return uri
