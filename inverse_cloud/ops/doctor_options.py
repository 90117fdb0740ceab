"""What ``doctor`` is told on its command line (pure): the curl-like name overrides, and the DNS records a
set-up needs (``doctor`` and ``setup`` print them)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["DoctorOptions", "parse_connect_to", "parse_resolve"]


@dataclass(frozen=True)
class DoctorOptions:
    resolve: dict[str, list[str]] = field(default_factory=dict)
    connect_to: dict[tuple[str, int], tuple[str, int]] = field(default_factory=dict)
    cafile: Path | None = None
    timeout_s: float = 10.0


def parse_resolve(items: list[str]) -> dict[str, list[str]]:
    """``["host:127.0.0.2", "host:[::1]"]`` -> ``{"host": ["127.0.0.2", "::1"]}``. Raises ValueError."""
    out: dict[str, list[str]] = {}
    for item in items:
        host, sep, addr = item.partition(":")
        if not sep or not host or not addr:
            raise ValueError(f"--resolve {item}: expected HOST:ADDR")
        out.setdefault(host.lower().rstrip("."), []).append(addr.strip("[]"))
    return out


def parse_connect_to(items: list[str]) -> dict[tuple[str, int], tuple[str, int]]:
    """curl's ``HOST1:PORT1:HOST2:PORT2``. Raises ValueError."""
    out: dict[tuple[str, int], tuple[str, int]] = {}
    for item in items:
        parts = item.split(":")
        if len(parts) != 4 or not all(p.isdigit() for p in (parts[1], parts[3])):
            raise ValueError(f"--connect-to {item}: expected HOST:PORT:ADDR:PORT")
        out[(parts[0].lower(), int(parts[1]))] = (parts[2], int(parts[3]))
    return out


