"""The DNS records a set-up needs, as zone-file lines (pure): what ``doctor`` prints at the end."""

from __future__ import annotations

from inverse_cloud.config import Config

__all__ = ["dns_records"]


def dns_records(cfg: Config, relay_addrs: list[str], account_uri: str) -> list[str]:
    """The DNS records the user should have, as zone-file lines (pure)."""
    from inverse_cloud.certs.caa import issuer_domain_for, recommended_record

    d = cfg.server.domain
    lines = []
    # AAAA only when this set-up serves IPv6: [relay] listen_host6 (relay-setup --ipv6) binds the forwards the
    # relay's ip6 NAT maps [v6]:443/80 onto. Without it the NAT maps IPv4 only, and an AAAA record (even when the
    # relay's own name has one) would send IPv6 phones to a port nothing forwards.
    v4 = [a for a in relay_addrs if ":" not in a]
    for addr in v4 or ["<relay IPv4 address>"]:
        lines.append(f"{d}. A {addr}")
    if cfg.relay.listen_host6:
        lines += [f"{d}. AAAA {a}" for a in relay_addrs if ":" in a]
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
