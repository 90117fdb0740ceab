"""Living with it: ``status``, ``doctor``, ``phone``, ``service``, ``export``/``import`` (and ``init``, from
:mod:`inverse_cloud.ops.init`).

Exit codes of ``status`` and ``doctor``: 0 healthy, 1 degraded (or a link is broken), 2 not running /
bad configuration.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import subprocess
import sys
from pathlib import Path

from inverse_cloud import config as config_mod
from inverse_cloud.config import Config
from inverse_cloud.errors import ConfigError, UserError

__all__ = ["add_commands"]

# --- status -----------------------------------------------------------------------------------------

def _status_once(args: argparse.Namespace, cfg: Config) -> int:
    from inverse_cloud.ops.control import ControlError, NotRunning, ask
    from inverse_cloud.ops.ready import readiness, ready_line
    from inverse_cloud.ops.status import format_text

    try:
        doc = ask(cfg.server.control_socket, "status", timeout_s=args.timeout)
    except NotRunning as exc:
        if args.json:
            print(json.dumps({"health": "not running", "error": str(exc), "ready_for_phones": False}))
        else:
            print(f"{exc}; start it with `systemctl --user start inverse-cloud` or `inverse-cloud serve`")
            print(ready_line(*readiness(None)))
        return 2
    except ControlError as exc:
        if args.json:
            print(json.dumps({"health": "unknown", "error": str(exc), "ready_for_phones": False}))
        else:
            print(f"inverse-cloud: {exc}", file=sys.stderr)
            print(ready_line(False, str(exc)))
        return 2
    print(json.dumps(doc, indent=2, sort_keys=True) if args.json else format_text(doc))
    return 0 if doc.get("health") in ("healthy", "local only") else 1


def cmd_status(args: argparse.Namespace) -> int:
    import time

    cfg = config_mod.load_config(args)
    if not args.watch:
        return _status_once(args, cfg)
    if args.interval <= 0 or (args.count is not None and args.count < 1):
        raise ConfigError("--interval must be above 0 and --count at least 1")
    clear = sys.stdout.isatty() and not args.json
    shown = 0
    try:
        while True:
            if clear:
                print("\033[H\033[2J", end="")
            code = _status_once(args, cfg)
            shown += 1
            if args.count is not None and shown >= args.count:
                return code
            if clear:
                print(f"\n(every {args.interval:g} s; Ctrl-C stops)")
            sys.stdout.flush()
            time.sleep(args.interval)  # the refresh period the user asked for, not a wait for a condition
    except KeyboardInterrupt:
        return 0


# --- phone ------------------------------------------------------------------------------------------

def cmd_phone(args: argparse.Namespace) -> int:
    from inverse_cloud.dav import users
    from inverse_cloud.ops.phone import account, render_terminal

    cfg = config_mod.load_config(args)
    known = users.list_users(cfg.server.htpasswd_path)
    user = args.user or (known[0] if known else "")
    if not user:
        raise UserError(f"no DAV user in {cfg.server.htpasswd_path}; add one: inverse-cloud user add NAME")
    if user not in known:
        raise UserError(f"no user {user!r} in {cfg.server.htpasswd_path} (known: {', '.join(known) or 'none'})")
    from inverse_cloud.ops.control import ControlError, ask
    from inverse_cloud.ops.ready import readiness, ready_line

    if not cfg.relay.enabled:
        print(f"WARNING: no relay is configured: {cfg.server.domain} does not lead to this laptop, and it serves a "
              "self-signed certificate, so a phone set up with this will not connect. Add a relay first: "
              "inverse-cloud setup")
        print()
    print(render_terminal(account(user, cfg.server.domain)))
    try:
        doc = ask(cfg.server.control_socket, "status", timeout_s=5)
    except ControlError:
        doc = None
    print()
    print(ready_line(*readiness(doc)))
    return 0


# --- service ----------------------------------------------------------------------------------------

def _user_manager_reachable() -> bool:
    if not shutil.which("systemctl"):
        return False
    try:
        return subprocess.run(["systemctl", "--user", "show-environment"], capture_output=True,
                              timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _linger_enabled() -> bool | None:
    if not shutil.which("loginctl"):
        return None
    import getpass

    try:
        out = subprocess.run(["loginctl", "show-user", getpass.getuser(), "--property=Linger"],
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() == "Linger=yes"


def _linger_hint() -> str:
    import getpass

    return ("so it also runs when you are not logged in (after a reboot, too), run once:\n"
            f"    loginctl enable-linger {getpass.getuser()}")


def cmd_service(args: argparse.Namespace) -> int:
    from inverse_cloud.fsutil import atomic_write
    from inverse_cloud.ops.systemd import UNIT_NAME, render_unit, unit_path

    path = Path(args.unit_dir) / UNIT_NAME if args.unit_dir else unit_path()
    manager = not args.no_systemctl and _user_manager_reachable()

    def systemctl(*argv: str) -> int:
        return subprocess.run(["systemctl", "--user", *argv], timeout=60).returncode

    if args.action == "install":
        cfg = config_mod.load_config(args)  # refuse to install a unit for a config that does not load
        assert cfg.path is not None
        text = render_unit(cfg.path.absolute(), python=sys.executable, stop_timeout_s=cfg.server.shutdown_timeout_s)
        atomic_write(path, text.encode("utf-8"), mode=0o644)
        print(f"wrote {path}")
        if manager:
            if systemctl("daemon-reload") or systemctl("enable", "--now", UNIT_NAME):
                raise UserError(f"systemctl --user enable --now {UNIT_NAME} failed; see: journalctl --user -u "
                                "inverse-cloud")
            print(f"enabled and started {UNIT_NAME}; logs: journalctl --user -u inverse-cloud -f")
        else:
            print("to start it, run:\n"
                  f"    systemctl --user daemon-reload && systemctl --user enable --now {UNIT_NAME}")
        if _linger_enabled() is not True:
            print(_linger_hint())
        if not manager and not args.no_systemctl:
            # The unit exists but nothing runs: that is not the success `install` promises.
            print("inverse-cloud: the unit is written but not started: no systemd user manager answers "
                  "(`systemctl --user` needs a login session, or linger); start it with the commands above",
                  file=sys.stderr)
            return 1
        print("next: inverse-cloud status   (then `inverse-cloud phone` to set up the phone)")
        return 0
    if args.action == "uninstall":
        if manager:
            systemctl("disable", "--now", UNIT_NAME)
        if path.exists():
            path.unlink()
            print(f"removed {path}")
        else:
            print(f"no unit at {path}")
        if manager:
            systemctl("daemon-reload")
        print("your data is untouched (inverse-cloud export FILE backs it up)")
        return 0
    # status
    if not path.exists():
        print(f"not installed (no {path}); install with: inverse-cloud service install")
        return 2
    print(f"unit: {path}")
    linger = _linger_enabled()
    if linger is False:
        print("linger is off: the service stops when you log out; " + _linger_hint())
    if manager:
        return subprocess.run(["systemctl", "--user", "status", "--no-pager", UNIT_NAME], timeout=30).returncode
    print("no systemd user manager reachable from here (try `systemctl --user status inverse-cloud`)")
    return 0


# --- export / import --------------------------------------------------------------------------------

def cmd_export(args: argparse.Namespace) -> int:
    from inverse_cloud.ops.backup import export_backup
    from inverse_cloud.prompt import read_passphrase

    cfg = config_mod.load_config(args)
    passphrase = None if args.no_encrypt else read_passphrase(args.passphrase_file, confirm=True)
    result = export_backup(cfg, Path(args.file), passphrase)
    print(f"wrote {result.path} ({result.files} files, {result.items} items, {result.bytes} bytes; storage "
          f"locked for {result.locked_s * 1000:.0f} ms)")
    if passphrase is None:
        print("it holds your contacts, calendars, passwords (hashed), the ACME account key and the SSH keys, "
              "unencrypted: keep it private")
    else:
        print("encrypted with your passphrase (age format): without it the file cannot be read or restored")
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    from inverse_cloud.ops.backup import ChangesNotAccepted, import_backup
    from inverse_cloud.ops.backup_crypt import AGE_MAGIC, is_encrypted
    from inverse_cloud.prompt import read_passphrase

    path = config_mod.config_path(args)
    cfg = config_mod.load(path) if path.exists() else None
    src = Path(args.file).expanduser()
    try:
        with open(src, "rb") as fh:
            encrypted = is_encrypted(fh.read(len(AGE_MAGIC)))
    except OSError:
        encrypted = False   # import_backup names the problem
    passphrase = read_passphrase(args.passphrase_file, confirm=False) if encrypted else None
    try:
        result = import_backup(src, cfg, config_path=path, passphrase=passphrase,
                               accept_changes=args.accept_changes,
                               data_dir=Path(args.data_dir).expanduser().absolute() if args.data_dir else None)
    except ChangesNotAccepted as exc:
        print("this import would change:")
        for line in exc.changes:
            print(f"  {line}")
        raise
    print(f"restored {result.files} files ({result.items} items) into {result.data_dir}; Radicale verified the store")
    if result.config_written:
        print(f"wrote {result.config_written} from the export (check listen addresses and paths)")
    if result.moved_aside:
        print(f"the empty store that was there is kept at {result.moved_aside}")
    print("next: inverse-cloud service install   (or inverse-cloud serve)")
    return 0


# --- doctor -----------------------------------------------------------------------------------------

def cmd_doctor(args: argparse.Namespace) -> int:
    from inverse_cloud.ops.doctor import DoctorOptions, format_report, parse_connect_to, parse_resolve, run_doctor

    path = config_mod.config_path(args)
    try:
        opts = DoctorOptions(resolve=parse_resolve(args.resolve), connect_to=parse_connect_to(args.connect_to),
                             cafile=Path(args.cacert) if args.cacert else None, timeout_s=args.timeout)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    report = asyncio.run(run_doctor(path, opts))
    print(json.dumps(report.as_dict(), indent=2) if args.json else format_report(report))
    return report.exit_code


# --- parser -----------------------------------------------------------------------------------------

def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser
                 ) -> None:
    """Add this area's sub-commands to the inverse-cloud parser."""
    from inverse_cloud.ops import setup

    setup.add_commands(sub, common)
    p = sub.add_parser("status", parents=[common], help="what the running server is doing (exit 0 healthy, "
                       "1 degraded, 2 not running)",
                       description="Ask the running server (over its control socket) for the tunnel, the "
                                   "certificate, the last sync per device and whether phones can sync now. "
                                   "Exit 0 healthy (or local only, as configured), 1 degraded, 2 not running.")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--timeout", type=float, default=10.0, metavar="S",
                   help="how long to wait for the server's answer (default: %(default)g)")
    p.add_argument("--watch", action="store_true", help="show the state again every --interval seconds until "
                   "Ctrl-C")
    p.add_argument("--interval", type=float, default=2.0, metavar="S",
                   help="seconds between refreshes with --watch (default: %(default)g)")
    p.add_argument("--count", type=int, metavar="N", help="with --watch: stop after N refreshes (default: until "
                   "Ctrl-C)")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("doctor", parents=[common], help="walk the path a phone takes and name the first broken "
                       "link, with the fix",
                       description="Check, in the order a phone depends on them: the config, key permissions, "
                                   "DNS, the relay, the server, the forwards, public HTTP and HTTPS, DAV and "
                                   "CAA. Stops at the first broken link and says how to fix it. Exit 0 all "
                                   "good, 1 a link is broken or warns, 2 bad configuration.")
    p.add_argument("--resolve", action="append", default=[], metavar="HOST:ADDR",
                   help="answer DNS for HOST with ADDR instead of asking DNS (repeatable; default: ask DNS)")
    p.add_argument("--connect-to", action="append", default=[], metavar="HOST:PORT:ADDR:PORT",
                   help="like curl: connect there instead when the public path is probed (repeatable; default: "
                        "where DNS points)")
    p.add_argument("--cacert", metavar="FILE", help="CA file to check the public certificate against "
                   "(default: the system's)")
    p.add_argument("--timeout", type=float, default=10.0, metavar="S", help="per-step timeout (default 10)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_doctor)

    p = sub.add_parser("phone", parents=[common], help="show the phone/Thunderbird set-up with a QR code",
                       description="Print the DAVx5 QR code, the URLs for Thunderbird and other apps, and "
                                   "whether phones can sync now.")
    p.add_argument("--user", metavar="NAME", help="DAV user (default: the first one)")
    p.set_defaults(func=cmd_phone)

    p = sub.add_parser("service", parents=[common], help="install|uninstall|status of the systemd user unit",
                       description="Write (install), remove (uninstall) or show (status) the systemd user unit "
                                   "that runs `inverse-cloud serve` in the background; install also enables "
                                   "and starts it. Exit 1 when the unit could not be started.")
    p.add_argument("action", choices=["install", "uninstall", "status"], help="what to do")
    p.add_argument("--unit-dir", metavar="DIR", help="write the unit here (default ~/.config/systemd/user)")
    p.add_argument("--no-systemctl", action="store_true", help="only write/remove the file; do not call systemctl")
    p.set_defaults(func=cmd_service)

    p = sub.add_parser("export", parents=[common], help="write a consistent backup (contacts, calendars, users, "
                       "keys, config) to FILE",
                       description="Write a consistent backup (contacts, calendars, users, keys, config) to "
                                   "FILE while the server keeps running; encrypted with a passphrase unless "
                                   "--no-encrypt.")
    p.add_argument("file", metavar="FILE", help="where to write the backup")
    p.add_argument("--passphrase-file", metavar="FILE", help="read the passphrase from FILE's first line "
                   "(default: ask on the terminal)")
    p.add_argument("--no-encrypt", action="store_true", help="write a plain .tar.gz (readable by anyone who "
                   "gets the file)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("import", parents=[common], help="restore a backup into an empty store (new laptop)",
                       description="Restore a backup made by `export` into an empty store (a new laptop); "
                                   "never over existing data.")
    p.add_argument("file", metavar="FILE", help="the backup to restore")
    p.add_argument("--data-dir", metavar="DIR", help="where to restore when there is no config yet "
                   f"(default: {config_mod.default_data_dir()})")
    p.add_argument("--passphrase-file", metavar="FILE", help="the passphrase of an encrypted export, from FILE's "
                   "first line (default: ask on the terminal)")
    p.add_argument("--accept-changes", action="store_true", help="restore even though the export replaces users, "
                   "keys or settings (they are listed without this flag, and nothing is changed)")
    p.set_defaults(func=cmd_import)
