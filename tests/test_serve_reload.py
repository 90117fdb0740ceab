"""SIGHUP to a running `inverse-cloud serve` whose reload fails: a broken user file, a certificate pair that is
not a certificate. Each is one ERROR line naming the file, no traceback, and the process keeps serving as it
was (the old users log in, the old certificate is served); once the file is fixed, the next SIGHUP takes it."""

from __future__ import annotations

import signal
import subprocess

from inverse_cloud import config
from inverse_cloud.certs.store import CertStore
from inverse_cloud.dav import users
from tests.support import ServeProcess, ThrowawayCA, served_certificate_serial, wait_until


def propfind(port: int, user: str = "alice:correct horse", path: str = "/radicale/alice/") -> str:
    auth = ["-u", user] if user else []
    return subprocess.run(["curl", "-sk", "-o", "/dev/null", "-w", "%{http_code}", *auth, "-X", "PROPFIND",
                           "-H", "Depth: 0", f"https://127.0.0.1:{port}{path}"],
                          capture_output=True, text=True, timeout=30, check=False).stdout


def error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if " ERROR " in line]


def test_broken_htpasswd_on_sighup_is_one_error_line_and_the_old_users_keep_working(instance):
    """bob is added while serving and the server reads the file (a failed login of someone else; bob never
    logged in, so no login cache helps him); the user file becomes
    garbage and SIGHUP is sent: one ERROR 'reload failed: user file <path> refused: line 1 is not
    'name:hash'', no traceback; bob's old password still syncs (207: the serving Radicale kept the users it
    had, it did not re-read the garbage); the file restored and SIGHUP again: no ERROR, alice syncs."""
    cfg = config.load(instance)
    path = cfg.server.htpasswd_path
    with ServeProcess(instance) as srv:
        assert propfind(srv.https_port) == "207"
        users.add_user(path, "bob", "battery staple")
        # A failed login makes the serving Radicale look at the file (it re-reads it when it changed): bob
        # is now one of the users it has, without a successful login of his to cache.
        assert propfind(srv.https_port, user="nobody:wrong") == "401"
        good = path.read_bytes()
        mark = len(srv.log())
        path.write_text("this is not an htpasswd line\n")
        srv.signal(signal.SIGHUP)
        wait_until(lambda: error_lines(srv.log()[mark:]), 20, "the reload's ERROR line", on_timeout=srv.log)
        assert propfind(srv.https_port, user="bob:battery staple", path="/radicale/bob/") == "207", srv.log()
        assert propfind(srv.https_port, user="") == "401"
        new = srv.log()[mark:]
        errors = error_lines(new)
        assert len(errors) == 1, new
        assert f"reload failed: user file {path} refused: line 1 is not 'name:hash'" in errors[0]
        assert "Traceback" not in new
        path.write_bytes(good)
        mark = len(srv.log())
        srv.signal(signal.SIGHUP)
        wait_until(lambda: "reloading certificates and users" in srv.log()[mark:], 20, "the second reload")
        wait_until(lambda: propfind(srv.https_port) == "207", 20, "alice syncing again")
        assert srv.proc is not None and srv.proc.poll() is None
        assert error_lines(srv.log()[mark:]) == []


def test_user_file_garbled_without_sighup_keeps_the_users_and_says_so_once(instance):
    """Radicale re-reads the user file by itself when it changes. bob is added (never logged in), then the
    file is garbled with no SIGHUP: bob's next login still syncs (207), and one ERROR line names the file
    and the line that is wrong, however many logins follow; `user add` on a repaired file works at once."""
    cfg = config.load(instance)
    path = cfg.server.htpasswd_path
    with ServeProcess(instance) as srv:
        assert propfind(srv.https_port) == "207"
        users.add_user(path, "bob", "battery staple")
        # A failed login makes the serving Radicale look at the file (it re-reads it when it changed): bob
        # is now one of the users it has, without a successful login of his to cache.
        assert propfind(srv.https_port, user="nobody:wrong") == "401"
        good = path.read_text()
        mark = len(srv.log())
        path.write_text(good + "carol\n")
        for _ in range(3):
            assert propfind(srv.https_port, user="bob:battery staple", path="/radicale/bob/") == "207", srv.log()
        wait_until(lambda: error_lines(srv.log()[mark:]), 20, "the re-read's ERROR line", on_timeout=srv.log)
        new = srv.log()[mark:]
        errors = error_lines(new)
        assert len(errors) == 1, new
        # UserFileWatch notices the change first (its rebuild refuses the file); without it, the auth
        # plugin's own re-read says the same with its user count
        assert f"user file {path} refused: line 3 is not 'name:hash'; keeping the" in errors[0], errors
        path.write_text(good)
        users.add_user(path, "dave", "correct battery")
        assert propfind(srv.https_port, user="dave:correct battery", path="/radicale/dave/") == "207", srv.log()


def test_corrupt_certificate_pair_on_sighup_is_one_error_line_and_the_old_one_is_served(instance, tmp_path):
    """An issued pair is served; a new 'pair' that is not a certificate is stored and SIGHUP sent: one ERROR
    'certificate in <dir> refused: ...; keeping <the old one>', no traceback, the old serial is still what a
    handshake gets and DAV still works; a good pair stored and SIGHUP: its serial is served."""
    cfg = config.load(instance)
    store = CertStore(cfg.server.cert_dir)
    ca = ThrowawayCA(tmp_path)
    chain, key, first = ca.issue()
    store.save(chain, key)
    with ServeProcess(instance) as srv:
        assert served_certificate_serial("127.0.0.1", srv.https_port) == first
        mark = len(srv.log())
        # A pair stored, then damaged on disk (the store itself refuses to write an unparsable chain).
        broken = store.save(*ca.issue()[:2])
        (broken / "fullchain.pem").write_bytes(
            b"-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydA==\n-----END CERTIFICATE-----\n")
        srv.signal(signal.SIGHUP)
        wait_until(lambda: error_lines(srv.log()[mark:]), 20, "the reload's ERROR line", on_timeout=srv.log)
        new = srv.log()[mark:]
        errors = error_lines(new)
        assert len(errors) == 1 and f"certificate in {broken.resolve()} refused: " in errors[0], new
        assert "; keeping " in errors[0] and "Traceback" not in new
        assert served_certificate_serial("127.0.0.1", srv.https_port) == first
        assert propfind(srv.https_port) == "207"
        chain2, key2, second = ca.issue()
        store.save(chain2, key2)
        srv.signal(signal.SIGHUP)
        wait_until(lambda: served_certificate_serial("127.0.0.1", srv.https_port) == second, 20,
                   "the good new pair served", on_timeout=srv.log)
