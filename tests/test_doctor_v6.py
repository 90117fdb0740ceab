"""doctor's IPv6 link (ops/doctor_v6.py) as a table: what DNS answers for the domain, whether this set-up binds
IPv6 forwards ([relay] listen_host6), and what a TLS handshake to each AAAA address gets."""

from __future__ import annotations

import datetime as dt

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from inverse_cloud import config as config_mod
from inverse_cloud.ops.doctor_options import DoctorOptions
from inverse_cloud.ops.doctor_v6 import check_https6
from inverse_cloud.ops.netprobe import spki_sha256_of_cert
from inverse_cloud.tunnel.commands import set_config_value


def _cert_der() -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "laptop.test")])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(now).not_valid_after(now + dt.timedelta(days=1))
            .sign(key, hashes.SHA256()))
    return cert.public_bytes(serialization.Encoding.DER)


OURS, OTHER = _cert_der(), _cert_der()


@pytest.mark.parametrize(("host6", "domain_addrs", "answer", "state", "fragment"), [
    ("", ["192.0.2.7"], None, "ok", "no AAAA record: phones reach it over IPv4 only (the relay's NAT maps IPv4"),
    ("::", ["192.0.2.7"], None, "warn", "publish: laptop.test. AAAA 2001:db8::7"),
    ("::", ["192.0.2.7", "2001:db8::7"], OURS, "ok", "AAAA 2001:db8::7: [v6]:443 presents our key"),
    ("", ["192.0.2.7", "2001:db8::7"], ConnectionRefusedError(111, "refused"), "fail",
     "over IPv6 ([2001:db8::7]:443, its AAAA record) does not answer (connection refused)"),
    ("::", ["2001:db8::7"], OTHER, "fail", "presents a certificate whose key is not ours"),
])
async def test_aaaa_path(instance, host6, domain_addrs, answer, state, fragment):
    text = set_config_value(instance.read_text(), "relay", "host", '"relay.test"')
    instance.write_text(set_config_value(text, "relay", "listen_host6", f'"{host6}"'))
    cfg = config_mod.load(instance)
    probed: list[tuple[str, int]] = []

    async def resolve(name: str) -> list[str]:
        assert name == "laptop.test"
        return domain_addrs

    async def probe(target: tuple[str, int]) -> bytes | None:
        probed.append(target)
        if isinstance(answer, Exception):
            raise answer
        return answer

    status = {"certificate": {"key_sha256": spki_sha256_of_cert(OURS)}}
    v = await check_https6(cfg, status, resolve, ["192.0.2.7", "2001:db8::7"], DoctorOptions(), probe=probe,
                           routable=lambda addr: True)
    assert v.state == state and fragment in v.detail + " " + v.fix, v
    assert probed == ([("2001:db8::7", 443)] if answer is not None else [])
    if state == "fail" and "does not answer" in v.detail:
        assert "relay-setup --ipv6" in v.fix


async def test_redirected_443_is_not_probed(instance):
    cfg = config_mod.load(instance)

    async def resolve(name: str) -> list[str]:
        raise AssertionError("not resolved")

    opts = DoctorOptions(connect_to={("laptop.test", 443): ("127.0.0.1", 1)})
    v = await check_https6(cfg, {}, resolve, [], opts)
    assert v.state == "skip" and "--connect-to" in v.detail


async def test_no_ipv6_route_here_is_a_skip_not_a_verdict(instance):
    """A laptop on a network without IPv6 cannot probe the AAAA path: the link is skipped and says why; it is
    neither ok (nothing was shown) nor a failure (the relay may well serve IPv6)."""
    text = set_config_value(instance.read_text(), "relay", "host", '"relay.test"')
    instance.write_text(text)
    cfg = config_mod.load(instance)

    async def resolve(name: str) -> list[str]:
        return ["192.0.2.7", "2001:db8::7"]

    async def probe(target: tuple[str, int]) -> bytes | None:
        raise AssertionError("not probed")

    v = await check_https6(cfg, {}, resolve, [], DoctorOptions(), probe=probe, routable=lambda addr: False)
    assert v.state == "skip" and "this machine has no IPv6 route" in v.detail, v
