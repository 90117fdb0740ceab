"""CAA (inverse_cloud/certs/caa.py): RFC 8659/8657 evaluation as a table, and the look-up (tree climbing) against a
small in-process DNS server on a free loopback UDP port."""

from __future__ import annotations

import socket
import threading

import dns.message
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset
import pytest

from inverse_cloud.certs.caa import (
    CaaRecord,
    evaluate,
    issuer_domain_for,
    lookup_caa,
    lookup_caa_sync,
    parse_issue_value,
    recommended_record,
)
from inverse_cloud.config import LETSENCRYPT, LETSENCRYPT_STAGING

ACCT = "https://acme-v02.api.letsencrypt.org/acme/acct/123456"
OTHER = "https://acme-v02.api.letsencrypt.org/acme/acct/999"
LE = "letsencrypt.org"


def issue(value: str, flags: int = 0) -> CaaRecord:
    return CaaRecord(flags, "issue", value)


PINNED = issue(f"letsencrypt.org; accounturi={ACCT}; validationmethods=http-01")


@pytest.mark.parametrize(("methods", "method", "state"), [
    ("http-01", "tls-alpn-01", "blocks-us"),
    ("tls-alpn-01", "tls-alpn-01", "ok"),
    ("http-01,tls-alpn-01", "http-01,tls-alpn-01", "ok"),
    ("tls-alpn-01", "http-01,tls-alpn-01", "blocks-us"),        # auto may use either: both must be allowed
])
def test_validationmethods_follows_the_challenge_in_use(methods, method, state):
    record = issue(f"letsencrypt.org; accounturi={ACCT}; validationmethods={methods}")
    assert evaluate([record], LE, ACCT, method=method).state == state
    assert recommended_record("a.test", LE, ACCT, method).endswith(f'validationmethods={method}"')


@pytest.mark.parametrize(("records", "state", "needle"), [
    ([], "missing", "any CA"),
    ([CaaRecord(0, "iodef", "mailto:a@example.org")], "missing", "without an issue property"),
    ([PINNED], "ok", "only account"),
    ([PINNED, CaaRecord(0, "iodef", "mailto:a@example.org")], "ok", ""),
    ([issue(f"LetsEncrypt.org ; AccountURI={ACCT} ; validationmethods=dns-01,http-01")], "ok", ""),  # case, spaces
    ([issue(f"letsencrypt.org; accounturi={ACCT}")], "ok", ""),            # any method, but only our account
    ([issue("letsencrypt.org")], "too-permissive", "any account at letsencrypt.org"),
    ([PINNED, issue("sectigo.com")], "too-permissive", "CA sectigo.com"),
    ([PINNED, issue(f"letsencrypt.org; accounturi={OTHER}")], "too-permissive", OTHER),
    ([PINNED, issue(";")], "ok", ""),                                        # ";" permits nobody
    ([issue(";")], "blocks-us", "renewals will be refused"),
    ([issue("sectigo.com")], "blocks-us", ""),
    ([issue(f"letsencrypt.org; accounturi={OTHER}")], "blocks-us", ""),
    ([issue(f"letsencrypt.org; accounturi={ACCT}; validationmethods=dns-01")], "blocks-us", "http-01"),
    ([PINNED, CaaRecord(128, "tbs", "unknown")], "blocks-us", "critical unknown property"),
    ([PINNED, CaaRecord(0, "tbs", "unknown")], "ok", ""),                   # non-critical unknown: ignored
    ([CaaRecord(0, "issuewild", "sectigo.com"), PINNED], "ok", ""),          # issuewild: not for our name
])
def test_evaluate(records, state, needle):
    verdict = evaluate(records, LE, ACCT)
    assert verdict.state == state, verdict.detail
    assert needle in verdict.detail


def test_evaluate_without_issuer_or_account_is_unknown():
    assert evaluate([PINNED], "", ACCT).state == "unknown"
    assert "caa_issuer" in evaluate([PINNED], "", ACCT).detail
    assert evaluate([PINNED], LE, "").state == "unknown"


def test_parse_issue_value():
    assert parse_issue_value(f" LetsEncrypt.org. ;accounturi={ACCT}; validationmethods = http-01 ;") == (
        "letsencrypt.org", {"accounturi": ACCT, "validationmethods": "http-01"})
    assert parse_issue_value(";") == ("", {})


def test_recommended_record_and_issuer():
    assert recommended_record("contacts.example.org", LE, ACCT) == (
        f'contacts.example.org. CAA 0 issue "letsencrypt.org; accounturi={ACCT}; validationmethods=http-01"')
    assert issuer_domain_for(LETSENCRYPT) == issuer_domain_for(LETSENCRYPT_STAGING) == LE
    assert issuer_domain_for("https://127.0.0.1:14000/dir") == ""
    assert issuer_domain_for("https://127.0.0.1:14000/dir", "Pebble.Test") == "pebble.test"


# --- look-up against a DNS server we control -------------------------------------------------------------

class TinyDNS:
    """Answers CAA queries from a dict name -> [CaaRecord]; NXDOMAIN for names not in ``exists``;
    SERVFAIL for names in ``broken``. UDP on a free loopback port, one thread, stopped by the fixture."""

    def __init__(self, zone: dict[str, list[CaaRecord]], exists: set[str], broken: set[str] = frozenset()) -> None:
        self.zone, self.exists, self.broken = zone, exists, broken
        self.queries: list[str] = []
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                data, addr = self.sock.recvfrom(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            q = dns.message.from_wire(data)
            name = q.question[0].name.to_text()
            self.queries.append(name)
            r = dns.message.make_response(q)
            if name in self.broken:
                r.set_rcode(dns.rcode.SERVFAIL)
            elif name not in self.exists and name not in self.zone:
                r.set_rcode(dns.rcode.NXDOMAIN)
            elif q.question[0].rdtype == dns.rdatatype.CAA and self.zone.get(name):
                texts = [f'{c.flags} {c.tag} "{c.value}"' for c in self.zone[name]]
                r.answer.append(dns.rrset.from_text(name, 300, "IN", "CAA", *texts))
            self.sock.sendto(r.to_wire(), addr)

    def __enter__(self) -> TinyDNS:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self.thread.join(5)
        self.sock.close()


def test_lookup_climbs_to_the_parent_and_stops_at_the_first_record_set():
    """contacts.example.org has no CAA, example.org has the pinned record: that set is the relevant one
    (RFC 8659 section 3); org. is never asked because the climb stops."""
    with TinyDNS({"example.org.": [PINNED]}, exists={"contacts.example.org.", "org."}) as ns:
        records, owner = lookup_caa_sync("contacts.example.org", ("127.0.0.1", ns.port))
        assert owner == "example.org." and records == [PINNED]
        assert ns.queries == ["contacts.example.org.", "example.org."]


def test_lookup_with_no_record_anywhere_is_empty():
    with TinyDNS({}, exists={"contacts.example.org.", "example.org.", "org."}) as ns:
        assert lookup_caa_sync("contacts.example.org", ("127.0.0.1", ns.port)) == ([], "")
        assert ns.queries == ["contacts.example.org.", "example.org.", "org."]


def test_lookup_failure_is_an_error_not_an_empty_set():
    """SERVFAIL must not read as "no CAA" (that would claim "missing" when DNS is just broken)."""
    with TinyDNS({}, exists=set(), broken={"contacts.example.org."}) as ns, pytest.raises(OSError):
        lookup_caa_sync("contacts.example.org", ("127.0.0.1", ns.port), timeout_s=2)


async def test_async_lookup_evaluates_and_maps_dns_errors_to_unknown():
    with TinyDNS({"contacts.example.org.": [PINNED, issue("sectigo.com")]}, exists=set()) as ns:
        verdict = await lookup_caa("contacts.example.org", LE, ACCT, ("127.0.0.1", ns.port))
        assert verdict.state == "too-permissive" and verdict.owner == "contacts.example.org."
    with TinyDNS({}, exists=set(), broken={"contacts.example.org."}) as ns:
        verdict = await lookup_caa("contacts.example.org", LE, ACCT, ("127.0.0.1", ns.port))
        assert verdict.state == "unknown" and "failed" in verdict.detail


def test_the_servers_caa_check_keeps_dnspython_out_of_the_server_process(tmp_path):
    """serve's certificate manager checks CAA at start and daily, for the life of the process. dnspython (some
    70 modules, ~3 MiB of heap that is never returned) runs that look-up in a short-lived child, so the server
    never imports it. A fresh interpreter builds the manager, checks CAA against the test name server, and
    reports where the verdict's record set was found (so the look-up really happened) and whether ``dns`` is
    among its modules."""
    import subprocess
    import sys

    text = f"""
[server]
domain = "contacts.example.org"
data_dir = "{tmp_path / 'data'}"
state_dir = "{tmp_path / 'state'}"
[acme]
enabled = true
directory = "https://127.0.0.1:9/dir"
caa_issuer = "letsencrypt.org"
dns_server = "127.0.0.1:PORT"
"""
    script = """
import asyncio, sys
from types import SimpleNamespace
from inverse_cloud import config as config_mod
from inverse_cloud.certs.manager import CertManager
m = CertManager(config_mod.loads(sys.argv[1]), SimpleNamespace(challenges=None, tls=None, https_port=0))
v = asyncio.run(m.check_caa())
print("verdict:", v.state, v.owner)
print("dns loaded:", any(name == "dns" or name.startswith("dns.") for name in sys.modules))
"""
    with TinyDNS({"contacts.example.org.": [PINNED]}, exists=set()) as ns:
        out = subprocess.run([sys.executable, "-c", script, text.replace("PORT", str(ns.port))],
                             capture_output=True, text=True, timeout=120, check=True).stdout
    verdict = out.split("verdict:")[1].split("\n")[0].split()
    assert verdict[-1] == "contacts.example.org.", out   # the record set was found at the name itself
    assert "dns loaded: False" in out, out
