"""The DNS records a set-up needs, as zone-file lines (pure): what ``doctor`` prints at the end."""

from __future__ import annotations

from inverse_cloud.config import Config

__all__ = ["dns_records"]


def dns_records(cfg: Config, relay_addrs: list[str], account_uri: str) -> list[str]:
    """The DNS records the user should have, as zone-file lines (pure)."""
    from inverse_cloud.certs.caa import issuer_domain_for, recommended_record

    d = cfg.server.domain
    lines = []
    # IPv4 only: relay-setup's default NAT rules map IPv4 80/443, so an AAAA record (even when the relay's own
    # name has one) would send IPv6 phones to a port nothing forwards. The sslh and nginx variants can listen on
    # IPv6 (relay-setup --ipv6); their AAAA record is in docs/setup.md.
    for addr in [a for a in relay_addrs if ":" not in a] or ["<relay IPv4 address>"]:
        lines.append(f"{d}. A {addr}")
    issuer = issuer_domain_for(cfg.acme.directory, cfg.acme.caa_issuer) or "<your CA's issuer domain>"
    lines.append(recommended_record(d, issuer, account_uri or "<account URL: shown after the first certificate>",
                                   cfg.acme.caa_methods))
    parent = d.split(".", 1)[1] if "." in d else d
    lines += [
        f"_carddavs._tcp.{parent}. SRV 0 1 443 {d}.   ; optional: clients given only {parent} find the server",
        f"_caldavs._tcp.{parent}. SRV 0 1 443 {d}.",
        f'_carddavs._tcp.{parent}. TXT "path=/radicale/"',
        f'_caldavs._tcp.{parent}. TXT "path=/radicale/"',
    ]
    return lines
