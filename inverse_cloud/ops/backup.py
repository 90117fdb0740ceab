"""``inverse-cloud export FILE`` and ``import FILE``: a consistent snapshot, and a restore that never
overwrites data.

Export holds Radicale's storage lock (``<storage>/.Radicale.lock``, ``flock(LOCK_SH)``: Radicale's
writers take ``LOCK_EX`` for the whole of a write, so a shared lock waits for a write in progress and
holds off the next one) while it copies the store into a tar file. Every item acknowledged to a client
before the lock was granted is in the snapshot; nothing half-written is. The tar also carries the
user file, the ACME account key (CAA pins it), the SSH keys and pinned relay host key, and the config;
a ``MANIFEST.json`` lists every file with its SHA-256. The tar is encrypted and authenticated with a
passphrase (the age format, see :mod:`inverse_cloud.ops.backup_crypt`) unless asked not to, written 0600
and renamed into place.

Import refuses a store that holds any item (restoring an old snapshot over a server that phones have
synced with since makes them delete what is newer: see docs/operations.md), refuses while a server
runs, refuses a wrong passphrase or a modified file before reading a member, streams each member to a
staging folder while hashing it (capped per member and in total), lists what the import would change
(:mod:`inverse_cloud.ops.backup_review`) and goes on only when that is accepted, runs Radicale's own
storage verification on the staged store, and only then moves it into place.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import hashlib
import io
import json
import os
import shutil
import tarfile
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from inverse_cloud import __version__
from inverse_cloud.config import Config
from inverse_cloud.errors import InverseCloudError
from inverse_cloud.fsutil import ensure_private_dir, fsync_dir
from inverse_cloud.ops import backup_crypt
from inverse_cloud.ops.backup_review import describe_changes

__all__ = ["BackupError", "ChangesNotAccepted", "ExportResult", "ImportResult", "export_backup", "import_backup",
           "store_items", "storage_lock"]

FORMAT = 1
LOCK_TIMEOUT_S = 60.0
# Radicale's own bookkeeping that a restore must not carry over: the lock, temporary files of a
# write in progress (never complete under our lock, but harmless to skip) and caches it rebuilds.
_SKIP_PREFIXES = (".Radicale.lock", ".Radicale.tmp-", ".Radicale.cache")


# Import caps: a member above MAX_MEMBER_BYTES, a total above MAX_TOTAL_BYTES or more than MAX_MEMBERS
# entries refuse the whole file (a small .tar.gz can expand to gigabytes). An item is at most
# [server] max_body_bytes (4 MiB by default, 1 GiB at most); a store of 100,000 items fits.
MAX_MEMBER_BYTES = 1 << 30
MAX_TOTAL_BYTES = 8 << 30
MAX_MEMBERS = 200_000
_CHUNK = 1 << 20


class BackupError(InverseCloudError):
    """Export or import cannot be done; nothing was changed."""


class ChangesNotAccepted(BackupError):
    """The import would change users, keys or settings and ``accept_changes`` was not given; ``changes``
    lists them, one line each. Nothing was changed."""

    def __init__(self, message: str, changes: list[str]) -> None:
        super().__init__(message)
        self.changes = changes


@dataclass(frozen=True)
class ExportResult:
    path: Path
    files: int
    items: int
    bytes: int
    lock_wait_s: float
    locked_s: float


@dataclass(frozen=True)
class ImportResult:
    data_dir: Path
    files: int
    items: int
    config_written: Path | None
    moved_aside: Path | None


@contextlib.contextmanager
def storage_lock(storage_dir: Path, shared: bool = True, timeout_s: float = LOCK_TIMEOUT_S) -> Iterator[float]:
    """Hold Radicale's storage lock; yields the seconds spent waiting for it.

    :raises BackupError: the lock was not granted within ``timeout_s`` (a write is stuck).
    """
    storage_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    start = time.monotonic()
    # Radicale opens the lock file with "w+" each time; so do we (it holds no data).
    with open(storage_dir / ".Radicale.lock", "w+") as fh:
        mode = fcntl.LOCK_SH if shared else fcntl.LOCK_EX
        deadline = start + timeout_s
        delay = 0.005
        while True:
            try:
                fcntl.flock(fh.fileno(), mode | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise BackupError(f"storage {storage_dir} stayed locked for {timeout_s:.0f} s (a write is "
                                      "stuck?); nothing was exported") from None
                time.sleep(delay)  # polling a file lock with a deadline; flock has no timeout
                delay = min(delay * 2, 0.1)
        try:
            yield time.monotonic() - start
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _skip(name: str) -> bool:
    return name.startswith(_SKIP_PREFIXES)


def _walk(root: Path) -> Iterator[Path]:
    """Files under ``root`` (sorted, no symlinks followed, Radicale's lock/tmp/cache left out)."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not _skip(d))
        for name in sorted(filenames):
            if not _skip(name):
                yield Path(dirpath) / name


def store_items(storage_dir: Path) -> int:
    """Number of items (files that are not Radicale bookkeeping) in the collections of ``storage_dir``."""
    root = storage_dir / "collection-root"
    if not root.is_dir():
        return 0
    return sum(1 for p in _walk(root) if not p.name.startswith("."))


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes, mtime: float) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o600
    info.mtime = int(mtime)
    tar.addfile(info, io.BytesIO(data))


def export_backup(cfg: Config, dest: Path, passphrase: str | None) -> ExportResult:
    """Write a snapshot of ``cfg``'s data to ``dest`` (mode 0600, replaced atomically): a .tar.gz,
    encrypted for ``passphrase`` in the age format unless ``passphrase`` is None.

    :raises BackupError: the storage lock was not granted, or ``dest`` is inside the data folder.
    """
    data_dir = cfg.server.data_dir
    dest = dest.expanduser().absolute()
    if dest.is_relative_to(data_dir):
        raise BackupError(f"{dest} is inside the data folder {data_dir}; write the backup somewhere else")
    if not cfg.server.storage_dir.is_dir():
        raise BackupError(f"no storage folder at {cfg.server.storage_dir}: nothing to export")
    dest.parent.mkdir(parents=True, exist_ok=True)
    manifest: dict[str, Any] = {"format": FORMAT, "version": __version__, "domain": cfg.server.domain,
                                "created": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
                                "files": {}}
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", dir=dest.parent)
    tmp = Path(tmp_name)
    files = 0
    try:
        os.fchmod(fd, 0o600)
        plain: IO[bytes] = io.BytesIO() if passphrase is not None else os.fdopen(fd, "wb")
        with plain as raw, tarfile.open(fileobj=raw, mode="w:gz", compresslevel=6) as tar:
            def add(path: Path, arcname: str) -> None:
                nonlocal files
                data = path.read_bytes()
                manifest["files"][arcname] = hashlib.sha256(data).hexdigest()
                _add_bytes(tar, arcname, data, path.stat().st_mtime)
                files += 1

            storage = cfg.server.storage_dir
            with storage_lock(storage) as waited:
                locked_at = time.monotonic()
                for path in _walk(storage):
                    add(path, "data/collections/" + path.relative_to(storage).as_posix())
                locked_s = time.monotonic() - locked_at
            # The rest is not written by Radicale: no lock needed.
            for path in _walk(data_dir):
                rel = path.relative_to(data_dir)
                if rel.parts and rel.parts[0] == "collections":
                    continue
                add(path, "data/" + rel.as_posix())
            if cfg.path is not None and cfg.path.exists():
                add(cfg.path, "config.toml")
            manifest["data_dir"] = str(data_dir)
            manifest["items"] = sum(1 for n in manifest["files"]
                                    if n.startswith("data/collections/collection-root/")
                                    and not n.rsplit("/", 1)[-1].startswith("."))
            _add_bytes(tar, "MANIFEST.json", json.dumps(manifest, indent=1, sort_keys=True).encode(), time.time())
            tar.close()
            if isinstance(raw, io.BytesIO):
                assert passphrase is not None
                with os.fdopen(fd, "wb") as out:
                    out.write(backup_crypt.encrypt(raw.getvalue(), passphrase))
                    out.flush()
                    os.fsync(out.fileno())
            else:
                raw.flush()
                os.fsync(raw.fileno())
        os.replace(tmp, dest)
        fsync_dir(dest.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return ExportResult(dest, files, int(manifest["items"]), dest.stat().st_size, waited, locked_s)


def _read_manifest(tar: tarfile.TarFile, src: Path) -> dict[str, Any]:
    try:
        member = tar.getmember("MANIFEST.json")
        fh = tar.extractfile(member)
        assert fh is not None
        manifest = json.loads(fh.read())
    except (KeyError, ValueError, AssertionError):
        raise BackupError(f"{src} is not an inverse-cloud export (no valid MANIFEST.json)") from None
    if manifest.get("format") != FORMAT:
        raise BackupError(f"{src}: export format {manifest.get('format')} is not supported by this version")
    return dict(manifest)


def _server_running(cfg: Config) -> bool:
    from inverse_cloud.ops.control import NotRunning, ask

    try:
        ask(cfg.server.control_socket, "status", timeout_s=5)
    except NotRunning:
        return False
    except InverseCloudError:
        return True
    return True


def verify_store(cfg: Config) -> None:
    """Run Radicale's own storage verification (what ``radicale --verify-storage`` does).

    :raises BackupError: Radicale reports a problem.
    """
    import logging

    import radicale.config
    import radicale.storage

    from inverse_cloud.dav.radicale_app import radicale_options

    configuration = radicale.config.load([])
    configuration.update(radicale_options(cfg), "inverse-cloud config", privileged=True)
    radicale_log = logging.getLogger("radicale")
    level = radicale_log.level
    radicale_log.setLevel(logging.ERROR)
    try:
        store = radicale.storage.load(configuration)
        with store.acquire_lock("r"):
            ok = store.verify()
    except Exception as exc:  # Radicale raises plain exceptions for broken items
        raise BackupError(f"Radicale storage verification failed: {exc}") from exc
    finally:
        radicale_log.setLevel(level)
    if not ok:
        raise BackupError(f"Radicale storage verification failed for {cfg.server.storage_dir}")


def _open_export(src: Path, passphrase: str | None, max_total_bytes: int) -> tarfile.TarFile:
    """The export's tar, decrypted first if it is encrypted.

    :raises BackupError: a wrong passphrase or a modified file (age cannot tell them apart), an
        encrypted file without a passphrase, a file over the cap, or not a tar at all.
    """
    try:
        with open(src, "rb") as fh:
            head = fh.read(len(backup_crypt.AGE_MAGIC))
            size = os.fstat(fh.fileno()).st_size
            if size > max_total_bytes:
                raise BackupError(f"{src}: {size} bytes is over the import's {max_total_bytes}-byte cap")
            if backup_crypt.is_encrypted(head):
                if passphrase is None:
                    raise BackupError(f"{src} is encrypted: give its passphrase (--passphrase-file FILE, or "
                                      "run on a terminal to be asked)")
                fh.seek(0)
                plain = backup_crypt.decrypt(fh.read(), passphrase)
                if plain is None:
                    raise BackupError(f"{src}: wrong passphrase, or the file was modified after export; "
                                      "nothing was changed")
                return tarfile.open(fileobj=io.BytesIO(plain), mode="r:*")
        return tarfile.open(src, mode="r:*")
    except (tarfile.TarError, OSError, EOFError) as exc:
        # tarfile lists every compression it tried, one per line: the user gets one line.
        reason = str(exc).splitlines()[0].rstrip(":") if str(exc) else type(exc).__name__
        raise BackupError(f"{src}: not a readable export ({reason})") from None


def import_backup(src: Path, cfg: Config | None, *, config_path: Path, data_dir: Path | None = None,
                  passphrase: str | None = None, accept_changes: bool = False, check_running: bool = True,
                  max_member_bytes: int = MAX_MEMBER_BYTES, max_total_bytes: int = MAX_TOTAL_BYTES
                  ) -> ImportResult:
    """Restore an export into an empty store.

    ``cfg`` is the existing configuration, or None when ``config_path`` does not exist yet: then the
    exported config is written there with ``data_dir`` (default: the XDG data folder) substituted.
    ``passphrase`` opens an encrypted export. Users, keys and (with no config yet) settings the
    export would change are only changed with ``accept_changes``.

    :raises ChangesNotAccepted: the import would change users, keys or settings (listed).
    :raises BackupError: the store holds items, a server is running, the passphrase is wrong, the file
        is modified, damaged or over a cap, or its config is refused; in each case nothing was changed.
    """
    from inverse_cloud import config as config_mod
    from inverse_cloud.errors import ConfigError

    src = src.expanduser()
    if not src.is_file():
        raise BackupError(f"{src}: no such file")
    tar = _open_export(src, passphrase, max_total_bytes)
    with tar:
        _count_members(tar, src)
        manifest = _read_manifest(tar, src)
        target_data = cfg.server.data_dir if cfg is not None else (data_dir or config_mod.default_data_dir())
        if cfg is not None and data_dir is not None and data_dir != cfg.server.data_dir:
            raise BackupError(f"--data-dir {data_dir} differs from data_dir {cfg.server.data_dir} in {config_path}; "
                              "edit the config or leave out --data-dir")
        storage = target_data / "collections"
        existing = store_items(storage)
        if existing:
            raise BackupError(f"refusing to import: the store {storage} already holds {existing} item(s); "
                              "importing would mix or roll back data that phones have synced (see "
                              "docs/operations.md). Export it first, then move it away to import here")
        if cfg is not None and check_running and _server_running(cfg):
            raise BackupError("refusing to import while inverse-cloud is running; stop it first "
                              "(systemctl --user stop inverse-cloud)")
        ensure_private_dir(target_data)
        staging = Path(tempfile.mkdtemp(prefix=".import-", dir=target_data))
        try:
            files = _extract_checked(tar, manifest, staging, src, max_member_bytes, max_total_bytes)
            exported_config = staging / "config.toml"
            exported_text = exported_config.read_text(encoding="utf-8") if exported_config.exists() else None
            try:
                exported = config_mod.loads(exported_text, Path("config.toml")) if exported_text else None
            except ConfigError as exc:
                raise BackupError(f"{src}: its config is refused: {exc}; nothing was changed") from None
            changes = describe_changes(staging, target_data, exported, cfg is None)
            if changes and not accept_changes:
                raise ChangesNotAccepted(f"{src} would change {len(changes)} thing(s) listed above; nothing was "
                                         "changed (run again with --accept-changes to restore it)", changes)
            # Radicale checks the restored store where it lies in staging, before anything is moved.
            base = cfg if cfg is not None else exported
            if base is not None:
                verify_store(config_mod.replace_server(base, data_dir=staging / "data"))
            moved = _install(staging / "data", target_data)
            config_written = None
            if cfg is None and exported_text is not None:
                config_written = _write_config(exported_text, config_path, target_data, manifest)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return ImportResult(target_data, files, int(manifest.get("items", 0)), config_written, moved)


def _count_members(tar: tarfile.TarFile, src: Path) -> None:
    """Read the member headers once (tarfile keeps them), refusing past MAX_MEMBERS."""
    for n, _member in enumerate(tar, 1):
        if n > MAX_MEMBERS:
            raise BackupError(f"{src}: more than {MAX_MEMBERS} entries; refusing the whole file")


def _extract_checked(tar: tarfile.TarFile, manifest: dict[str, Any], staging: Path, src: Path,
                     max_member_bytes: int, max_total_bytes: int) -> int:
    """Stream every member into ``staging`` while hashing it; refuse the whole file (the caller removes
    ``staging``) at the first entry that is not a plain file in the manifest, is over a cap or does
    not match its checksum."""
    expected: dict[str, str] = manifest.get("files", {})
    seen = 0
    total = 0
    for member in tar.getmembers():
        name = member.name
        if name == "MANIFEST.json":
            continue
        if not member.isfile() or name.startswith("/") or ".." in Path(name).parts:
            raise BackupError(f"{src}: unexpected entry {name!r}; refusing the whole file")
        if name not in expected:
            raise BackupError(f"{src}: {name} is not in the manifest; refusing the whole file")
        if member.size > max_member_bytes:
            raise BackupError(f"{src}: {name} is {member.size} bytes, over the {max_member_bytes}-byte cap "
                              "per file; nothing was changed")
        total += member.size
        if total > max_total_bytes:
            raise BackupError(f"{src}: more than {max_total_bytes} bytes in all, over the import's cap; "
                              "nothing was changed")
        fh = tar.extractfile(member)
        assert fh is not None
        out = staging / name
        ensure_private_dir(out.parent)
        digest = hashlib.sha256()
        fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh_out:
            while chunk := fh.read(_CHUNK):
                digest.update(chunk)
                fh_out.write(chunk)
            if digest.hexdigest() != expected[name]:
                raise BackupError(f"{src}: {name} does not match its checksum (damaged file); nothing was changed")
            fh_out.flush()
            os.fsync(fh_out.fileno())
        os.utime(out, (member.mtime, member.mtime))
        seen += 1
    if seen != len(expected):
        raise BackupError(f"{src}: {len(expected) - seen} file(s) listed in the manifest are missing")
    return seen


def _install(staged: Path, target: Path) -> Path | None:
    """Move the staged tree into ``target``. An existing (item-less) collections folder is moved
    aside, never deleted; other files (user file, keys) replace the ones ``init`` made."""
    moved = None
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    for entry in sorted(staged.iterdir()):
        dest = target / entry.name
        if entry.is_dir():
            if dest.exists():
                if entry.name == "collections":
                    moved = target / f"collections.before-import-{stamp}"
                    os.replace(dest, moved)
                else:
                    for path in sorted(entry.rglob("*")):
                        if path.is_file():
                            out = dest / path.relative_to(entry)
                            ensure_private_dir(out.parent)
                            os.replace(path, out)
                    continue
            os.replace(entry, dest)
        else:
            os.replace(entry, dest)
    fsync_dir(target)
    return moved


def _write_config(text: str, config_path: Path, data_dir: Path, manifest: dict[str, Any]) -> Path:
    """The exported config with the data folder of this machine (its paths may differ)."""
    import re

    from inverse_cloud.fsutil import atomic_write

    old = str(manifest.get("data_dir", ""))
    text = re.sub(r'(?m)^data_dir\s*=.*$', f'data_dir = "{data_dir}"', text, count=1)
    if old:
        text = text.replace(f'"{old}/', f'"{data_dir}/')
    ensure_private_dir(config_path.parent)
    atomic_write(config_path, text.encode("utf-8"), mode=0o600)
    return config_path
