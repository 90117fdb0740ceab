"""Radicale's multifilesystem collection with the index answering what would read every item.

Overridden: ``has_uid`` (every PUT), ``sync`` (every sync-collection, and the token in PROPFIND),
``etag`` (the CTag) and ``last_modified``; ``upload`` and ``delete`` do what Radicale's do, except that
the change goes to the index instead of Radicale's per-item history files (whose clean-up lists the
whole history folder on every write). Everything else, the files and Radicale's item cache included, is
Radicale's own code: reads, listings, reports and the layout on disk are unchanged, and stock Radicale
can serve the same folder at any time (its sync tokens then start afresh, which clients handle by a
full sync).

Whenever the index cannot answer (``IndexUnavailable``), the method falls back to Radicale's own.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import os
import pickle
import stat
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from hashlib import sha256
from typing import IO, TYPE_CHECKING, Any, TextIO, cast

import radicale.item as radicale_item
from radicale import pathutils, storage
from radicale.storage import multifilesystem
from radicale.storage.multifilesystem.cache import CacheContent

from inverse_cloud.dav.storage.index import Found, IndexUnavailable
from inverse_cloud.dav.storage.items import IndexedItem, found

if TYPE_CHECKING:
    from inverse_cloud.dav.storage import Storage

__all__ = ["Collection", "flush_filesystem"]


def flush_filesystem(path: str) -> None:
    """Write everything dirty on the file system holding ``path`` to disk (Linux syncfs; elsewhere sync).

    :raises OSError: the flush failed (an I/O error: the data may not be on disk).
    """
    fd = os.open(path, os.O_RDONLY)
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        syncfs = getattr(libc, "syncfs", None)
        if syncfs is None:
            os.sync()
        elif syncfs(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"syncfs {path}: {os.strerror(err)}")
    finally:
        os.close(fd)


@dataclass
class _CacheBatch:
    folder: str
    hrefs: set[str] = field(default_factory=set)


class Collection(multifilesystem.Collection):
    _storage: Storage
    _cache_batch: _CacheBatch | None = None

    # --- what the index needs (index.Folder) ------------------------------------------------------

    @property
    def filesystem_path(self) -> str:
        return self._filesystem_path

    def is_item_name(self, name: str) -> bool:
        return bool(pathutils.is_safe_filesystem_path_component(name))

    def read_items(self, hrefs: list[str]) -> dict[str, Found | None]:
        """Each item through Radicale's ``_get``; the item cache entries it writes (every item, on a store
        the index has never seen) are made durable together (see :meth:`_store_item_cache`)."""
        if len(hrefs) < 2:
            return {href: self.read_item(href) for href in hrefs}
        cache_folder = self._storage._get_collection_cache_subfolder(self._filesystem_path, ".Radicale.cache",
                                                                     "item")
        self._storage._makedirs_synced(cache_folder)
        with tempfile.TemporaryDirectory(prefix=".Radicale.tmp-", dir=cache_folder) as tmp:
            self._cache_batch = _CacheBatch(tmp)
            try:
                found = {href: self.read_item(href) for href in hrefs}
                self._commit_cache_batch(cache_folder)
            finally:
                self._cache_batch = None
        return found

    def read_item(self, href: str) -> Found | None:
        item = self._read(href)
        return None if item is None else found(item)

    def _store_item_cache(self, href: str, item: radicale_item.Item, cache_hash: str = "") -> Any:
        """Radicale's, except within :meth:`read_items`: there the entry is written (without fsync) into the
        batch's folder, and moved into place with the others once they are all on disk (one syncfs), so
        each entry Radicale can read is whole, as with Radicale's fsync per entry."""
        batch = self._cache_batch
        if batch is None or not cache_hash:
            return super()._store_item_cache(href, item, cache_hash)
        content = self._item_cache_content(item)
        with open(os.path.join(batch.folder, href), "wb") as fb:
            pickle.dump((cache_hash, *content), fb)
        batch.hrefs.add(href)
        return content

    def _load_item_cache(self, href: str, cache_hash: str) -> Any:
        batch = self._cache_batch
        if batch is not None and href in batch.hrefs:
            with open(os.path.join(batch.folder, href), "rb") as f:
                hash_, *rest = pickle.load(f)  # noqa: S301 (our own entry, just written)
            if hash_ == cache_hash:
                return CacheContent(*rest)
        return super()._load_item_cache(href, cache_hash)

    def _commit_cache_batch(self, cache_folder: str) -> None:
        batch = self._cache_batch
        if batch is None or not batch.hrefs:
            return
        if self._storage._filesystem_fsync:
            flush_filesystem(batch.folder)
        for href in batch.hrefs:
            os.replace(os.path.join(batch.folder, href), os.path.join(cache_folder, href))
        self._storage._sync_directory(cache_folder)

    # --- listings answered by the index (items.py) -------------------------------------------------

    _indexed: dict[str, tuple[str, str, str | None, int, int]] | None = None

    def _list(self) -> Iterator[str]:
        """Radicale's listing; for an address book or a calendar, the index's rows are fetched along (one
        query), and ``_get`` of a listed item whose file still matches its row answers from the row."""
        names = list(super()._list())
        self._indexed = None
        if names and self.tag in ("VADDRESSBOOK", "VCALENDAR"):
            try:
                self._indexed = self._storage.index.live_rows(self)
            except IndexUnavailable:
                pass
        return iter(names)

    def _get(self, href: str, verify_href: bool = True) -> radicale_item.Item | None:
        rows = self._indexed
        row = None if rows is None or verify_href else rows.get(href)
        if row is not None and row[2] is not None:
            try:
                st = os.stat(os.path.join(self._filesystem_path, href))
            except OSError:
                st = None
            if st is not None and stat.S_ISREG(st.st_mode) and (st.st_size, st.st_mtime_ns) == row[3:]:
                name, _, component = row[2].partition("/")
                return IndexedItem(self, href, row[0], row[1], name, component, st.st_mtime, self._read)
        return super()._get(href, verify_href)

    def _read(self, href: str) -> radicale_item.Item | None:
        return super()._get(href, verify_href=False)

    # --- answered by the index --------------------------------------------------------------------

    def has_uid(self, uid: str) -> bool:
        try:
            return self._storage.index.has_uid(self, uid)
        except IndexUnavailable:
            return bool(super().has_uid(uid))

    def sync(self, old_token: str = "") -> tuple[str, Iterable[str]]:
        try:
            return self._storage.index.sync(self, old_token)
        except IndexUnavailable:
            return super().sync(old_token)

    @property
    def etag(self) -> str:
        try:
            gen, seq, _ = self._storage.index.state(self)
        except IndexUnavailable:
            return super().etag
        digest = sha256(f"{gen}/{seq}/".encode())
        digest.update(json.dumps(self.get_meta(), sort_keys=True).encode())
        return f'"{digest.hexdigest()}"'

    @property
    def last_modified(self) -> str:
        try:
            _, _, newest_ns = self._storage.index.state(self)
        except IndexUnavailable:
            return super().last_modified
        last = max(os.path.getmtime(self._filesystem_path), newest_ns / 1e9)
        if os.path.exists(self._props_path):
            last = max(last, os.path.getmtime(self._props_path))
        return time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(last))

    def get_multi(self, hrefs: Iterable[str]) -> Iterator[tuple[str, radicale_item.Item | None]]:
        """Radicale's ``get_multi`` without its listing of the folder, where the folder cannot hold two names
        for one file: the listing exists to catch case-insensitive matches, and costs a multiget (and the
        items of an incremental sync) time in proportion to the collection's size."""
        if not self._is_collision_free:
            yield from super().get_multi(hrefs)
            return
        for href in hrefs:
            if not pathutils.is_safe_filesystem_path_component(href):
                yield href, None
                continue
            if pathutils.file_check_size(os.path.join(self._filesystem_path, href), self._storage._max_resource_size):
                yield href, self._get(href, verify_href=False)

    # --- writes -----------------------------------------------------------------------------------

    def _upload_all_nonatomic(self, items: Iterable[radicale_item.Item], suffix: str = "") -> None:
        """Radicale's bulk write of a new collection (MKCOL with items, a PUT of a whole calendar or address
        book) into a temporary folder that is renamed into place afterwards. Nothing can see the folder
        before that rename, so instead of two fsyncs per item (file and cache entry) the files are flushed
        once, with syncfs(2), before Radicale renames the folder and syncs its parent.

        Only this thread's writes skip fsync (Storage.deferred_flush): requests on other roots may be
        writing at the same time, and theirs are flushed as usual.
        """
        st = self._storage
        if not st._filesystem_fsync:
            super()._upload_all_nonatomic(items, suffix)
            return
        with st.deferred_flush():
            super()._upload_all_nonatomic(items, suffix)
        flush_filesystem(self._filesystem_path)
        st._sync_directory(st._get_collection_cache_subfolder(self._filesystem_path, ".Radicale.cache", "item"))
        st._sync_directory(self._filesystem_path)

    def upload(self, href: str, item: radicale_item.Item
               ) -> tuple[radicale_item.Item, radicale_item.Item | None]:
        """Radicale's ``upload`` (same file, same item cache entry), the change recorded in the index."""
        if not pathutils.is_safe_filesystem_path_component(href):
            raise pathutils.UnsafePathError(href)
        path = pathutils.path_to_filesystem(self._filesystem_path, href, self._is_collision_free)
        old_item = self._get(href, verify_href=False)
        try:
            fo: IO[Any]
            with self._atomic_write(path, newline="") as fo:
                cast(TextIO, fo).write(item.serialize())
        except Exception as e:
            raise ValueError(f"Failed to store item {href!r} in collection {self.path!r}: {e}") from e
        if self._storage._use_mtime_and_size_for_item_cache:
            st = os.stat(path)
            cache_hash = self._item_cache_mtime_and_size(st.st_size, st.st_mtime_ns)
        else:
            cache_hash = self._item_cache_hash(item.serialize().encode(self._encoding))
        try:
            self._store_item_cache(href, item, cache_hash)
        except Exception as e:
            raise ValueError(f"Failed to store item cache of {href!r} in collection {self.path!r}: {e}") from e
        self._storage.record(self, {href: found(item)})
        uploaded_item = self._get(href, verify_href=False)
        if uploaded_item is None:
            raise RuntimeError("Storage modified externally")
        return uploaded_item, old_item

    def delete(self, href: str | None = None) -> None:
        """Radicale's ``delete``; an item's removal is recorded in the index, a collection's ends its tokens."""
        if href is None:
            super().delete(None)
            self._storage.forget(self.path)
            return
        if not pathutils.is_safe_filesystem_path_component(href):
            raise pathutils.UnsafePathError(href)
        path = pathutils.path_to_filesystem(self._filesystem_path, href, self._is_collision_free)
        if not os.path.isfile(path):
            raise storage.ComponentNotFoundError(href)
        os.remove(path)
        self._storage._sync_directory(os.path.dirname(path))
        self._storage.record(self, {href: None})
        cache_folder = self._storage._get_collection_cache_subfolder(os.path.dirname(path), ".Radicale.cache",
                                                                     "item")
        cache_file = os.path.join(cache_folder, os.path.basename(path))
        if os.path.isfile(cache_file):
            os.remove(cache_file)
            self._storage._sync_directory(cache_folder)
