"""Which entries of the collection folders changed: Linux inotify through ctypes (the stdlib has no binding).

The index trusts its rows for a folder only while a watch on that folder says nothing changed there.
A write by anyone (this process, an editor, vdirsyncer, a restore) queues its event inside the writing
system call, so a change completed before :meth:`DirWatcher.drain` returns is always reported. What a
watch cannot see (no inotify, the watch limit reached, a queue overflow) is reported as "everything
changed", and the index then compares every file with its row: slower, never stale.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import struct
from dataclasses import dataclass, field

__all__ = ["Changes", "DirWatcher"]

_IN_MODIFY = 0x00000002
_IN_ATTRIB = 0x00000004
_IN_CLOSE_WRITE = 0x00000008
_IN_MOVED_FROM = 0x00000040
_IN_MOVED_TO = 0x00000080
_IN_CREATE = 0x00000100
_IN_DELETE = 0x00000200
_IN_DELETE_SELF = 0x00000400
_IN_MOVE_SELF = 0x00000800
_IN_Q_OVERFLOW = 0x00004000
_IN_IGNORED = 0x00008000
_IN_ONLYDIR = 0x01000000
_IN_NONBLOCK = 0o4000
_IN_CLOEXEC = 0o2000000
# Content, size/mtime (Radicale's item cache key), and every way a name appears or disappears.
_MASK = (_IN_MODIFY | _IN_ATTRIB | _IN_CLOSE_WRITE | _IN_MOVED_FROM | _IN_MOVED_TO | _IN_CREATE | _IN_DELETE
         | _IN_DELETE_SELF | _IN_MOVE_SELF | _IN_ONLYDIR)
_SELF = _IN_DELETE_SELF | _IN_MOVE_SELF | _IN_IGNORED
_EVENT = struct.Struct("iIII")


@dataclass
class Changes:
    """What :meth:`DirWatcher.drain` saw: names per watched folder, folders that changed as a whole."""

    names: dict[str, set[str]] = field(default_factory=dict)
    whole: set[str] = field(default_factory=set)
    overflow: bool = False


class DirWatcher:
    """inotify watches on folders (not recursive). Not thread-safe: the index calls it under its lock.

    :raises OSError: inotify is not available (not Linux, or the instance limit is reached).
    """

    def __init__(self) -> None:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        self._add = libc.inotify_add_watch
        self._add.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
        self._rm = libc.inotify_rm_watch
        self._rm.argtypes = [ctypes.c_int, ctypes.c_int]
        fd = libc.inotify_init1(_IN_NONBLOCK | _IN_CLOEXEC)
        if fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"inotify_init1: {os.strerror(err)}")
        self._fd: int | None = fd
        self._paths: dict[int, str] = {}
        self._wds: dict[str, int] = {}

    def watch(self, path: str) -> None:
        """Watch the folder at ``path`` (again: a folder replaced under the same path gets a new watch).

        :raises OSError: the folder is missing, or the watch limit (fs.inotify.max_user_watches) is reached.
        """
        if self._fd is None:
            raise OSError("watcher closed")
        self.unwatch(path)
        wd = self._add(self._fd, os.fsencode(path), _MASK)
        if wd < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"inotify_add_watch {path}: {os.strerror(err)}")
        old = self._paths.get(wd)
        if old is not None and old != path:
            self._wds.pop(old, None)    # the same folder under another path: one watch, the newer path
        self._paths[wd] = path
        self._wds[path] = wd

    def unwatch(self, path: str) -> None:
        wd = self._wds.pop(path, None)
        if wd is not None:
            self._paths.pop(wd, None)
            if self._fd is not None:
                self._rm(self._fd, wd)    # EINVAL when the kernel already dropped it: nothing to do

    def is_watching(self, path: str) -> bool:
        return path in self._wds

    def drain(self) -> Changes:
        """Everything queued since the last call. Never blocks."""
        out = Changes()
        if self._fd is None:
            return out
        while True:
            try:
                buf = os.read(self._fd, 1 << 16)
            except BlockingIOError:
                return out
            pos = 0
            while pos + _EVENT.size <= len(buf):
                wd, mask, _cookie, length = _EVENT.unpack_from(buf, pos)
                raw = buf[pos + _EVENT.size:pos + _EVENT.size + length]
                pos += _EVENT.size + length
                if mask & _IN_Q_OVERFLOW:
                    out.overflow = True
                    continue
                path = self._paths.get(wd)
                if path is None:
                    continue
                if mask & _SELF:
                    out.whole.add(path)
                    if mask & _IN_IGNORED:       # the kernel removed the watch (folder deleted)
                        self._paths.pop(wd, None)
                        self._wds.pop(path, None)
                    continue
                name = os.fsdecode(raw.split(b"\0", 1)[0])
                if name:
                    out.names.setdefault(path, set()).add(name)

    def __del__(self) -> None:
        self.close()

    def close(self) -> None:
        if getattr(self, "_fd", None) is not None:
            assert self._fd is not None
            os.close(self._fd)
            self._fd = None
        self._paths.clear()
        self._wds.clear()
