"""inverse-cloud's Radicale storage plugin (``[storage] type = inverse_cloud.dav.storage``).

Radicale's ``multifilesystem`` with a persisted index per collection (index.py): a PUT checks UID
uniqueness with one look-up instead of reading every item, and a sync-collection is answered from a
change log instead of hashing every item's history. The folder layout, the item files and Radicale's item
cache are Radicale's own (``radicale --verify-storage`` accepts the store; stock Radicale can serve it).

The plugin reaches into Radicale's internals (``_get``, ``_atomic_write``, the item cache), which change
between releases: it refuses to start on a Radicale outside the range it is tested against
(:data:`TESTED_RADICALE`), with one line, rather than serve wrong answers.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import threading
from collections.abc import Iterable, Iterator, Mapping
from typing import IO, Any, AnyStr, ClassVar

import radicale
import radicale.item as radicale_item
from radicale import config, pathutils
from radicale import storage as radicale_storage
from radicale.storage import multifilesystem

from inverse_cloud.dav.storage.collection import Collection
from inverse_cloud.dav.storage.index import Found, Index, IndexUnavailable
from inverse_cloud.dav.storage.items import found
from inverse_cloud.dav.storage.locks import WHOLE_STORE, ProcessLock, RootLocks, ScopedApplication, root_of

__all__ = ["INDEX_FILE", "PLUGIN", "TESTED_RADICALE", "Collection", "ScopedApplication", "Storage",
           "is_tested_radicale", "untested_radicale_message"]

log = logging.getLogger(__name__)

PLUGIN = "inverse_cloud.dav.storage"
# [first tested, first untested): the plugin overrides internals of Radicale 3.9's multifilesystem.
TESTED_RADICALE = ((3, 9, 0), (3, 10, 0))
# Next to Radicale's caches; the name starts with .Radicale.cache, so backups and snapshots that skip
# Radicale's caches skip it too (it is rebuilt from the item files).
INDEX_FILE = ".Radicale.cache.inverse-cloud-index.sqlite"


def is_tested_radicale(version: str) -> bool:
    """Whether Radicale ``version`` (e.g. "3.9.0") lies in :data:`TESTED_RADICALE`."""
    m = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?", version)
    if not m:
        return False
    v = (int(m.group(1)), int(m.group(2)), int(m.group(3) or 0))
    return TESTED_RADICALE[0] <= v < TESTED_RADICALE[1]


def untested_radicale_message(version: str) -> str:
    lo, hi = (".".join(map(str, v)) for v in TESTED_RADICALE)
    return (f"Radicale {version} is installed, but inverse-cloud's storage is tested with Radicale >={lo},<{hi}: "
            f"install that (pip install 'radicale>={lo},<{hi}'), or set [radicale.storage] type = "
            f"\"multifilesystem\" to serve with Radicale's own storage")


class Storage(multifilesystem.Storage):
    """``multifilesystem.Storage`` whose collections answer from the index; see the module docstring.

    :raises RuntimeError: the installed Radicale is outside :data:`TESTED_RADICALE`.
    """

    _collection_class: ClassVar[type[multifilesystem.Collection]] = Collection

    def __init__(self, configuration: config.Configuration) -> None:
        if not is_tested_radicale(radicale.VERSION):
            raise RuntimeError(untested_radicale_message(radicale.VERSION))
        self._request = threading.local()       # .root: the request root of this thread (ScopedApplication)
        self._deferred = threading.local()      # .on: this thread's writes are flushed later (syncfs)
        super().__init__(configuration)
        folder = configuration.get("storage", "filesystem_cache_folder") or self._filesystem_folder
        self._makedirs_synced(folder)
        self.index = Index(os.path.join(folder, INDEX_FILE),
                           max_token_age_s=float(configuration.get("storage", "max_sync_token_age")),
                           max_item_bytes=int(self._max_resource_size))
        # Locks per collection root (locks.py), unless something may act across roots while a lock is held:
        # a storage hook (run under the lock, e.g. a git commit of the whole folder), sharing (a request's
        # path is mapped to another user's collection), or rights other than owner_only (a request may read
        # other roots).
        self._per_root = (not configuration.get("storage", "hook")
                          and configuration.get("sharing", "type") == "none"
                          and configuration.get("rights", "type") == "owner_only")
        self._root_locks = RootLocks()
        self._process_lock = ProcessLock(os.path.join(self._filesystem_folder, ".Radicale.lock"))

    def scoped(self, app: Any) -> ScopedApplication:
        """``app`` (Radicale's application on this storage), telling the storage each request's root, so
        that a read locks only its root (without it, every read locks the whole store)."""
        return ScopedApplication(app, self._set_request_root)

    def _set_request_root(self, root: str | None) -> None:
        self._request.root = root

    @contextlib.contextmanager
    def acquire_lock(self, mode: str, user: str = "", *args: Any, **kwargs: Any) -> Iterator[None]:
        """Radicale's storage lock, per collection root (locks.py): a write locks the roots of ``path`` (and
        a MOVE's ``to_path``); a read the root of the request in this thread; anything else the whole store.
        With a hook, sharing or other rights, Radicale's own lock of the whole store."""
        if not self._per_root:
            with super().acquire_lock(mode, user, *args, **kwargs):
                yield
            return
        if mode not in ("r", "w"):
            raise ValueError(f"Invalid mode: {mode!r}")
        if mode == "w":
            paths = [p for p in (kwargs.get("path"), kwargs.get("to_path")) if p]
            roots = [root_of(p) for p in paths] if paths else [WHOLE_STORE]
        else:
            root = getattr(self._request, "root", None)
            roots = [WHOLE_STORE if root is None else root]
        with self._process_lock.held(), self._root_locks.hold(mode, roots):
            yield

    @contextlib.contextmanager
    def deferred_flush(self) -> Iterator[None]:
        """This thread's writes skip fsync until the block ends; the caller flushes them (syncfs)."""
        self._deferred.on = True
        try:
            yield
        finally:
            self._deferred.on = False

    def _fsync(self, f: IO[AnyStr]) -> None:
        if not getattr(self._deferred, "on", False):
            super()._fsync(f)

    def _sync_directory(self, path: str) -> None:
        if not getattr(self._deferred, "on", False):
            super()._sync_directory(path)

    def record(self, collection: Collection, changes: dict[str, Found | None]) -> None:
        """Tell the index about our own write. The files are written already: if the index cannot take
        it, the collection is compared with its files at its next use."""
        try:
            self.index.record(collection, changes)
        except IndexUnavailable:
            pass

    def forget(self, path: str) -> None:
        try:
            self.index.forget(path)
        except IndexUnavailable:
            pass

    def move(self, item: radicale_item.Item, to_collection: radicale_storage.BaseCollection, to_href: str) -> None:
        """Radicale's ``move`` (file and item cache entry), the change recorded in both collections' index."""
        if not pathutils.is_safe_filesystem_path_component(to_href):
            raise pathutils.UnsafePathError(to_href)
        src = item.collection
        assert isinstance(to_collection, Collection) and isinstance(src, Collection) and item.href
        move_from = pathutils.path_to_filesystem(src._filesystem_path, item.href, self._is_collision_free)
        move_to = pathutils.path_to_filesystem(to_collection._filesystem_path, to_href, self._is_collision_free)
        try:
            os.replace(move_from, move_to)
        except OSError as e:
            raise ValueError(f"Failed to move file {move_from!r} => {move_to!r} {e}") from e
        self._sync_directory(to_collection._filesystem_path)
        if src._filesystem_path != to_collection._filesystem_path:
            self._sync_directory(src._filesystem_path)
        cache_from = self._get_collection_cache_subfolder(src._filesystem_path, ".Radicale.cache", "item")
        cache_to = self._get_collection_cache_subfolder(to_collection._filesystem_path, ".Radicale.cache", "item")
        self._makedirs_synced(cache_to)
        try:
            os.replace(os.path.join(cache_from, item.href), os.path.join(cache_to, to_href))
        except FileNotFoundError:
            pass
        except OSError as e:
            log.warning("storage: moving the cache entry of %r failed: %s", item.href, e)
        if src.path == to_collection.path:
            self.record(src, {item.href: None, to_href: found(item)})
        else:
            self.record(src, {item.href: None})
            self.record(to_collection, {to_href: found(item)})

    def create_collection(self, href: str, items: Iterable[radicale_item.Item] | None = None,
                          props: Mapping[str, str] | None = None) -> Any:
        """Radicale's ``create_collection``. With ``props`` it writes a new folder (MKCOL, or a PUT of a whole
        calendar replacing one): its tokens start afresh, as Radicale's do."""
        result = super().create_collection(href, items=items, props=props)
        if props:
            self.forget(pathutils.strip_path(href))
        return result
