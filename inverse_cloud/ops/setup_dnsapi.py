"""``setup --dns PROVIDER``: setup creates the A and CAA records itself, through the DNS provider's API, with
dns-lexicon (the optional extra ``inverse-cloud[dns]``; it speaks to 100+ providers). Only the PowerDNS HTTP
API is tested here (a real PowerDNS in the test world); other providers take their options the same way
(``--dns-option name=value``, the names of ``lexicon PROVIDER --help``) and their secret from
``--dns-token-file`` (lexicon's ``auth_token``) or lexicon's ``LEXICON_<PROVIDER>_<OPTION>`` variables.

Each record set is replaced, not added to: the name's A set becomes the relay's addresses and its CAA set the
one record that pins our account (an old A record elsewhere, or an old CAA record letting another CA issue,
would defeat the point). Blocking (lexicon uses requests): ``setup`` is a command, not the server."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from inverse_cloud.errors import ConfigError, InverseCloudError

__all__ = ["DnsApi", "DnsApiError", "parse_options"]

TTL_S = 300   # short enough that a corrected record is seen within minutes; setup asks the servers directly


class DnsApiError(InverseCloudError):
    """The provider refused or could not be reached; the message names the provider, record and cause."""


def parse_options(pairs: Sequence[str]) -> dict[str, str]:
    """``["pdns_server=http://ns:8081", ...]`` -> ``{"pdns_server": "http://ns:8081"}``.

    :raises ConfigError: an item without ``=`` or with an empty name.
    """
    out: dict[str, str] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        name = name.strip().replace("-", "_")
        if not sep or not name:
            raise ConfigError(f"--dns-option {pair!r}: give NAME=VALUE, e.g. pdns_server=http://ns.example.org:8081")
        out[name] = value.strip()
    return out


def read_token(path: str) -> str:
    """The API secret in ``path`` (its first line).

    :raises ConfigError: unreadable or empty.
    """
    try:
        text = Path(path).expanduser().read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"--dns-token-file {path}: {getattr(exc, 'strerror', None) or exc}") from None
    token = text.splitlines()[0].strip() if text.strip() else ""
    if not token:
        raise ConfigError(f"--dns-token-file {path}: the file is empty")
    return token


@dataclass(frozen=True)
class DnsApi:
    provider: str
    options: dict[str, str] = field(default_factory=dict)
    token: str = ""

    def _client(self, domain: str) -> Any:  # lexicon's Client: no type information at this boundary
        try:
            from lexicon.client import Client
            from lexicon.config import ConfigResolver
        except ImportError:
            raise ConfigError("--dns needs dns-lexicon: install inverse-cloud with its dns extra "
                              "(sh scripts/install.sh dns)") from None
        provider_options: dict[str, str] = dict(self.options)
        if self.token:
            provider_options.setdefault("auth_token", self.token)
        # resolve_zone_name: the zone is found in DNS (its SOA), not guessed from the public suffix list,
        # which lexicon would otherwise try to download.
        doc = {"provider_name": self.provider, "domain": domain, "resolve_zone_name": True, "ttl": TTL_S,
               self.provider: provider_options}
        try:
            return Client(ConfigResolver().with_env().with_dict(doc))  # type: ignore[no-untyped-call]
        except Exception as exc:  # noqa: BLE001 - lexicon's own errors have no common base
            raise DnsApiError(f"{self.provider}: {_first_line(exc)}") from exc

    def replace(self, domain: str, rtype: str, contents: Sequence[str]) -> None:
        """Make ``contents`` the whole ``rtype`` set of ``domain`` at the provider.

        :raises DnsApiError: the provider refused or did not answer (its reason, one line).
        :raises ConfigError: dns-lexicon is not installed, or the provider is unknown.
        """
        client = self._client(domain)
        try:
            with client as ops:
                ops.delete_record(rtype=rtype, name=domain)
                for content in contents:
                    ops.create_record(rtype, domain, content)
        except Exception as exc:  # noqa: BLE001 - a boundary: requests, lexicon and provider errors alike
            raise DnsApiError(f"{self.provider}: creating the {rtype} record of {domain} failed: "
                              f"{_first_line(exc)}") from exc


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]
