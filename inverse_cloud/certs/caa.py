"""CAA: the record that keeps the relay from getting a certificate for our domain.

The domain's A/AAAA records point at the relay, which owns ports 80/443, so a hostile relay could pass
HTTP-01 (or TLS-ALPN-01) itself. A CAA record bound to our ACME account and to the challenge in use
(RFC 8657) stops that: the CA refuses
every other account. This module evaluates a CAA record set (pure) and looks one up (dnspython: in a thread, or
for the long-running server in a short-lived child process, so that the server never imports it).

States (``CaaVerdict.state``):

* ``ok``             only our account (at our CA) may issue;
* ``missing``        no ``issue`` property: any CA, any account may issue (the relay too);
* ``too-permissive`` our account may issue, but so may another CA or another account;
* ``blocks-us``      no record lets our account issue with the challenge in use: renewals will fail;
* ``unknown``        the look-up failed (DNS error), or we do not know our CA's issuer domain / account yet.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
from collections.abc import Sequence
from concurrent.futures import Executor
from dataclasses import dataclass

from inverse_cloud.config import LETSENCRYPT, LETSENCRYPT_STAGING

__all__ = [
    "STATES",
    "CaaRecord",
    "CaaVerdict",
    "evaluate",
    "issuer_domain_for",
    "lookup_caa",
    "lookup_caa_isolated",
    "parse_issue_value",
    "recommended_record",
]

log = logging.getLogger(__name__)

STATES = ("ok", "missing", "too-permissive", "blocks-us", "unknown")
# RFC 8659 7.1 + registered properties; an unknown property with the critical flag forbids issuance.
KNOWN_TAGS = {"issue", "issuewild", "iodef", "issuemail", "issuevmc", "contactemail", "contactphone"}
CRITICAL = 128
METHOD = "http-01"

_ISSUERS = {LETSENCRYPT: "letsencrypt.org", LETSENCRYPT_STAGING: "letsencrypt.org"}


@dataclass(frozen=True)
class CaaRecord:
    flags: int
    tag: str
    value: str

    def __str__(self) -> str:
        return f'{self.flags} {self.tag} "{self.value}"'


@dataclass(frozen=True)
class CaaVerdict:
    state: str
    detail: str
    owner: str = ""   # the name whose record set was relevant (after climbing to a parent)

    @property
    def is_ok(self) -> bool:
        return self.state == "ok"


def issuer_domain_for(directory_url: str, configured: str = "") -> str:
    """The CA's CAA issuer domain: ``[acme] caa_issuer`` if set, "letsencrypt.org" for Let's Encrypt, else ""."""
    return configured.strip().lower() or _ISSUERS.get(directory_url.rstrip("/"), _ISSUERS.get(directory_url, ""))


def recommended_record(domain: str, issuer: str, account_uri: str, method: str = METHOD) -> str:
    """The zone-file line to publish (RFC 8657 accounturi + validationmethods). ``method``: the challenge
    type(s) in use, comma-separated (``[acme] challenge = "auto"`` uses two)."""
    return f'{domain.rstrip(".")}. CAA 0 issue "{issuer}; accounturi={account_uri}; validationmethods={method}"'


def parse_issue_value(value: str) -> tuple[str, dict[str, str]]:
    """``"letsencrypt.org; accounturi=https://...; validationmethods=http-01"`` ->
    ("letsencrypt.org", {"accounturi": ..., "validationmethods": "http-01"}) (RFC 8659 4.2).

    An empty issuer (``";"``) means "no CA may issue". Parameter names are case-insensitive.
    """
    issuer, _, rest = value.partition(";")
    params: dict[str, str] = {}
    for part in rest.split(";"):
        key, sep, val = part.strip().partition("=")
        if sep and key.strip():
            params[key.strip().lower()] = val.strip()
    return issuer.strip().lower().rstrip("."), params


def _permits(params: dict[str, str], issuer: str, want_issuer: str, account: str, method: str) -> bool:
    if not issuer or issuer != want_issuer:
        return False
    acct = params.get("accounturi")
    if acct is not None and acct != account:
        return False
    methods = params.get("validationmethods")
    if methods is None:
        return True
    allowed = [m.strip().lower() for m in methods.split(",")]
    return all(m.strip() in allowed for m in method.split(","))


def evaluate(records: Sequence[CaaRecord], issuer: str, account_uri: str, owner: str = "",
             method: str = METHOD) -> CaaVerdict:
    """Judge the relevant CAA record set for a non-wildcard name (RFC 8659 section 4, RFC 8657)."""
    if not issuer:
        return CaaVerdict("unknown", "the CA's CAA issuer domain is unknown (set [acme] caa_issuer)", owner)
    if not account_uri:
        return CaaVerdict("unknown", "no ACME account yet (it is created with the first order)", owner)
    for r in records:
        if r.flags & CRITICAL and r.tag.lower() not in KNOWN_TAGS:
            return CaaVerdict("blocks-us", f"critical unknown property {r}: no CA will issue", owner)
    issues = [r for r in records if r.tag.lower() == "issue"]
    if not issues:
        what = "no CAA record" if not records else "CAA records without an issue property"
        return CaaVerdict("missing", f"{what}: any CA and any account may issue, the relay included", owner)
    ours: list[CaaRecord] = []
    others: list[str] = []
    for r in issues:
        iss, params = parse_issue_value(r.value)
        if _permits(params, iss, issuer, account_uri, method):
            ours.append(r)
        if not iss:
            continue  # ";" forbids, it permits nobody
        acct = params.get("accounturi")
        if iss != issuer:
            others.append(f"CA {iss}")
        elif acct is None:
            others.append(f"any account at {iss}")
        elif acct != account_uri:
            others.append(f"account {acct}")
    if not ours:
        return CaaVerdict("blocks-us", f"no CAA issue record lets account {account_uri} at {issuer} use {method}; "
                                       "renewals will be refused", owner)
    if others:
        return CaaVerdict("too-permissive", "CAA also allows " + ", ".join(sorted(set(others))), owner)
    return CaaVerdict("ok", f"only account {account_uri} at {issuer} may issue", owner)


def _candidates(domain: str) -> list[str]:
    """RFC 8659 3: the name itself, then each parent, excluding the root."""
    labels = domain.rstrip(".").split(".")
    return [".".join(labels[i:]) + "." for i in range(len(labels))]


def lookup_caa_sync(domain: str, nameserver: tuple[str, int] | None = None,
                    timeout_s: float = 5.0) -> tuple[list[CaaRecord], str]:
    """The relevant CAA record set of ``domain`` and the name it was found at ([] and "" when none).

    :raises OSError: the look-up failed (timeout, SERVFAIL, no resolver) -- not "no record".
    """
    import dns.exception
    import dns.rdatatype
    import dns.resolver

    resolver = dns.resolver.Resolver(configure=nameserver is None)
    if nameserver is not None:
        resolver.nameservers = [nameserver[0]]
        resolver.port = nameserver[1]
    resolver.lifetime = timeout_s
    for name in _candidates(domain):
        try:
            answer = resolver.resolve(name, "CAA", raise_on_no_answer=False)
        except dns.resolver.NXDOMAIN:
            continue
        except dns.exception.DNSException as exc:
            raise OSError(f"CAA look-up of {name} failed ({type(exc).__name__}: {exc})") from exc
        records = [
            CaaRecord(int(rd.flags), rd.tag.decode("ascii", "replace"), rd.value.decode("utf-8", "replace"))
            for rd in (answer.rrset or []) if rd.rdtype == dns.rdatatype.CAA
        ]
        if records:
            return records, name
    return [], ""


async def lookup_caa(domain: str, issuer: str, account_uri: str, nameserver: tuple[str, int] | None = None,
                     executor: Executor | None = None, method: str = METHOD) -> CaaVerdict:
    """Look up and evaluate; DNS errors become state "unknown" (never raises for DNS)."""
    loop = asyncio.get_running_loop()
    try:
        records, owner = await loop.run_in_executor(executor, lookup_caa_sync, domain, nameserver)
    except OSError as exc:
        return CaaVerdict("unknown", str(exc))
    return evaluate(records, issuer, account_uri, owner, method)


# One look-up climbs at most a few names with a 5 s lifetime each; the child also pays an interpreter start.
CHILD_TIMEOUT_S = 60.0


async def _lookup_in_child(domain: str, nameserver: tuple[str, int] | None,
                           timeout_s: float) -> tuple[list[CaaRecord], str]:
    """:func:`lookup_caa_sync` in ``python -m inverse_cloud.certs.caa_child``.

    :raises OSError: the look-up failed, or the child did not answer within ``timeout_s``.
    """
    args = [domain] + ([f"{nameserver[0]}:{nameserver[1]}"] if nameserver else [])
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "inverse_cloud.certs.caa_child", *args,
                                                stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout_s)
    except TimeoutError:
        raise OSError(f"CAA look-up of {domain} did not finish within {timeout_s:g} s") from None
    finally:
        if proc.returncode is None:  # timed out, or the caller was cancelled: the child goes too
            proc.kill()
            await proc.wait()
    try:
        answer = json.loads(out.decode("utf-8", "replace").strip().splitlines()[-1])
    except (ValueError, IndexError):
        detail = err.decode("utf-8", "replace").strip().splitlines()[-1:] or [f"exit code {proc.returncode}"]
        raise OSError(f"CAA look-up of {domain} failed ({detail[0]})") from None
    if "error" in answer:
        raise OSError(str(answer["error"]))
    return [CaaRecord(int(f), str(t), str(v)) for f, t, v in answer["records"]], str(answer["owner"])


async def lookup_caa_isolated(domain: str, issuer: str, account_uri: str,
                              nameserver: tuple[str, int] | None = None, method: str = METHOD,
                              timeout_s: float = CHILD_TIMEOUT_S) -> CaaVerdict:
    """:func:`lookup_caa` with the DNS part in a short-lived child process (dnspython stays out of the
    caller); DNS errors, and a child that fails or hangs, become state "unknown" (never raises for DNS)."""
    try:
        records, owner = await _lookup_in_child(domain, nameserver, timeout_s)
    except OSError as exc:
        return CaaVerdict("unknown", str(exc))
    return evaluate(records, issuer, account_uri, owner, method)
