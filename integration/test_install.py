"""README's install block, run as written on this machine, as root and as an ordinary user: afterwards
`inverse-cloud` is on the PATH a login shell gets, and it is the installed copy (not this checkout).

Each run gets a copy of the repository (as a user's clone would be) and a home of its own; root's run has a
tmpfs on /usr/local/bin in a private mount namespace, so this machine's /usr/local/bin is untouched. The
ordinary user is a system account `woinstall` made for the test and deleted afterwards. pip finds its
packages as it does for the tests (the same pip configuration file, copied into the test home)."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from tests.support.docs import shell_blocks

REPO = Path(__file__).resolve().parent.parent
USER = "woinstall"
LOGIN_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"  # Debian's for root; login shells


def install_block() -> str:
    """README's first "Run it" block up to (not including) the first `inverse-cloud` command."""
    lines = []
    for line in shell_blocks(REPO / "README.md", "Run it")[0]:
        if line.startswith("inverse-cloud"):
            break
        lines.append(line)
    assert lines, "README's Run it block has no install command"
    return "set -e\n" + "\n".join(lines) + "\n"


def copy_repo(dest: Path) -> Path:
    ignore = shutil.ignore_patterns(".git", ".venv", "__pycache__", "build", "*.egg-info", ".ci-*")
    shutil.copytree(REPO, dest, ignore=ignore)
    return dest


def pip_conf(home: Path) -> None:
    src = Path.home() / ".config" / "pip" / "pip.conf"
    if src.is_file():
        (home / ".config" / "pip").mkdir(parents=True, exist_ok=True)
        shutil.copy(src, home / ".config" / "pip" / "pip.conf")


def pip_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k.startswith("PIP_")}


@pytest.mark.slow
def test_readme_install_as_root(tmp_path):
    """As root: the block runs without sudo; /usr/local/bin/inverse-cloud (root's PATH) runs the venv's copy."""
    assert os.geteuid() == 0, "needs root (a private mount namespace); CI runs as root"
    home = tmp_path / "root-home"
    home.mkdir()
    pip_conf(home)
    clone = copy_repo(tmp_path / "inverse-cloud")
    before = os.listdir("/usr/local/bin")
    script = ("set -e; mount --make-rprivate /; mount -t tmpfs tmpfs /usr/local/bin; cd \"$0\"; sh -c \"$1\"; "
              "command -v inverse-cloud; inverse-cloud --version; readlink -f \"$(command -v inverse-cloud)\"")
    out = subprocess.run(["unshare", "-m", "sh", "-c", script, str(clone), install_block()],
                         env={**pip_env(), "HOME": str(home), "PATH": LOGIN_PATH, "LANG": "C.UTF-8"},
                         capture_output=True, text=True, timeout=600, check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    lines = out.stdout.strip().splitlines()
    assert lines[-3] == "/usr/local/bin/inverse-cloud", out.stdout
    assert lines[-2].startswith("inverse-cloud "), out.stdout
    assert lines[-1] == str(home / ".local" / "lib" / "inverse-cloud" / "bin" / "inverse-cloud"), out.stdout
    assert os.listdir("/usr/local/bin") == before, "this machine's /usr/local/bin was changed"


@pytest.fixture
def ordinary_user():
    """A fresh system account with a Debian home (/etc/skel: its ~/.profile adds ~/.local/bin); deleted after."""
    assert os.geteuid() == 0, "needs root (useradd); CI runs as root"
    base = Path(tempfile.mkdtemp(prefix="wo-install-"))
    os.chmod(base, 0o755)  # noqa: S103 (the test user must reach its home inside)
    home = base / USER
    subprocess.run(["userdel", "-r", USER], capture_output=True, check=False)
    subprocess.run(["useradd", "--system", "--create-home", "--home-dir", str(home), "--skel", "/etc/skel",
                    "--shell", "/bin/bash", "--comment", "inverse-cloud install test", USER],
                   check=True, capture_output=True)
    try:
        yield pwd.getpwnam(USER), home
    finally:
        subprocess.run(["userdel", USER], capture_output=True, check=False)
        subprocess.run(["groupdel", USER], capture_output=True, check=False)
        shutil.rmtree(base, ignore_errors=True)


@pytest.mark.slow
def test_readme_install_as_an_ordinary_user(ordinary_user):
    """As a user (python3-venv present, so no sudo is needed): ~/.local/bin/inverse-cloud, and a login shell
    (bash -l reads Debian's ~/.profile) finds `inverse-cloud` on its PATH."""
    entry, home = ordinary_user
    pip_conf(home)
    clone = copy_repo(home / "inverse-cloud")
    subprocess.run(["chown", "-R", f"{entry.pw_uid}:{entry.pw_gid}", str(home)], check=True)
    env = {**pip_env(), "HOME": str(home), "USER": USER, "LOGNAME": USER, "PATH": "/usr/local/bin:/usr/bin:/bin",
           "LANG": "C.UTF-8"}
    as_user = ["setpriv", f"--reuid={entry.pw_uid}", f"--regid={entry.pw_gid}", "--init-groups"]
    out = subprocess.run([*as_user, "sh", "-c", install_block()], cwd=clone, env=env, capture_output=True,
                         text=True, timeout=600, check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    found = subprocess.run([*as_user, "bash", "-lc", "command -v inverse-cloud && inverse-cloud --version"],
                           cwd=home, env=env, capture_output=True, text=True, timeout=60, check=False)
    assert found.returncode == 0, found.stdout + found.stderr
    assert found.stdout.splitlines()[0] == str(home / ".local" / "bin" / "inverse-cloud"), found.stdout
