"""What ``doctor`` is told on its command line (pure): the curl-like name overrides, and the DNS records a
set-up needs (``doctor`` and ``setup`` print them)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from inverse_cloud.config import Config

__all__ = ["DoctorOptions", "dns_records", "parse_connect_to", "parse_resolve"]


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


def dns_records(cfg: Config, relay_addrs: list[str], account_uri: str) -> list[str]:
    """The DNS records the user should have, as zone-file lines (pure)."""
    from inverse_cloud.certs.caa import issuer_domain_for, recommended_record

    d = cfg.server.domain
    lines = []
    for addr in relay_addrs or ["<relay IPv4 address>"]:
        lines.append(f"{d}. A{'AAA' if ':' in addr else ''} {addr}")
    issuer = issuer_domain_for(cfg.acme.directory, cfg.acme.caa_issuer) or "<your CA's issuer domain>"
    lines.append(recommended_record(d, issuer, account_uri or "<account URL: shown after the first certificate>"))
    parent = d.split(".", 1)[1] if "." in d else d
    lines += [
        f"_carddavs._tcp.{parent}. SRV 0 1 443 {d}.   ; optional: clients given only {parent} find the server",
        f"_caldavs._tcp.{parent}. SRV 0 1 443 {d}.",
        f'_carddavs._tcp.{parent}. TXT "path=/radicale/"',
        f'_caldavs._tcp.{parent}. TXT "path=/radicale/"',
    ]
    return lines
