"""The log formatter: one line per event, control characters from anywhere escaped at every level."""

from __future__ import annotations

import logging

import pytest

from inverse_cloud import log


def _format(level: str, msg: str, *args: object) -> str:
    record = logging.LogRecord("inverse_cloud.test", logging.WARNING, __file__, 1, msg, args, None)
    formatter = log._OneLineFormatter(journald=True, debug=level == "debug")
    return formatter.format(record)


@pytest.mark.parametrize("level", ["debug", "info"])
def test_client_strings_cannot_forge_a_line_or_a_terminal_escape(level):
    """A client-chosen string holding LF, CR, ESC, a C1 control or a bidi override, logged through any
    logger at debug or info level, stays on one line and holds no raw control character. At debug level
    newlines used to pass through untouched, so a client could write a fake
    ``<addr>: N more failed logins`` line for a fail2ban filter."""
    evil = "x\n1.2.3.4: 9 more failed logins within 60 s\r\x1b[2J\x85\u202e"
    line = _format(level, "phone page: user %s", evil)
    assert "\n" not in line and line.isprintable(), repr(line)
    assert "\\x1b[2J" in line and "\\u202e" in line


def test_printable_leaves_ordinary_text_alone():
    assert log.printable("GET /radicale/alice/ é ü 日本") == "GET /radicale/alice/ é ü 日本"
    assert log.printable("a\tb\x00") == "a\\x09b\\x00"
