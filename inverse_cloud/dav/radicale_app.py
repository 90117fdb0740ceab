"""Radicale, configured explicitly from our config.

``radicale.config.load([])`` starts from Radicale's built-in defaults and reads *no* file, so neither
``/etc/radicale/config`` nor ``RADICALE_CONFIG`` can change what we serve. The options that keep the
server safe are set here; ``[radicale.*]`` may only pass through the options in
config.RADICALE_PASS_THROUGH.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from inverse_cloud.config import Config

log = logging.getLogger(__name__)

__all__ = ["AUTH_PLUGIN", "LOGIN_CACHE_S", "PREDEFINED_COLLECTIONS", "STORAGE_PLUGIN", "UserFileWatch",
           "build_application", "radicale_options"]

# How long Radicale keeps a verified login (counted from the check, not from the last use). Radicale's
# default, 15 s, makes a phone's first request after any pause longer than that (a 20 s outage, a suspend,
# a network change) pay a bcrypt check, 0.2 s idle and 0.8-1.9 s on a loaded 2-core machine, right when the
# tunnel is back. As long as the known-good credentials of dav/wsgi.py (KNOWN_GOOD_S). A change of the
# user file drops every cached login at the next request (UserFileWatch), so a revoked password stops at once.
LOGIN_CACHE_S = 300

# Every user gets an address book and a calendar at first login, so a phone finds something to sync
# and Thunderbird (which cannot create collections) has a target.
PREDEFINED_COLLECTIONS = {
    "contacts": {"tag": "VADDRESSBOOK", "D:displayname": "Contacts"},
    "calendar": {
        "tag": "VCALENDAR",
        "D:displayname": "Calendar",
        "C:supported-calendar-component-set": "VEVENT,VTODO,VJOURNAL",
    },
}


# The module path of inverse_cloud.dav.storage, named here so that building the options imports no Radicale.
STORAGE_PLUGIN = "inverse_cloud.dav.storage"
AUTH_PLUGIN = "inverse_cloud.dav.auth"


def radicale_options(cfg: Config) -> dict[str, dict[str, str]]:
    s = cfg.server
    options: dict[str, dict[str, str]] = {
        "server": {
            # Used by Radicale only when proxy headers are present; we strip those, and pass
            # SCRIPT_NAME ourselves. Set anyway so a header we missed cannot move the prefix.
            "script_name": "/radicale",
            # Limits enforced in front of Radicale too (web.py); these are Radicale's own checks.
            # Radicale caps max_resource_size at 80% of max_content_length: leave room above ours.
            "max_content_length": str(s.max_body_bytes * 5 // 4 + 1),
            "max_resource_size": str(s.max_body_bytes),
            # Radicale sleeps in the worker thread on 5xx; we never want a thread asleep.
            "delay_on_error": "0",
        },
        "auth": {
            # Radicale's htpasswd, except that a re-read finding a broken file keeps the users it had.
            "type": AUTH_PLUGIN,
            "htpasswd_filename": str(s.htpasswd_path),
            "htpasswd_encryption": "autodetect",
            # The failed-login delay is applied by web.py with an async sleep: Radicale's own
            # is a time.sleep that would hold a worker thread .
            "delay": "0",
            # bcrypt costs ~0.2 s per check: cache good logins so a sync does not pay it per request.
            "cache_logins": "True",
            "cache_successful_logins_expiry": str(LOGIN_CACHE_S),
            # Re-read the user file only when its size or mtime changes (user add/remove take effect).
            "htpasswd_cache": "True",
        },
        "rights": {"type": "owner_only"},
        "storage": {
            # Radicale's multifilesystem plus a persisted index (inverse_cloud/dav/storage/): PUT, DELETE and
            # sync-collection cost the same at 50 items as at 50,000, on the same files. Override with
            # [radicale.storage] type = "multifilesystem" to serve with Radicale's own storage code.
            "type": STORAGE_PLUGIN,
            "filesystem_folder": str(s.storage_dir),
            "predefined_collections": json.dumps(PREDEFINED_COLLECTIONS),
            # Validate Radicale's per-item cache by the file's mtime (ns) + size instead of reading and
            # hashing every item file on each PROPFIND/REPORT/PUT (Radicale's wiki, "Performance tuning").
            # Radicale's own writes refresh the cache entry; only an edit made outside Radicale, to the
            # same size within one timestamp tick, could be missed. -13..-16% CPU per phase at 1000
            # cards (bench/README.md). Override with [radicale.storage] use_mtime_and_size_for_item_cache.
            "use_mtime_and_size_for_item_cache": "True",
        },
        "logging": {"level": "warning", "mask_passwords": "True"},
        # Radicale's web interface: off unless [server] web_ui = true.
        "web": {"type": "internal" if s.web_ui else "none"},
    }
    for section, values in cfg.radicale_extra.items():
        options.setdefault(section, {}).update(values)
    return options


# The version (size, mtime, inode) of each user file whose refusal has been reported, so a broken file is
# one ERROR line whether SIGHUP's rebuild or a request's noticed it first.
_REFUSED: dict[Path, tuple[int, int, int] | None] = {}


class UserFileWatch:
    """A WSGI app that rebuilds the Radicale app it wraps when the user file changes (size, mtime or
    inode), in the worker thread that notices it, before the request is served: Radicale's login cache
    (LOGIN_CACHE_S) would otherwise keep a changed password or a removed user working until it expires.
    Requests already running finish with the old app, as after SIGHUP."""

    def __init__(self, build: Callable[[], Any], user_file: Path) -> None:
        self._build, self._path = build, user_file
        self._lock = threading.Lock()
        self._stamp = self._read_stamp()
        try:
            self._app = build()
        except Exception:
            _REFUSED[self._path] = self._stamp  # the caller reports it (SIGHUP's "reload failed" line)
            raise

    def _read_stamp(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self._path)
        except OSError:
            return None
        return st.st_size, st.st_mtime_ns, st.st_ino

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        stamp = self._read_stamp()
        if stamp != self._stamp:
            with self._lock:
                if stamp != self._stamp:
                    self._stamp = stamp
                    try:
                        self._app = self._build()
                    except Exception as exc:  # boundary: a broken user file must not fail every request
                        if _REFUSED.get(self._path) != stamp:  # one line per broken version of the file
                            _REFUSED[self._path] = stamp
                            log.error("%s; keeping the users it had until it is fixed", exc)
        result: Iterable[bytes] = self._app(environ, start_response)
        return result


def build_application(cfg: Config) -> UserFileWatch:
    """A Radicale WSGI application for ``cfg`` (rebuilt when the user file changes, see
    :class:`UserFileWatch`). Imports Radicale lazily (it is the heaviest import). With the storage plugin,
    Radicale's application is wrapped in the plugin's ScopedApplication (which keeps Radicale's
    ``_storage`` attribute).

    :raises ConfigError: a ``[radicale.*]`` option is wrong.
    :raises StartupError: our storage plugin is configured and the installed Radicale is not one it is
        tested with.
    """
    import radicale

    from inverse_cloud.errors import StartupError

    options = radicale_options(cfg)
    if options["storage"].get("type") == STORAGE_PLUGIN:
        from inverse_cloud.dav.storage import is_tested_radicale, untested_radicale_message

        if not is_tested_radicale(radicale.VERSION):
            raise StartupError(untested_radicale_message(radicale.VERSION))

    def build() -> Any:
        return _radicale_application(cfg, options)

    return UserFileWatch(build, cfg.server.htpasswd_path)


def _radicale_application(cfg: Config, options: dict[str, dict[str, str]]) -> Any:
    import radicale.app
    import radicale.config

    from inverse_cloud.errors import ConfigError

    configuration = radicale.config.load([])
    try:
        configuration.update(options, "inverse-cloud config", privileged=True)
    except (RuntimeError, ValueError) as exc:
        # Only [radicale.*] pass-through options can be wrong here; Radicale names option and section.
        where = cfg.path or "config"
        raise ConfigError(f"{where}: [radicale.*]: {exc}".replace(" in inverse-cloud config", "")) from None
    # Radicale narrates its set-up at WARNING (creating folders, optional modules); only errors matter here.
    radicale_log = logging.getLogger("radicale")
    level = radicale_log.level
    radicale_log.setLevel(logging.ERROR)
    try:
        app = radicale.app.Application(configuration)
    finally:
        radicale_log.setLevel(level)
    if options["storage"].get("type") == STORAGE_PLUGIN:
        # The plugin locks per collection root: it needs to know each request's root (storage/locks.py).
        from inverse_cloud.dav.storage import Storage

        assert isinstance(app._storage, Storage)
        return app._storage.scoped(app)
    return app
