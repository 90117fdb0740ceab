"""`inverse-cloud init` and `inverse-cloud user`: what they create (and with which modes), and the one-line
errors and exit codes when something is missing or wrong."""

from __future__ import annotations

import stat
import subprocess
import sys
from pathlib import Path

import bcrypt
import pytest

from inverse_cloud import cli, config
from inverse_cloud.dav import users
from tests.support import free_port


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def htpasswd_hash(path: Path, user: str) -> bytes:
    for line in path.read_text().splitlines():
        name, _, hashed = line.partition(":")
        if name == user:
            return hashed.encode()
    raise AssertionError(f"{user} not in {path}")


@pytest.fixture
def pwfile(tmp_path) -> Path:
    p = tmp_path / "pw"
    p.write_text("correct horse\n")  # the trailing newline an editor adds is not part of the password
    return p


def init_args(root: Path, pwfile: Path, *extra: str) -> list[str]:
    return ["init", "--non-interactive", "--config", str(root / "cfg" / "config.toml"),
            "--data-dir", str(root / "data"), "--state-dir", str(root / "state"), "--domain", "laptop.test",
            "--user", "alice", "--password-file", str(pwfile), "--relay", "", "--acme-email", "",
            "--https-listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0", *extra]


def test_init_creates_private_config_data_and_first_user(tmp_path, pwfile, capsys):
    """init writes a config that loads, a storage folder, a bcrypt htpasswd entry and two SSH keys;
    every private file is 0600 and every folder 0700."""
    root = tmp_path / "ic"
    assert cli.main(init_args(root, pwfile)) == 0
    out = capsys.readouterr().out
    assert "wrote" in out and "alice" in out
    cfg = config.load(root / "cfg" / "config.toml")
    s = cfg.server
    assert s.domain == "laptop.test" and s.data_dir == root / "data" and s.state_dir == root / "state"
    for d in (root / "cfg", s.data_dir, s.state_dir, s.storage_dir, cfg.relay.key_file.parent):
        assert d.is_dir() and mode(d) == 0o700, d
    for f in (root / "cfg" / "config.toml", s.htpasswd_path, cfg.relay.key_file, cfg.relay.takeover_key_file):
        assert mode(f) == 0o600, f
    hashed = htpasswd_hash(s.htpasswd_path, "alice")
    assert hashed.startswith(b"$2") and bcrypt.checkpw(b"correct horse", hashed)
    assert cfg.relay.key_file.read_text().startswith("-----BEGIN OPENSSH PRIVATE KEY-----")
    assert cfg.relay.key_file.with_suffix(".pub").read_text().startswith("ssh-ed25519 ")
    # Every option is documented in the written file (the template), commented or not.
    text = (root / "cfg" / "config.toml").read_text()
    assert "# max_body_bytes = " in text and "# idle_timeout_s = " in text


def test_init_uses_xdg_locations_by_default(tmp_path, pwfile, monkeypatch):
    for var in ("XDG_CONFIG_HOME", "XDG_DATA_HOME", "XDG_STATE_HOME"):
        monkeypatch.setenv(var, str(tmp_path / var.lower()))
    assert cli.main(["init", "--non-interactive", "--domain", "laptop.test", "--user", "alice",
                     "--password-file", str(pwfile), "--relay", "", "--acme-email", ""]) == 0
    cfg_path = tmp_path / "xdg_config_home" / "inverse-cloud" / "config.toml"
    cfg = config.load(cfg_path)
    assert cfg.server.data_dir == tmp_path / "xdg_data_home" / "inverse-cloud"
    assert cfg.server.state_dir == tmp_path / "xdg_state_home" / "inverse-cloud"
    assert mode(cfg_path) == 0o600 and users.list_users(cfg.server.htpasswd_path) == ["alice"]


def test_init_non_interactive_without_password_fails_with_one_line(tmp_path, capsys):
    """No --password-file and --non-interactive: exit 2, one line saying what to pass, nothing written."""
    root = tmp_path / "ic"
    args = [a for a in init_args(root, Path("x")) if a not in ("--password-file", "x")]
    assert cli.main(args) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and "--password-file" in err, err
    assert not (root / "cfg" / "config.toml").exists()
    assert not (root / "data").exists()


def test_init_non_interactive_without_password_in_a_child_process(tmp_path):
    """The real entry point, stdin not a terminal: exit 2 and no traceback."""
    proc = subprocess.run([sys.executable, "-m", "inverse_cloud.cli", "init", "--non-interactive", "--config",
                           str(tmp_path / "c.toml"), "--data-dir", str(tmp_path / "d"), "--domain", "laptop.test",
                           "--user", "alice"], capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr


@pytest.mark.parametrize(("extra", "fragment"), [
    (["--domain", "not a domain"], "[server] domain"),
    (["--https-listen", "127.0.0.1:70000"], "https_listen"),
    (["--user", "a:b"], "invalid user name"),
    (["--relay", "u@host:99999"], "--relay"),
])
def test_init_bad_flags_fail_with_one_line(tmp_path, pwfile, capsys, extra, fragment):
    root = tmp_path / "ic"
    args = init_args(root, pwfile)
    for flag, value in zip(extra[::2], extra[1::2], strict=True):
        args[args.index(flag) + 1] = value
    assert cli.main(args) in (1, 2)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and fragment in err, err
    assert not (root / "cfg" / "config.toml").exists()


def test_init_refuses_to_overwrite_without_force(tmp_path, pwfile, capsys):
    root = tmp_path / "ic"
    assert cli.main(init_args(root, pwfile)) == 0
    cfg_path = root / "cfg" / "config.toml"
    before = cfg_path.read_bytes()
    capsys.readouterr()
    assert cli.main(init_args(root, pwfile)) == 2
    err = capsys.readouterr().err
    assert "already exists" in err and "--force" in err and err.count("\n") == 1
    assert cfg_path.read_bytes() == before
    key_before = (root / "data" / "ssh" / "id_ed25519").read_bytes()
    assert cli.main(init_args(root, pwfile, "--force")) == 0
    assert (root / "data" / "ssh" / "id_ed25519").read_bytes() == key_before, "--force must keep the SSH key"
    assert users.list_users(root / "data" / "users.htpasswd") == ["alice"]


@pytest.fixture
def initialised(tmp_path, pwfile) -> Path:
    root = tmp_path / "ic"
    assert cli.main(init_args(root, pwfile)) == 0
    return root / "cfg" / "config.toml"


def test_user_add_passwd_remove(initialised, tmp_path, capsys):
    """user add makes a second bcrypt entry (file stays 0600), passwd replaces only that user's hash,
    remove deletes only that user and says the data stays."""
    htpasswd = config.load(initialised).server.htpasswd_path
    pw2 = tmp_path / "pw2"
    pw2.write_text("battery staple")
    base = ["--config", str(initialised)]
    assert cli.main(["user", "add", "bob", "--password-file", str(pw2), *base]) == 0
    assert users.list_users(htpasswd) == ["alice", "bob"] and mode(htpasswd) == 0o600
    assert bcrypt.checkpw(b"battery staple", htpasswd_hash(htpasswd, "bob"))
    alice_hash = htpasswd_hash(htpasswd, "alice")

    pw3 = tmp_path / "pw3"
    pw3.write_text("new secret")
    assert cli.main(["user", "passwd", "bob", "--password-file", str(pw3), *base]) == 0
    assert bcrypt.checkpw(b"new secret", htpasswd_hash(htpasswd, "bob"))
    assert not bcrypt.checkpw(b"battery staple", htpasswd_hash(htpasswd, "bob"))
    assert htpasswd_hash(htpasswd, "alice") == alice_hash

    capsys.readouterr()
    assert cli.main(["user", "list", *base]) == 0
    assert capsys.readouterr().out.split() == ["alice", "bob"]
    assert cli.main(["user", "remove", "bob", *base]) == 0
    assert "data stays" in capsys.readouterr().out
    assert users.list_users(htpasswd) == ["alice"] and mode(htpasswd) == 0o600


@pytest.mark.parametrize(("argv", "code", "fragment"), [
    (["user", "add", "alice"], 1, "already exists"),
    (["user", "remove", "nobody"], 1, "no user"),
    (["user", "passwd", "nobody"], 1, "no user"),
    (["user", "add", "../x"], 1, "invalid user name"),
])
def test_user_errors_are_one_line(initialised, tmp_path, capsys, argv, code, fragment):
    pw = tmp_path / "pw-user"
    pw.write_text("whatever pw")
    before = config.load(initialised).server.htpasswd_path.read_bytes()
    capsys.readouterr()
    assert cli.main([*argv, "--password-file", str(pw), "--config", str(initialised)]) == code
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and fragment in err, err
    assert config.load(initialised).server.htpasswd_path.read_bytes() == before


def test_user_without_name_is_a_usage_error(initialised, capsys):
    with pytest.raises(SystemExit) as caught:
        cli.main(["user", "add", "--config", str(initialised)])
    assert caught.value.code == 2
    assert "needs a NAME" in capsys.readouterr().err


def test_user_refuses_empty_and_overlong_passwords(initialised, tmp_path, capsys):
    for text, fragment in (("\n", "too short"), ("x" * 73, "longer than 72 bytes")):
        pw = tmp_path / "pw-bad"
        pw.write_text(text)
        capsys.readouterr()
        assert cli.main(["user", "add", "carol", "--password-file", str(pw), "--config", str(initialised)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and fragment in err, err
    assert "carol" not in users.list_users(config.load(initialised).server.htpasswd_path)


@pytest.mark.parametrize("action", ["add", "passwd"])
@pytest.mark.parametrize(("weak", "fragment"), [("abc", "too short"), ("password123", "too easy to guess"),
                                                 ("aaaaaaaaaaaa", "too easy to guess"),
                                                 ("alice-alice", None)])
def test_user_add_and_passwd_refuse_a_weak_password_file_with_one_line(initialised, tmp_path, capsys, action,
                                                                      weak, fragment):
    """The same check as init and setup: a weak password in --password-file is one line on stderr, exit 2,
    and the htpasswd file is unchanged (a name-like but long password with enough letters passes)."""
    name = "bob" if action == "add" else "alice"
    htpasswd = config.load(initialised).server.htpasswd_path
    before = htpasswd.read_bytes()
    pw = tmp_path / "pw-weak"
    pw.write_text(weak + "\n")
    capsys.readouterr()
    code = cli.main(["user", action, name, "--password-file", str(pw), "--config", str(initialised)])
    err = capsys.readouterr().err
    if fragment is None:
        assert code == 0, err
        return
    assert code == 2 and err.count("\n") == 1 and fragment in err, err
    assert htpasswd.read_bytes() == before


@pytest.mark.parametrize("action", ["add", "passwd"])
def test_user_add_and_passwd_on_a_terminal_ask_again_with_the_reason(initialised, action):
    """On a terminal: a short password is asked again with its reason, then a mismatch is asked again,
    then the good one twice is taken (bcrypt-checked in the file)."""
    import pexpect

    name = "bob" if action == "add" else "alice"
    child = pexpect.spawn(sys.executable, ["-m", "inverse_cloud.cli", "user", action, name, "--config",
                                           str(initialised)], encoding="utf-8", timeout=60)
    child.expect_exact(f"Password for DAV user {name}:")
    child.sendline("short")
    child.expect_exact("that password is too short")
    child.expect_exact(f"Password for DAV user {name}:")
    child.sendline("battery staple horse")
    child.expect_exact("Again:")
    child.sendline("battery staple mouse")
    child.expect_exact("the two passwords differ")
    child.expect_exact(f"Password for DAV user {name}:")
    child.sendline("battery staple horse")
    child.expect_exact("Again:")
    child.sendline("battery staple horse")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0, child.before
    htpasswd = config.load(initialised).server.htpasswd_path
    assert bcrypt.checkpw(b"battery staple horse", htpasswd_hash(htpasswd, name))


def test_serve_on_a_port_in_use_names_port_and_option(tmp_path, pwfile):
    """A listener that cannot bind: exit 3 and one line naming the port and the config option."""
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        root = tmp_path / "ic"
        args = init_args(root, pwfile)
        args[args.index("--https-listen") + 1] = f"127.0.0.1:{port}"
        assert cli.main(args) == 0
        proc = subprocess.run([sys.executable, "-m", "inverse_cloud.cli", "serve", "--config",
                               str(root / "cfg" / "config.toml")], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 3, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert str(port) in last and "[server] https_listen" in last and "in use" in last, proc.stderr
    assert "Traceback" not in proc.stderr


def test_init_refuses_root_as_the_tunnel_login(tmp_path, pwfile, capsys):
    """--relay root@relay: root would lose its password and shell to setup.sh; one line, nothing written."""
    root = tmp_path / "ic"
    args = init_args(root, pwfile)
    args[args.index("--relay") + 1] = "root@relay.test"
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "root" in err and "inverse-cloud" in err, err
    assert not (root / "cfg" / "config.toml").exists()


def test_init_asks_for_the_relay_host_and_defaults_the_login(tmp_path, pwfile, monkeypatch, capsys):
    """Interactive init: the relay question asks for the host (not USER@HOST), and a bare host gives the
    tunnel login `inverse-cloud`. Wrong answers are asked again with a one-line reason: a URL for the domain,
    `root@` as the relay login, a relay that does not answer (nothing listens on its port); a relay whose
    port answers with an SSH banner is taken."""
    import socket as socket_mod
    import threading

    listener = socket_mod.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    live = listener.getsockname()[1]

    def banner() -> None:   # what an sshd says first: init checks that an SSH server answers there
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            with conn:
                conn.sendall(b"SSH-2.0-OpenSSH_9.2p1 Debian-2\r\n")

    threading.Thread(target=banner, daemon=True).start()
    dead = free_port()
    answers = iter(["https://laptop.test/", "laptop.test", f"root@127.0.0.1:{live}", f"127.0.0.1:{dead}",
                    f"127.0.0.1:{live}", "", "alice"])
    prompts: list[str] = []

    def fake_input(prompt: str = "") -> str:
        prompts.append(prompt)
        return next(answers)

    monkeypatch.setattr("builtins.input", fake_input)
    root = tmp_path / "ic"
    args = ["init", "--config", str(root / "cfg" / "config.toml"), "--data-dir", str(root / "data"),
            "--state-dir", str(root / "state"), "--password-file", str(pwfile), "--https-listen", "127.0.0.1:0",
            "--http-listen", "127.0.0.1:0"]
    try:
        assert cli.main(args) == 0
    finally:
        listener.close()
    out = capsys.readouterr().out
    relay_prompts = [p for p in prompts if p.lower().startswith("relay")]
    assert relay_prompts and all("USER@" not in p for p in relay_prompts), prompts
    assert "only the host name" in out, out
    assert "the login is root" in out and "account of its own" in out, out
    assert f"127.0.0.1:{dead} does not answer" in out, out
    cfg = config.load(root / "cfg" / "config.toml")
    assert (cfg.server.domain, cfg.relay.user, cfg.relay.host, cfg.relay.port) == \
        ("laptop.test", "inverse-cloud", "127.0.0.1", live)
