"""DAV users in an htpasswd file (bcrypt), the format Radicale reads."""

from __future__ import annotations

import re
from pathlib import Path

import bcrypt

from inverse_cloud.errors import UserError
from inverse_cloud.fsutil import atomic_write

__all__ = ["add_user", "list_users", "remove_user", "set_password", "validate_username"]

# Radicale 3.8+ rejects ':' and several '@'; we also keep path-hostile characters out, since the user
# name becomes a folder and a URL segment.
_USER_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@+-]{0,63}")
BCRYPT_ROUNDS = 12


def validate_username(name: str) -> str:
    if not _USER_RE.fullmatch(name) or name.count("@") > 1 or ".." in name:
        raise UserError(f"invalid user name {name!r}: use 1-64 letters, digits and . _ @ + - "
                        "(starting with a letter or digit)")
    return name


def _read(path: Path) -> list[tuple[str, str]]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    out = []
    for line in text.splitlines():
        if line.strip() and not line.startswith("#") and ":" in line:
            user, _, hashed = line.partition(":")
            out.append((user, hashed))
    return out


def _write(path: Path, entries: list[tuple[str, str]]) -> None:
    atomic_write(path, "".join(f"{u}:{h}\n" for u, h in entries).encode("utf-8"), mode=0o600)


def _hash(password: str) -> str:
    if not password:
        raise UserError("empty password refused")
    if len(password.encode("utf-8")) > 72:
        raise UserError("password longer than 72 bytes: bcrypt would ignore the rest; use a shorter one")
    return bcrypt.hashpw(password.encode("utf-8"), bcrypt.gensalt(BCRYPT_ROUNDS)).decode("ascii")


def list_users(path: Path) -> list[str]:
    return [u for u, _ in _read(path)]


def add_user(path: Path, name: str, password: str) -> None:
    validate_username(name)
    entries = _read(path)
    if any(u == name for u, _ in entries):
        raise UserError(f"user {name!r} already exists in {path} (use `inverse-cloud user passwd {name}`)")
    entries.append((name, _hash(password)))
    _write(path, entries)


def set_password(path: Path, name: str, password: str) -> None:
    entries = _read(path)
    if not any(u == name for u, _ in entries):
        raise UserError(f"no user {name!r} in {path}")
    hashed = _hash(password)
    _write(path, [(u, hashed if u == name else h) for u, h in entries])


def remove_user(path: Path, name: str) -> None:
    entries = _read(path)
    if not any(u == name for u, _ in entries):
        raise UserError(f"no user {name!r} in {path}")
    _write(path, [(u, h) for u, h in entries if u != name])
