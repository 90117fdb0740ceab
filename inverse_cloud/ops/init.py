"""``inverse-cloud init``: the config file, the data folder, the first DAV user and the relay SSH keys."""

from __future__ import annotations

import argparse
import getpass
from pathlib import Path

from inverse_cloud import config as config_mod
from inverse_cloud.errors import ConfigError
from inverse_cloud.ops.answers import domain_problem, email_problem, password_problem, relay_problem, ssh_problem
from inverse_cloud.prompt import ask, ask_until, read_password

__all__ = ["add_commands", "cmd_init", "parse_relay"]


def parse_relay(text: str) -> tuple[str, str, int]:
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


def _relay_answer_problem(answer: str) -> str | None:
    """Why the typed relay will not do: bad syntax, root as the login, or no SSH server answering there."""
    why = relay_problem(answer)
    if why:
        return why
    try:
        _user, host, port = parse_relay(answer)
    except ConfigError as exc:
        return str(exc).removeprefix(f"--relay {answer}: ")
    return ssh_problem(host, port, timeout_s=5)


def cmd_init(args: argparse.Namespace) -> int:
    from inverse_cloud.dav import users
    from inverse_cloud.fsutil import atomic_write, ensure_private_dir
    from inverse_cloud.tunnel.keys import generate_ssh_key

    interactive = not args.non_interactive
    cfg_path = config_mod.config_path(args)
    if cfg_path.exists() and not args.force:
        raise ConfigError(f"{cfg_path} already exists; nothing was changed (edit it, or pass --force to "
                          "write a new one)")
    domain = args.domain or (ask_until("Domain phones will use (e.g. contacts.example.org)", "", domain_problem)
                             if interactive else "")
    if not domain:
        raise ConfigError("no domain: give --domain NAME")
    data_dir = Path(args.data_dir).expanduser() if args.data_dir else config_mod.default_data_dir()
    if args.relay is not None:
        relay_user, relay_host, relay_port = parse_relay(args.relay)
    else:
        relay_text = ask_until(
            "Relay host, as HOST[:PORT] (the tunnel login is inverse-cloud; empty: no relay for now)", "",
            _relay_answer_problem, allow_empty=True) if interactive else ""
        relay_user, relay_host, relay_port = parse_relay(relay_text)
    if args.acme_email is not None:
        email = args.acme_email
    elif interactive:
        email = ask_until("E-mail for Let's Encrypt expiry notices (optional)", "", email_problem, allow_empty=True)
    else:
        email = ""
    if email and email_problem(email):
        raise ConfigError(f"--acme-email: {email_problem(email)}")
    user = args.user or ask("First DAV user name", getpass.getuser(), interactive)
    users.validate_username(user)
    password = read_password(args, interactive, user, lambda pw: password_problem(pw, user))

    template = (Path(__file__).parent.parent / "templates" / "config.toml.in").read_text(encoding="utf-8")
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


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser
                 ) -> None:
    """Add ``init`` to the inverse-cloud parser."""
    p = sub.add_parser(
        "init", parents=[common], help="create the config, the data folder and a first user",
        description="Write the config file, create the data and state folders, the first DAV user and the SSH "
                    "keys for the relay. Asks for what no flag gives (or fails with --non-interactive). "
                    "`inverse-cloud setup` runs this and every later step.")
    p.add_argument("--data-dir", metavar="DIR",
                   help=f"contacts, calendars, users and keys (default: {config_mod.default_data_dir()})")
    p.add_argument("--state-dir", metavar="DIR",
                   help=f"certificates, renewal state, control socket (default: {config_mod.default_state_dir()})")
    p.add_argument("--domain", metavar="NAME", help="the name phones use, e.g. contacts.example.org "
                   "(default: asked)")
    p.add_argument("--user", metavar="NAME", help="first DAV user (default: asked, offering your login name)")
    p.add_argument("--password-file", metavar="FILE", help="file holding that user's password on one line "
                   "(default: asked twice on the terminal)")
    p.add_argument("--https-listen", metavar="HOST:PORT", default="127.0.0.1:8443",
                   help="where this laptop listens for HTTPS; the relay forwards 443 here (default: %(default)s)")
    p.add_argument("--http-listen", metavar="HOST:PORT", default="127.0.0.1:8080",
                   help="where this laptop listens for HTTP (ACME challenges, redirects; default: %(default)s)")
    p.add_argument("--relay", metavar="USER@HOST[:PORT]", help="the relay's tunnel login, empty for none "
                   "(default: asked; the login defaults to inverse-cloud)")
    p.add_argument("--acme-email", metavar="EMAIL", help="e-mail for the CA's expiry notices (default: asked; "
                   "empty: none)")
    p.add_argument("--acme-directory", metavar="URL", help="ACME directory URL (default: Let's Encrypt)")
    p.add_argument("--acme-ca-bundle", metavar="FILE", help="CA file to trust for the ACME directory "
                   "(default: the system's)")
    p.add_argument("--non-interactive", action="store_true", help="never ask; fail on what is missing")
    p.add_argument("--force", action="store_true", help="overwrite an existing config file (keys are kept)")
    p.set_defaults(func=cmd_init)
