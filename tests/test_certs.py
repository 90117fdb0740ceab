"""Pure renewal decisions (inverse_cloud/certs/policy.py): tables with explicit ``now``, no clock, no I/O."""

from __future__ import annotations

import datetime as dt
import json
import logging

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from inverse_cloud.certs.policy import (
    CA_RETRY_SCHEDULE_S,
    PATH_RETRY_SCHEDULE_S,
    AriWindow,
    RenewalState,
    Validity,
    ari_cert_id,
    choose_in_window,
    decide,
    default_renewal_time,
    failure_level,
    failures_are_moot,
    human_duration,
    next_attempt_at,
    next_retry_delay_s,
    parse_renewal_info,
    parse_retry_after,
    parse_retry_after_detail,
)

UTC = dt.UTC
T0 = dt.datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
D = dt.timedelta(days=1)
H = dt.timedelta(hours=1)
M = dt.timedelta(minutes=1)

LE90 = Validity("aa", T0, T0 + 90 * D)          # Let's Encrypt classic
LE45 = Validity("bb", T0, T0 + 45 * D)          # the 2028 maximum
SHORT6 = Validity("cc", T0, T0 + 6 * D)         # "shortlived" profile: under 10 days -> renew at half
PEBBLE = Validity("dd", T0, T0 + 120 * dt.timedelta(seconds=1))


@pytest.mark.parametrize(("cert", "expected"), [
    (LE90, T0 + 60 * D),                # 1/3 of 90 d left = 30 d before expiry (but never hard-coded)
    (LE45, T0 + 30 * D),                # 1/3 of 45 d left = 15 d
    (SHORT6, T0 + 3 * D),               # under 10 days: half
    (PEBBLE, T0 + dt.timedelta(seconds=60)),
    (Validity("ee", T0, T0 + 10 * D), T0 + dt.timedelta(days=10) * 2 / 3),  # exactly 10 d is not "under"
])
def test_default_renewal_time(cert, expected):
    assert default_renewal_time(cert) == expected


@pytest.mark.parametrize(("cert", "now", "action", "at"), [
    (None, T0, "obtain", T0),                                    # self-signed only: obtain now
    (LE90, T0 + 59 * D, "wait", T0 + 60 * D),                    # not yet
    (LE90, T0 + 60 * D, "renew", T0 + 60 * D),                   # due exactly at 2/3
    (LE90, T0 + 89 * D, "renew", T0 + 89 * D),                   # late but valid
    (LE90, T0 + 91 * D, "obtain", T0 + 91 * D),                  # expired by the local clock (+ clock jump)
    (LE90, T0 - 2 * D, "wait", T0 + 60 * D),                     # clock 2 d behind NotBefore: keep serving, no loop
    (SHORT6, T0 + 2 * D, "wait", T0 + 3 * D),
    (SHORT6, T0 + 3 * D + M, "renew", T0 + 3 * D + M),
])
def test_decide_without_failures(cert, now, action, at):
    d = decide(cert, now, RenewalState())
    assert (d.action, d.at) == (action, at), d.reason


def test_decide_reasons_name_the_rule():
    assert "expired according to the local clock" in decide(LE90, T0 + 91 * D, RenewalState()).reason
    assert "no CA-issued certificate" in decide(None, T0, RenewalState()).reason


def _failed(n: int, at: dt.datetime, kind: str = "ca", retry_after_s: float | None = None) -> RenewalState:
    s = RenewalState()
    for _ in range(n):
        s.record_failure(at, "boom", kind, retry_after_s)  # type: ignore[arg-type]
    return s


@pytest.mark.parametrize(("failures", "waited", "action"), [
    (1, 59, "wait"), (1, 60, "renew"),
    (2, 599, "wait"), (2, 600, "renew"),
    (3, 5999, "wait"), (3, 6000, "renew"),
    (4, 86399, "wait"), (4, 86400, "renew"),
    (9, 86399, "wait"), (9, 86400, "renew"),     # then daily
])
def test_backoff_follows_the_lets_encrypt_table(failures, waited, action):
    failed_at = T0 + 70 * D
    d = decide(LE90, failed_at + dt.timedelta(seconds=waited), _failed(failures, failed_at))
    assert d.action == action
    if action == "wait":
        assert d.at == failed_at + dt.timedelta(seconds=CA_RETRY_SCHEDULE_S[min(failures, 4) - 1])


def test_retry_after_longer_than_backoff_wins_and_force_does_not_skip_it():
    failed_at = T0 + 70 * D
    s = _failed(1, failed_at, retry_after_s=120)
    assert decide(LE90, failed_at + 61 * dt.timedelta(seconds=1), s).action == "wait"
    forced = decide(LE90, failed_at + dt.timedelta(seconds=119), s, force=True)
    assert forced.action == "wait" and forced.at == failed_at + dt.timedelta(seconds=120)
    assert "asked us to wait" in forced.reason
    assert decide(LE90, failed_at + dt.timedelta(seconds=120), s, force=True).action == "renew"


def test_force_skips_our_backoff_and_the_window():
    failed_at = T0 + 10 * D
    s = _failed(3, failed_at)
    assert decide(LE90, failed_at + M, s).action == "wait"
    assert decide(LE90, failed_at + M, s, force=True).action == "renew"
    assert decide(LE90, T0 + D, RenewalState(), force=True).action == "renew"


def test_early_retry_skips_our_backoff_but_not_the_window():
    """`cert renew` without --force: retry a failing renewal now, but do not renew a certificate not due."""
    s = _failed(3, T0 + 70 * D)
    assert decide(LE90, T0 + 70 * D + M, s, retry_now=True).action == "renew"
    assert decide(None, T0, _failed(2, T0, kind="path"), retry_now=True).action == "obtain"
    assert decide(LE90, T0 + D, RenewalState(), retry_now=True).action == "wait"


def test_backoff_after_clock_went_backwards_is_bounded_from_now():
    """A failure recorded 'in the future' (the clock jumped back 2 days) must not park renewals for 2 days."""
    failed_at = T0 + 70 * D
    now = failed_at - 2 * D
    at = next_attempt_at(_failed(2, failed_at), now)
    assert at == now + dt.timedelta(seconds=600)


def test_a_streak_is_moot_only_when_nothing_would_be_due_without_it():
    """The clock was 100 d ahead (certificates looked expired on arrival) and is right again: the served
    certificate is valid and not due, so the streak is over. While renewal is due, the certificate has
    expired, only the self-signed stand-in is served, or the CA's Retry-After still holds, it is not."""
    streak = _failed(3, T0 + 100 * D)
    assert failures_are_moot(LE90, T0 + D, streak)                  # clock back to normal: over
    assert not failures_are_moot(LE90, T0 + 61 * D, streak)         # renewal due: the backoff still counts
    assert not failures_are_moot(LE90, T0 + 91 * D, streak)         # expired
    assert not failures_are_moot(None, T0 + D, streak)              # nothing CA-issued served
    assert not failures_are_moot(LE90, T0 + D, RenewalState())      # no streak at all
    held = _failed(1, T0 + D)
    held.retry_after_s = 3 * 86400.0
    assert not failures_are_moot(LE90, T0 + 2 * D, held)            # the CA asked us to wait
    assert failures_are_moot(LE90, T0 + 5 * D, held)
    cleared = _failed(2, T0)
    cleared.clear_failures()
    assert (cleared.failures, cleared.last_error, cleared.last_failure_at, cleared.retry_after_s) == (0, "", None, None)


def test_path_failures_use_the_fast_schedule_and_reset_on_kind_change():
    s = _failed(2, T0, kind="path")
    assert next_attempt_at(s, T0) == T0 + dt.timedelta(seconds=PATH_RETRY_SCHEDULE_S[1])
    s.record_failure(T0, "CA down", "ca")
    assert (s.failures, s.failure_kind) == (1, "ca")
    s.record_success(T0, "ff")
    assert s.failures == 0 and next_attempt_at(s, T0) is None


@pytest.mark.parametrize(("n", "kind", "delay"), [
    (0, "ca", 0), (1, "ca", 60), (2, "ca", 600), (3, "ca", 6000), (4, "ca", 86400), (50, "ca", 86400),
    (1, "path", 15), (2, "path", 60), (3, "path", 300), (4, "path", 600), (99, "path", 600),
])
def test_retry_schedule(n, kind, delay):
    assert next_retry_delay_s(n, kind) == delay


# --- ARI -------------------------------------------------------------------------------------------------

# Recorded from Let's Encrypt's renewalInfo endpoint (RFC 9773 section 4.2 shape), fractional seconds and all.
LE_ARI = json.loads("""{
  "suggestedWindow": {"start": "2026-04-30T01:22:41.123456789Z", "end": "2026-05-01T23:22:41Z"},
  "explanationURL": "https://community.letsencrypt.org/t/ari-explained"
}""")
EARLY_ARI = {"suggestedWindow": {"start": "2026-03-05T00:00:00+00:00", "end": "2026-03-06T00:00:00+00:00"}}


def test_parse_recorded_renewal_info():
    w = parse_renewal_info(LE_ARI)
    assert w.start == dt.datetime(2026, 4, 30, 1, 22, 41, 123456, tzinfo=UTC)
    assert w.end == dt.datetime(2026, 5, 1, 23, 22, 41, tzinfo=UTC)
    assert w.explanation_url.startswith("https://")


@pytest.mark.parametrize("bad", [
    {}, {"suggestedWindow": {"start": "2026-05-01T00:00:00Z"}},
    {"suggestedWindow": {"start": "2026-05-02T00:00:00Z", "end": "2026-05-01T00:00:00Z"}},   # end < start
    {"suggestedWindow": {"start": 5, "end": "2026-05-01T00:00:00Z"}},
    {"suggestedWindow": "soon"},
])
def test_malformed_renewal_info_is_refused(bad):
    with pytest.raises(ValueError):
        parse_renewal_info(bad)


@pytest.mark.parametrize(("u", "expected"), [
    (0.0, dt.datetime(2026, 5, 1, tzinfo=UTC)), (0.5, dt.datetime(2026, 5, 1, 12, tzinfo=UTC)),
    (1.0, dt.datetime(2026, 5, 2, tzinfo=UTC)), (7.0, dt.datetime(2026, 5, 2, tzinfo=UTC)),
])
def test_choose_in_window(u, expected):
    w = AriWindow(dt.datetime(2026, 5, 1, tzinfo=UTC), dt.datetime(2026, 5, 2, tzinfo=UTC))
    assert choose_in_window(w, u) == expected


def test_ari_time_overrides_the_lifetime_rule_for_its_serial_only():
    s = RenewalState(ari_serial=LE90.serial_hex, ari_time=choose_in_window(parse_renewal_info(EARLY_ARI), 0.5))
    early = dt.datetime(2026, 3, 5, 12, tzinfo=UTC)
    assert decide(LE90, early - M, s) .at == early                           # the CA asks for early renewal
    assert decide(LE90, early, s).action == "renew"
    assert "ARI" in decide(LE90, early, s).reason
    other = Validity("99", LE90.not_before, LE90.not_after)
    assert decide(other, early, s).action == "wait"                          # ARI choice was for another cert


def test_ari_is_ignored_once_a_twentieth_of_the_lifetime_is_left():
    late_window = AriWindow(T0 + 200 * D, T0 + 201 * D)                       # CA says "much later"
    s = RenewalState(ari_serial=LE90.serial_hex, ari_time=choose_in_window(late_window, 0.5))
    assert decide(LE90, T0 + 70 * D, s).action == "wait"                     # ARI followed while there is time
    assert decide(LE90, T0 + 86 * D, s).action == "renew"                    # < 4.5 d left: validity wins


def test_ari_cert_id_matches_rfc9773_example():
    """RFC 9773 4.1: AKI 69:88:5B:6B:87:46:40:41:E1:B3:7B:84:7B:A0:AE:2C:DE:01:C8:D4, serial 0x87654321."""
    key = ec.generate_private_key(ec.SECP256R1())
    aki = bytes.fromhex("69885B6B874640 41E1B37B847BA0AE2CDE01C8D4".replace(" ", ""))
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "example")])
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(0x87654321).not_valid_before(T0).not_valid_after(T0 + D)
            .add_extension(x509.AuthorityKeyIdentifier(aki, None, None), critical=False)
            .sign(key, hashes.SHA256()))
    assert ari_cert_id(cert) == "aYhba4dGQEHhs3uEe6CuLN4ByNQ.AIdlQyE"


# --- Retry-After -----------------------------------------------------------------------------------------

@pytest.mark.parametrize(("value", "expected"), [
    ("120", 120.0), (" 0 ", 0.0), ("Sun, 01 Mar 2026 12:02:00 GMT", 120.0),   # delta-seconds and HTTP-date
    ("Sun, 01 Mar 2026 11:00:00 GMT", 0.0),                                     # in the past: now
    ("99999999", 7 * 86400.0),                                                  # capped at a week
    ("soon", None), ("", None), (None, None), ("-5", None),
])
def test_parse_retry_after(value, expected):
    assert parse_retry_after(value, T0) == expected


def test_retry_after_from_lets_encrypt_problem_detail():
    detail = "too many certificates (5) already issued for this exact set of identifiers in the last 168h0m0s, " \
             "retry after 2026-03-01 13:00:00 UTC: see https://letsencrypt.org/docs/rate-limits/"
    assert parse_retry_after_detail(detail, T0) == 3600.0
    assert parse_retry_after_detail("no hint here", T0) is None


# --- state file, escalation, wording --------------------------------------------------------------------

def test_state_round_trip_and_tolerance():
    s = _failed(2, T0, retry_after_s=30.5)
    s.caa_state, s.ari_time, s.last_check_at = "missing", T0 + D, T0
    again = RenewalState.from_json(s.to_json())
    assert again == s
    broken = RenewalState.from_json(json.dumps({"failures": "x", "last_failure_at": "yesterday",
                                                "failure_kind": "weird", "unknown_key": 1, "last_error": 5}))
    assert (broken.failures, broken.last_failure_at, broken.failure_kind, broken.last_error) == (0, None, "ca", "5")
    with pytest.raises(ValueError):
        RenewalState.from_json("[1, 2]")


@pytest.mark.parametrize(("cert", "now", "failures", "level"), [
    (LE90, T0 + 61 * D, 1, logging.WARNING),      # 29 d left: there is time
    (LE90, T0 + 76 * D, 5, logging.ERROR),        # under 15 d (half the renewal window) left: a human must act
    (SHORT6, T0 + 4 * D, 1, logging.WARNING),
    (SHORT6, T0 + 5 * D, 1, logging.ERROR),       # under 1.5 d of 6 d
    (None, T0, 1, logging.WARNING), (None, T0, 3, logging.ERROR),
    (LE90, T0 + 91 * D, 1, logging.ERROR),        # expired
])
def test_failure_level_escalates(cert, now, failures, level):
    assert failure_level(cert, now, failures) == level


@pytest.mark.parametrize(("s", "text"), [(0, "0s"), (59, "59s"), (60, "1m"), (90, "1m30s"), (6000, "1h40m"),
                                         (86400, "1d"), (90061, "1d1h")])
def test_human_duration(s, text):
    assert human_duration(s) == text


# --- boundaries and exact wording (each row kills a mutant a looser test let live) ----------------------

def _cert_with(serial: int, aki: bytes | None) -> x509.Certificate:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "example")])
    builder = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
               .serial_number(serial).not_valid_before(T0).not_valid_after(T0 + D))
    if aki is not None:
        builder = builder.add_extension(x509.AuthorityKeyIdentifier(aki, None, None), critical=False)
    return builder.sign(key, hashes.SHA256())


def test_a_certificate_is_expired_at_its_not_after_instant():
    assert LE90.is_expired(LE90.not_after) and not LE90.is_expired(LE90.not_after - dt.timedelta(microseconds=1))


def test_aware_makes_naive_times_utc_and_converts_others_to_utc(monkeypatch):
    """Naive means UTC; an aware time in another zone becomes the same instant in UTC, whatever the
    machine's own time zone (set to Europe/Berlin here)."""
    import time

    from inverse_cloud.certs.policy import aware

    monkeypatch.setenv("TZ", "Europe/Berlin")
    time.tzset()
    try:
        naive = aware(dt.datetime(2026, 3, 1, 12, 0))
        assert naive == T0 and naive.tzinfo is UTC
        plus2 = aware(dt.datetime(2026, 3, 1, 14, 0, tzinfo=dt.timezone(dt.timedelta(hours=2))))
        assert plus2 == T0 and plus2.tzinfo is UTC and plus2.hour == 12
    finally:
        monkeypatch.delenv("TZ")
        time.tzset()


def test_a_zero_length_ari_window_is_its_start():
    w = AriWindow(T0, T0)
    assert choose_in_window(w, 0.7) == T0
    assert parse_renewal_info({"suggestedWindow": {"start": "2026-03-01T12:00:00Z",
                                                   "end": "2026-03-01T12:00:00Z"}}) == AriWindow(T0, T0, "")


@pytest.mark.parametrize(("obj", "message"), [
    ({}, "renewalInfo without suggestedWindow start/end ('suggestedWindow')"),
    ({"suggestedWindow": {"start": "2026-05-02T00:00:00Z", "end": "2026-05-01T00:00:00Z"}},
     "renewalInfo window ends before it starts"),
    ({"suggestedWindow": {"start": 5, "end": "2026-05-01T00:00:00Z"}}, "expected an RFC 3339 time, got 5"),
    ({"suggestedWindow": {"start": "soon", "end": "2026-05-01T00:00:00Z"}}, "expected an RFC 3339 time, got 'soon'"),
])
def test_malformed_renewal_info_messages(obj, message):
    with pytest.raises(ValueError) as info:
        parse_renewal_info(obj)
    assert str(info.value) == message


@pytest.mark.parametrize(("text", "expected"), [
    ("2026-03-01T12:00:00.1234567Z", T0.replace(microsecond=123456)),           # 7 fraction digits: cut to 6
    ("2026-03-01T14:00:00.123456789+02:00", T0.replace(microsecond=123456)),    # 9 digits and an offset
    ("2026-03-01T12:00:00.1234567", T0.replace(microsecond=123456)),            # no zone: UTC
    ("2026-03-01t12:00:00z", T0),                                                # lower-case t and z
])
def test_rfc3339_times_the_ca_may_send(text, expected):
    w = parse_renewal_info({"suggestedWindow": {"start": text, "end": "2027-01-01T00:00:00Z"}})
    assert w.start == expected


@pytest.mark.parametrize(("url", "expected"), [(None, ""), (5, ""), ("https://x.example/why", "https://x.example/why")])
def test_renewal_info_explanation_url_is_kept_only_as_text(url, expected):
    obj: dict[str, object] = {"suggestedWindow": {"start": "2026-05-01T00:00:00Z", "end": "2026-05-02T00:00:00Z"}}
    if url is not None:
        obj["explanationURL"] = url
    assert parse_renewal_info(obj).explanation_url == expected


def test_retry_after_detail_variants():
    assert parse_retry_after_detail("retry after 2026-03-01T13:00:00Z", T0) == 3600.0     # ISO 'T' form
    assert parse_retry_after_detail("retry after 2026-03-01 11:00:00 UTC", T0) == 0.0     # in the past: now
    assert parse_retry_after_detail("", T0) is None
    assert parse_retry_after_detail(None, T0) is None  # type: ignore[arg-type]


@pytest.mark.parametrize(("serial", "tail"), [
    (0x7F, "fw"),          # 7 bits: one byte, no sign padding
    (0x80, "AIA"),         # high bit set: a leading zero byte keeps it positive (DER INTEGER)
    (0x87654321, "AIdlQyE"),
])
def test_ari_cert_id_serial_encoding(serial, tail):
    cert = _cert_with(serial, bytes(range(1, 21)))
    assert ari_cert_id(cert) == "AQIDBAUGBwgJCgsMDQ4PEBESExQ." + tail


def test_ari_cert_id_without_a_key_identifier_names_what_is_missing():
    with pytest.raises(ValueError) as info:
        ari_cert_id(_cert_with(5, None))
    assert str(info.value) == "certificate has no Authority Key Identifier"


def test_record_failure_of_another_kind_starts_a_new_streak():
    s = _failed(1, T0, kind="ca")
    s.record_failure(T0 + M, "path broken", "path")
    assert (s.failures, s.failure_kind, s.last_error, s.last_failure_at, s.last_attempt_at) == (
        1, "path", "path broken", T0 + M, T0 + M)
    s.record_failure(T0 + 2 * M, "still", "path", retry_after_s=9.0)
    assert (s.failures, s.retry_after_s) == (2, 9.0)


def test_record_success_and_clear_failures_reset_everything_they_own():
    s = _failed(3, T0, kind="path", retry_after_s=30.0)
    s.ari_serial, s.ari_start, s.ari_end, s.ari_time, s.ari_next_fetch = "aa", T0, T0 + D, T0 + H, T0 + 2 * H
    s.record_success(T0 + D, "bb")
    assert s == RenewalState(last_attempt_at=T0 + D, last_success_at=T0 + D, last_serial="bb")
    t = _failed(2, T0, kind="path", retry_after_s=5.0)
    t.last_check_at, t.caa_state = T0, "ok"
    t.clear_failures()
    assert t == RenewalState(last_attempt_at=T0, last_check_at=T0, caa_state="ok")


def test_state_file_text_is_sorted_and_indented_by_one():
    text = RenewalState(failures=1, last_error="x").to_json()
    assert text.startswith('{\n "ari_end": null,\n "ari_next_fetch": null,')
    assert text.endswith("\n}\n") and '\n "failures": 1,\n' in text


def test_state_file_every_field_survives_a_round_trip():
    s = RenewalState(failures=2, failure_kind="path", last_error="e", last_failure_at=T0, retry_after_s=1.5,
                     last_attempt_at=T0 + M, last_success_at=T0 - D, last_serial="ab", ari_serial="ab",
                     ari_start=T0, ari_end=T0 + D, ari_time=T0 + H, ari_next_fetch=T0 + 2 * H,
                     last_check_at=T0 + 3 * M, next_renewal_at=T0 + 60 * D, next_action="wait",
                     caa_state="ok", caa_detail="d", caa_checked_at=T0 + 4 * M, extra={"k": [1]})
    assert RenewalState.from_json(s.to_json()) == s


def test_a_corrupt_state_file_falls_back_field_by_field():
    """Every bad value falls back to its default, and the fields after it are still read."""
    raw = {"failures": "x", "ari_start": "not a time", "ari_end": 7, "ari_next_fetch": [],
           "retry_after_s": "soon", "failure_kind": "path", "extra": [1], "last_serial": "ff",
           "next_renewal_at": "2026-03-01T12:00:00+00:00", "caa_state": None}
    s = RenewalState.from_json(json.dumps(raw))
    assert (s.failures, s.ari_start, s.ari_end, s.ari_next_fetch, s.retry_after_s) == (0, None, None, None, None)
    assert (s.failure_kind, s.extra, s.last_serial, s.next_renewal_at) == ("path", {}, "ff", T0)
    assert s.caa_state == "None"
    assert RenewalState.from_json('{"retry_after_s": null, "ari_time": null}') == RenewalState()
    nulls = RenewalState.from_json('{"retry_after_s": "2.5", "extra": {"a": 1}, "failure_kind": "ca"}')
    assert (nulls.retry_after_s, nulls.extra) == (2.5, {"a": 1})
    with pytest.raises(ValueError) as info:
        RenewalState.from_json("[1, 2]")
    assert str(info.value) == "state file is not a JSON object"
    with pytest.raises(ValueError):
        RenewalState.from_json("{not json")


def test_copy_does_not_share_extra():
    s = RenewalState(extra={"a": 1})
    c = s.copy()
    c.extra["b"] = 2
    assert s.extra == {"a": 1} and c.extra == {"a": 1, "b": 2} and c.failures == s.failures


def test_no_streak_means_no_backoff_even_with_a_failure_time_left():
    s = RenewalState(failures=0, last_failure_at=T0)
    assert next_attempt_at(s, T0 + M) is None


@pytest.mark.parametrize(("cert", "now", "state", "reason"), [
    (None, T0, RenewalState(), "no CA-issued certificate for the domain"),
    (LE90, T0 + 91 * D, RenewalState(), "certificate expired according to the local clock"),
    (LE90, T0, RenewalState(), "renewal due at 0.33 of the lifetime left"),
    (LE90, T0 + 61 * D, RenewalState(), "renewal due (0.33 of the lifetime left)"),
    (LE90, T0 + 61 * D, _failed(1, T0 + 61 * D), "renewal due (0.33 of the lifetime left); backing off after "
                                                 "1 failure(s)"),
    (LE90, T0 + 61 * D, _failed(1, T0 + 61 * D, retry_after_s=3600), "renewal due (0.33 of the lifetime left); "
                                                                     "the ACME server asked us to wait"),
])
def test_decide_reason_wording(cert, now, state, reason):
    assert decide(cert, now, state).reason == reason


def test_forced_renewal_reason_and_ari_source_wording():
    assert decide(LE90, T0 + D, RenewalState(), force=True).reason == "renewal requested"
    s = RenewalState(ari_serial=LE90.serial_hex, ari_time=T0 + 10 * D)
    assert decide(LE90, T0 + D, s).reason == "renewal due at the CA's renewal window (ARI)"


def test_ari_is_ignored_when_exactly_a_twentieth_of_the_lifetime_is_left():
    s = RenewalState(ari_serial=LE90.serial_hex, ari_time=T0 + 200 * D)
    at_the_mark = LE90.not_after - LE90.lifetime / 20
    assert decide(LE90, at_the_mark, s).action == "renew"
    assert decide(LE90, at_the_mark - dt.timedelta(seconds=1), s).action == "wait"


def test_a_streak_is_moot_once_the_cas_hold_ends_exactly_now_and_ari_counts():
    """The Retry-After hold ending at this instant no longer holds; and a streak is moot when the CA's ARI
    window (for the served certificate) puts the renewal later than the lifetime rule would."""
    failed_at = T0 + 70 * D
    s = _failed(1, failed_at, retry_after_s=60.0)
    s.ari_serial, s.ari_time = LE90.serial_hex, T0 + 80 * D
    assert failures_are_moot(LE90, failed_at + M, s)
    assert not failures_are_moot(LE90, failed_at + M - dt.timedelta(seconds=1), s)
    no_ari = _failed(1, failed_at)
    assert not failures_are_moot(LE90, failed_at + H, no_ari)   # past 2/3 of the lifetime: renewal is due


def test_failure_level_at_exactly_half_the_renewal_window():
    half = LE90.not_after - LE90.lifetime / 3 / 2
    assert failure_level(LE90, half, 1) == logging.WARNING
    assert failure_level(LE90, half + dt.timedelta(seconds=1), 1) == logging.ERROR


def test_retry_schedule_defaults_to_the_ca_schedule():
    assert [next_retry_delay_s(n) for n in (1, 2, 5)] == [60.0, 600.0, 86400.0]


def test_ari_cert_id_refuses_an_aki_without_key_identifier():
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "example")])
    aki = x509.AuthorityKeyIdentifier(None, [x509.DirectoryName(name)], 7)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(7).not_valid_before(T0).not_valid_after(T0 + D)
            .add_extension(aki, critical=False).sign(key, hashes.SHA256()))
    with pytest.raises(ValueError) as info:
        ari_cert_id(cert)
    assert str(info.value) == "certificate's Authority Key Identifier has no keyIdentifier"


def test_ari_cert_id_strips_only_base64_padding():
    """An identifier part that ends in 'X' keeps it (only '=' padding is dropped)."""
    cert = _cert_with(0x17, bytes(range(1, 19)) + b"\x00\x00\x17")
    assert ari_cert_id(cert) == "AQIDBAUGBwgJCgsMDQ4PEBESAAAX.Fw"
