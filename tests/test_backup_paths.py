"""export/import's smaller paths in this process, with exact expectations: whether a server runs, Radicale's
verification verdicts, the config written for a new laptop, how the staged tree is moved into place, what an
export that fails halfway leaves behind, and the refusals that come before anything is read."""

from __future__ import annotations

import logging
import stat
import tarfile
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from inverse_cloud import config as config_mod
from inverse_cloud.errors import InverseCloudError
from inverse_cloud.ops import backup, control
from inverse_cloud.ops.backup import BackupError, export_backup, import_backup
from tests.test_backup import _fill


@pytest.mark.parametrize(("answer", "running"), [
    (control.NotRunning("no server"), False),
    (InverseCloudError("the socket answered garbage"), True),     # something is there: do not import
    ({"state": "serving"}, True),
])
def test_a_server_counts_as_running_unless_nothing_answers(instance, monkeypatch, answer, running):
    cfg = config_mod.load(instance)
    asked: list[tuple[Any, ...]] = []

    def ask(path: Path, cmd: str, timeout_s: float = 10.0) -> Any:
        asked.append((path, cmd, timeout_s))
        if isinstance(answer, Exception):
            raise answer
        return answer

    monkeypatch.setattr(control, "ask", ask)
    assert backup._server_running(cfg) is running
    assert asked == [(cfg.server.control_socket, "status", 5)]


def test_verification_names_radicales_complaint_and_restores_its_log_level(instance, monkeypatch):
    """Radicale's verify raising (its plain exceptions for a broken collection): one BackupError carrying its
    words, and the radicale logger's level is what it was before (it is raised to ERROR meanwhile). (A broken
    item alone does not fail Radicale's verification: Radicale 3 skips it with a warning.)"""
    import contextlib

    import radicale.storage

    cfg = config_mod.load(instance)
    levels: list[int] = []

    def verify() -> bool:
        levels.append(logging.getLogger("radicale").level)
        raise ValueError("broken collection 'alice/contacts'")

    store = SimpleNamespace(acquire_lock=lambda _mode: contextlib.nullcontext(), verify=verify)
    monkeypatch.setattr(radicale.storage, "load", lambda _configuration: store)
    radicale_log = logging.getLogger("radicale")
    radicale_log.setLevel(logging.INFO)
    with pytest.raises(BackupError) as err:
        backup.verify_store(cfg)
    assert str(err.value) == "Radicale storage verification failed: broken collection 'alice/contacts'"
    assert levels == [logging.ERROR] and radicale_log.level == logging.INFO


def test_a_store_radicale_does_not_accept_is_named(instance, monkeypatch):
    import contextlib

    import radicale.storage

    cfg = config_mod.load(instance)
    store = SimpleNamespace(acquire_lock=lambda _mode: contextlib.nullcontext(), verify=lambda: False)
    monkeypatch.setattr(radicale.storage, "load", lambda _configuration: store)
    with pytest.raises(BackupError) as err:
        backup.verify_store(cfg)
    assert str(err.value) == f"Radicale storage verification failed for {cfg.server.storage_dir}"


def test_the_config_for_a_new_laptop_points_at_its_own_data_folder(tmp_path):
    text = ('[server]\ndomain = "a.example.org"\ndata_dir = "/old/data"\n'
            '[relay]\nkey_file = "/old/data/ssh/tunnel_key"\nother = "/old/database"\n')
    path = backup._write_config(text, tmp_path / "conf" / "config.toml", tmp_path / "new",
                                {"data_dir": "/old/data"})
    assert path == tmp_path / "conf" / "config.toml"
    assert path.read_text() == (f'[server]\ndomain = "a.example.org"\ndata_dir = "{tmp_path}/new"\n'
                                f'[relay]\nkey_file = "{tmp_path}/new/ssh/tunnel_key"\nother = "/old/database"\n')
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    bare = backup._write_config('data_dir = "/x"\nk = "/x/y"\n', tmp_path / "c2.toml", tmp_path / "n2", {})
    assert bare.read_text() == f'data_dir = "{tmp_path}/n2"\nk = "/x/y"\n'     # no old folder recorded


def test_installing_moves_old_collections_aside_merges_folders_and_replaces_files(tmp_path):
    staged, target = tmp_path / "staged", tmp_path / "target"
    (staged / "collections" / "collection-root").mkdir(parents=True)
    (staged / "collections" / "collection-root" / "new.vcf").write_text("new")
    (staged / "ssh").mkdir()
    (staged / "ssh" / "tunnel_key").write_text("exported key")
    (staged / "acme").mkdir()
    (staged / "acme" / "account.json").write_text("exported account")
    (staged / "users.htpasswd").write_text("exported users")
    (target / "collections" / "collection-root").mkdir(parents=True)
    (target / "collections" / "collection-root" / "empty-marker").write_text("")
    (target / "ssh").mkdir()
    (target / "ssh" / "tunnel_key").write_text("old key")
    (target / "ssh" / "known_hosts").write_text("kept")
    (target / "users.htpasswd").write_text("old users")
    moved = backup._install(staged, target)
    assert moved is not None and moved.parent == target and moved.name.startswith("collections.before-import-")
    assert (moved / "collection-root" / "empty-marker").exists()
    assert (target / "collections" / "collection-root" / "new.vcf").read_text() == "new"
    assert (target / "ssh" / "tunnel_key").read_text() == "exported key"
    assert (target / "ssh" / "known_hosts").read_text() == "kept"
    assert (target / "acme" / "account.json").read_text() == "exported account"
    assert (target / "users.htpasswd").read_text() == "exported users"
    (tmp_path / "staged2" / "collections").mkdir(parents=True)
    (tmp_path / "target2").mkdir()
    assert backup._install(tmp_path / "staged2", tmp_path / "target2") is None      # nothing to move aside
    assert (tmp_path / "target2" / "collections").is_dir()


def test_an_export_without_a_store_is_refused(instance, tmp_path):
    import shutil

    cfg = config_mod.load(instance)
    shutil.rmtree(cfg.server.storage_dir)
    with pytest.raises(BackupError) as err:
        export_backup(cfg, tmp_path / "e.tar.gz", None)
    assert str(err.value) == f"no storage folder at {cfg.server.storage_dir}: nothing to export"


def test_an_export_that_fails_halfway_leaves_nothing_behind(instance, tmp_path, monkeypatch):
    cfg = config_mod.load(instance)
    _fill(cfg, cards=2, events=0)
    real, calls = backup._add_bytes, []

    def failing(*args: Any) -> None:
        calls.append(1)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        real(*args)

    monkeypatch.setattr(backup, "_add_bytes", failing)
    out = tmp_path / "out"
    with pytest.raises(OSError, match="No space left"):
        export_backup(cfg, out / "e.tar.gz", None)
    assert list(out.iterdir()) == []


def test_an_export_with_too_many_entries_is_refused_before_anything_is_read(instance, tmp_path, monkeypatch):
    cfg = config_mod.load(instance)
    _fill(cfg, cards=3, events=0)
    export_backup(cfg, tmp_path / "e.tar.gz", None)
    monkeypatch.setattr(backup, "MAX_MEMBERS", 2)
    target = tmp_path / "new"
    with pytest.raises(BackupError) as err:
        import_backup(tmp_path / "e.tar.gz", None, config_path=target / "config.toml", data_dir=target / "data")
    assert str(err.value) == f"{tmp_path / 'e.tar.gz'}: more than 2 entries; refusing the whole file"
    assert not target.exists()
    import tarfile

    with tarfile.open(tmp_path / "e.tar.gz") as tar:
        monkeypatch.setattr(backup, "MAX_MEMBERS", len(tar.getmembers()))    # exactly at the cap: accepted
    result = import_backup(tmp_path / "e.tar.gz", None, config_path=target / "config.toml", data_dir=target / "data",
                           accept_changes=True)
    assert result.items == 3


def test_import_refusals_before_anything_changes(instance, tmp_path, monkeypatch):
    """No such file; --data-dir that differs from the config's; a running server (exact lines)."""
    from tests.support import init_instance

    cfg = config_mod.load(instance)
    _fill(cfg, cards=1, events=0)
    export = tmp_path / "e.tar.gz"
    export_backup(cfg, export, None)
    b_path = init_instance(tmp_path / "b")
    b = config_mod.load(b_path)
    with pytest.raises(BackupError) as err:
        import_backup(tmp_path / "missing.tar.gz", b, config_path=b_path)
    assert str(err.value) == f"{tmp_path / 'missing.tar.gz'}: no such file"
    with pytest.raises(BackupError) as err:
        import_backup(export, b, config_path=b_path, data_dir=tmp_path / "elsewhere")
    assert str(err.value) == (f"--data-dir {tmp_path / 'elsewhere'} differs from data_dir {b.server.data_dir} in "
                              f"{b_path}; edit the config or leave out --data-dir")
    monkeypatch.setattr(backup, "_server_running", lambda _cfg: True)
    with pytest.raises(BackupError) as err:     # the config's own data folder given again is no difference
        import_backup(export, b, config_path=b_path, data_dir=b.server.data_dir)
    assert str(err.value) == ("refusing to import while inverse-cloud is running; stop it first "
                              "(systemctl --user stop inverse-cloud)")
    assert not any(p.name.startswith(".import-") for p in b.server.data_dir.iterdir())


def test_items_are_the_files_of_the_collections_without_radicales_bookkeeping(instance, tmp_path):
    cfg = config_mod.load(instance)
    assert backup.store_items(tmp_path / "no-store") == 0
    _fill(cfg, cards=3, events=1)
    assert backup.store_items(cfg.server.storage_dir) == 4       # .Radicale.props and caches not counted


def test_an_encrypted_export_in_this_process(instance, tmp_path):
    """Encrypted export -> import: no passphrase, a wrong one, the file over the size cap (refused, exact
    lines); with the right passphrase it is restored."""
    cfg = config_mod.load(instance)
    _fill(cfg, cards=1, events=0)
    export = tmp_path / "e.age"
    export_backup(cfg, export, "correct horse battery")
    size = export.stat().st_size
    target = tmp_path / "new"

    def restore(**kw: Any) -> Any:
        return import_backup(export, None, config_path=target / "config.toml", data_dir=target / "data",
                             accept_changes=True, **kw)

    for kw, message in (
        ({}, f"{export} is encrypted: give its passphrase (--passphrase-file FILE, or run on a terminal to be "
             "asked)"),
        ({"passphrase": "wrong"}, f"{export}: wrong passphrase, or the file was modified after export; nothing "
                                  "was changed"),
        ({"passphrase": "correct horse battery", "max_total_bytes": size - 1},
         f"{export}: {size} bytes is over the import's {size - 1}-byte cap"),
    ):
        with pytest.raises(BackupError) as err:
            restore(**kw)
        assert str(err.value) == message
    result = restore(passphrase="correct horse battery")
    assert result.items == 1
    # exactly at the cap the file itself passes (its members may still be refused by their own total)
    at_cap = tmp_path / "at-cap"
    try:
        import_backup(export, None, config_path=at_cap / "config.toml", data_dir=at_cap / "data",
                      accept_changes=True, passphrase="correct horse battery", max_total_bytes=size)
    except BackupError as exc:
        assert "bytes is over the import's" not in str(exc), exc


def _members(export: Path) -> list[tuple[Any, bytes]]:
    import tarfile

    with tarfile.open(export) as tar:
        return [(m, tar.extractfile(m).read()) for m in tar.getmembers()]  # type: ignore[union-attr]


def _write(dest: Path, members: list[tuple[Any, bytes]]) -> Path:
    import io
    import tarfile

    with tarfile.open(dest, "w:gz") as tar:
        for info, data in members:
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return dest


def test_extraction_boundaries_modes_times_and_the_manifest_anywhere(instance, tmp_path, monkeypatch):
    """Caps equal to the largest member and to the total are not exceeded; MANIFEST.json first in the file
    works as well as last; every restored file is 0600 with its exported mtime; one entry over MAX_MEMBERS is
    refused; a manifest without a file list refuses every member."""
    import json

    cfg = config_mod.load(instance)
    _fill(cfg, cards=2, events=0)
    export = tmp_path / "e.tar.gz"
    export_backup(cfg, export, None)
    members = _members(export)
    files = [(m, d) for m, d in members if m.name != "MANIFEST.json"]
    manifest = [(m, d) for m, d in members if m.name == "MANIFEST.json"]
    first = _write(tmp_path / "first.tar.gz", manifest + files)
    target = tmp_path / "new"
    biggest, total = max(m.size for m, _ in files), sum(m.size for m, _ in files)
    result = import_backup(first, None, config_path=target / "config.toml", data_dir=target / "data",
                           accept_changes=True, max_member_bytes=biggest, max_total_bytes=10 * total)
    assert result.files == len(files)
    for info, _data in files:
        if info.name == "config.toml":
            continue               # rewritten for this laptop's data folder (its own test above)
        restored = target / info.name
        assert stat.S_IMODE(restored.stat().st_mode) == 0o600, info.name
        assert int(restored.stat().st_mtime) == info.mtime, info.name

    staging = tmp_path / "staging"
    staging.mkdir()
    import tarfile

    with tarfile.open(first) as tar:
        doc = json.loads(tar.extractfile("MANIFEST.json").read())  # type: ignore[union-attr]
        assert backup._extract_checked(tar, doc, staging, first, biggest, total) == len(files)
    for kw, message in (({"max_member_bytes": biggest - 1}, "per file; nothing was changed"),
                        ({"max_total_bytes": total - 1}, "in all, over the import's cap; nothing was changed")):
        with tarfile.open(first) as tar, pytest.raises(BackupError) as err:
            args = {"max_member_bytes": biggest, "max_total_bytes": total, **kw}
            backup._extract_checked(tar, doc, tmp_path / f"s{len(kw)}{message[:3]}", first,
                                    args["max_member_bytes"], args["max_total_bytes"])
        assert str(err.value).endswith(message), str(err.value)
    no_list = {k: v for k, v in doc.items() if k != "files"}
    with tarfile.open(first) as tar, pytest.raises(BackupError) as err:
        backup._extract_checked(tar, no_list, tmp_path / "s-nolist", first, biggest, total)
    assert "is not in the manifest; refusing the whole file" in str(err.value)
    monkeypatch.setattr(backup, "MAX_MEMBERS", len(members) - 1)
    with pytest.raises(BackupError) as err:
        import_backup(first, None, config_path=tmp_path / "n2" / "config.toml", data_dir=tmp_path / "n2" / "data")
    assert str(err.value) == f"{first}: more than {len(members) - 1} entries; refusing the whole file"


def test_the_set_aside_store_is_named_by_the_time_and_nested_files_are_merged(tmp_path):
    import re

    staged, target = tmp_path / "staged", tmp_path / "target"
    (staged / "collections").mkdir(parents=True)
    (staged / "ssh" / "deep").mkdir(parents=True)
    (staged / "ssh" / "deep" / "key").write_text("new")
    (target / "collections").mkdir(parents=True)
    (target / "ssh").mkdir()
    moved = backup._install(staged, target)
    assert moved is not None and re.fullmatch(r"collections\.before-import-\d{8}-\d{6}", moved.name), moved
    assert (target / "ssh" / "deep" / "key").read_text() == "new"


def test_changes_not_accepted_carry_their_message_and_list(instance, tmp_path):
    from tests.support import init_instance

    cfg = config_mod.load(instance)
    _fill(cfg, cards=1, events=0)
    export = tmp_path / "e.tar.gz"
    export_backup(cfg, export, None)
    b_path = init_instance(tmp_path / "b", password="another long password")
    b = config_mod.load(b_path)
    with pytest.raises(backup.ChangesNotAccepted) as err:
        import_backup(export, b, config_path=b_path)
    assert str(err.value).startswith(f"{export} would change ") and "--accept-changes" in str(err.value)
    assert err.value.changes and all(isinstance(line, str) and line for line in err.value.changes)
    assert f"would change {len(err.value.changes)} thing(s)" in str(err.value)


def test_an_import_into_a_store_that_holds_items_is_refused(instance, tmp_path):
    """The store already holds items: refused with one line naming the store and the count; nothing staged."""
    cfg = config_mod.load(instance)
    _fill(cfg, cards=2, events=0)
    export = tmp_path / "e.tar.gz"
    export_backup(cfg, export, None)
    with pytest.raises(BackupError) as err:
        import_backup(export, cfg, config_path=instance, accept_changes=True, check_running=False)
    storage = cfg.server.data_dir / "collections"
    assert str(err.value) == (f"refusing to import: the store {storage} already holds 2 item(s); importing would "
                              "mix or roll back data that phones have synced (see docs/operations.md). Export it "
                              "first, then move it away to import here")
    assert not any(p.name.startswith(".import-") for p in cfg.server.data_dir.iterdir())


def test_radicale_verifies_the_staged_store_with_the_settings_that_will_serve_it(instance, tmp_path, monkeypatch):
    """Before anything is moved, Radicale verifies the store where it lies, in a ".import-" folder inside the
    target data folder, with the existing config (an import into a configured laptop) or the exported one (a
    new laptop)."""
    from tests.support import init_instance

    cfg = config_mod.load(instance)
    _fill(cfg, cards=1, events=0)
    export = tmp_path / "e.tar.gz"
    export_backup(cfg, export, None)
    seen: list[config_mod.Config] = []
    real = backup.verify_store
    monkeypatch.setattr(backup, "verify_store", lambda c: (seen.append(c), real(c))[1])

    b_path = init_instance(tmp_path / "b", password="another long password")
    b = config_mod.load(b_path)
    result = import_backup(export, b, config_path=b_path, accept_changes=True, check_running=False)
    assert (result.data_dir, result.items, result.config_written) == (b.server.data_dir, 1, None)
    staged = seen[-1].server.data_dir
    assert len(seen) == 1 and seen[0].path == b_path
    assert staged.name == "data" and staged.parent.parent == b.server.data_dir
    assert staged.parent.name.startswith(".import-") and not staged.parent.exists()

    new_config, new_data = tmp_path / "c" / "config.toml", tmp_path / "c-data"
    import_backup(export, None, config_path=new_config, data_dir=new_data, accept_changes=True)
    assert len(seen) == 2 and seen[1].path == Path("config.toml") and seen[1].server.domain == cfg.server.domain
    assert seen[1].server.data_dir.parent.parent == new_data


def test_a_new_laptop_is_shown_the_exported_config_and_a_broken_one_is_refused(instance, tmp_path):
    """With no config yet, the change list carries the exported config's summary and the refusal says how to go
    on; with a config, no "config:" line. An export whose config.toml is refused: one line naming the file's
    own error, nothing written."""
    from tests.support import init_instance

    cfg = config_mod.load(instance)
    _fill(cfg, cards=1, events=0)
    export = tmp_path / "e.tar.gz"
    export_backup(cfg, export, None)
    new_config = tmp_path / "c" / "config.toml"
    with pytest.raises(backup.ChangesNotAccepted) as err:
        import_backup(export, None, config_path=new_config, data_dir=tmp_path / "c-data")
    changes = err.value.changes
    assert f"config: domain {cfg.server.domain}" in changes
    assert str(err.value) == (f"{export} would change {len(changes)} thing(s) listed above; nothing was changed "
                              "(run again with --accept-changes to restore it)")
    b_path = init_instance(tmp_path / "b", password="another long password")
    with pytest.raises(backup.ChangesNotAccepted) as err:
        import_backup(export, config_mod.load(b_path), config_path=b_path, check_running=False)
    assert err.value.changes and not [c for c in err.value.changes if c.startswith("config:")]

    Path(instance).write_text(Path(instance).read_text() + '[rely]\nhost = "x"\n')
    broken = tmp_path / "broken.tar.gz"
    export_backup(cfg, broken, None)
    with pytest.raises(BackupError) as err:
        import_backup(broken, None, config_path=new_config, data_dir=tmp_path / "d-data", accept_changes=True)
    assert str(err.value).startswith(f"{broken}: its config is refused: config.toml: line ")
    assert str(err.value).endswith(': [rely]: unknown section (did you mean "[relay]"?); nothing was changed')
    assert not new_config.exists()


def test_an_export_reports_what_it_wrote_and_its_manifest_says_where_from(instance, tmp_path, monkeypatch):
    """Into a folder that does not exist yet: the result names the file, its size, every file and item
    written and the lock's wait and hold (within the call's own time); the manifest carries the format,
    version, domain, creation time and data folder (import rewrites paths from it) and a hash per file; the
    file is first written as a hidden temporary next to the destination (so the final rename is atomic);
    a config that was not loaded from a file is not exported."""
    import dataclasses
    import datetime as dt
    import hashlib
    import json
    import os
    import tarfile
    import tempfile
    import time

    from inverse_cloud import __version__

    cfg = config_mod.load(instance)
    _fill(cfg, cards=2, events=1)
    temps: list[tuple[str, str]] = []
    real_mkstemp = tempfile.mkstemp

    def mkstemp(*, prefix: str, dir: Path) -> tuple[int, str]:
        temps.append((prefix, str(dir)))
        return real_mkstemp(prefix=prefix, dir=dir)

    monkeypatch.setattr(backup.tempfile, "mkstemp", mkstemp)
    dest = tmp_path / "new" / "nested" / "snap.tar.gz"
    before = dt.datetime.now(dt.UTC).replace(microsecond=0)
    t0 = time.monotonic()
    zone = os.environ.get("TZ")
    os.environ["TZ"] = "Asia/Tokyo"      # "created" is UTC, whatever the laptop's time zone
    time.tzset()
    try:
        result = export_backup(cfg, dest, None)
    finally:
        if zone is None:
            del os.environ["TZ"]
        else:
            os.environ["TZ"] = zone
        time.tzset()
    elapsed = time.monotonic() - t0
    after = dt.datetime.now(dt.UTC)
    assert temps == [(".snap.tar.gz.", str(dest.parent))]
    assert sorted(p.name for p in dest.parent.iterdir()) == ["snap.tar.gz"]
    with tarfile.open(dest) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}  # type: ignore[union-attr]
        assert {m.mode for m in tar.getmembers()} == {0o600}      # private also for a plain `tar -x`
    manifest = json.loads(members.pop("MANIFEST.json"))
    assert {n: hashlib.sha256(d).hexdigest() for n, d in members.items()} == manifest["files"]
    items = sorted(n for n in members if n.startswith("data/collections/collection-root/")
                   and not n.rsplit("/", 1)[-1].startswith("."))
    assert len(items) == 3 and "config.toml" in members
    assert (result.path, result.files, result.items, result.bytes) == (dest, len(members), 3, dest.stat().st_size)
    assert 0 <= result.lock_wait_s and 0 <= result.locked_s and result.lock_wait_s + result.locked_s <= elapsed
    assert {k: v for k, v in manifest.items() if k not in ("files", "created")} == {
        "format": backup.FORMAT, "version": __version__, "domain": cfg.server.domain,
        "data_dir": str(cfg.server.data_dir), "items": 3}
    created = dt.datetime.strptime(manifest["created"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.UTC)
    assert before <= created <= after

    no_file = dataclasses.replace(cfg, path=None)
    again = export_backup(no_file, tmp_path / "no-config.tar.gz", None)
    with tarfile.open(again.path) as tar:
        names = tar.getnames()
    assert "config.toml" not in names and again.files == len(names) - 1 == result.files - 1


@pytest.mark.parametrize(("error", "reason"), [
    (tarfile.ReadError(), "ReadError"),                       # no message: the error's name
    (tarfile.ReadError("file could not be opened successfully:\n- method gz: x"),
     "file could not be opened successfully"),                              # first line, without its colon
])
def test_an_unreadable_export_is_one_line_naming_the_reason(tmp_path, monkeypatch, error, reason):
    src = tmp_path / "e.tar.gz"
    src.write_bytes(b"not a tar")

    def refuse(*_a: Any, **_kw: Any) -> Any:
        raise error

    monkeypatch.setattr(backup.tarfile, "open", refuse)
    with pytest.raises(BackupError) as err:
        backup._open_export(src, None, 1 << 20)
    assert str(err.value) == f"{src}: not a readable export ({reason})"
