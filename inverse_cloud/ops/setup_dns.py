"""What ``setup`` asks DNS while it waits for the records the user publishes: the domain's authoritative
servers (found through the system resolver, then asked directly, so a cached negative answer elsewhere does
not hide a record that is already published), their A/AAAA and CAA answers, and one line saying what each
server sees and what is wrong. Blocking (dnspython): ``setup`` is a command, not the server."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

__all__ = ["Nameserver", "a_record_view", "authoritative_servers", "caa_view", "wait_for"]

DNS_PORT = 53


@dataclass(frozen=True)
class Nameserver:
    name: str
    address: str
    port: int = DNS_PORT

    def __str__(self) -> str:
        return self.name if self.name == self.address else f"{self.name} ({self.address})"


def authoritative_servers(domain: str, timeout_s: float = 5.0) -> list[Nameserver]:
    """The name servers of the zone holding ``domain`` (its NS set, or its nearest parent's), with addresses.

    :raises OSError: no zone above ``domain`` has NS records the system resolver can find.
    """
    import dns.exception
    import dns.resolver

    resolver = dns.resolver.Resolver()
    resolver.lifetime = timeout_s
    labels = domain.rstrip(".").split(".")
    for i in range(len(labels) - 1):
        zone = ".".join(labels[i:])
        try:
            answer = resolver.resolve(zone, "NS", raise_on_no_answer=False)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoNameservers):
            continue
        except dns.exception.DNSException as exc:
            raise OSError(f"cannot find the name servers of {zone}: {exc}") from exc
        names = sorted(str(rd.target).rstrip(".") for rd in (answer.rrset or []))
        if not names:
            continue
        out: list[Nameserver] = []
        for ns in names:
            for rtype in ("A", "AAAA"):
                try:
                    addrs = resolver.resolve(ns, rtype, raise_on_no_answer=False)
                except dns.exception.DNSException:
                    continue
                out += [Nameserver(ns, rd.to_text()) for rd in (addrs.rrset or [])]
        if out:
            return out
        raise OSError(f"the name servers of {zone} ({', '.join(names)}) have no address")
    raise OSError(f"no name servers found for {domain} (is the domain registered?)")


def a_record_view(domain: str, servers: Sequence[Nameserver], relay: Sequence[str], *, need_v6: bool = False
                  ) -> tuple[bool, str]:
    """``(ok, line)``: ok when every server answers with relay addresses only (and, with ``need_v6``, an IPv6 one
    among them: the AAAA record); the line says what each sees."""
    from inverse_cloud.ops.netprobe import dns_addresses

    parts, ok = [], True
    for ns in servers:
        try:
            seen = dns_addresses(domain, (ns.address, ns.port))
        except OSError as exc:
            ok = False
            parts.append(f"{ns}: no answer ({exc})")
            continue
        if not seen:
            ok = False
            parts.append(f"{ns}: no A/AAAA record yet")
        elif not set(seen) <= set(relay):
            ok = False
            stray = ", ".join(sorted(set(seen) - set(relay)))
            parts.append(f"{ns}: {', '.join(seen)} ({stray} is not the relay)")
        elif need_v6 and not any(":" in a for a in seen):
            ok = False
            parts.append(f"{ns}: {', '.join(seen)} (no AAAA record yet)")
        else:
            parts.append(f"{ns}: {', '.join(seen)}")
    return ok, "; ".join(parts)


def caa_view(domain: str, servers: Sequence[Nameserver], issuer: str, account_uri: str) -> tuple[bool, str]:
    """``(ok, line)``: ok when every server's CAA set lets only our ACME account issue for ``domain``."""
    from inverse_cloud.certs.caa import evaluate, lookup_caa_sync

    parts, ok = [], True
    for ns in servers:
        try:
            records, owner = lookup_caa_sync(domain, (ns.address, ns.port))
        except OSError as exc:
            ok = False
            parts.append(f"{ns}: no answer ({exc})")
            continue
        verdict = evaluate(records, issuer, account_uri, owner)
        ok = ok and verdict.is_ok
        parts.append(f"{ns}: {verdict.state}" + ("" if verdict.is_ok else f" ({verdict.detail})"))
    return ok, "; ".join(parts)


def wait_for(view: Callable[[], tuple[bool, str]], timeout_s: float, interval_s: float,
             show: Callable[[str], None], clock: Callable[[], float], pause: Callable[[float], None]) -> bool:
    """Call ``view`` until it says ok or ``timeout_s`` passed, showing each line; True when ok."""
    deadline = clock() + timeout_s
    while True:
        ok, line = view()
        show(line)
        if ok:
            return True
        if clock() >= deadline:
            return False
        pause(interval_s)
