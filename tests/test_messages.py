"""The messages a person sees when something is off: one readable line saying what and what to do, never a
Python phrase (``Connect call failed``, ``unknown error -2``), a traceback, or a silent success."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from inverse_cloud import cli
from inverse_cloud.ops import commands as ops_commands
from inverse_cloud.ops.doctor import DoctorOptions, format_report, run_doctor
from tests.support import ServeProcess, free_port, init_instance

CLI = [sys.executable, "-m", "inverse_cloud.cli"]


def test_status_into_a_closed_pipe_is_silent(instance):
    """`inverse-cloud status | head -n1`: the reader is gone before status writes. Steps: a pipe whose read
    end is closed becomes status's stdout. Expected: nothing on stderr (no `Broken pipe`, no `Exception
    ignored`), and exit 141, as a program killed by SIGPIPE reports to the shell."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        proc = subprocess.run([*CLI, "status", "--config", str(instance)], stdout=write_end,
                              stderr=subprocess.PIPE, text=True, timeout=60)
    finally:
        os.close(write_end)
    assert proc.stderr == "", proc.stderr
    assert proc.returncode == 141


@pytest.fixture
def foreign_instance():
    """An instance made by root whose config others may read but whose data folder stays root's 0700: what a
    user finds after running `sudo inverse-cloud init`. Made under /tmp (pytest's tmp_path is root-only)."""
    if os.getuid() != 0:
        pytest.fail("this test runs the commands as another user (nobody) and needs root to do so")
    root = Path(tempfile.mkdtemp(prefix="se-owner-"))
    try:
        os.chmod(root, 0o755)  # noqa: S103 (the other user must reach the config)
        cfg = init_instance(root / "ic")
        os.chmod(root / "ic", 0o755)  # noqa: S103 (as above)
        os.chmod(cfg, 0o644)
        yield cfg
    finally:
        shutil.rmtree(root)


def as_nobody(*argv: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HOME": "/tmp"}
    return subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *CLI, *argv],
                          capture_output=True, text=True, timeout=120, env=env, cwd="/tmp")


def test_serve_with_a_data_dir_of_another_user_names_owner_and_fix(foreign_instance):
    """serve as nobody on root's data folder: exit 3 with one line naming the folder, its owner and what to
    do, not `.has-data: Permission denied`."""
    proc = as_nobody("serve", "--config", str(foreign_instance))
    assert proc.returncode == 3, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "belongs to root" in lines[0] and "chown" in lines[0], lines[0]
    assert ".has-data" not in proc.stderr and "Traceback" not in proc.stderr


def test_doctor_with_a_data_dir_of_another_user_names_owner(foreign_instance):
    """doctor as nobody on root's data folder: the keys link fails saying whose folder it is; no `check
    failed unexpectedly: PermissionError`."""
    proc = as_nobody("doctor", "--config", str(foreign_instance))
    assert "unexpectedly" not in proc.stdout and "PermissionError" not in proc.stdout, proc.stdout
    assert "belongs to root" in proc.stdout, proc.stdout
    assert proc.returncode == 1 and "Traceback" not in proc.stderr


async def test_a_name_that_does_not_resolve_says_so_in_words(tmp_path):
    """doctor with a relay name that exists nowhere (.invalid is reserved, RFC 6761): the DNS link says the
    name is not in DNS, not `unknown error -2`, `Errno` or `inet_pton`."""
    cfg = init_instance(tmp_path / "ic", relay="tunnel@relay.invalid")
    report = await run_doctor(cfg, DoctorOptions(timeout_s=5))
    dns = next(c for c in report.checks if c.name == "DNS")
    assert dns.state == "fail", dns
    assert "relay.invalid" in dns.detail and "no such name in DNS" in dns.detail, dns
    for python_words in ("error -2", "Errno", "inet_pton", "gaierror"):
        assert python_words not in dns.detail, dns


def test_relay_setup_to_a_closed_port_says_connection_refused(tmp_path):
    """relay-setup against a port nothing listens on: one line with `connection refused` and what to check,
    not Python's `Connect call failed ('127.0.0.1', PORT)`."""
    port = free_port()
    cfg = init_instance(tmp_path / "ic", relay=f"tunnel@127.0.0.1:{port}")
    proc = subprocess.run([*CLI, "relay-setup", "--yes", "--config", str(cfg)], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 1
    assert "Connect call failed" not in proc.stderr, proc.stderr
    assert f"127.0.0.1:{port}" in proc.stderr and "connection refused" in proc.stderr, proc.stderr
    assert "sshd" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_serve_twice_refuses_before_it_says_serving(instance):
    """A second serve with the same config while the first runs: exit 3 saying another one runs, and its
    output never claims `serving DAV on ...` (it must refuse before binding anything)."""
    with ServeProcess(instance) as first:
        proc = subprocess.run([*CLI, "serve", "--config", str(instance)], capture_output=True, text=True,
                              timeout=60)
        assert first.proc is not None and first.proc.poll() is None
    assert proc.returncode == 3, proc.stderr
    assert "already running" in proc.stderr, proc.stderr
    assert "serving DAV" not in proc.stderr, proc.stderr


def test_service_install_without_a_user_manager_is_not_a_success(instance, tmp_path, monkeypatch, capsys):
    """`service install` where no systemd user manager answers: the unit file is written, but nothing was
    started, so the exit code is 1 and the output says it is not running and how to start it."""
    monkeypatch.setattr(ops_commands, "_user_manager_reachable", lambda: False)
    code = cli.main(["service", "install", "--unit-dir", str(tmp_path / "units"), "--config", str(instance)])
    out = capsys.readouterr()
    assert (tmp_path / "units" / "inverse-cloud.service").exists()
    assert code == 1, out
    assert "not started" in out.err and "systemctl --user" in out.err, out


async def test_doctor_advice_never_reads_fix_fix(tmp_path):
    """A broken config: the advice line reads `fix: correct ...`, not `fix: fix ...`."""
    bad = tmp_path / "c.toml"
    bad.write_text('[server]\ndomain = "x.test"\nhttps_listen = 5\n')
    text = format_report(await run_doctor(bad, DoctorOptions(timeout_s=5)))
    assert "fix: fix" not in text, text
    assert "fix: " in text


def test_a_two_line_password_file_is_refused(instance, tmp_path, capsys):
    """A password file with a second line (a note, a second password): refused with one line, not a
    password with a newline in it."""
    pw = tmp_path / "pw"
    pw.write_text("first secret\nsecond line\n")
    assert cli.main(["user", "add", "bob", "--password-file", str(pw), "--config", str(instance)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "2 lines" in err, err


@pytest.mark.parametrize(("flag", "value", "fragment"), [
    ("--acme-email", "not-an-email", "e-mail"),
    ("--password", "abc", "too short"),
])
def test_init_refuses_a_bad_email_and_a_short_password(tmp_path, capsys, flag, value, fragment):
    root = tmp_path / "ic"
    pw = tmp_path / "pw"
    pw.write_text("correct horse\n")
    args = ["init", "--non-interactive", "--config", str(root / "c.toml"), "--data-dir", str(root / "d"),
            "--domain", "laptop.test", "--user", "alice", "--password-file", str(pw), "--relay", "",
            "--acme-email", "me@example.org"]
    if flag == "--password":
        pw.write_text(value + "\n")
    else:
        args[args.index(flag) + 1] = value
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and fragment in err, err
    assert not (root / "c.toml").exists()

