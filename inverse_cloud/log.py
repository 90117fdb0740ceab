"""Logging set-up: one line per event on stderr.

Under systemd (``JOURNAL_STREAM`` set) lines carry an ``<N>`` syslog priority prefix and no timestamp,
because journald adds both (sd-daemon(3)). Elsewhere a short timestamp is added. Tracebacks are only
printed at debug level (Radicale's habit): at INFO an exception is reduced to its one-line message.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable

__all__ = ["RepeatLimiter", "printable", "setup"]

_PRIORITY = {
    logging.DEBUG: 7,
    logging.INFO: 6,
    logging.WARNING: 4,
    logging.ERROR: 3,
    logging.CRITICAL: 2,
}


def _escape(ch: str) -> str:
    code = ord(ch)
    return f"\\x{code:02x}" if code < 0x100 else (f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}")


def printable(text: str) -> str:
    """``text`` with every non-printable character (C0/C1 controls, line and paragraph separators, bidi
    overrides, ...) written as a Python-style escape, ``\\x1b``: a client-chosen string in a log line can
    neither start a new line (a fake line for a fail2ban filter) nor drive the terminal showing it."""
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else _escape(ch) for ch in text)


class _OneLineFormatter(logging.Formatter):
    def __init__(self, journald: bool, debug: bool) -> None:
        # Milliseconds on a terminal: a reconnect's steps (network event, probe, tunnel up, the phone's
        # request) are a few hundred ms apart. journald stamps its own lines.
        fmt = "%(levelname)s %(name)s: %(message)s" if journald else (
            "%(asctime)s.%(msecs)03d %(levelname)s %(name)s: %(message)s")
        super().__init__(fmt, datefmt="%H:%M:%S")
        self._journald = journald
        self._debug = debug

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if not message.isprintable():
            # Messages carry client strings (paths, user names, user agents, Radicale's notes): escape
            # them at every level. Below debug a newline folds to " | " (multi-line messages of ours).
            if not self._debug:
                message = message.replace("\n", " | ")
            record = logging.makeLogRecord(record.__dict__)
            record.msg, record.args = printable(message), None
        if record.exc_info and not self._debug:
            # One line: keep the exception's message, drop the traceback.
            exc = record.exc_info[1]
            record = logging.makeLogRecord(record.__dict__)
            record.msg = f"{record.getMessage()} ({type(exc).__name__}: {exc})" if exc else record.getMessage()
            record.args = None
            record.exc_info = None
            record.exc_text = None
        line = super().format(record)
        if not self._debug:
            line = line.replace("\n", " | ")
        if self._journald:
            line = f"<{_PRIORITY.get(record.levelno, 6)}>{line}"
        return line


class _AiohttpParserNoise(logging.Filter):
    """aiohttp logs a malformed request as "Error handling request" with a traceback. A bad request
    from the internet is not an error of ours: keep one short line at INFO level."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == "aiohttp.server" and record.getMessage().startswith("Error handling request"):
            exc = record.exc_info[1] if record.exc_info else None
            source = record.getMessage()[len("Error handling request"):].strip()
            record.levelno, record.levelname = logging.INFO, "INFO"
            record.msg = f"bad request {source}: {short_reason(exc)}".replace("  ", " ")
            record.args = None
            record.exc_info = None
        return True


class RepeatLimiter(logging.Filter):
    """At most one line per ``interval_s`` for messages that repeat under load: asyncio's
    "socket.accept() out of system resource" comes once a second per listener for as long as descriptors
    are short, and an exhausted process must not flood the journal too. The line that passes says how
    many were dropped since the last one."""

    PREFIXES = ("socket.accept() out of system resource",)

    def __init__(self, interval_s: float = 10.0, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.interval_s, self.clock = interval_s, clock
        self._last: dict[str, float] = {}
        self._dropped: dict[str, int] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        prefix = next((p for p in self.PREFIXES if message.startswith(p)), None)
        if prefix is None:
            return True
        now = self.clock()
        if now - self._last.get(prefix, -self.interval_s) < self.interval_s:
            self._dropped[prefix] = self._dropped.get(prefix, 0) + 1
            return False
        self._last[prefix] = now
        dropped = self._dropped.pop(prefix, 0)
        if dropped:
            record.msg, record.args = f"{message} ({dropped} more like it in the last {self.interval_s:.0f} s)", None
        return True


def short_reason(exc: BaseException | None) -> str:
    """aiohttp's parser errors span lines and quote the offending bytes (which may hold credentials):
    keep the words, drop the quoted bytes and the caret line."""
    if exc is None:
        return "malformed request"
    text = str(getattr(exc, "message", "") or exc)
    words = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line == "^" or line.startswith(("b'", 'b"')):
            continue
        words.append(line.split(": b'", 1)[0].split(': b"', 1)[0].rstrip(":"))
    return f"{type(exc).__name__}: {'; '.join(words)[:160] or 'malformed request'}"


def setup(level: str = "info") -> None:
    """Configure the root logger once. ``level`` is debug|info|warning|error."""
    numeric = getattr(logging, level.upper(), logging.INFO)
    journald = bool(os.environ.get("JOURNAL_STREAM"))
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_OneLineFormatter(journald, numeric <= logging.DEBUG))
    handler.addFilter(_AiohttpParserNoise())
    handler.addFilter(RepeatLimiter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(numeric)
    # Radicale is chatty at INFO (a line per request and per login); our access log covers that.
    logging.getLogger("radicale").setLevel(max(numeric, logging.WARNING))
    logging.getLogger("asyncssh").setLevel(max(numeric, logging.WARNING))
    logging.getLogger("acme").setLevel(max(numeric, logging.WARNING))
    logging.getLogger("urllib3").setLevel(max(numeric, logging.WARNING))
