"""Files that hold secrets: 0700 directories, 0600 files, written atomically (temp file + fsync + rename
+ directory fsync), so a crash leaves either the old or the new content, never a torn file."""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path

from inverse_cloud.errors import ConfigError

__all__ = ["access_problem", "atomic_write", "check_private", "ensure_private_dir"]


def ensure_private_dir(path: Path) -> Path:
    """Create ``path`` (and parents) with mode 0700; tighten an existing one we own."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    st = path.stat()
    if st.st_uid == os.getuid() and stat.S_IMODE(st.st_mode) & 0o077:
        os.chmod(path, 0o700)
    return path


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Write ``data`` to ``path`` so that readers see the old or the new file, never a part."""
    ensure_private_dir(path.parent) if mode & 0o077 == 0 else path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    fsync_dir(path.parent)


def check_private(path: Path, what: str) -> None:
    """Refuse a secret file that others can read (checks st_mode, not access(): CI runs as root).

    :raises ConfigError: naming the file, its mode and the chmod that fixes it.
    """
    try:
        st = path.stat()
    except FileNotFoundError:
        raise ConfigError(f"{what} {path} does not exist") from None
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o077:
        raise ConfigError(
            f"{what} {path} has mode {mode:04o}; must be 0600 (run: chmod 600 {path})")
    if st.st_uid != os.getuid():
        raise ConfigError(f"{what} {path} is owned by uid {st.st_uid}, not by you (uid {os.getuid()})")


def _user_name(uid: int) -> str:
    import pwd

    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


def access_problem(path: Path, what: str) -> str | None:
    """Why this process cannot use the folder ``path`` (another user's, or behind a folder it may not enter),
    as one line with the fix; None when it can (or when ``path`` does not exist yet)."""
    me = _user_name(os.getuid())
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    except PermissionError:
        return (f"{what} {path} is inside a folder you ({me}) may not enter: run inverse-cloud as the user "
                "who created it, or move the folder")
    if os.access(path, os.R_OK | os.W_OK | os.X_OK):
        return None
    owner = _user_name(st.st_uid)
    if st.st_uid != os.getuid():
        return (f"{what} {path} belongs to {owner}, not to you ({me}): run inverse-cloud as {owner}, or take "
                f"the folder over with: sudo chown -R {me} {path}")
    return f"{what} {path} is not readable and writable by you ({me}): run: chmod 700 {path}"
