"""Storage locks per collection root (one user's folder), instead of Radicale's one lock for the whole store.

Radicale takes one readers-writer lock for every request: a write anywhere waits for every read, and every
read waits for any write. A PUT of a whole calendar of thousands of events holds that lock for seconds, and
meanwhile no other user's phone gets an answer. Requests on different roots never touch the same files, so
here a request locks only its own root, with Radicale's semantics inside it:

  a write on root R     excludes every other request on R (reads and writes), and whole-store reads
  a read on root R      excludes writes on R, and whole-store writes
  whole-store write     excludes everything (a request whose root is unknown, a PUT on "/", a MOVE's
                        second root is locked with its first, so a MOVE across roots is one request on two)
  whole-store read      excludes every write (PROPFIND on "/", a request whose root is not known)

The root of a read comes from the request path (:class:`ScopedApplication` tells the storage which root
the request in this thread is about); the root of a write from the path Radicale passes to
``acquire_lock``. Within a process these are :class:`RootLocks`; towards other processes (stock Radicale,
``radicale --verify-storage``) the process holds Radicale's own lock file exclusively while any request is
in progress (:class:`ProcessLock`), so another process on the same folder sees no request of ours half
done, as with Radicale's own lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from radicale import pathutils

__all__ = ["WHOLE_STORE", "ProcessLock", "RootLocks", "ScopedApplication", "root_of"]

# The "root" of a request that may touch any part of the store.
WHOLE_STORE = ""
# The headers that make Radicale take a request as proxied (and strip its script_name from the path).
_PROXY_HEADERS = ("HTTP_X_FORWARDED_FOR", "HTTP_X_FORWARDED_HOST", "HTTP_X_FORWARDED_PROTO",
                  "HTTP_X_FORWARDED_SERVER")


def root_of(path: str) -> str:
    """The collection root (first path segment) of a Radicale path; WHOLE_STORE for "/" itself."""
    return pathutils.sanitize_path(path).strip("/").split("/", 1)[0]


@dataclass
class _Root:
    readers: int = 0
    writer: bool = False


@dataclass
class RootLocks:
    """The in-process locks: one readers-writer lock per root, under a lock on the whole store.

    Writers are not preferred over readers (nor are they by Radicale's flock); a request holds a lock for
    the length of one request.
    """

    _cond: threading.Condition = field(default_factory=threading.Condition)
    _roots: dict[str, _Root] = field(default_factory=dict)
    _store_readers: int = 0
    _store_writer: bool = False
    _root_readers: int = 0          # requests holding a root read lock (any root)
    _root_writers: int = 0          # requests holding root write locks

    def _free(self, mode: str, roots: tuple[str, ...]) -> bool:
        if self._store_writer:
            return False
        if not roots:                                     # the whole store
            if mode == "w":
                return not (self._store_readers or self._root_readers or self._root_writers)
            return not self._root_writers
        if mode == "w" and self._store_readers:
            return False
        for name in roots:
            r = self._roots.get(name)
            if r is not None and (r.writer or mode == "w" and r.readers):
                return False
        return True

    @contextlib.contextmanager
    def hold(self, mode: str, roots: Iterable[str]) -> Iterator[None]:
        """Hold ``mode`` ("r" or "w") on ``roots`` (none, or WHOLE_STORE among them: the whole store)."""
        names = tuple(sorted(set(roots)))
        if WHOLE_STORE in names:
            names = ()
        with self._cond:
            self._cond.wait_for(lambda: self._free(mode, names))
            if not names:
                if mode == "w":
                    self._store_writer = True
                else:
                    self._store_readers += 1
            else:
                for name in names:
                    r = self._roots.setdefault(name, _Root())
                    if mode == "w":
                        r.writer = True
                    else:
                        r.readers += 1
                if mode == "w":
                    self._root_writers += 1
                else:
                    self._root_readers += 1
        try:
            yield
        finally:
            with self._cond:
                if not names:
                    if mode == "w":
                        self._store_writer = False
                    else:
                        self._store_readers -= 1
                else:
                    for name in names:
                        r = self._roots[name]
                        if mode == "w":
                            r.writer = False
                        else:
                            r.readers -= 1
                        if not r.readers and not r.writer:
                            del self._roots[name]
                    if mode == "w":
                        self._root_writers -= 1
                    else:
                        self._root_readers -= 1
                self._cond.notify_all()


class ProcessLock:
    """Radicale's lock file, held exclusively (flock) by this process while any of its requests runs.

    The first request in takes it (waiting, as Radicale does, for another process to finish); the last one
    out lets it go. Requests inside this process are ordered by :class:`RootLocks`.

    :raises RuntimeError: the lock cannot be taken (Radicale's wording: "Locking the storage failed").
    """

    def __init__(self, path: str) -> None:
        self._path = path
        self._cond = threading.Condition()
        self._users = 0
        self._fd: int | None = None
        self._taking = False

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        with self._cond:
            self._cond.wait_for(lambda: not self._taking)
            first = self._fd is None
            if first:
                self._taking = True
            else:
                self._users += 1
        if first:
            try:
                fd = os.open(self._path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX)
                except OSError:
                    os.close(fd)
                    raise
            except OSError as exc:
                with self._cond:
                    self._taking = False
                    self._cond.notify_all()
                raise RuntimeError(f"Locking the storage failed: {exc}") from exc
            with self._cond:
                self._fd, self._taking, self._users = fd, False, self._users + 1
                self._cond.notify_all()
        try:
            yield
        finally:
            with self._cond:
                self._users -= 1
                if not self._users and self._fd is not None:
                    os.close(self._fd)          # closing the descriptor releases the flock
                    self._fd = None


class ScopedApplication:
    """Radicale's WSGI application, telling the storage which root each request (in its thread) is about.

    ``_storage`` is Radicale's storage, as on Radicale's own application object.
    """

    def __init__(self, app: Any, set_root: Callable[[str | None], None]) -> None:
        self._app = app
        self._storage = app._storage
        self._set_root = set_root

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        # Behind a proxy (its headers), Radicale may strip a prefix from the path: its root is not known.
        proxied = any(environ.get(h) for h in _PROXY_HEADERS)
        self._set_root(None if proxied else root_of(environ.get("PATH_INFO", "")))
        try:
            # Radicale answers with the whole body in a list: every lock is released when it returns.
            return list(self._app(environ, start_response))
        finally:
            self._set_root(None)
