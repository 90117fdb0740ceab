"""``inverse-cloud user``: the DAV users (bcrypt htpasswd)."""

from __future__ import annotations

import argparse

from inverse_cloud import config as config_mod
from inverse_cloud.ops.answers import password_problem
from inverse_cloud.prompt import read_password

__all__ = ["add_commands", "cmd_user"]


def cmd_user(args: argparse.Namespace) -> int:
    from inverse_cloud.dav import users

    cfg = config_mod.load_config(args)
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
    # the same check as init and setup: asked again with the reason on a terminal, one line from a file
    password = read_password(args, True, args.name, lambda pw: password_problem(pw, args.name))
    if args.action == "add":
        users.add_user(path, args.name, password)
        print(f"added user {args.name!r}")
    else:
        users.set_password(path, args.name, password)
        print(f"changed the password of {args.name!r}")
    return 0


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser
                 ) -> None:
    """Add ``user`` to the inverse-cloud parser."""
    p = sub.add_parser("user", parents=[common], help="manage DAV users",
                       description="Add, remove, list DAV users or change a password (bcrypt, in the "
                                   "htpasswd file Radicale reads); a running server sees changes at once.")
    p.add_argument("action", choices=["add", "remove", "passwd", "list"], help="what to do")
    p.add_argument("name", nargs="?", default="", help="the user (needed by add, remove and passwd)")
    p.add_argument("--password-file", metavar="FILE", help="file holding the password on one line "
                   "(default: asked twice on the terminal)")
    p.set_defaults(func=cmd_user)
