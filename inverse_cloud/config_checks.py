"""The value checkers of the config schema (:data:`inverse_cloud.config.SCHEMA`): each turns one TOML value
into a typed value, or raises ``ValueError`` saying what was expected (the loader adds file, line and key)."""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["Checker", "parse_domain", "parse_hostport"]

Checker = Callable[[Any], Any]


def parse_hostport(text: str) -> tuple[str, int]:
    """``"127.0.0.1:8443"`` or ``"[::1]:8443"`` -> (host, port). Raises ValueError."""
    m = re.fullmatch(r"\[([0-9a-fA-F:.]+)\]:(\d+)|([^:\[\]]+):(\d+)", text.strip())
    if not m:
        raise ValueError("expected HOST:PORT, e.g. 127.0.0.1:8443")
    host = m.group(1) or m.group(3)
    port = int(m.group(2) or m.group(4))
    if not 0 <= port <= 65535:
        raise ValueError("port must be 0-65535")
    return host, port


def _str(v: Any) -> str:
    if not isinstance(v, str):
        raise ValueError("expected a string")
    return v


def _nonempty(v: Any) -> str:
    s = _str(v).strip()
    if not s:
        raise ValueError("expected a non-empty string")
    return s


def _opt_ipv6(v: Any) -> str:
    """"" (none) or an IPv6 address, brackets allowed: ``"::"``, ``"[2001:db8::10]"``."""
    s = _str(v).strip().strip("[]")
    if not s:
        return ""
    import ipaddress

    try:
        return str(ipaddress.IPv6Address(s))
    except ValueError:
        raise ValueError('expected an IPv6 address such as "::" (all of the relay\'s), or "" for none') from None


def _domain(v: Any) -> str:
    s = _nonempty(v).lower().rstrip(".")
    if not re.fullmatch(r"(?=.{1,253}$)([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\.)*[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?", s):
        raise ValueError("expected a DNS name such as contacts.example.org")
    return s


def parse_domain(text: str) -> str:
    """A DNS name as ``[server] domain`` accepts it (lower case, no trailing dot). Raises ValueError."""
    return _domain(text)


def _bool(v: Any) -> bool:
    if not isinstance(v, bool):
        raise ValueError("expected true or false")
    return v


def _int_range(lo: int, hi: int) -> Checker:
    def check(v: Any) -> int:
        if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
            raise ValueError(f"expected an integer {lo}-{hi}")
        return v

    return check


def _float_range(lo: float, hi: float) -> Checker:
    def check(v: Any) -> float:
        if isinstance(v, bool) or not isinstance(v, int | float) or not lo <= v <= hi:
            raise ValueError(f"expected a number {lo:g}-{hi:g}")
        return float(v)

    return check


def _hostport(v: Any) -> tuple[str, int]:
    return parse_hostport(_str(v))


def _opt_hostport(v: Any) -> tuple[str, int] | None:
    return parse_hostport(v) if _str(v).strip() else None


def _path(v: Any) -> Path:
    return Path(os.path.expanduser(_nonempty(v)))


def _choice(*choices: str) -> Checker:
    def check(v: Any) -> str:
        if v not in choices:
            raise ValueError("expected one of " + ", ".join(f'"{c}"' for c in choices))
        return str(v)

    return check


def _host_key(v: Any) -> str:
    s = _str(v).strip()
    if s and not re.fullmatch(r"(ssh-ed25519|ecdsa-sha2-nistp\d+|ssh-rsa|rsa-sha2-\d+) [A-Za-z0-9+/=]+", s):
        raise ValueError('expected an OpenSSH public key line such as "ssh-ed25519 AAAAC3..."')
    return s
