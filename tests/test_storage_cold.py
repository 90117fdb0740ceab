"""The storage plugin on a store it has never seen (a restore, a folder filled by vdirsyncer): the first
request reads every item once, and answers what stock Radicale answers."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from radicale import pathutils

from inverse_cloud.dav import storage as plugin
from inverse_cloud.dav.storage import collection as collection_mod
from tests.support.dav import Dav, radicale_app

BOOK = "/alice/book/"


def outside_card(i: int) -> str:
    # Not as vobject writes it (lower-case names, a long unfolded line, LF endings): Radicale's etag is of
    # its own serialization, not of these bytes.
    return (f"begin:VCARD\nversion:3.0\nuid:u{i}\nfn:Person {i}\nn:{i};Person;;;\n"
            f"note:{'x' * 120}\nend:VCARD\n")


def fill(store: Path, n: int) -> None:
    book = store / "collections" / "collection-root" / "alice" / "book"
    book.mkdir(parents=True)
    (book / ".Radicale.props").write_text(json.dumps({"tag": "VADDRESSBOOK"}))
    for i in range(n):
        (book / f"c{i}.vcf").write_text(outside_card(i))


@pytest.fixture
def counted(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, int]]:
    counts = {"fsync": 0, "flush": 0}
    real_fsync, real_flush = pathutils.fsync, collection_mod.flush_filesystem

    def fsync(fd: int) -> None:
        counts["fsync"] += 1
        real_fsync(fd)

    def flush(path: str) -> None:
        counts["flush"] += 1
        real_flush(path)

    monkeypatch.setattr(pathutils, "fsync", fsync)
    monkeypatch.setattr(collection_mod, "flush_filesystem", flush)
    yield counts


def test_first_sync_of_an_unseen_store_answers_as_stock_radicale_with_one_flush(
        tmp_path: Path, counted: dict[str, int]) -> None:
    """40 cards written behind every server's back. Stock Radicale on one copy and the plugin on another
    answer the first sync with the same hrefs and etags; the plugin writes Radicale's 40 item cache entries
    with one file-system flush (not an fsync per entry and per folder: this test failed before, with no
    flush and an fsync per entry), and stock Radicale then serves the plugin's copy from those entries
    with the same etags."""
    fill(tmp_path / "stock", 40)
    fill(tmp_path / "ours", 40)
    stock_app = radicale_app(tmp_path / "stock", "multifilesystem")
    _, _, stock = Dav(stock_app).sync(BOOK)
    app = radicale_app(tmp_path / "ours", plugin.PLUGIN)
    try:
        counted.update(fsync=0, flush=0)
        status, _, ours = Dav(app).sync(BOOK)
        assert status == 207 and len(ours) == 40
        assert ours == stock
        assert counted["flush"] == 1 and counted["fsync"] < 5, counted
        assert Dav(app).listing(BOOK) == Dav(stock_app).listing(BOOK)
    finally:
        app._storage.index.close()
    cache = tmp_path.joinpath("ours", "collections", "collection-root", "alice", "book", ".Radicale.cache", "item")
    entries = sorted(p.name for p in cache.iterdir() if not p.name.startswith("."))
    assert entries == sorted(f"c{i}.vcf" for i in range(40))
    again = Dav(radicale_app(tmp_path / "ours", "multifilesystem"))
    assert again.sync(BOOK)[2] == stock
