"""``doctor``'s IPv6 link: when the domain has AAAA records, each one must lead to this laptop as A does.

A phone on an IPv6-first mobile network uses the AAAA record whenever there is one. A record that points at the
relay while the relay maps only IPv4 onto the tunnel fails for exactly those phones, now and then, which is worse
than having no AAAA record at all; so the check probes every AAAA address's port 443 and compares the key.
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from inverse_cloud.config import Config
from inverse_cloud.ops.doctor_options import DoctorOptions
from inverse_cloud.ops.netprobe import describe, http_request, spki_sha256_of_cert

__all__ = ["NAME", "V6Verdict", "check_https6"]

NAME = "public HTTPS (IPv6)"


@dataclass(frozen=True)
class V6Verdict:
    state: str      # ok | fail | warn | skip
    detail: str
    fix: str = ""


def has_route6(addr: str) -> bool:
    """Whether this machine has an IPv6 route to ``addr`` (a UDP connect: the kernel's route lookup, no packet)."""
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as sock:
            sock.connect((addr, 443))
    except OSError:
        return False
    return True


def _no_verify() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


async def check_https6(cfg: Config, status: dict[str, Any], resolve: Callable[[str], Awaitable[list[str]]],
                       relay_addrs: list[str], opts: DoctorOptions,
                       probe: Callable[[tuple[str, int]], Awaitable[bytes | None]] | None = None,
                       routable: Callable[[str], bool] = has_route6) -> V6Verdict:
    """The verdict on the domain's IPv6 path: ``resolve`` is doctor's (``--resolve``, ``[acme] dns_server`` or the
    system), ``relay_addrs`` what it found for the relay; ``probe`` (tests) returns the certificate a TLS
    handshake to an address gets, by default a real one; ``routable`` whether this machine can reach an IPv6
    address at all."""
    if (cfg.server.domain, 443) in opts.connect_to:
        return V6Verdict("skip", "port 443 is redirected by --connect-to")
    try:
        domain_addrs = await resolve(cfg.server.domain) if cfg.relay.enabled else []
    except OSError:
        domain_addrs = []
    our_key_sha256 = (status.get("certificate") or {}).get("key_sha256", "")
    timeout_s = opts.timeout_s
    domain = cfg.server.domain
    if not cfg.relay.enabled:
        return V6Verdict("skip", "no relay configured")
    v6 = sorted(a for a in domain_addrs if ":" in a)
    relay6 = sorted(a for a in relay_addrs if ":" in a)
    if not v6:
        if cfg.relay.listen_host6 and relay6:
            return V6Verdict("warn", f"{domain} has no AAAA record, though the relay ({', '.join(relay6)}) serves "
                             "IPv6 ([relay] listen_host6): phones on IPv6-only networks need NAT64 to reach it",
                             f"publish: {domain}. AAAA {relay6[0]}")
        return V6Verdict("ok", f"{domain} has no AAAA record: phones reach it over IPv4 only"
                         + ("" if cfg.relay.listen_host6 else " (the relay's NAT maps IPv4 only)"))

    async def handshake(target: tuple[str, int]) -> bytes | None:
        return (await http_request(target, domain, "HEAD", "/", timeout_s, tls=_no_verify()))[3]

    get = probe or handshake
    fix = ("the relay must map [v6]:443 onto the tunnel: `inverse-cloud relay-setup --ipv6 --apply ADMIN@RELAY` "
           "(an ip6 table, and [relay] listen_host6 here; then restart serve), or remove the AAAA record")
    unroutable = [a for a in v6 if not routable(a)]
    if unroutable:
        # Not the relay's fault, nor proof that the path works: this laptop's network has no IPv6.
        return V6Verdict("skip", f"AAAA {', '.join(v6)}: this machine has no IPv6 route, so [v6]:443 cannot be "
                         "probed from here (check from a phone on IPv6, or run doctor from a network with IPv6)")
    for addr in v6:
        try:
            der = await get((addr, 443))
        except (OSError, TimeoutError, ssl.SSLError) as exc:
            return V6Verdict("fail", f"https://{domain}/ over IPv6 ([{addr}]:443, its AAAA record) does not answer "
                             f"({describe(exc)}): phones on IPv6 cannot sync", fix)
        if der is None:
            return V6Verdict("fail", f"[{addr}]:443 presented no certificate", fix)
        theirs = spki_sha256_of_cert(der)
        if our_key_sha256 and theirs != our_key_sha256:
            return V6Verdict("fail", f"[{addr}]:443 (AAAA of {domain}) presents a certificate whose key is not ours "
                             f"(sha256 {theirs[:16]}…): something else answers IPv6 phones",
                             "check the AAAA record and the relay's ip6 rules; do not sync over IPv6 until fixed")
    return V6Verdict("ok", f"AAAA {', '.join(v6)}: [v6]:443 presents our key (sha256 {our_key_sha256[:16]}…)")
