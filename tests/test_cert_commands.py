"""`cert status | renew | caa` against a running server: they ask it over the control socket instead of
guessing from a lock file, and with ACME off they say so and create nothing."""

from __future__ import annotations

import subprocess
import sys

from inverse_cloud import config as config_mod
from inverse_cloud.ops.control import ControlServer, ask_async
from inverse_cloud.ops.verbs import cert_renew_verb
from tests.support import ServeProcess

CLI = [sys.executable, "-m", "inverse_cloud.cli"]


def cert(instance, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, "cert", *argv, "--config", str(instance)], capture_output=True, text=True,
                          timeout=60)


def test_cert_status_sees_the_running_server(instance):
    """serve runs (ACME off: no relay, so no certificate lock file): `cert status` says running with serve's
    pid, not `server: not running`."""
    with ServeProcess(instance) as srv:
        out = cert(instance, "status")
    assert f"server:       running, pid {srv.pid}" in out.stdout, out.stdout + out.stderr


def test_cert_renew_with_acme_off_says_so_instead_of_binding_a_port(instance):
    """serve runs with ACME off: `cert renew` exits 1 saying ACME is off, not `port ... already in use`."""
    with ServeProcess(instance):
        out = cert(instance, "renew")
    assert out.returncode == 1, out.stdout + out.stderr
    assert "ACME is off" in out.stderr and "in use" not in out.stderr, out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr


def test_cert_caa_with_acme_off_creates_no_account_key(instance):
    """`cert caa` with ACME off: exit 1, one line saying ACME is off; no acme/account-key.pem appears."""
    account_dir = config_mod.load(instance).acme.account_dir
    out = cert(instance, "caa")
    assert out.returncode == 1 and "ACME is off" in out.stderr, out.stdout + out.stderr
    assert not (account_dir / "account-key.pem").exists()
    assert not account_dir.exists() or not any(account_dir.iterdir())


class FakeManager:
    def __init__(self) -> None:
        self.requests: list[bool] = []

    def request_check(self, force: bool = False) -> None:
        self.requests.append(force)


async def test_cert_renew_verb_over_a_real_control_socket(tmp_path):
    """The verb `cert renew` sends: the manager is asked to check (with --force passed through) and the
    answer carries the request time the command waits for."""
    manager = FakeManager()
    control = ControlServer(tmp_path / "c" / "control.sock")
    control.register("cert-renew", cert_renew_verb(manager))
    await control.start()
    try:
        answer = await ask_async(control.path, "cert-renew", force=True)
        await ask_async(control.path, "cert-renew")
    finally:
        await control.aclose()
    assert manager.requests == [True, False]
    assert answer["requested_at"].endswith("+00:00")
