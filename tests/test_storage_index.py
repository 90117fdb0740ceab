"""The storage index's look-ups cost the same in a collection of 100 items as in one of 3,000: counted in
SQLite's virtual-machine steps (deterministic), not in time. A look-up that walks the collection's rows,
as a query plan SQLite picks by itself can, fails here."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from inverse_cloud.dav.storage.index import Found, Index


class PlainFolder:
    """index.Folder over a plain folder: every file is an item; its uid and etag come from its name."""

    path = "alice/book"

    def __init__(self, fs: Path) -> None:
        self.filesystem_path = str(fs)

    def is_item_name(self, name: str) -> bool:
        return not name.startswith(".")

    def read_items(self, hrefs: list[str]) -> dict[str, Found | None]:
        return {h: (f"uid-{h}", f'"etag-{h}"', "VCARD/") for h in hrefs}


def vm_steps(index: Index, call: Callable[[], object]) -> int:
    """SQLite virtual-machine steps (in tens) that ``call`` makes the index's connection run."""
    db = index._conn()
    ticks = [0]

    def tick() -> int:
        ticks[0] += 1
        return 0

    db.set_progress_handler(tick, 10)
    try:
        call()
    finally:
        db.set_progress_handler(None, 0)
    return ticks[0]


@pytest.mark.parametrize("lookup", ["has_uid", "state"])
def test_a_lookup_does_not_walk_the_collection(tmp_path: Path, lookup: str) -> None:
    """``has_uid`` (every PUT asks it) and ``state`` (the collection's etag and last-modified, which every
    PROPFIND of the collection asks) cost the same at 3,000 items as at 100. Both failed before: SQLite
    picked the primary key over the uid index by itself, and the newest mtime had no index, so each
    walked every row (9 ms and 11 ms at 50,000 items). The answers are checked too."""
    costs: dict[int, int] = {}
    for n in (100, 3000):
        fs = tmp_path / f"c{n}"
        fs.mkdir()
        for i in range(n):
            (fs / f"h{i}.vcf").write_bytes(b"x" * (i % 7 + 1))
            os.utime(fs / f"h{i}.vcf", ns=(i * 1000, i * 1000))
        index = Index(str(tmp_path / f"index-{n}.sqlite"), 30 * 86400.0, 1 << 20)
        folder = PlainFolder(fs)
        try:
            assert index.has_uid(folder, "uid-h1.vcf") and not index.has_uid(folder, "uid-absent")
            assert index.state(folder)[2] == (n - 1) * 1000          # the newest item's mtime
            if lookup == "has_uid":
                costs[n] = vm_steps(index, lambda i=index, f=folder: i.has_uid(f, "uid-absent"))
            else:
                costs[n] = vm_steps(index, lambda i=index, f=folder: i.state(f))
        finally:
            index.close()
    assert costs[3000] <= 2 * costs[100] + 5, costs
