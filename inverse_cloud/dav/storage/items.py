"""Items of a listing answered from the index, read from their file only when their content is asked for.

A PROPFIND Depth 1 of an address book or a calendar asks, per item, for what the index holds: the etag
(Radicale's own, recorded from Radicale's item), the content type (made of the object's name, VCARD or
VCALENDAR, and its component, VEVENT, VTODO...: the index row's kind) and the last modification (the file's
mtime, as Radicale formats it). Radicale's listing reads every item's cache entry (file, text and all) to
answer that; :class:`IndexedItem` answers it from the index row, and reads the item through Radicale's own
``_get`` the first time anything else is asked (its text, its vobject, its time range), so every other
answer is Radicale's.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import radicale.item as radicale_item

__all__ = ["IndexedItem", "found"]


def found(item: radicale_item.Item) -> tuple[str, str, str]:
    """What the index records of an item Radicale read or wrote (index.Found): uid, etag, kind."""
    return item.uid, item.etag, f"{item.name}/{item.component_name}"


class IndexedItem(radicale_item.Item):
    """A listed item: uid, etag, name, component and last-modified from the index; the rest from ``load``.

    :raises RuntimeError: (when the content is first asked for) the file no longer holds an item; Radicale's
        wording, "Storage modified externally".
    """

    def __init__(self, collection: Any, href: str, uid: str, etag: str, name: str, component: str, mtime_s: float,
                 load: Callable[[str], radicale_item.Item | None]) -> None:
        super().__init__(collection=collection, href=href, text="", etag=etag, uid=uid, name=name,
                         component_name=component,
                         last_modified=time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(mtime_s)))
        self._text = None
        self._load = load
        self._item: radicale_item.Item | None = None

    def _real(self) -> radicale_item.Item:
        if self._item is None:
            assert self.href is not None
            item = self._load(self.href)
            if item is None:
                raise RuntimeError("Storage modified externally")
            self._item = item
        return self._item

    def serialize(self) -> str:
        if self._text is None:
            self._text = self._real().serialize()
        return self._text

    @property
    def vobject_item(self) -> Any:
        return self._real().vobject_item

    @property
    def time_range(self) -> tuple[int, int]:
        return self._real().time_range
