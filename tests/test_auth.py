"""The htpasswd plugin in-process: what counts as a broken user file, and that a serving Radicale's re-read
of one keeps the users it had (one ERROR line per broken version), while a good change is taken at once."""

from __future__ import annotations

import logging
import os

import pytest
import radicale.config

from inverse_cloud.dav import auth, users


@pytest.mark.parametrize(("text", "problem"), [
    ("", None),
    ("# comment\n\nalice:$2b$12$x\n", None),
    ("  # indented comment\nalice:hash\nbob:hash\n", None),
    ("alice:hash\nnot a line\n", "line 2 is not 'name:hash'"),
    (":hash\n", "line 1 is not 'name:hash'"),
    ("alice:\n", "line 1 is not 'name:hash'"),
    ("alice:a\nbob:b\nalice:c\n", "line 3 names user 'alice' a second time"),
])
def test_htpasswd_problem(text, problem):
    assert auth.htpasswd_problem(text) == problem


def _auth(path) -> auth.Auth:
    configuration = radicale.config.load([])
    configuration.update({"auth": {"type": "inverse_cloud.dav.auth", "htpasswd_filename": str(path),
                                   "htpasswd_encryption": "autodetect", "cache_logins": "True",
                                   "htpasswd_cache": "True", "delay": "0"}}, "test", privileged=True)
    return auth.Auth(configuration)


def _touch_later(path) -> None:
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))


def test_a_broken_re_read_keeps_the_users_and_logs_once(tmp_path, caplog):
    """alice and bob in the file; the file gets a line without a colon: bob still logs in, one ERROR names
    the file, the line and how many users were kept, and further logins add no line; the file repaired with
    carol added: carol logs in at once."""
    path = tmp_path / "users"
    users.add_user(path, "alice", "correct horse")
    users.add_user(path, "bob", "battery staple")
    a = _auth(path)
    assert a._cache_logins is True           # bcrypt per request would cost ~0.2 s: the login cache is on
    good = path.read_text()
    path.write_text(good + "garbage\n")
    _touch_later(path)
    caplog.set_level(logging.INFO, "inverse_cloud.dav.auth")
    assert a._login("bob", "battery staple") == "bob"
    assert a._login("bob", "wrong") == ""
    assert a._login("alice", "correct horse") == "alice"
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == [f"user file {path} refused: line 3 is not 'name:hash'; keeping the 2 user(s) read before "
                      "(fix the file: it is re-read when it changes)"]
    path.write_text(good)
    users.add_user(path, "carol", "staple horse")
    _touch_later(path)
    assert a._login("carol", "staple horse") == "carol"
    assert len([r for r in caplog.records if r.levelno >= logging.ERROR]) == 1


def test_the_first_read_refuses_a_broken_file(tmp_path):
    """A new Application (start, SIGHUP) reading a broken file raises with the file and the problem."""
    path = tmp_path / "users"
    path.write_text("alice:a\nalice:b\n")
    with pytest.raises(RuntimeError, match=f"user file {path} refused: line 2 names user 'alice' a second time"):
        _auth(path)
