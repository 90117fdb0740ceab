"""Radicale as we configure it (inverse_cloud/dav/radicale_app.py), called through WSGI directly: the login
cache that keeps bcrypt off a phone's path after a pause, and the user file taking effect at once."""

from __future__ import annotations

import base64
import io
import sys

from inverse_cloud import config
from inverse_cloud.dav import users
from inverse_cloud.dav.radicale_app import LOGIN_CACHE_S, build_application, radicale_options


def _cfg(tmp_path):
    return config.loads(f'[server]\ndomain = "laptop.test"\ndata_dir = "{tmp_path}"\nstate_dir = "{tmp_path}/s"\n')


def propfind(app, user: str, password: str) -> int:
    auth = base64.b64encode(f"{user}:{password}".encode()).decode()
    environ = {"REQUEST_METHOD": "PROPFIND", "PATH_INFO": f"/{user}/", "SCRIPT_NAME": "/radicale",
               "QUERY_STRING": "", "SERVER_NAME": "laptop.test", "SERVER_PORT": "443", "SERVER_PROTOCOL": "HTTP/1.1",
               "HTTP_HOST": "laptop.test", "HTTP_DEPTH": "0", "HTTP_AUTHORIZATION": f"Basic {auth}",
               "REMOTE_ADDR": "127.0.0.1", "CONTENT_LENGTH": "0", "wsgi.input": io.BytesIO(b""),
               "wsgi.errors": sys.stderr, "wsgi.url_scheme": "https", "wsgi.version": (1, 0),
               "wsgi.multithread": True, "wsgi.multiprocess": False, "wsgi.run_once": False}
    statuses: list[str] = []
    body = app(environ, lambda status, headers, exc_info=None: statuses.append(status))
    b"".join(body)
    return int(statuses[0].split()[0])


def test_successful_logins_are_cached_as_long_as_the_known_good_credentials(tmp_path):
    """Radicale's own default keeps a verified login for 15 s only: any phone pause longer than that (a
    20 s outage, a suspend) makes its next request pay a bcrypt check (0.8-1.9 s on a loaded 2-core
    machine) right when the tunnel is back. Expected: Radicale keeps it as long as our known-good cache."""
    from inverse_cloud.dav.wsgi import KNOWN_GOOD_S

    auth = radicale_options(_cfg(tmp_path))["auth"]
    assert auth["cache_logins"] == "True"
    assert int(auth["cache_successful_logins_expiry"]) == LOGIN_CACHE_S >= KNOWN_GOOD_S


def test_a_changed_password_or_removed_user_takes_effect_at_the_next_request(tmp_path):
    """alice logs in (the login is now cached). Her password is changed in the user file: the old one gets
    401 at the very next request, the new one 207. Then she is removed: 401 for the new one too. Expected
    although the login cache lasts minutes: the user file's change drops it (before, a cached login kept
    working for up to 15 s after a change)."""
    cfg = _cfg(tmp_path)
    users.add_user(cfg.server.htpasswd_path, "alice", "correct horse")
    app = build_application(cfg)
    assert propfind(app, "alice", "correct horse") == 207
    assert propfind(app, "alice", "correct horse") == 207          # from the cache
    users.set_password(cfg.server.htpasswd_path, "alice", "battery staple")
    assert propfind(app, "alice", "correct horse") == 401
    assert propfind(app, "alice", "battery staple") == 207
    users.remove_user(cfg.server.htpasswd_path, "alice")
    assert propfind(app, "alice", "battery staple") == 401
