"""Asking the person at the terminal: a default in brackets, a password twice without echo, and an answer
asked again with a one-line reason until it passes its check."""

from __future__ import annotations

import argparse
import getpass
import sys
from collections.abc import Callable
from pathlib import Path

from inverse_cloud.errors import ConfigError, UserError

__all__ = ["ask", "ask_until", "read_passphrase", "read_password", "read_password_file"]

# A check returns why an answer will not do (one line), or None when it will.
Problem = Callable[[str], str | None]


def ask(prompt: str, default: str, interactive: bool) -> str:
    if not interactive:
        return default
    answer = input(f"{prompt} [{default}]: ").strip() if default else input(f"{prompt}: ").strip()
    return answer or default


def ask_until(prompt: str, default: str, problem: Problem, *, allow_empty: bool = False) -> str:
    """Ask until ``problem(answer)`` is None, printing its reason each time. An empty answer is accepted
    as is when ``allow_empty``. EOF (Ctrl-D) ends the asking with a ConfigError."""
    while True:
        try:
            answer = ask(prompt, default, True)
        except EOFError:
            raise ConfigError(f"no answer to {prompt!r}") from None
        if not answer and allow_empty:
            return answer
        why = problem(answer) if answer else "an answer is needed"
        if why is None:
            return answer
        print(f"  {why} Try again." if why.endswith("?") else f"  {why}; try again")


def read_password_file(path: str) -> str:
    """The password in ``path``: its one line, without the newline an editor adds.

    :raises ConfigError: the file cannot be read, or has more than one line (a note, a second password).
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"--password-file {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"--password-file {path}: not UTF-8 text") from None
    body = text[:-1] if text.endswith("\n") else text
    body = body[:-1] if body.endswith("\r") else body
    lines = body.splitlines()
    if len(lines) > 1:
        raise ConfigError(f"--password-file {path} has {len(lines)} lines; put the password alone on one line")
    return body


def read_password(args: argparse.Namespace, interactive: bool, user: str, problem: Problem | None = None) -> str:
    """The password from ``--password-file``, else asked twice on the terminal (again while ``problem``
    finds one, with its reason).

    :raises ConfigError: no file and no terminal, or the file's password fails ``problem``.
    :raises UserError: the two typed passwords differ.
    """
    if args.password_file:
        password = read_password_file(args.password_file)
        why = problem(password) if problem else None
        if why:
            raise ConfigError(f"--password-file {args.password_file}: {why}")
        return password
    if not interactive or not sys.stdin.isatty():
        raise ConfigError("no password: give --password-file FILE (or run on a terminal to be asked)")
    while True:
        first = getpass.getpass(f"Password for DAV user {user}: ")
        why = problem(first) if problem else None
        if why:
            print(f"  {why}; try again")
            continue
        if first != getpass.getpass("Again: "):
            if problem is None:
                raise UserError("passwords differ; nothing was changed")
            print("  the two passwords differ; try again")
            continue
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
