"""Command line. The only module that prints errors for humans and chooses exit codes:
0 ok, 1 a command failed, 2 bad configuration or usage, 3 ``serve`` could not start."""

from __future__ import annotations

import argparse
import asyncio
import getpass
import importlib
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from inverse_cloud import __version__
from inverse_cloud import config as config_mod
from inverse_cloud.errors import ConfigError, InverseCloudError, StartupError, UserError

__all__ = ["main"]

log = logging.getLogger("inverse_cloud")

# Modules that add sub-commands of their own: each has ``add_commands(subparsers)``.
EXTENSIONS: list[str] = ["inverse_cloud.tunnel.commands", "inverse_cloud.certs.commands", "inverse_cloud.ops.commands"]

Handler = Callable[[argparse.Namespace], int]


def _config_path(args: argparse.Namespace) -> Path:
    return Path(args.config).expanduser() if args.config else config_mod.default_config_path()


def load_config(args: argparse.Namespace) -> config_mod.Config:
    return config_mod.load(_config_path(args))


# --- init -----------------------------------------------------------------------------------------

def _ask(prompt: str, default: str, interactive: bool) -> str:
    if not interactive:
        return default
    answer = input(f"{prompt} [{default}]: ").strip() if default else input(f"{prompt}: ").strip()
    return answer or default


def _ask_until(prompt: str, default: str, interactive: bool, problem: Callable[[str], str | None]) -> str:
    """Ask until ``problem(answer)`` is None, printing its one-line reason each time (EOF ends the asking)."""
    while True:
        answer = _ask(prompt, default, interactive)
        why = problem(answer) if answer else None
        if why is None or not interactive:
            return answer
        print(f"  {why}; try again")


def _domain_problem(answer: str) -> str | None:
    if "://" in answer or "/" in answer:
        return f"{answer!r} is a URL: give only the host name, e.g. contacts.example.org"
    try:
        config_mod.parse_domain(answer)
    except ValueError:
        return f"{answer!r} is not a DNS name such as contacts.example.org"
    return None


def _parse_relay(text: str) -> tuple[str, str, int]:
    """``[USER@]HOST[:PORT]`` -> (user, host, port); the login defaults to ``inverse-cloud``.

    :raises ConfigError: bad syntax, or a login that must not be the tunnel's (root).
    """
    if not text:
        return "inverse-cloud", "", 22
    from inverse_cloud.tunnel.relay_files import login_refusal

    user, host, port = config_mod.parse_user_host(text, "--relay", "inverse-cloud")
    refusal = login_refusal(user)
    if refusal:
        raise ConfigError(f"--relay {text}: {refusal.replace('[relay] user is root', 'the login is root')}")
    return user, host, port


def _relay_problem(answer: str) -> str | None:
    """Why the interactive relay answer will not do: bad syntax, root, or nothing answering on its port."""
    import socket

    try:
        _user, host, port = _parse_relay(answer)
    except ConfigError as exc:
        return str(exc).removeprefix(f"--relay {answer}: ")
    try:
        with socket.create_connection((host, port), timeout=5):
            pass
    except OSError as exc:
        return f"relay {host}:{port} does not answer ({exc.strerror or exc}); check the name and port"
    return None


def _read_password(args: argparse.Namespace, interactive: bool, user: str) -> str:
    if args.password_file:
        try:
            return Path(args.password_file).read_text(encoding="utf-8").rstrip("\r\n")
        except OSError as exc:
            raise ConfigError(f"--password-file {args.password_file}: {exc.strerror}") from None
    if not interactive or not sys.stdin.isatty():
        raise ConfigError("no password: give --password-file FILE (or run on a terminal to be asked)")
    first = getpass.getpass(f"Password for DAV user {user}: ")
    if first != getpass.getpass("Again: "):
        raise UserError("passwords differ; nothing was changed")
    return first


def generate_ssh_key(path: Path, comment: str) -> bool:
    """Create an ed25519 key (0600 in a 0700 directory) unless one exists. True if created."""
    import asyncssh

    from inverse_cloud.fsutil import atomic_write, ensure_private_dir

    if path.exists():
        return False
    ensure_private_dir(path.parent)
    key = asyncssh.generate_private_key("ssh-ed25519", comment=comment)
    atomic_write(path, key.export_private_key("openssh"), mode=0o600)
    atomic_write(path.with_suffix(".pub"), key.export_public_key("openssh"), mode=0o644)
    return True


def cmd_init(args: argparse.Namespace) -> int:
    from inverse_cloud.dav import users
    from inverse_cloud.fsutil import atomic_write, ensure_private_dir

    interactive = not args.non_interactive
    cfg_path = _config_path(args)
    if cfg_path.exists() and not args.force:
        raise ConfigError(f"{cfg_path} already exists; nothing was changed (edit it, or pass --force to "
                          "write a new one)")
    domain = args.domain or _ask_until(
        "Domain phones will use (e.g. contacts.example.org)", "", interactive, _domain_problem)
    if not domain:
        raise ConfigError("no domain: give --domain NAME")
    data_dir = Path(args.data_dir).expanduser() if args.data_dir else config_mod.default_data_dir()
    if args.relay is not None:
        relay_user, relay_host, relay_port = _parse_relay(args.relay)
    else:
        relay_text = _ask_until(
            "Relay host, as HOST[:PORT] (the tunnel login is inverse-cloud; empty: no relay for now)", "",
            interactive, _relay_problem)
        relay_user, relay_host, relay_port = _parse_relay(relay_text)
    email = args.acme_email if args.acme_email is not None else _ask(
        "E-mail for Let's Encrypt expiry notices (optional)", "", interactive)
    user = args.user or _ask("First DAV user name", getpass.getuser(), interactive)
    users.validate_username(user)
    password = _read_password(args, interactive, user)

    template = (Path(__file__).parent / "templates" / "config.toml.in").read_text(encoding="utf-8")
    text = template.format(
        domain=domain, https_listen=args.https_listen, http_listen=args.http_listen, data_dir=data_dir,
        relay_host=relay_host, relay_port=relay_port, relay_user=relay_user, relay_host_key="",
        acme_email=email)
    for key, value in (("directory", args.acme_directory), ("ca_bundle", args.acme_ca_bundle)):
        if value:
            text = text.replace(f'# {key} = ', f'{key} = "{value}"  # was: ', 1)
    if args.state_dir:
        text = text.replace('# state_dir = "~/.local/state/inverse-cloud"', f'state_dir = "{args.state_dir}"')
    # Check what we are about to write with the same loader serve uses.
    cfg = config_mod.loads(text, cfg_path)
    ensure_private_dir(cfg_path.parent)
    ensure_private_dir(data_dir)
    ensure_private_dir(cfg.server.state_dir)
    cfg.server.storage_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    if cfg.server.htpasswd_path.exists() and user in users.list_users(cfg.server.htpasswd_path):
        users.set_password(cfg.server.htpasswd_path, user, password)
    else:
        users.add_user(cfg.server.htpasswd_path, user, password)
    made_key = generate_ssh_key(cfg.relay.key_file, f"inverse-cloud tunnel {domain}")
    generate_ssh_key(cfg.relay.takeover_key_file, f"inverse-cloud takeover {domain}")
    atomic_write(cfg_path, text.encode("utf-8"), mode=0o600)
    print(f"wrote {cfg_path}")
    print(f"data in {data_dir} (DAV user {user!r} created)")
    if made_key:
        print(f"SSH key for the relay: {cfg.relay.key_file}.pub")
    if relay_host:
        print(f"next: inverse-cloud relay-setup --apply root@{relay_host}   (as the relay's admin: creates the "
              f"tunnel login {relay_user} there and pins the relay's host key)")
    else:
        print("next: inverse-cloud serve   (local only; add [relay] host later for phones outside this network)")
    return 0


# --- user -------------------------------------------------------------------------------------------

def cmd_user(args: argparse.Namespace) -> int:
    from inverse_cloud.dav import users

    cfg = load_config(args)
    path = cfg.server.htpasswd_path
    if args.action == "list":
        for name in users.list_users(path):
            print(name)
        return 0
    if args.action == "remove":
        users.remove_user(path, args.name)
        print(f"removed user {args.name!r} (their data stays in {cfg.server.storage_dir / 'collection-root'})")
        return 0
    users.validate_username(args.name)
    password = _read_password(args, True, args.name)
    if args.action == "add":
        users.add_user(path, args.name, password)
        print(f"added user {args.name!r}")
    else:
        users.set_password(path, args.name, password)
        print(f"changed the password of {args.name!r}")
    return 0


# --- serve ------------------------------------------------------------------------------------------

def build_supervisor(cfg: config_mod.Config) -> Any:
    """Assemble the components in start order. Extensions plug in through ``SERVE_HOOKS``."""
    from inverse_cloud.dav.server import DavServer
    from inverse_cloud.supervisor import Supervisor

    sup = Supervisor()
    server = DavServer(cfg, public_https_port=443)
    sup.add(server)
    for name in EXTENSIONS:
        hook = getattr(importlib.import_module(name), "serve_hook", None)
        if hook is not None:
            hook(cfg, sup, server)
    return sup


def cmd_serve(args: argparse.Namespace) -> int:
    from inverse_cloud import log as log_mod

    cfg = load_config(args)
    log_mod.setup(args.log_level or cfg.server.log_level)
    sup = build_supervisor(cfg)
    try:
        asyncio.run(sup.run())
    except (StartupError, ConfigError):
        raise
    except InverseCloudError as exc:
        raise StartupError(str(exc)) from exc
    return 0


# --- parser -----------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="inverse-cloud",
        description="Contacts and calendars on your laptop, reachable through a relay that only sees TLS.")
    parser.add_argument("--version", action="version", version=f"inverse-cloud {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", metavar="PATH",
                        help=f"config file (default: {config_mod.default_config_path()})")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("init", parents=[common], help="create the config, the data folder and a first user")
    p.add_argument("--data-dir", metavar="DIR")
    p.add_argument("--state-dir", metavar="DIR")
    p.add_argument("--domain", metavar="NAME")
    p.add_argument("--user", metavar="NAME")
    p.add_argument("--password-file", metavar="FILE")
    p.add_argument("--https-listen", metavar="HOST:PORT", default="127.0.0.1:8443")
    p.add_argument("--http-listen", metavar="HOST:PORT", default="127.0.0.1:8080")
    p.add_argument("--relay", metavar="USER@HOST[:PORT]")
    p.add_argument("--acme-email", metavar="EMAIL")
    p.add_argument("--acme-directory", metavar="URL")
    p.add_argument("--acme-ca-bundle", metavar="FILE")
    p.add_argument("--non-interactive", action="store_true", help="never ask; fail on what is missing")
    p.add_argument("--force", action="store_true", help="overwrite an existing config file")
    p.set_defaults(func=cmd_init)

    p = sub.add_parser("user", parents=[common], help="manage DAV users")
    p.add_argument("action", choices=["add", "remove", "passwd", "list"])
    p.add_argument("name", nargs="?", default="")
    p.add_argument("--password-file", metavar="FILE")
    p.set_defaults(func=cmd_user)

    p = sub.add_parser("serve", parents=[common], help="run the server (and tunnel, and certificates)")
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    p.set_defaults(func=cmd_serve)

    for name in EXTENSIONS:
        importlib.import_module(name).add_commands(sub, common)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "command", None) == "user" and args.action != "list" and not args.name:
        parser.error("user add|remove|passwd needs a NAME")
    try:
        return int(args.func(args))
    except ConfigError as exc:
        print(f"inverse-cloud: {exc}", file=sys.stderr)
        return 2
    except StartupError as exc:
        print(f"inverse-cloud: cannot start: {exc}", file=sys.stderr)
        return 3
    except InverseCloudError as exc:
        print(f"inverse-cloud: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except OSError as exc:
        # Files we were told to use: a readable line, not a traceback.
        if os.environ.get("INVERSE_CLOUD_DEBUG"):
            raise
        print(f"inverse-cloud: {exc.filename or ''}: {exc.strerror or exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
