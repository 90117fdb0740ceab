"""``inverse-cloud setup``: from nothing to a syncing phone, as one guided command.

It asks only what it cannot find out (the domain, the relay and its admin login, the first user and
password; the tunnel login defaults to ``inverse-cloud`` and the e-mail to none, flags only), checks each
answer on entry and asks again with a one-line reason, then runs the steps, one line each::

    init -> relay (apply the relay side, pin its host key) -> dns (print the A record, or create it with
    --dns, and wait for it at the domain's authoritative servers) -> account (register) -> caa (print the
    CAA record with accounturi, or create it, and wait for it) -> start (user unit + linger, or wait for
    `serve`) -> certificate (the first one) -> phone

Resumable and idempotent: the answers (never the password) and the finished steps are kept in
``setup-state.json`` next to the config; a rerun skips what is done. The relay variant (``--nat sni``,
``--ipv6``, ``--ssh-on-443``, as for relay-setup) is kept too; a rerun that changes it runs the relay and dns
steps again, since the relay side and the records follow it. Every answer is also a flag, and
``--non-interactive`` never asks (a missing or wrong answer is one line and exit 2).

The order is the point of the ``caa`` step: the first certificate is ordered only after DNS shows the CAA
record that pins our account, so the relay never has a window in which it could get one for the name.
"""

from __future__ import annotations

import argparse
import getpass
import json
import re
import sys
import time
from pathlib import Path
from typing import Any

from inverse_cloud import config as config_mod
from inverse_cloud.errors import ConfigError
from inverse_cloud.fsutil import atomic_write
from inverse_cloud.ops.answers import (
    domain_problem,
    email_problem,
    password_problem,
    relay_problem,
    resolve_problem,
    ssh_problem,
)
from inverse_cloud.prompt import ask_until, read_password

__all__ = ["STEPS", "SetupState", "add_commands", "cmd_setup"]

STEPS = ("init", "relay", "dns", "account", "caa", "start", "certificate", "phone")
TUNNEL_USER = "inverse-cloud"
NO_ADMIN = "none"   # the relay side is applied by hand (relay-setup --output), setup only pins the host key


class SetupState:
    """The answers and the finished steps, in a 0600 JSON file next to the config."""

    def __init__(self, path: Path, answers: dict[str, str], done: list[str]) -> None:
        self.path, self.answers, self.done = path, answers, done

    @classmethod
    def load(cls, path: Path) -> SetupState:
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return cls(path, {}, [])
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{path}: unreadable set-up state ({exc}); remove it to start the set-up over") from None
        answers = {str(k): str(v) for k, v in (doc.get("answers") or {}).items()}
        return cls(path, answers, [str(s) for s in doc.get("done") or [] if s in STEPS])

    def save(self) -> None:
        doc = {"answers": self.answers, "done": self.done}
        atomic_write(self.path, json.dumps(doc, indent=1).encode("utf-8"), mode=0o600)

    def finish(self, step: str) -> None:
        if step not in self.done:
            self.done.append(step)
        self.save()


# --- answers -----------------------------------------------------------------------------------------

def _split_relay(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition("@")[2].partition(":")
    return host, int(port) if port else 22


def relay_reach_problem(answer: str) -> str | None:
    """The relay answer: syntax, then the name resolves, then something speaks SSH on the port."""
    problem = relay_problem(answer)
    if problem:
        return problem
    if "@" in answer:
        login, _, host = answer.partition("@")
        return (f"{answer!r}: give the relay's host only ({host}); the tunnel login is {TUNNEL_USER}, "
                f"and {'the admin login (' + login + ') is' if login == 'root' else 'an admin login is'} "
                "asked next")
    host, port = _split_relay(answer)
    return resolve_problem(host) or ssh_problem(host, port)


def login_problem(answer: str) -> str | None:
    """A login name on the relay (not user@host, not a path)."""
    if "@" in answer or ":" in answer or not answer.replace("-", "").replace("_", "").replace(".", "").isalnum():
        return f"{answer!r}: give only a login name, e.g. root"
    return None


def tunnel_login_problem(answer: str) -> str | None:
    """The tunnel login: a login name, and not one setup.sh would lock out (root)."""
    from inverse_cloud.tunnel.relay_files import login_refusal

    return login_problem(answer) or login_refusal(answer)


def admin_problem(answer: str) -> str | None:
    return None if answer == NO_ADMIN else login_problem(answer)


def _answer(args: argparse.Namespace, state: SetupState, key: str, prompt: str, default: str,
            problem: Any, interactive: bool, *, allow_empty: bool = False) -> str:
    """A flag wins, then the saved answer, then asking (never when ``prompt`` is empty: the default is
    taken); every source passes the same check."""
    given = getattr(args, key)
    if given is not None:
        value = str(given)
    elif key in state.answers:
        value = state.answers[key]
    elif not prompt:
        value = default
    elif interactive:
        value = ask_until(prompt, default, problem, allow_empty=allow_empty)
    elif default or allow_empty:
        value = default
    else:
        raise ConfigError(f"--{key.replace('_', '-')} is needed with --non-interactive")
    why = problem(value) if value else None
    if why:
        if given is None and interactive:  # a saved answer that no longer passes: ask again
            value = ask_until(prompt, default, problem, allow_empty=allow_empty)
        else:
            raise ConfigError(f"--{key.replace('_', '-')} {value}: {why}")
    state.answers[key] = value
    state.save()
    return value


def collect_answers(args: argparse.Namespace, state: SetupState, interactive: bool, need_password: bool
                    ) -> tuple[dict[str, str], str]:
    """The answers (saved) and the password (never saved; "" when the user exists already)."""
    a = {
        "domain": _answer(args, state, "domain", "Domain phones will use (e.g. contacts.example.org)", "",
                          domain_problem, interactive),
        "relay": _answer(args, state, "relay", "Relay host, as HOST or HOST:PORT (its SSH server)", "",
                         relay_reach_problem, interactive),
        "relay_admin": _answer(args, state, "relay_admin", f"Admin login on the relay to apply its side ({NO_ADMIN}: "
                               "you apply it yourself)", "root", admin_problem, interactive),
        # Not asked (a good default, or optional): flags only.
        "tunnel_user": _answer(args, state, "tunnel_user", "", TUNNEL_USER, tunnel_login_problem,
                               interactive),
        "email": _answer(args, state, "email", "", "", email_problem, interactive, allow_empty=True),
        "user": _answer(args, state, "user", "First DAV user name", getpass.getuser(), _user_problem,
                        interactive),
    }
    a.update(_dns_answers(args, state))
    a.update(relay_choices(args, state))
    password = ""
    if need_password:
        password = read_password(args, interactive, a["user"], lambda pw: password_problem(pw, a["user"]))
    return a, password


def _dns_answers(args: argparse.Namespace, state: SetupState) -> dict[str, str]:
    """--dns, its options and its token file's path (never the token), saved so a plain rerun keeps them;
    ``--dns none`` turns it off again. Flags only: setup never asks for them."""
    from inverse_cloud.ops.setup_dnsapi import parse_options

    keys = ("dns", "dns_options", "dns_token_file")
    if args.dns is not None:
        if not re.fullmatch(r"[a-z0-9_]+", args.dns):
            raise ConfigError(f"--dns {args.dns}: give a dns-lexicon provider name, e.g. powerdns (or none)")
        parse_options(args.dns_option)
        for key in keys:
            state.answers.pop(key, None)
        if args.dns != "none":
            token_file = str(Path(args.dns_token_file).expanduser().absolute()) if args.dns_token_file else ""
            state.answers.update(dns=args.dns, dns_options="\n".join(args.dns_option), dns_token_file=token_file)
        state.save()
    elif args.dns_option or args.dns_token_file:
        raise ConfigError("--dns-option and --dns-token-file go with --dns PROVIDER")
    return {key: state.answers[key] for key in keys if key in state.answers}


# The relay variant: answer key -> its default (relay-setup's).
RELAY_CHOICES = {"nat": "nft", "ipv6": "no", "ssh_on_443": "no"}
FOLLOW_RELAY = ("relay", "dns")   # the steps a changed relay variant runs again


def relay_choices(args: argparse.Namespace, state: SetupState) -> dict[str, str]:
    """--nat, --ipv6/--no-ipv6 and --ssh-on-443/--no-ssh-on-443, saved as --dns is: a flag replaces the saved
    choice, a plain rerun keeps it. Flags only: setup never asks. When a choice differs from the one the relay
    step was done with, the relay and dns steps are no longer done (one line says so): the relay side, the
    laptop's [relay] settings and the records follow the new variant.

    :raises ConfigError: a combination relay-setup cannot build (none of setup's choices today).
    """
    from inverse_cloud.tunnel.commands import variant_problem

    saved = {key: state.answers.get(key, default) for key, default in RELAY_CHOICES.items()}
    chosen = dict(saved)
    if args.nat is not None:
        chosen["nat"] = args.nat
    for key in ("ipv6", "ssh_on_443"):
        if getattr(args, key) is not None:
            chosen[key] = "yes" if getattr(args, key) else "no"
    problem = variant_problem(chosen["nat"], ssh_on_443=chosen["ssh_on_443"] == "yes", ipv6=chosen["ipv6"] == "yes",
                              proxy_protocol=False)
    if problem:
        raise ConfigError(problem)
    changed = [f"{key.replace('_', '-')} {saved[key]} -> {chosen[key]}" for key in chosen if chosen[key] != saved[key]]
    redo = [step for step in FOLLOW_RELAY if step in state.done]
    if changed and redo:
        state.done = [step for step in state.done if step not in FOLLOW_RELAY]
        print(f"relay variant changed ({', '.join(changed)}): the {' and '.join(redo)} step"
              f"{'s' if len(redo) > 1 else ''} run{'' if len(redo) > 1 else 's'} again", flush=True)
    state.answers.update(chosen)
    state.save()
    return chosen


def _user_problem(answer: str) -> str | None:
    from inverse_cloud.dav.users import validate_username
    from inverse_cloud.errors import UserError

    try:
        validate_username(answer)
    except UserError as exc:
        return str(exc)
    return None


# --- output ------------------------------------------------------------------------------------------

class Lines:
    """One line per step; a live line (redrawn in place on a terminal) while waiting."""

    def __init__(self) -> None:
        self.live = sys.stdout.isatty()
        self.started = time.monotonic()
        self._open = False

    def step(self, n: int, name: str, text: str) -> None:
        self.end()
        print(f"[{n}/{len(STEPS)}] {name}: {text}  ({time.monotonic() - self.started:.0f} s)", flush=True)

    def note(self, text: str) -> None:
        self.end()
        print(f"      {text}", flush=True)

    def progress(self, text: str) -> None:
        line = f"      ... {text}"
        if self.live:
            print("\r\033[K" + line[:200], end="", flush=True)
            self._open = True
        else:
            print(line, flush=True)

    def end(self) -> None:
        if self._open:
            print(flush=True)
            self._open = False


# --- the command -------------------------------------------------------------------------------------

def cmd_setup(args: argparse.Namespace) -> int:
    from inverse_cloud.ops import setup_steps as steps

    cfg_path = config_mod.config_path(args)
    state = SetupState.load(cfg_path.parent / "setup-state.json")
    if cfg_path.exists() and "init" not in state.done:
        state.done.append("init")  # an existing config is used as it is (init refuses to overwrite it)
    interactive = not args.non_interactive and sys.stdin.isatty()
    answers, password = collect_answers(args, state, interactive, need_password="init" not in state.done)
    out = Lines()
    ctx = steps.Context(args=args, cfg_path=cfg_path, answers=answers, password=password, out=out,
                        interactive=interactive)
    for n, name in enumerate(STEPS, 1):
        if name in state.done and name not in steps.ALWAYS:
            out.step(n, name, "done before")
            continue
        result = steps.RUN[name](ctx)
        state.finish(name)  # recorded before it is shown: a step shown as done is never run again
        out.step(n, name, result)
    out.end()
    return 0 if ctx.ready else 1


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser
                 ) -> None:
    """Add ``setup`` to the inverse-cloud parser."""
    p = sub.add_parser(
        "setup", parents=[common], help="guided set-up: from nothing to a syncing phone (resumable)",
        description="Ask what cannot be found out, check each answer, then: write the config, apply the relay "
                    "side, print the DNS records and wait for them, register the ACME account and wait for its "
                    "CAA record, start the service, wait for the first certificate, and show the phone QR code. "
                    "Ctrl-C and run it again to continue where it stopped.")
    p.add_argument("--domain", metavar="NAME", help="the name phones use (default: asked)")
    p.add_argument("--relay", metavar="HOST[:PORT]", help="the relay's SSH server (default: asked)")
    p.add_argument("--relay-admin", metavar="LOGIN", help=f"admin login on the relay that applies its side over "
                   f"ssh; {NO_ADMIN}: you apply it yourself (default: asked, offering root)")
    p.add_argument("--tunnel-user", metavar="LOGIN", help=f"tunnel login created on the relay (default: "
                   f"{TUNNEL_USER})")
    p.add_argument("--email", metavar="EMAIL", help="e-mail given to the CA with the account (default: none)")
    p.add_argument("--user", metavar="NAME", help="first DAV user (default: asked, offering your login name)")
    p.add_argument("--password-file", metavar="FILE", help="that user's password on one line (default: asked "
                   "twice)")
    p.add_argument("--nat", choices=["nft", "sni"], help="how the relay maps its public 443/80 to the tunnel, as "
                   "for relay-setup: nft (DNAT) or sni (a relay that already carries another laptop, or will: nginx "
                   "routes by name; give each laptop its own --tunnel-user and [relay] ports) (default: nft, or "
                   "the saved choice)")
    p.add_argument("--ipv6", action=argparse.BooleanOptionalAction, help="also serve phones on IPv6, as "
                   "relay-setup --ipv6: the dns step then also prints (or creates) the AAAA record and waits for "
                   "it (default: IPv4 only, or the saved choice)")
    p.add_argument("--ssh-on-443", action=argparse.BooleanOptionalAction, help="also put the relay's SSH on "
                   "public 443 behind sslh (with --nat sni: in its nginx router), as relay-setup --ssh-on-443, for "
                   "laptops in networks that block outbound SSH (default: no, or the saved choice)")
    p.add_argument("--staging", action="store_true", help="use Let's Encrypt's staging CA first, so retries "
                   "cannot hit production rate limits (rerun without it later)")
    p.add_argument("--yes", action="store_true", help="accept the relay's host key without asking (it is "
                   "still shown)")
    p.add_argument("--non-interactive", action="store_true", help="never ask; fail on what is missing")
    p.add_argument("--wait", type=float, default=1800.0, metavar="S",
                   help="how long each wait (DNS records, server start, certificate) lasts before setup stops "
                        "and says what it saw (default: %(default)g)")
    p.add_argument("--data-dir", metavar="DIR", help=f"as for init (default: {config_mod.default_data_dir()})")
    p.add_argument("--state-dir", metavar="DIR", help=f"as for init (default: {config_mod.default_state_dir()})")
    p.add_argument("--https-listen", metavar="HOST:PORT", default="127.0.0.1:8443",
                   help="as for init (default: %(default)s)")
    p.add_argument("--http-listen", metavar="HOST:PORT", default="127.0.0.1:8080",
                   help="as for init (default: %(default)s)")
    p.add_argument("--acme-directory", metavar="URL", help="ACME directory (default: Let's Encrypt)")
    p.add_argument("--acme-ca-bundle", metavar="FILE", help="CA file for the ACME directory (default: the "
                   "system's)")
    p.add_argument("--acme-caa-issuer", metavar="DOMAIN", help="the CA's CAA issuer domain, for a CA other "
                   "than Let's Encrypt (default: known for Let's Encrypt)")
    p.add_argument("--dns", metavar="PROVIDER", help="create the A and CAA records through this DNS provider's "
                   "API with dns-lexicon (the dns extra), e.g. powerdns; default: you publish them and setup waits")
    p.add_argument("--dns-option", metavar="NAME=VALUE", action="append", default=[],
                   help="an option of the --dns provider, as lexicon names it (powerdns: "
                        "pdns_server=http://HOST:8081); repeat for more (default: none)")
    p.add_argument("--dns-token-file", metavar="FILE", help="file holding the --dns provider's API key on one "
                   "line (lexicon's auth_token; default: lexicon's LEXICON_<PROVIDER>_AUTH_TOKEN variable)")
    p.add_argument("--dns-server", metavar="HOST:PORT",
                   help="for tests: ask this DNS server instead of the domain's authoritative servers "
                        "(default: the authoritative servers)")
    p.set_defaults(func=cmd_setup)
