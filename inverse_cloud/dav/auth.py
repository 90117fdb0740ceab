"""Radicale's htpasswd authentication, except that a broken user file never replaces a good one.

Radicale re-reads the user file whenever its size or mtime changes (``htpasswd_cache``), so ``inverse-cloud
user add`` takes effect at once. Stock Radicale skips the lines it cannot parse on a re-read: a file
garbled by hand (or half written by another tool) silently drops every user on it, and every phone's next
login fails until the file is repaired. Here a re-read that finds a problem keeps the users read before,
with one ERROR line naming the file and the problem; the first read (start, SIGHUP) refuses such a file.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any, ClassVar

from radicale import config
from radicale.auth import htpasswd

__all__ = ["Auth", "htpasswd_problem"]

log = logging.getLogger(__name__)


def htpasswd_problem(text: str) -> str | None:
    """What is wrong with an htpasswd file's text (the first problem, with its line), or None.

    Blank lines and ``#`` comments are allowed; every other line is ``name:hash`` with neither part empty,
    and no name appears twice.
    """
    seen: set[str] = set()
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        name, colon, digest = line.partition(":")
        if not colon or not name or not digest:
            return f"line {number} is not 'name:hash'"
        if name in seen:
            return f"line {number} names user {name!r} a second time"
        seen.add(name)
    return None


class Auth(htpasswd.Auth):
    """Radicale's ``htpasswd`` plugin with all-or-nothing re-reads (selected by radicale_app.py)."""

    # (file, size, mtime_ns) of each broken version already reported: one ERROR line per version, whether
    # the first read of a reload (a new Application) or a serving Application's re-read sees it first.
    _reported: ClassVar[set[tuple[str, int, int]]] = set()

    def __init__(self, configuration: config.Configuration) -> None:
        super().__init__(configuration)
        # Radicale caches logins only for the auth types it ships (this one is a module path): bcrypt costs
        # ~0.2 s per check, so turn the cache back on as BaseAuth.__init__ would for "htpasswd".
        if configuration.get("auth", "cache_logins") and not self._cache_logins:
            self._cache_logins = True
            self._cache_successful_logins_expiry = configuration.get("auth", "cache_successful_logins_expiry")
            self._cache_failed_logins_expiry = configuration.get("auth", "cache_failed_logins_expiry")
            self._cache_successful = {}
            self._cache_failed = {}
            self._cache_failed_logins_salt_ns = time.time_ns()

    def _problem(self) -> tuple[str | None, tuple[str, int, int]]:
        st = os.stat(self._filename)
        version = (str(self._filename), st.st_size, st.st_mtime_ns)
        try:
            with open(self._filename, encoding=self._encoding) as f:
                text = f.read()
        except (OSError, UnicodeDecodeError) as exc:
            return f"cannot be read: {exc}", version
        return htpasswd_problem(text), version

    def _read_htpasswd(self, init: bool, suppress: bool) -> tuple[bool, int, int, dict[Any, Any], int, int]:
        try:
            problem, version = self._problem()
        except OSError as exc:
            problem, version = f"cannot be read: {exc}", (str(self._filename), -1, -1)
        if problem is None:
            return super()._read_htpasswd(init, suppress)
        message = f"user file {self._filename} refused: {problem}"
        first_report = version not in self._reported
        self._reported.add(version)
        if init:
            raise RuntimeError(message)
        if first_report:
            log.error("%s; keeping the %d user(s) read before (fix the file: it is re-read when it changes)",
                      message, len(self._htpasswd))
        # Remember this version as read, so the broken file is not parsed again on every login.
        return (self._htpasswd_ok, self._htpasswd_bcrypt_use, self._htpasswd_argon2_use, self._htpasswd,
                version[1], version[2])
