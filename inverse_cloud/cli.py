"""Command line. The only module that prints errors for humans and chooses exit codes (README "Exit
codes"): 0 ok, 1 a command failed, 2 bad configuration or usage, 3 ``serve`` could not start, 130 Ctrl-C,
141 the output pipe was closed."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from inverse_cloud import __version__
from inverse_cloud import config as config_mod
from inverse_cloud.certs import commands as cert_commands
from inverse_cloud.dav import commands as dav_commands
from inverse_cloud.errors import ConfigError, InverseCloudError, StartupError
from inverse_cloud.ops import commands as ops_commands
from inverse_cloud.ops import init as init_cmd
from inverse_cloud.tunnel import commands as tunnel_commands

__all__ = ["main"]

log = logging.getLogger("inverse_cloud")

def _serve(args: argparse.Namespace) -> int:
    # The composition root imports every component (aiohttp, Radicale, asyncssh): only ``serve`` pays for it.
    from inverse_cloud import app

    return app.cmd_serve(args)


# --- parser -----------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="inverse-cloud",
        description="Contacts and calendars on your laptop, reachable through a relay that only sees TLS.")
    parser.add_argument("--version", action="version", version=f"inverse-cloud {__version__}")
    config_help = (f"config file (default: $INVERSE_CLOUD_CONFIG, else {config_mod.default_config_path()}); "
                   "before or after the command")
    parser.add_argument("--config", metavar="PATH", help=config_help)
    # The same option after the command. SUPPRESS: absent there, it must not overwrite a --config given
    # before the command with None (argparse copies a sub-parser's defaults over the parent's values).
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", metavar="PATH", default=argparse.SUPPRESS, help=config_help)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    # Each area contributes its own commands, in the order `--help` lists them.
    init_cmd.add_commands(sub, common)
    dav_commands.add_commands(sub, common)
    p = sub.add_parser("serve", parents=[common], help="run the server (and tunnel, and certificates)",
                       description="Run the DAV server, the tunnel to the relay and the certificate manager in "
                                   "the foreground until SIGTERM or Ctrl-C (the systemd unit runs this).")
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"],
                   help="log detail on stderr (default: [server] log_level in the config, info)")
    p.set_defaults(func=_serve)
    for area in (tunnel_commands, cert_commands, ops_commands):
        area.add_commands(sub, common)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "command", None) == "user" and args.action != "list" and not args.name:
        parser.error("user add|remove|passwd needs a NAME")
    try:
        code = int(args.func(args))
        sys.stdout.flush()  # here, so a closed pipe is seen below and not at interpreter exit
        return code
    except BrokenPipeError:
        # The reader went away (`status | head -n1`): stop quietly, as a program killed by SIGPIPE would.
        # Later writes (the interpreter's final flush) go to /dev/null instead of raising again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return 141
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
