"""Certificate renewal decisions as pure functions: no clock, no files, no network.

Everything here takes ``now`` (an aware UTC datetime) as an argument, so the rules are table-tested
(tests/test_certs.py) and the component that acts on them (cert_manager.py) only reads the clock.

Rules (Let's Encrypt integration guide, certbot ``renewal.py``, certmagic ``certificates.go``):

* renew when one third of the lifetime is left, or half for lifetimes under 10 days; never a fixed
  "30 days" (lifetimes are shrinking: 90 d today, 45 d by 2028, 6 d "shortlived");
* when the CA offers ARI (RFC 9773 ``renewalInfo``), renew at a random time inside its suggested window,
  unless less than 1/20 of the lifetime is left (then the certificate's own validity wins);
* after a failure, back off along :data:`CA_RETRY_SCHEDULE_S`, and never before the CA's ``Retry-After``;
* a backoff never waits longer than its own delay measured from *now*, so a clock that jumped backwards
  cannot park renewals for days.
"""

from __future__ import annotations

import base64
import datetime as dt
import email.utils
import json
import logging
import math
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Literal

from cryptography import x509

__all__ = [
    "CA_RETRY_SCHEDULE_S",
    "PATH_RETRY_SCHEDULE_S",
    "AriWindow",
    "Decision",
    "RenewalState",
    "Validity",
    "ari_cert_id",
    "choose_in_window",
    "decide",
    "default_renewal_time",
    "failure_level",
    "human_duration",
    "next_attempt_at",
    "next_retry_delay_s",
    "parse_renewal_info",
    "parse_retry_after",
    "parse_retry_after_detail",
    "renewal_fraction",
]

UTC = dt.UTC

# Backoff after failed ACME attempts, indexed by the number of consecutive failures (1-based); the last
# entry repeats. Let's Encrypt's integration guide: "about 1 min -> 10 min -> 100 min -> 1 day, then daily".
CA_RETRY_SCHEDULE_S: tuple[float, ...] = (
    60,         # 1st failure: a blip (CA restart, network change, a nonce storm)
    600,        # 2nd: 10 min
    6000,       # 3rd: 100 min
    86400,      # 4th and later: once a day ("renewal failure should not be treated as a fatal error")
)

# Backoff when our own public-path self-check fails. It costs the CA nothing (no order is placed), so it
# retries faster and caps at 10 min: the tunnel coming up or the user fixing DNS should be noticed soon.
PATH_RETRY_SCHEDULE_S: tuple[float, ...] = (
    15,         # the tunnel may still be connecting at start
    60,
    300,
    600,        # then every 10 min
)

SHORT_LIFETIME = dt.timedelta(days=10)      # certbot/LE: lifetimes under this renew at 1/2 left
ARI_IGNORE_FRACTION = 1 / 20                # certmagic: ignore ARI once 1/20 of the lifetime is left
ARI_DEFAULT_RECHECK = dt.timedelta(hours=6)  # RFC 9773 4.3.3 default when the response has no Retry-After
MAX_RETRY_AFTER = dt.timedelta(days=7)      # distrust absurd Retry-After values (a typo'd date, a hostile shim)

FailureKind = Literal["ca", "path"]


@dataclass(frozen=True)
class Validity:
    """The facts about a CA-issued certificate the decision needs (aware UTC datetimes)."""

    serial_hex: str
    not_before: dt.datetime
    not_after: dt.datetime

    @property
    def lifetime(self) -> dt.timedelta:
        return self.not_after - self.not_before

    def remaining(self, now: dt.datetime) -> dt.timedelta:
        return self.not_after - now

    def is_expired(self, now: dt.datetime) -> bool:
        return now >= self.not_after


@dataclass(frozen=True)
class AriWindow:
    start: dt.datetime
    end: dt.datetime
    explanation_url: str = ""


@dataclass(frozen=True)
class Decision:
    """``action`` is "obtain" (no usable certificate), "renew", or "wait" (until ``at``)."""

    action: Literal["obtain", "renew", "wait"]
    at: dt.datetime
    reason: str

    @property
    def is_due(self) -> bool:
        return self.action != "wait"


def aware(t: dt.datetime) -> dt.datetime:
    """Naive datetimes in this code base are UTC (``CertInfo``); make them aware."""
    return t.replace(tzinfo=UTC) if t.tzinfo is None else t.astimezone(UTC)


def renewal_fraction(lifetime: dt.timedelta) -> float:
    """The fraction of the lifetime that is left when we renew."""
    return 1 / 2 if lifetime < SHORT_LIFETIME else 1 / 3


def default_renewal_time(v: Validity) -> dt.datetime:
    """When to renew without ARI: one third (or half, for short lifetimes) of the lifetime left."""
    return v.not_after - v.lifetime * renewal_fraction(v.lifetime)


def choose_in_window(w: AriWindow, u: float) -> dt.datetime:
    """A time inside the ARI window; ``u`` in [0, 1) comes from the caller's random source."""
    span = max(0.0, (w.end - w.start).total_seconds())
    return w.start + dt.timedelta(seconds=span * min(max(u, 0.0), 1.0))


def parse_renewal_info(obj: Mapping[str, Any]) -> AriWindow:
    """Parse an RFC 9773 RenewalInfo object (``{"suggestedWindow": {"start": ..., "end": ...}}``).

    :raises ValueError: malformed, or end before start (RFC 9773 4.2: "MUST be treated as invalid").
    """
    try:
        window = obj["suggestedWindow"]
        start = _parse_rfc3339(window["start"])
        end = _parse_rfc3339(window["end"])
    except (KeyError, TypeError) as exc:
        raise ValueError(f"renewalInfo without suggestedWindow start/end ({exc})") from None
    if end < start:
        raise ValueError("renewalInfo window ends before it starts")
    url = obj.get("explanationURL", "")
    return AriWindow(start, end, url if isinstance(url, str) else "")


def _parse_rfc3339(text: Any) -> dt.datetime:
    if not isinstance(text, str):
        raise ValueError(f"expected an RFC 3339 time, got {text!r}")
    # Python 3.11's fromisoformat accepts "Z" and offsets, but not more than 6 fraction digits.
    m = re.fullmatch(r"(.*?\.\d{6})\d*(Z|[+-]\d\d:\d\d)?", text.strip())
    cleaned = (m.group(1) + (m.group(2) or "")) if m else text.strip()
    try:
        return aware(dt.datetime.fromisoformat(cleaned.replace("z", "Z")))
    except ValueError:
        raise ValueError(f"expected an RFC 3339 time, got {text!r}") from None


def parse_retry_after(value: str | None, now: dt.datetime) -> float | None:
    """Seconds to wait from an HTTP ``Retry-After`` value: delta-seconds or an HTTP-date (RFC 9110 10.2.3).

    Returns None when absent or unparsable; 0 for a date in the past; at most :data:`MAX_RETRY_AFTER`.
    """
    if value is None:
        return None
    value = value.strip()
    if not value:
        return None
    if value.isdigit():
        seconds = float(int(value))
    else:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        seconds = (aware(when) - now).total_seconds()
    return min(max(0.0, seconds), MAX_RETRY_AFTER.total_seconds())


_DETAIL_RETRY = re.compile(r"retry after (\d{4}-\d\d-\d\d[ T]\d\d:\d\d:\d\d)(?:\.\d+)? ?(?:UTC|Z)?", re.IGNORECASE)


def parse_retry_after_detail(detail: str, now: dt.datetime) -> float | None:
    """Let's Encrypt also writes the time into the problem detail ("... retry after 2026-01-01 00:18:15 UTC")."""
    m = _DETAIL_RETRY.search(detail or "")
    if not m:
        return None
    when = dt.datetime.fromisoformat(m.group(1).replace(" ", "T")).replace(tzinfo=UTC)
    return min(max(0.0, (when - now).total_seconds()), MAX_RETRY_AFTER.total_seconds())


def next_retry_delay_s(failures: int, kind: FailureKind = "ca") -> float:
    """Backoff after ``failures`` consecutive failures (0 means no wait)."""
    if failures <= 0:
        return 0.0
    schedule = CA_RETRY_SCHEDULE_S if kind == "ca" else PATH_RETRY_SCHEDULE_S
    return float(schedule[min(failures, len(schedule)) - 1])


def ari_cert_id(cert: x509.Certificate) -> str:
    """RFC 9773 4.1 certificate identifier: base64url(AKI keyIdentifier) "." base64url(DER serial).

    :raises ValueError: the certificate has no Authority Key Identifier.
    """
    try:
        aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    except x509.ExtensionNotFound:
        raise ValueError("certificate has no Authority Key Identifier") from None
    if aki.key_identifier is None:
        raise ValueError("certificate's Authority Key Identifier has no keyIdentifier")
    serial = cert.serial_number
    serial_der = serial.to_bytes(math.ceil((serial.bit_length() + 1) / 8), "big", signed=True)

    def b64(b: bytes) -> str:
        return base64.urlsafe_b64encode(b).decode("ascii").rstrip("=")

    return f"{b64(aki.key_identifier)}.{b64(serial_der)}"


# --- persisted state --------------------------------------------------------------------------------------

@dataclass
class RenewalState:
    """What must survive a restart: the failure streak (and the CA's Retry-After), the ARI choice for the
    current certificate, the last CAA verdict, and a few facts ``cert status`` shows."""

    failures: int = 0
    failure_kind: FailureKind = "ca"
    last_error: str = ""
    last_failure_at: dt.datetime | None = None
    retry_after_s: float | None = None
    last_attempt_at: dt.datetime | None = None
    last_success_at: dt.datetime | None = None
    last_serial: str = ""
    # ARI: the window the CA suggested for ``ari_serial`` and the random time we picked in it.
    ari_serial: str = ""
    ari_start: dt.datetime | None = None
    ari_end: dt.datetime | None = None
    ari_time: dt.datetime | None = None
    ari_next_fetch: dt.datetime | None = None
    # Last check and its decision (informational: status, and `cert renew` waiting for the server).
    last_check_at: dt.datetime | None = None
    next_renewal_at: dt.datetime | None = None
    next_action: str = ""
    # CAA (caa.py): state is one of caa.STATES; detail is one line.
    caa_state: str = ""
    caa_detail: str = ""
    caa_checked_at: dt.datetime | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def record_failure(self, now: dt.datetime, error: str, kind: FailureKind,
                       retry_after_s: float | None = None) -> None:
        self.failures = self.failures + 1 if self.failure_kind == kind or self.failures == 0 else 1
        self.failure_kind = kind
        self.last_error = error
        self.last_failure_at = now
        self.retry_after_s = retry_after_s
        self.last_attempt_at = now

    def record_success(self, now: dt.datetime, serial_hex: str) -> None:
        self.failures = 0
        self.failure_kind = "ca"
        self.last_error = ""
        self.last_failure_at = None
        self.retry_after_s = None
        self.last_attempt_at = now
        self.last_success_at = now
        self.last_serial = serial_hex
        self.ari_serial = ""
        self.ari_start = self.ari_end = self.ari_time = self.ari_next_fetch = None

    def clear_failures(self) -> None:
        """Forget the failure streak (it no longer matters: see :func:`failures_are_moot`)."""
        self.failures = 0
        self.failure_kind = "ca"
        self.last_error = ""
        self.last_failure_at = None
        self.retry_after_s = None

    def ari_time_for(self, serial_hex: str) -> dt.datetime | None:
        return self.ari_time if self.ari_serial == serial_hex else None

    def to_json(self) -> str:
        out: dict[str, Any] = {}
        for k, v in asdict(self).items():
            out[k] = v.isoformat() if isinstance(v, dt.datetime) else v
        return json.dumps(out, indent=1, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> RenewalState:
        """Tolerant: unknown keys are ignored and bad values fall back to defaults, so a state file from
        another version never stops renewals. Raises ValueError only for text that is not a JSON object."""
        raw = json.loads(text)
        if not isinstance(raw, dict):
            raise ValueError("state file is not a JSON object")
        state = cls()
        for f in fields(cls):
            if f.name not in raw:
                continue
            value = raw[f.name]
            default = getattr(state, f.name)
            try:
                if f.name.endswith("_at") or f.name in ("ari_start", "ari_end", "ari_time", "ari_next_fetch"):
                    value = None if value is None else aware(dt.datetime.fromisoformat(value))
                elif f.name == "retry_after_s":
                    value = None if value is None else float(value)
                elif f.name == "failures":
                    value = max(0, int(value))
                elif f.name == "failure_kind":
                    value = value if value in ("ca", "path") else "ca"
                elif f.name == "extra":
                    value = value if isinstance(value, dict) else {}
                elif isinstance(default, str):
                    value = str(value)
            except (TypeError, ValueError):
                continue
            setattr(state, f.name, value)
        return state

    def copy(self) -> RenewalState:
        return replace(self, extra=dict(self.extra))


def next_attempt_at(state: RenewalState, now: dt.datetime) -> dt.datetime | None:
    """The earliest time another attempt is allowed after the current failure streak (None: now).

    The wait is measured from the last failure, but never from a failure "in the future" (the clock
    went backwards): then it is measured from ``now``. ``Retry-After`` from the CA always wins when longer.
    """
    if state.failures <= 0 or state.last_failure_at is None:
        return None
    base = min(state.last_failure_at, now)
    wait = max(next_retry_delay_s(state.failures, state.failure_kind), state.retry_after_s or 0.0)
    return base + dt.timedelta(seconds=wait)


def decide(cert: Validity | None, now: dt.datetime, state: RenewalState, *, force: bool = False,
           retry_now: bool = False) -> Decision:
    """Renew now, or when next.

    ``cert`` is the CA-issued certificate being served (None when only the self-signed stand-in is served,
    or the served one does not cover the domain). ``retry_now`` (the user's "early retry", ``cert renew``)
    skips our own backoff; ``force`` (``cert renew --force``) also skips the renewal window. Neither skips
    the CA's ``Retry-After``.
    """
    backoff = next_attempt_at(state, now)
    ca_hold = None
    if state.retry_after_s and state.last_failure_at is not None:
        ca_hold = min(state.last_failure_at, now) + dt.timedelta(seconds=state.retry_after_s)

    def gated(action: Literal["obtain", "renew"], reason: str) -> Decision:
        hold = ca_hold if (force or retry_now) else backoff
        if hold is not None and hold > now:
            why = "the ACME server asked us to wait" if hold == ca_hold else (
                f"backing off after {state.failures} failure(s)")
            return Decision("wait", hold, f"{reason}; {why}")
        return Decision(action, now, reason)

    if cert is None:
        return gated("obtain", "no CA-issued certificate for the domain")
    if cert.is_expired(now):
        return gated("obtain", "certificate expired according to the local clock")
    if force:
        return gated("renew", "renewal requested")
    when = default_renewal_time(cert)
    source = f"{renewal_fraction(cert.lifetime):.2g} of the lifetime left"
    ari = state.ari_time_for(cert.serial_hex)
    if ari is not None and cert.remaining(now) > cert.lifetime * ARI_IGNORE_FRACTION:
        when, source = ari, "the CA's renewal window (ARI)"
    if now < when:
        return Decision("wait", when, f"renewal due at {source}")
    return gated("renew", f"renewal due ({source})")


def failures_are_moot(cert: Validity | None, now: dt.datetime, state: RenewalState) -> bool:
    """Whether a failure streak no longer matters: without it nothing would be due (a CA-issued certificate
    that has not expired and whose renewal time lies ahead) and no Retry-After from the CA still holds. This
    is how a streak ends that no success would end soon, e.g. certificates that looked expired on arrival
    while the local clock was wrong, once the clock is right: the next renewal may be two months away, and
    until then `status` would report a failure that is over."""
    if state.failures <= 0 or cert is None or cert.is_expired(now):
        return False
    if state.retry_after_s and state.last_failure_at is not None and (
            min(state.last_failure_at, now) + dt.timedelta(seconds=state.retry_after_s) > now):
        return False
    clean = RenewalState(ari_serial=state.ari_serial, ari_time=state.ari_time)
    return not decide(cert, now, clean).is_due


def failure_level(cert: Validity | None, now: dt.datetime, failures: int) -> int:
    """WARNING while there is time; ERROR when a human should act.

    With a certificate: ERROR once half of the renewal window has passed without success (e.g. 15 days
    left of 90, 1.5 of 6). Without one (self-signed served, phones fail): ERROR from the third failure.
    """
    if cert is None or cert.is_expired(now):
        return logging.ERROR if failures >= 3 or cert is not None else logging.WARNING
    if cert.remaining(now) < cert.lifetime * renewal_fraction(cert.lifetime) / 2:
        return logging.ERROR
    return logging.WARNING


def human_duration(seconds: float) -> str:
    """``90`` -> "1m30s", ``6000`` -> "1h40m", ``86400`` -> "1d"; at most two units."""
    s = int(round(max(0.0, seconds)))
    if s < 60:
        return f"{s}s"
    parts: list[str] = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if s >= size:
            parts.append(f"{s // size}{unit}")
            s %= size
        if len(parts) == 2:
            break
    return "".join(parts)
