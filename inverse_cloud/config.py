"""Configuration: one TOML file, parsed once at start into frozen dataclasses.

Every option is declared once in :data:`SCHEMA` with its type, default and the reason for the default;
``config.example.toml`` documents the same options for users. Errors name the file, the line, the key,
what was expected and what was found, e.g.::

    /home/a/.config/inverse-cloud/config.toml: line 3: [relay] port: expected an integer 1-65535, got "x"

Unknown keys get a "did you mean" from :func:`difflib.get_close_matches`.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from inverse_cloud.config_checks import (
    Checker,
    _bool,
    _choice,
    _domain,
    _float_range,
    _host_key,
    _hostport,
    _int_range,
    _nonempty,
    _opt_hostport,
    _opt_ipv6,
    _path,
    _str,
    parse_domain,
    parse_hostport,
)
from inverse_cloud.errors import ConfigError

__all__ = [
    "AcmeConfig",
    "Config",
    "RelayConfig",
    "ServerConfig",
    "config_path",
    "default_config_path",
    "load_config",
    "default_data_dir",
    "default_state_dir",
    "load",
    "parse_domain",
    "parse_hostport",
    "parse_user_host",
]

LETSENCRYPT = "https://acme-v02.api.letsencrypt.org/directory"
LETSENCRYPT_STAGING = "https://acme-staging-v02.api.letsencrypt.org/directory"


def _xdg(var: str, fallback: str) -> Path:
    value = os.environ.get(var)
    return Path(value) if value and os.path.isabs(value) else Path.home() / fallback


def default_config_path() -> Path:
    return _xdg("XDG_CONFIG_HOME", ".config") / "inverse-cloud" / "config.toml"


def default_data_dir() -> Path:
    return _xdg("XDG_DATA_HOME", ".local/share") / "inverse-cloud"


def default_state_dir() -> Path:
    return _xdg("XDG_STATE_HOME", ".local/state") / "inverse-cloud"


def parse_user_host(text: str, flag: str, default_user: str | None = None) -> tuple[str, str, int]:
    """``user@host[:port]`` -> (user, host, port); port 22 when absent. Without ``default_user`` the user
    part is required.

    :raises ConfigError: naming ``flag`` and what was expected.
    """
    user, _, hostport = text.rpartition("@")
    host, port = hostport, 22
    if hostport.count(":") == 1:
        host, _, p = hostport.partition(":")
        if not p.isdigit() or not 0 < int(p) < 65536:
            raise ConfigError(f"{flag} {text}: port must be 1-65535")
        port = int(p)
    user = user or (default_user or "")
    if not user or not host:
        raise ConfigError(f"{flag} {text}: expected USER@HOST[:PORT]")
    return user, host, port


@dataclass(frozen=True)
class ServerConfig:
    domain: str
    https_listen: tuple[str, int]
    http_listen: tuple[str, int]
    data_dir: Path
    state_dir: Path
    max_body_bytes: int
    body_grace_s: float
    body_min_rate_bps: int
    idle_timeout_s: float
    handshake_timeout_s: float
    max_connections: int
    radicale_threads: int
    auth_delay_s: float
    shutdown_timeout_s: float
    log_level: str
    control_socket: Path
    # Radicale's web interface at /radicale/.web/ (it can delete collections once logged in). Off: phones
    # and desktop clients never use it, and it shares the phone page's origin.
    web_ui: bool = False

    @property
    def storage_dir(self) -> Path:
        return self.data_dir / "collections"

    @property
    def htpasswd_path(self) -> Path:
        return self.data_dir / "users.htpasswd"

    @property
    def cert_dir(self) -> Path:
        return self.state_dir / "tls"


@dataclass(frozen=True)
class RelayConfig:
    enabled: bool
    host: str
    port: int
    user: str
    key_file: Path
    takeover_key_file: Path
    host_key: str
    listen_host: str
    https_port: int
    http_port: int
    keepalive_interval_s: float
    keepalive_count_max: int
    connect_timeout_s: float
    fallback_port: int = 0
    proxy_protocol: bool = False
    listen_host6: str = ""     # a second pair of forwards for IPv6 phones ("::"); "" = none

    @property
    def known_hosts_path(self) -> Path:
        return self.key_file.parent / "relay_known_hosts"


@dataclass(frozen=True)
class AcmeConfig:
    enabled: bool
    directory: str
    email: str
    ca_bundle: Path | None
    eab_kid: str
    eab_hmac_key: str
    key_type: str
    check_interval_s: float
    account_dir: Path
    self_check_address: tuple[str, int] | None = None
    dns_server: tuple[str, int] | None = None
    caa_issuer: str = ""
    challenge: str = "http-01"
    tls_self_check_address: tuple[str, int] | None = None

    @property
    def challenge_methods(self) -> tuple[str, ...]:
        """The ACME challenge types this installation may use, in the order tried."""
        return ("http-01", "tls-alpn-01") if self.challenge == "auto" else (self.challenge,)

    @property
    def caa_methods(self) -> str:
        """The CAA ``validationmethods`` value that lets every challenge in use through (RFC 8657)."""
        return ",".join(self.challenge_methods)


@dataclass(frozen=True)
class Config:
    path: Path | None
    server: ServerConfig
    relay: RelayConfig
    acme: AcmeConfig
    radicale_extra: Mapping[str, Mapping[str, str]] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------------
# Schema: (key, checker, default). A default of _REQUIRED means the key must be given.
# Defaults and their reasons live in config.example.toml next to each option.

_REQUIRED = object()


SCHEMA: dict[str, dict[str, tuple[Checker, Any]]] = {
    "server": {
        "domain": (_domain, _REQUIRED),
        "https_listen": (_hostport, "127.0.0.1:8443"),
        "http_listen": (_hostport, "127.0.0.1:8080"),
        "data_dir": (_path, None),
        "state_dir": (_path, None),
        "max_body_bytes": (_int_range(1024, 1 << 30), 4 * 1024 * 1024),
        "body_grace_s": (_float_range(1, 3600), 10.0),
        "body_min_rate_bps": (_int_range(1, 1 << 30), 1024),
        "idle_timeout_s": (_float_range(1, 3600), 30.0),
        "handshake_timeout_s": (_float_range(1, 60), 10.0),
        "max_connections": (_int_range(4, 100_000), 512),
        "radicale_threads": (_int_range(1, 64), 4),
        "auth_delay_s": (_float_range(0, 10), 1.0),
        "shutdown_timeout_s": (_float_range(0, 600), 15.0),
        "log_level": (_choice("debug", "info", "warning", "error"), "info"),
        "control_socket": (_path, None),
        "web_ui": (_bool, False),
    },
    "relay": {
        "enabled": (_bool, None),
        "host": (_str, ""),
        "port": (_int_range(1, 65535), 22),
        "user": (_nonempty, "inverse-cloud"),
        "key_file": (_path, None),
        "takeover_key_file": (_path, None),
        "host_key": (_host_key, ""),
        "listen_host": (_nonempty, "127.0.0.1"),
        "https_port": (_int_range(1, 65535), 44353),
        "http_port": (_int_range(1, 65535), 8053),
        "keepalive_interval_s": (_float_range(1, 600), 5.0),
        "keepalive_count_max": (_int_range(1, 100), 3),
        "connect_timeout_s": (_float_range(1, 300), 15.0),
        "fallback_port": (_int_range(0, 65535), 0),
        "proxy_protocol": (_bool, False),
        "listen_host6": (_opt_ipv6, ""),
    },
    "acme": {
        "enabled": (_bool, None),
        "directory": (_nonempty, LETSENCRYPT),
        "staging": (_bool, False),
        "email": (_str, ""),
        "ca_bundle": (_path, None),
        "eab_kid": (_str, ""),
        "eab_hmac_key": (_str, ""),
        "key_type": (_choice("ecdsa-p256", "ecdsa-p384", "rsa-2048", "rsa-3072"), "ecdsa-p256"),
        "check_interval_s": (_float_range(1, 86400), 600.0),
        "self_check_address": (_opt_hostport, None),
        "dns_server": (_opt_hostport, None),
        "caa_issuer": (_str, ""),
        "challenge": (_choice("http-01", "tls-alpn-01", "auto"), "http-01"),
        "tls_self_check_address": (_opt_hostport, None),
    },
}

# The Radicale options [radicale.*] may pass through: each is a limit, a cache setting or a client
# compatibility switch that cannot run code, widen access, move data or log content. Everything else
# (storage.type and storage.hook run code; sharing.* makes password-less shares; web.type is [server]
# web_ui; auth.*/rights.type decide who sees what; logging.* can write contacts to the log) is refused,
# and so is any option a future Radicale adds until it is reviewed here.
RADICALE_PASS_THROUGH: dict[str, frozenset[str]] = {
    "server": frozenset({"max_vevent_rrule_occurrence"}),
    "encoding": frozenset({"request", "stock"}),
    "auth": frozenset({"realm", "cache_successful_logins_expiry", "cache_failed_logins_expiry"}),
    "rights": frozenset({"permit_delete_collection", "permit_overwrite_collection"}),
    "storage": frozenset({"max_sync_token_age", "skip_broken_item", "strict_preconditions",
                          "use_mtime_and_size_for_item_cache", "use_cache_subfolder_for_item",
                          "use_cache_subfolder_for_history", "use_cache_subfolder_for_synctoken",
                          "predefined_collections"}),
    "reporting": frozenset({"max_expand_occurrence", "max_freebusy_occurrence", "freebusy_view_past_days",
                            "freebusy_view_future_days"}),
}


def _locate(text: str, section: str | None, key: str | None) -> int | None:
    """Best-effort line number (1-based) of ``key`` inside ``[section]`` (or of the header itself)."""
    current: str | None = None
    header_line = None
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        m = re.match(r"^\[+\s*([^\]]+?)\s*\]+", line)
        if m:
            current = m.group(1).strip().strip('"')
            if current == section and header_line is None:
                header_line = n
            continue
        if key is not None and current == section:
            km = re.match(r'^"?([A-Za-z0-9_.-]+)"?\s*=', line)
            if km and km.group(1) == key:
                return n
    return header_line


class _Errors:
    def __init__(self, path: Path | None, text: str) -> None:
        self.path, self.text = path, text

    def fail(self, section: str | None, key: str | None, what: str) -> ConfigError:
        where = str(self.path) if self.path else "config"
        line = _locate(self.text, section, key)
        if line is not None:
            where += f": line {line}"
        name = f"[{section}] {key}" if section and key else (f"[{section}]" if section else (key or ""))
        return ConfigError(f"{where}: {name}: {what}" if name else f"{where}: {what}")


def _describe(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"  # TOML's spelling, not Python's
    return f'"{v}"' if isinstance(v, str) else repr(v)


def _name_at(text: str, line_no: int) -> str | None:
    """``[section] key`` (or ``[section]`` for a header) written on line ``line_no``, if any."""
    lines = text.splitlines()
    line = lines[line_no - 1].strip() if 0 < line_no <= len(lines) else ""
    header = re.match(r"^\[+\s*([^\]]+?)\s*\]+", line)
    if header:
        return f"[{header.group(1)}]"
    key = re.match(r'^"?([A-Za-z0-9_.-]+)"?\s*=', line)
    if not key:
        return None
    for raw in reversed(lines[: line_no - 1]):
        sm = re.match(r"^\s*\[+\s*([^\]]+?)\s*\]+", raw)
        if sm:
            return f"[{sm.group(1)}] {key.group(1)}"
    return key.group(1)


def load(path: Path, overrides: Mapping[str, Mapping[str, Any]] | None = None) -> Config:
    """Read and check ``path``. ``overrides`` (from command-line flags) win over the file.

    :raises ConfigError: with one line naming file, line, key and what was expected.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(
            f"{path}: no such config file (run `inverse-cloud init` to create one, or pass --config)"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read config file: {exc}") from None
    return loads(text, path, overrides)


def loads(text: str, path: Path | None = None,
          overrides: Mapping[str, Mapping[str, Any]] | None = None) -> Config:
    errors = _Errors(path, text)
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        # tomllib's message carries "(at line L, column C)"; put the file name in front of it.
        msg = str(exc)
        m = re.search(r"\(at line (\d+), column (\d+)\)", msg)
        if m:
            msg = msg[: m.start()].strip()
            where = f"{path or 'config'}: line {m.group(1)}, column {m.group(2)}"
        else:
            where = f"{path or 'config'}"
        name = _name_at(text, int(m.group(1))) if m else None
        if msg.startswith(("Cannot overwrite a value", "Cannot declare")):
            msg = f"{name} is defined twice" if name else msg + " (a key or table is defined twice)"
        elif name:
            msg = f"{name}: {msg[:1].lower()}{msg[1:]}"
        raise ConfigError(f"{where}: TOML syntax error: {msg}") from None
    for section, extra in (overrides or {}).items():
        raw.setdefault(section, {}).update(extra)

    known = set(SCHEMA) | {"radicale"}
    for section in raw:
        if section not in known:
            hint = difflib.get_close_matches(section, sorted(known), n=1)
            raise errors.fail(section, None, "unknown section" + (
                f' (did you mean "[{hint[0]}]"?)' if hint else f"; known: {', '.join(sorted(known))}"))
        if not isinstance(raw[section], dict):
            raise errors.fail(None, section, "expected a [table]")

    values: dict[str, dict[str, Any]] = {}
    for section, schema in SCHEMA.items():
        given = raw.get(section, {})
        for key in given:
            if key not in schema:
                hint = difflib.get_close_matches(key, list(schema), n=1)
                raise errors.fail(section, key, "unknown key" + (
                    f' (did you mean "{hint[0]}"?)' if hint else f"; known keys: {', '.join(schema)}"))
        out: dict[str, Any] = {}
        for key, (check, default) in schema.items():
            if key in given:
                try:
                    out[key] = check(given[key])
                except ValueError as exc:
                    raise errors.fail(section, key, f"{exc}, got {_describe(given[key])}") from None
            elif default is _REQUIRED:
                raise errors.fail(section, key, "missing required key")
            else:
                # Defaults go through the same checker, so "127.0.0.1:8443" becomes ("127.0.0.1", 8443).
                out[key] = default if default is None else check(default)
        values[section] = out

    radicale_extra = _radicale_extra(raw.get("radicale", {}), errors)
    return _build(path, values, radicale_extra)


def _radicale_extra(raw: Any, errors: _Errors) -> dict[str, dict[str, str]]:
    """``[radicale.<section>] option = value`` passes options through to Radicale unchanged."""
    out: dict[str, dict[str, str]] = {}
    for section, options in raw.items():
        if not isinstance(options, dict):
            raise errors.fail("radicale", section,
                              "expected a table such as [radicale.storage] holding Radicale options")
        for option, value in options.items():
            allowed = RADICALE_PASS_THROUGH.get(section, frozenset())
            if option not in allowed:
                listed = ", ".join(sorted(allowed)) if allowed else "none"
                raise errors.fail(f"radicale.{section}", option,
                                  "is not a Radicale option inverse-cloud passes through (it could run code, "
                                  f"widen access or is set by inverse-cloud itself); allowed here: {listed}")
            if isinstance(value, bool):
                value = "True" if value else "False"
            out.setdefault(section, {})[option] = str(value)
    return out


def _build(path: Path | None, v: dict[str, dict[str, Any]], radicale_extra: dict[str, dict[str, str]]) -> Config:
    s = v["server"]
    data_dir: Path = s["data_dir"] or default_data_dir()
    state_dir: Path = s["state_dir"] or default_state_dir()
    # Derived from the config alone (not $XDG_RUNTIME_DIR, which cron jobs and ssh sessions may lack), so
    # `status` finds the socket of the server that runs with this config wherever it is called from.
    control = s["control_socket"] or state_dir / "control.sock"
    server = ServerConfig(
        domain=s["domain"], https_listen=s["https_listen"], http_listen=s["http_listen"],
        data_dir=data_dir, state_dir=state_dir, max_body_bytes=s["max_body_bytes"],
        body_grace_s=s["body_grace_s"], body_min_rate_bps=s["body_min_rate_bps"], idle_timeout_s=s["idle_timeout_s"],
        handshake_timeout_s=s["handshake_timeout_s"], max_connections=s["max_connections"],
        radicale_threads=s["radicale_threads"], auth_delay_s=s["auth_delay_s"],
        shutdown_timeout_s=s["shutdown_timeout_s"], log_level=s["log_level"], control_socket=control,
        web_ui=s["web_ui"],
    )
    r = v["relay"]
    ssh_dir = data_dir / "ssh"
    relay = RelayConfig(
        enabled=bool(r["host"]) if r["enabled"] is None else r["enabled"],
        host=r["host"], port=r["port"], user=r["user"],
        key_file=r["key_file"] or ssh_dir / "id_ed25519",
        takeover_key_file=r["takeover_key_file"] or ssh_dir / "id_ed25519_takeover",
        host_key=r["host_key"], listen_host=r["listen_host"], https_port=r["https_port"],
        http_port=r["http_port"], keepalive_interval_s=r["keepalive_interval_s"],
        keepalive_count_max=r["keepalive_count_max"], connect_timeout_s=r["connect_timeout_s"],
        fallback_port=r["fallback_port"], proxy_protocol=r["proxy_protocol"], listen_host6=r["listen_host6"],
    )
    a = v["acme"]
    directory = LETSENCRYPT_STAGING if a["staging"] and a["directory"] == LETSENCRYPT else a["directory"]
    acme = AcmeConfig(
        enabled=relay.enabled if a["enabled"] is None else a["enabled"],
        directory=directory, email=a["email"], ca_bundle=a["ca_bundle"], eab_kid=a["eab_kid"],
        eab_hmac_key=a["eab_hmac_key"], key_type=a["key_type"], check_interval_s=a["check_interval_s"],
        account_dir=data_dir / "acme", self_check_address=a["self_check_address"], dns_server=a["dns_server"],
        caa_issuer=a["caa_issuer"].strip().lower(), challenge=a["challenge"],
        tls_self_check_address=a["tls_self_check_address"],
    )
    return Config(path=path, server=server, relay=relay, acme=acme, radicale_extra=radicale_extra)


def replace_server(cfg: Config, **changes: Any) -> Config:
    """A copy of ``cfg`` with some [server] fields changed (tests and flags)."""
    return dataclasses.replace(cfg, server=dataclasses.replace(cfg.server, **changes))


def config_path(args: argparse.Namespace) -> Path:
    """The config file a command was given (``--config``, before or after the command), else
    ``$INVERSE_CLOUD_CONFIG``, else :func:`default_config_path`."""
    given = getattr(args, "config", None) or os.environ.get("INVERSE_CLOUD_CONFIG")
    return Path(given).expanduser() if given else default_config_path()


def load_config(args: argparse.Namespace) -> Config:
    """:func:`load` the config file a command was given.

    :raises ConfigError: the file is missing or wrong (the message names file, line, key and expectation).
    """
    return load(config_path(args))
