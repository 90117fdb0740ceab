"""Listings answered from the index (inverse_cloud.dav.storage.items): a PROPFIND Depth 1 of an address book
reads no item, and still answers what stock Radicale answers."""

from __future__ import annotations

from pathlib import Path

import pytest
from radicale.storage import multifilesystem

from inverse_cloud.dav import storage as plugin
from tests.support.dav import Dav, collection_tokens_masked, radicale_app, vcard

BOOK = "/alice/book/"
PROPS = ('<?xml version="1.0"?><d:propfind xmlns:d="DAV:"><d:prop><d:resourcetype/><d:getetag/>'
         '<d:getcontenttype/><d:getlastmodified/></d:prop></d:propfind>')


def body(dav: Dav, props: str) -> bytes:
    status, out = dav.request("PROPFIND", BOOK, props, depth="1")
    assert status == 207
    return collection_tokens_masked(out)


def counting_reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    read: list[str] = []
    real_get = multifilesystem.Collection._get

    def counting_get(self: multifilesystem.Collection, href: str, verify_href: bool = True) -> object:
        read.append(href)
        return real_get(self, href, verify_href)

    monkeypatch.setattr(multifilesystem.Collection, "_get", counting_get)
    return read


def test_propfind_of_an_address_book_reads_no_item_and_answers_as_stock(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """20 cards on both sides; once the index knows them, the plugin's PROPFIND Depth 1 (etag, content type,
    last-modified) reads no item (this test failed before: every item's cache entry was read), and its body
    equals stock Radicale's on the same files. A card rewritten behind the server's back (another size) is
    read from its file and listed with its new etag, as stock lists it; a PROPFIND asking for the content
    length reads the items (their text) and also answers as stock. (The collection's own etag, made from
    the index's change log, is masked.)"""
    app = radicale_app(tmp_path / "s", plugin.PLUGIN)
    dav = Dav(app)
    try:
        assert dav.mkcol(BOOK) == 201
        for i in range(20):
            assert dav.put(f"{BOOK}c{i}.vcf", vcard(f"u{i}")) == 201
        dav.sync(BOOK)
        stock = Dav(radicale_app(tmp_path / "s", "multifilesystem"))
        read = counting_reads(monkeypatch)
        status, ours = dav.request("PROPFIND", BOOK, PROPS, depth="1")
        assert status == 207 and ours.count(b"<response>") == 21
        assert read == []
        monkeypatch.undo()
        assert collection_tokens_masked(ours) == body(stock, PROPS)

        (tmp_path / "s/collections/collection-root/alice/book/c3.vcf").write_text(vcard("u3", "Rewritten by hand"))
        assert body(dav, PROPS) == body(stock, PROPS)
        length = PROPS.replace("<d:getlastmodified/>", "<d:getcontentlength/>")
        assert body(dav, length) == body(stock, length)
    finally:
        app._storage.index.close()


CAL = "/alice/cal/"


def ics(uid: str, component: str = "VEVENT", summary: str = "one") -> str:
    when = ("DTSTART:20260101T100000Z\r\nDTEND:20260101T110000Z\r\n" if component == "VEVENT"
            else "DUE:20260102T100000Z\r\n")
    return (f"BEGIN:VCALENDAR\r\nVERSION:2.0\r\nPRODID:x\r\nBEGIN:{component}\r\nUID:{uid}\r\n{when}"
            f"SUMMARY:{summary}\r\nDTSTAMP:20260101T000000Z\r\nEND:{component}\r\nEND:VCALENDAR\r\n")


def calendar_body(dav: Dav, props: str = PROPS) -> bytes:
    status, out = dav.request("PROPFIND", CAL, props, depth="1")
    assert status == 207
    return collection_tokens_masked(out)


def test_propfind_of_a_calendar_reads_no_item_and_names_each_items_component(tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Events and tasks in one calendar: once the index knows them, PROPFIND Depth 1 reads no item (this
    failed before: a calendar's listing read every item, as the index did not hold the component type that
    the content type names) and its body equals stock Radicale's on the same files, with
    ``component=VEVENT`` or ``component=VTODO`` per item. An event rewritten by hand as a task is read and
    listed as a task, as stock lists it."""
    app = radicale_app(tmp_path / "s", plugin.PLUGIN)
    dav = Dav(app)
    try:
        assert dav.mkcol(CAL, "calendar") == 201
        for i in range(12):
            component = "VTODO" if i % 3 == 0 else "VEVENT"
            assert dav.request("PUT", f"{CAL}e{i}.ics", ics(f"e{i}", component), content_type="text/calendar")[0] == 201
        dav.sync(CAL)
        stock = Dav(radicale_app(tmp_path / "s", "multifilesystem"))
        read = counting_reads(monkeypatch)
        status, ours = dav.request("PROPFIND", CAL, PROPS, depth="1")
        assert status == 207 and ours.count(b"<response>") == 13
        assert read == []
        monkeypatch.undo()
        assert ours.count(b"component=VTODO") == 4 and ours.count(b"component=VEVENT") == 8
        assert collection_tokens_masked(ours) == calendar_body(stock)

        (tmp_path / "s/collections/collection-root/alice/cal/e1.ics").write_text(ics("e1", "VTODO", "now a task"))
        assert calendar_body(dav) == calendar_body(stock)
        assert calendar_body(dav).count(b"component=VTODO") == 5
    finally:
        app._storage.index.close()


def test_an_index_from_before_component_types_keeps_its_tokens_and_learns_them(tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """A schema 1 index (no component column, as written by earlier versions) is upgraded in place: a sync
    token handed out before still gets "no changes", and after that first comparison, which reads the
    items once through Radicale's item cache, a PROPFIND reads no item."""
    import sqlite3

    app = radicale_app(tmp_path / "s", plugin.PLUGIN)
    dav = Dav(app)
    assert dav.mkcol(CAL, "calendar") == 201
    for i in range(5):
        assert dav.request("PUT", f"{CAL}e{i}.ics", ics(f"e{i}"), content_type="text/calendar")[0] == 201
    _, token, _ = dav.sync(CAL)
    db_path = app._storage.index._db_path
    app._storage.index.close()
    db = sqlite3.connect(db_path)
    db.executescript(   # schema 1's table, exactly
        "CREATE TABLE items1(coll INTEGER NOT NULL, href TEXT NOT NULL, uid TEXT, etag TEXT, size INTEGER, "
        "mtime_ns INTEGER, seq INTEGER NOT NULL, deleted_at REAL, PRIMARY KEY(coll, href)) WITHOUT ROWID;"
        "INSERT INTO items1 SELECT coll, href, uid, etag, size, mtime_ns, seq, deleted_at FROM items;"
        "DROP TABLE items; ALTER TABLE items1 RENAME TO items;"
        "CREATE INDEX items_uid ON items(coll, uid); CREATE INDEX items_seq ON items(coll, seq);"
        "UPDATE meta SET value='1' WHERE key='schema';")
    db.close()

    app = radicale_app(tmp_path / "s", plugin.PLUGIN)
    dav = Dav(app)
    try:
        status, token_after, changed = dav.sync(CAL, token)
        assert status == 207 and changed == {} and token_after == token
        read = counting_reads(monkeypatch)
        assert calendar_body(dav).count(b"component=VEVENT") == 5
        assert read == []
    finally:
        app._storage.index.close()
    db = sqlite3.connect(db_path)
    try:
        assert db.execute("SELECT value FROM meta WHERE key='schema'").fetchone() == ("2",)
        assert db.execute("SELECT count(*) FROM items WHERE kind='VCALENDAR/VEVENT'").fetchone() == (5,)
    finally:
        db.close()
