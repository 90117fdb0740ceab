"""The storage plugin (inverse_cloud.dav.storage), through Radicale's WSGI app in this process.

A "restart" is a new Radicale application on the same folder, the old one's index closed.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import radicale
from radicale.storage import multifilesystem
from radicale.storage.multifilesystem import get as multifilesystem_get

from inverse_cloud.dav import storage as plugin
from inverse_cloud.dav.storage import index as index_mod
from tests.support.dav import Dav, radicale_app, vcard

BOOK = "/alice/book/"
BOOK_DIR = ("collections", "collection-root", "alice", "book")


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Callable[..., Dav]]:
    apps: list[object] = []

    def start(**storage: str) -> Dav:
        for app in apps:
            app._storage.index.close()  # type: ignore[attr-defined]
        app = radicale_app(tmp_path / "store", plugin.PLUGIN, **storage)
        assert isinstance(app._storage, plugin.Storage)
        apps.append(app)
        return Dav(app)

    yield start
    for app in apps:
        app._storage.index.close()  # type: ignore[attr-defined]


def book_dir(tmp_path: Path) -> Path:
    return tmp_path.joinpath("store", *BOOK_DIR)


def changed(dav: Dav, token: str) -> tuple[str, dict[str, int]]:
    status, new, resp = dav.sync(BOOK, token)
    assert status == 207, resp
    return new, {href.rsplit("/", 1)[1]: code for href, (code, _) in resp.items()}


def test_radicale_options_make_the_plugin_the_default_storage(tmp_path: Path) -> None:
    from inverse_cloud import config
    from inverse_cloud.dav.radicale_app import STORAGE_PLUGIN, radicale_options
    from tests.support import init_instance

    cfg = config.load(init_instance(tmp_path / "inst"))
    assert radicale_options(cfg)["storage"]["type"] == STORAGE_PLUGIN == plugin.PLUGIN


def test_uid_conflict_is_found_by_the_index_and_survives_a_restart(server: Callable[..., Dav]) -> None:
    """A second href with a UID already in the book gets 409, also after a restart; once the first item
    is deleted the UID is free again."""
    dav = server()
    assert dav.mkcol(BOOK) == 201
    assert dav.put(BOOK + "a.vcf", vcard("u1")) == 201
    assert dav.put(BOOK + "b.vcf", vcard("u1")) == 409
    dav = server()
    assert dav.put(BOOK + "c.vcf", vcard("u1")) == 409
    assert dav.put(BOOK + "a.vcf", vcard("u1", "Changed")) == 204     # same href, same UID: a replacement
    assert dav.delete(BOOK + "a.vcf") == 200
    assert dav.put(BOOK + "c.vcf", vcard("u1")) == 201


def test_put_delete_and_sync_read_only_the_items_they_touch(server: Callable[..., Dav],
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """With 30 cards stored (and compared once), a PUT, a DELETE, two syncs and a multiget never list the
    collection and read no item but the ones they name: the cost does not grow with the book. (Stock
    multifilesystem reads every item for has_uid and for sync, and lists the folder for a multiget: this
    test fails on it.)"""
    dav = server()
    dav.mkcol(BOOK)
    for i in range(30):
        assert dav.put(BOOK + f"c{i}.vcf", vcard(f"u{i}")) == 201
    _, token, _ = dav.sync(BOOK)
    read: list[str] = []
    real_get = multifilesystem.Collection._get

    def counting_get(self: multifilesystem.Collection, href: str, verify_href: bool = True) -> object:
        read.append(href)
        return real_get(self, href, verify_href)

    def no_listing(self: object) -> None:
        raise AssertionError("listed every item")

    def no_listdir(path: str) -> None:
        raise AssertionError(f"listed {path}")

    monkeypatch.setattr(multifilesystem.Collection, "_get", counting_get)
    monkeypatch.setattr(multifilesystem.Collection, "get_all", no_listing)
    monkeypatch.setattr(multifilesystem.Collection, "_list", no_listing)
    monkeypatch.setattr(multifilesystem_get.os, "listdir", no_listdir)
    assert dav.put(BOOK + "new.vcf", vcard("u-new")) == 201
    assert dav.put(BOOK + "dup.vcf", vcard("u3")) == 409
    assert dav.delete(BOOK + "c7.vcf") == 200
    token, got = changed(dav, token)
    assert got == {"new.vcf": 200, "c7.vcf": 404}
    assert changed(dav, token) == (token, {})
    got = {h.rsplit("/", 1)[1]: code for h, (code, _) in dav.multiget(BOOK, [BOOK + "c1.vcf", BOOK + "c7.vcf"]).items()}
    assert got == {"c1.vcf": 200, "c7.vcf": 404}
    assert set(read) <= {"new.vcf", "dup.vcf", "c7.vcf", "c1.vcf"}, read


def test_sync_tokens_stay_valid_across_restarts(server: Callable[..., Dav]) -> None:
    """A token handed out before a restart serves an incremental sync after it: exactly the changes."""
    dav = server()
    dav.mkcol(BOOK)
    for i in range(5):
        dav.put(BOOK + f"c{i}.vcf", vcard(f"u{i}"))
    _, token, items = dav.sync(BOOK)
    assert len(items) == 5
    dav = server()
    assert changed(dav, token) == (token, {})
    dav.put(BOOK + "c1.vcf", vcard("u1", "Other"))
    dav.delete(BOOK + "c2.vcf")
    dav = server()
    new, got = changed(dav, token)
    assert got == {"c1.vcf": 200, "c2.vcf": 404} and new != token
    assert changed(dav, new) == (new, {})


@pytest.mark.parametrize("token", [
    "http://radicale.org/ns/sync/" + "0" * 64,                                    # another generation
    "http://radicale.org/ns/sync/" + "a" * 63,                                    # malformed
    "http://example.org/not-ours",
    "GEN+" + f"{10**6:032x}",                                                     # a number never handed out
])
def test_a_token_the_index_cannot_serve_gets_valid_sync_token(server: Callable[..., Dav], token: str) -> None:
    """Radicale's own answer: 403 with DAV:valid-sync-token, so the client falls back to a full sync."""
    dav = server()
    dav.mkcol(BOOK)
    dav.put(BOOK + "a.vcf", vcard("u1"))
    _, current, _ = dav.sync(BOOK)
    if token.startswith("GEN+"):
        token = current[:-32] + token[4:]
    status, _, resp = dav.sync(BOOK, token)
    assert status == 403 and "valid-sync-token" in resp["error"][1]


def test_deleting_or_replacing_a_collection_ends_its_tokens(server: Callable[..., Dav]) -> None:
    """As with stock Radicale: tokens of a deleted (then re-created) or a replaced collection are refused."""
    dav = server()
    dav.mkcol(BOOK)
    dav.put(BOOK + "a.vcf", vcard("u1"))
    _, token, _ = dav.sync(BOOK)
    assert dav.delete(BOOK) == 200
    assert dav.mkcol(BOOK) == 201
    assert dav.sync(BOOK, token)[0] == 403
    cal = "/alice/cal/"
    ics = ("BEGIN:VCALENDAR\r\nVERSION:2.0\r\nPRODID:x\r\nBEGIN:VEVENT\r\nUID:e1\r\nDTSTART:20260101T100000Z\r\n"
           "DTEND:20260101T110000Z\r\nSUMMARY:one\r\nDTSTAMP:20260101T000000Z\r\nEND:VEVENT\r\nEND:VCALENDAR\r\n")
    assert dav.request("PUT", cal, ics, content_type="text/calendar")[0] == 201
    _, token, items = dav.sync(cal)
    assert len(items) == 1
    assert dav.request("PUT", cal, ics.replace("one", "two"), content_type="text/calendar")[0] in (201, 204)
    assert dav.sync(cal, token)[0] == 403
    assert len(dav.sync(cal)[2]) == 1


def _outside_changes(folder: Path) -> None:
    """Behind the server's back: one card added, one changed in place (same size: only the content and the
    mtime differ, the folder's entries do not), one removed."""
    (folder / "added.vcf").write_text(vcard("u-added"))
    with open(folder / "c1.vcf", "r+b") as f:
        data = f.read()
        f.seek(0)
        f.write(data.replace(b"FN:Someone", b"FN:Somebody"[:10] + b"X"))
    os.remove(folder / "c2.vcf")


def _check_outside_changes_seen(dav: Dav, token: str) -> None:
    new, got = changed(dav, token)
    assert got == {"added.vcf": 200, "c1.vcf": 200, "c2.vcf": 404}
    listing = {h.rsplit("/", 1)[1] for h in dav.listing(BOOK)}
    assert listing == {"c0.vcf", "c1.vcf", "c3.vcf", "added.vcf"}
    assert b"FN:SomebodX" in dav.get(BOOK + "c1.vcf")[1]
    assert dav.put(BOOK + "again.vcf", vcard("u-added")) == 409      # the added card's UID is known
    assert dav.put(BOOK + "c2-again.vcf", vcard("u2")) == 201        # the removed card's UID is free
    assert changed(dav, new)[1] == {"c2-again.vcf": 200}


def _four_cards(dav: Dav) -> str:
    dav.mkcol(BOOK)
    for i in range(4):
        assert dav.put(BOOK + f"c{i}.vcf", vcard(f"u{i}")) == 201
    return dav.sync(BOOK)[1]


def test_outside_writer_while_serving_is_seen_by_the_next_request(server: Callable[..., Dav], tmp_path: Path) -> None:
    dav = server()
    token = _four_cards(dav)
    _outside_changes(book_dir(tmp_path))
    _check_outside_changes_seen(dav, token)


def test_outside_writer_while_stopped_is_seen_after_the_restart(server: Callable[..., Dav], tmp_path: Path) -> None:
    dav = server()
    token = _four_cards(dav)
    dav.app._storage.index.close()
    _outside_changes(book_dir(tmp_path))
    _check_outside_changes_seen(server(), token)


def test_outside_writer_is_seen_without_inotify(server: Callable[..., Dav], tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
                                                ) -> None:
    """No watch available: every request compares the files (slower), and the answer is still never stale."""
    def no_inotify() -> None:
        raise OSError(38, "Function not implemented")

    monkeypatch.setattr(index_mod, "DirWatcher", no_inotify)
    with caplog.at_level(logging.WARNING, logger="inverse_cloud.dav.storage.index"):
        dav = server()
    assert "no inotify" in caplog.text
    token = _four_cards(dav)
    _outside_changes(book_dir(tmp_path))
    _check_outside_changes_seen(dav, token)


def test_move_is_reported_by_both_collections(server: Callable[..., Dav]) -> None:
    dav = server()
    other = "/alice/other/"
    dav.mkcol(BOOK)
    dav.mkcol(other)
    dav.put(BOOK + "a.vcf", vcard("u1"))
    _, t_book, _ = dav.sync(BOOK)
    _, t_other, _ = dav.sync(other)
    assert dav.move(BOOK + "a.vcf", other + "b.vcf") == 201
    assert changed(dav, t_book)[1] == {"a.vcf": 404}
    status, _, resp = dav.sync(other, t_other)
    assert {h.rsplit("/", 1)[1]: c for h, (c, _) in resp.items()} == {"b.vcf": 200}
    assert dav.put(other + "c.vcf", vcard("u1")) == 409
    assert dav.put(BOOK + "c.vcf", vcard("u1")) == 201


def test_a_damaged_index_is_rebuilt_from_the_items(server: Callable[..., Dav], tmp_path: Path,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    """The index file is garbage: it is built again from the item files (one warning), everything is
    answered, and a token from before gets valid-sync-token (the client does one full sync)."""
    dav = server()
    token = _four_cards(dav)
    dav.app._storage.index.close()
    db = tmp_path / "store" / "collections" / plugin.INDEX_FILE
    for extra in ("-wal", "-shm"):
        Path(str(db) + extra).unlink(missing_ok=True)
    db.write_bytes(b"this is not a database" * 100)
    with caplog.at_level(logging.WARNING, logger="inverse_cloud.dav.storage.index"):
        dav = server()
        assert dav.put(BOOK + "x.vcf", vcard("u1")) == 409
        assert dav.put(BOOK + "x.vcf", vcard("u-x")) == 201
    assert dav.sync(BOOK, token)[0] == 403
    status, token, items = dav.sync(BOOK)
    assert status == 207 and len(items) == 5
    warnings = [r.getMessage() for r in caplog.records if r.name == "inverse_cloud.dav.storage.index"]
    assert len(warnings) == 1 and "damaged" in warnings[0], warnings


def test_an_unusable_index_falls_back_to_radicale_with_one_warning(server: Callable[..., Dav], tmp_path: Path,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    """The index cannot be opened (here: its path is taken by a folder, as a full disk or lost permissions
    would make it fail): every request is still answered correctly by Radicale's own code, one warning."""
    dav = server()
    _four_cards(dav)
    dav.app._storage.index.close()
    db = tmp_path / "store" / "collections" / plugin.INDEX_FILE
    for extra in ("", "-wal", "-shm"):
        Path(str(db) + extra).unlink(missing_ok=True)
    db.mkdir()
    with caplog.at_level(logging.WARNING, logger="inverse_cloud.dav.storage.index"):
        dav = server()
        assert dav.put(BOOK + "x.vcf", vcard("u1")) == 409
        assert dav.put(BOOK + "x.vcf", vcard("u-x")) == 201
        status, token, items = dav.sync(BOOK)
        assert status == 207 and len(items) == 5
        assert dav.delete(BOOK + "c0.vcf") == 200
        assert {h.rsplit("/", 1)[1]: c for h, (c, _) in dav.sync(BOOK, token)[2].items()} == {"c0.vcf": 404}
    warnings = [r.getMessage() for r in caplog.records if r.name == "inverse_cloud.dav.storage.index"]
    assert len(warnings) == 1 and "unusable" in warnings[0], warnings


def test_old_tombstones_are_dropped_and_tokens_before_them_refused(server: Callable[..., Dav],
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Deletions older than max_sync_token_age are forgotten; a token from before one of them can no longer
    be served (valid-sync-token), a newer one still can."""
    now = [1_000_000.0]
    monkeypatch.setattr(index_mod.time, "time", lambda: now[0])
    monkeypatch.setattr(index_mod, "PRUNE_INTERVAL_S", 0.0)
    dav = server(max_sync_token_age="100")
    dav.mkcol(BOOK)
    dav.put(BOOK + "a.vcf", vcard("u1"))
    dav.put(BOOK + "b.vcf", vcard("u2"))
    _, old, _ = dav.sync(BOOK)
    dav.delete(BOOK + "a.vcf")
    _, mid, items = dav.sync(BOOK)
    assert set(items) == {"/alice/book/a.vcf", "/alice/book/b.vcf"}      # the tombstone, as Radicale lists it
    now[0] += 101
    dav.put(BOOK + "c.vcf", vcard("u3"))                                  # a write prunes
    assert dav.sync(BOOK, old)[0] == 403
    assert changed(dav, mid)[1] == {"c.vcf": 200}
    assert set(dav.sync(BOOK)[2]) == {"/alice/book/b.vcf", "/alice/book/c.vcf"}


def test_stock_radicale_verifies_and_serves_the_store(server: Callable[..., Dav], tmp_path: Path) -> None:
    """The layout is Radicale's: its verification passes and stock multifilesystem lists the same items
    with the same etags (a user can switch back at any time)."""
    dav = server()
    _four_cards(dav)
    dav.delete(BOOK + "c3.vcf")
    ours = dav.listing(BOOK)
    dav.app._storage.index.close()
    stock = radicale_app(tmp_path / "store", "multifilesystem")
    assert stock._storage.verify()
    assert Dav(stock).listing(BOOK) == ours and len(ours) == 3


@pytest.mark.parametrize(("version", "tested"), [
    ("3.9.0", True), ("3.9.7", True), ("3.9.0.dev1", True), ("3.8.9", False), ("3.10.0", False),
    ("4.0", False), ("garbage", False),
])
def test_is_tested_radicale(version: str, tested: bool) -> None:
    assert plugin.is_tested_radicale(version) is tested


def test_an_untested_radicale_is_refused_with_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from inverse_cloud import config
    from inverse_cloud.dav.radicale_app import build_application
    from inverse_cloud.errors import StartupError
    from tests.support import init_instance

    cfg = config.load(init_instance(tmp_path / "inst"))
    monkeypatch.setattr(radicale, "VERSION", "3.10.1")
    with pytest.raises(StartupError) as err:
        build_application(cfg)
    assert "\n" not in str(err.value) and "Radicale 3.10.1" in str(err.value) and ">=3.9.0,<3.10.0" in str(err.value)
    with pytest.raises(RuntimeError, match="Radicale 3.10.1"):
        radicale_app(tmp_path / "store", plugin.PLUGIN)


def test_index_file_is_private_and_named_like_radicales_caches(server: Callable[..., Dav], tmp_path: Path) -> None:
    """Backups and snapshots skip names starting with .Radicale.cache; the index is rebuilt from the items."""
    server().mkcol(BOOK)
    db = tmp_path / "store" / "collections" / plugin.INDEX_FILE
    assert db.name.startswith(".Radicale.cache") and (db.stat().st_mode & 0o777) == 0o600
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_comparing_one_collection_holds_up_no_other(server: Callable[..., Dav], tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """The first use after a restart of a book with items written behind the server's back reads them (here:
    stalled inside the read); meanwhile a sync of another collection is answered, not queued behind it."""
    dav = server()
    other = "/alice/other/"
    _four_cards(dav)
    dav.mkcol(other)
    dav.put(other + "o.vcf", vcard("u-o"))
    dav.app._storage.index.close()
    for i in range(3):
        (book_dir(tmp_path) / f"outside{i}.vcf").write_text(vcard(f"u-out{i}"))
    dav = server()
    entered, release, resumed = threading.Event(), threading.Event(), threading.Event()
    real_read = plugin.Collection.read_item

    def stalled_read(self: plugin.Collection, href: str) -> tuple[str, str] | None:
        if self.path == "alice/book":
            entered.set()
            release.wait(5)           # (on a time-out the test fails below: the other sync had to wait)
            release.set()
            resumed.set()
        return real_read(self, href)

    monkeypatch.setattr(plugin.Collection, "read_item", stalled_read)
    result: dict[str, tuple[int, str, dict[str, tuple[int, str]]]] = {}
    reader = threading.Thread(target=lambda: result.setdefault("book", dav.sync(BOOK)))
    reader.start()
    try:
        assert entered.wait(10)
        status, _, items = dav.sync(other)
        assert status == 207 and len(items) == 1
        assert not resumed.is_set(), "the other collection's sync waited for the book's comparison"
    finally:
        release.set()
        reader.join(30)
    assert result["book"][0] == 207 and len(result["book"][2]) == 7


def test_a_write_the_index_never_heard_of_is_found_at_the_next_start(server: Callable[..., Dav],
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The process dies between a write's file and its index row (here: the index is not told, and no watch
    is active, as after a SIGKILL): at the next start the comparison with the files records the change, a
    token from before reports it, and its UID is taken."""
    dav = server()
    token = _four_cards(dav)
    dav.app._storage.index.close()                  # no watch reports what follows
    monkeypatch.setattr(plugin.Storage, "record", lambda self, collection, changes: None)
    assert dav.put(BOOK + "late.vcf", vcard("u-late")) == 201
    assert dav.delete(BOOK + "c0.vcf") == 200
    monkeypatch.undo()
    dav = server()
    assert changed(dav, token)[1] == {"late.vcf": 200, "c0.vcf": 404}
    assert dav.put(BOOK + "other.vcf", vcard("u-late")) == 409


def test_a_whole_calendar_put_is_flushed_once_not_per_item(server: Callable[..., Dav],
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """A PUT of a 60-event calendar writes the new collection folder with one file-system flush before it is
    renamed into place, not two fsyncs per event; every event is then served and listed by a sync, and
    fsync is on again for the next write."""
    from radicale import pathutils

    from inverse_cloud.dav.storage import collection as collection_mod

    fsyncs, flushes = [0], [0]
    real_fsync, real_flush = pathutils.fsync, collection_mod.flush_filesystem

    def counting_fsync(fd: int) -> None:
        fsyncs[0] += 1
        real_fsync(fd)

    def counting_flush(path: str) -> None:
        flushes[0] += 1
        real_flush(path)

    dav = server()
    monkeypatch.setattr(pathutils, "fsync", counting_fsync)
    monkeypatch.setattr(collection_mod, "flush_filesystem", counting_flush)
    events = "".join(f"BEGIN:VEVENT\r\nUID:e{i}\r\nDTSTART:20260101T{i % 24:02d}0000Z\r\nDURATION:PT1H\r\n"
                     f"SUMMARY:event {i}\r\nDTSTAMP:20260101T000000Z\r\nEND:VEVENT\r\n" for i in range(60))
    ics = "BEGIN:VCALENDAR\r\nVERSION:2.0\r\nPRODID:x\r\n" + events + "END:VCALENDAR\r\n"
    assert dav.request("PUT", "/alice/cal/", ics, content_type="text/calendar")[0] == 201
    assert flushes[0] == 1 and fsyncs[0] < 10, (flushes, fsyncs)
    assert len(dav.sync("/alice/cal/")[2]) == 60
    assert dav.app._storage._filesystem_fsync is True
