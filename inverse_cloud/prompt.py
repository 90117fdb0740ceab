"""Asking the person at the terminal: a default in brackets, a password twice without echo."""

from __future__ import annotations

import argparse
import getpass
import sys
from pathlib import Path

from inverse_cloud.errors import ConfigError, UserError

__all__ = ["ask", "read_passphrase", "read_password"]


def ask(prompt: str, default: str, interactive: bool) -> str:
    if not interactive:
        return default
    answer = input(f"{prompt} [{default}]: ").strip() if default else input(f"{prompt}: ").strip()
    return answer or default


def read_password(args: argparse.Namespace, interactive: bool, user: str) -> str:
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


def read_passphrase(passphrase_file: str | None, confirm: bool) -> str:
    """A backup passphrase from ``passphrase_file`` (its first line), else asked on the terminal (twice
    when ``confirm``).

    :raises ConfigError: no file and no terminal, an unreadable file, or an empty passphrase.
    :raises UserError: the two answers differ.
    """
    if passphrase_file:
        try:
            text = Path(passphrase_file).expanduser().read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"--passphrase-file {passphrase_file}: {getattr(exc, 'strerror', None) or exc}"
                              ) from None
        passphrase = text.splitlines()[0] if text else ""
        if not passphrase:
            raise ConfigError(f"--passphrase-file {passphrase_file}: the file is empty")
        return passphrase
    if not sys.stdin.isatty():
        raise ConfigError("no passphrase: give --passphrase-file FILE (or run on a terminal to be asked)")
    first = getpass.getpass("Backup passphrase: ")
    if not first:
        raise ConfigError("empty passphrase refused")
    if confirm and first != getpass.getpass("Again: "):
        raise UserError("passphrases differ; nothing was written")
    return first
