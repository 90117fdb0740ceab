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
        read: list[str] = []
        real_get = multifilesystem.Collection._get

        def counting_get(self: multifilesystem.Collection, href: str, verify_href: bool = True) -> object:
            read.append(href)
            return real_get(self, href, verify_href)

        monkeypatch.setattr(multifilesystem.Collection, "_get", counting_get)
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
