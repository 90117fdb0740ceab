"""The storage plugin's locks per collection root (inverse_cloud.dav.storage.locks), through Radicale's WSGI
app in this process: a big write on one user's root holds up no other user, and still excludes every
request on its own root, as Radicale's lock of the whole store does."""

from __future__ import annotations

import base64
import fcntl
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from inverse_cloud.dav import storage as plugin
from inverse_cloud.dav.storage import locks
from tests.support import wait_until
from tests.support.dav import Dav, radicale_app, vcard


@pytest.fixture
def two_users(tmp_path: Path) -> Iterator[tuple[Dav, Dav]]:
    app = radicale_app(tmp_path / "store", plugin.PLUGIN)
    (tmp_path / "store.users").write_text("alice:pw\nbob:pw2\n")
    alice, bob = Dav(app), Dav(app)
    bob.auth = "Basic " + base64.b64encode(b"bob:pw2").decode()
    yield alice, bob
    app._storage.index.close()


def calendar(n: int) -> str:
    events = "".join(f"BEGIN:VEVENT\r\nUID:e{i}\r\nDTSTART:20260101T{i % 24:02d}0000Z\r\nDURATION:PT1H\r\n"
                     f"SUMMARY:event {i}\r\nDTSTAMP:20260101T000000Z\r\nEND:VEVENT\r\n" for i in range(n))
    return "BEGIN:VCALENDAR\r\nVERSION:2.0\r\nPRODID:x\r\n" + events + "END:VCALENDAR\r\n"


class Stall:
    """Holds alice's whole-calendar write inside its lock until released."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.entered, self.release = threading.Event(), threading.Event()
        self.order: list[str] = []
        real = plugin.Collection._upload_all_nonatomic

        def stalled(col: plugin.Collection, items: object, suffix: str = "") -> None:
            self.entered.set()
            assert self.release.wait(60), "the test never released the import"
            real(col, items, suffix)  # type: ignore[arg-type]
            self.order.append("import written")

        monkeypatch.setattr(plugin.Collection, "_upload_all_nonatomic", stalled)


def run(target: Callable[[], object], results: dict[str, object], name: str) -> threading.Thread:
    t = threading.Thread(target=lambda: results.__setitem__(name, target()), daemon=True)
    t.start()
    return t


def test_another_users_requests_are_answered_while_a_big_import_holds_its_lock(
        two_users: tuple[Dav, Dav], monkeypatch: pytest.MonkeyPatch) -> None:
    """Alice PUTs a whole calendar; its write is stalled inside the storage lock. Meanwhile Bob's sync,
    listing, PUT and DELETE on his own book are all answered (they would wait for the import under
    Radicale's lock of the whole store: this test failed before, with Bob's sync stuck until the release).
    Once released, the import is complete and served."""
    alice, bob = two_users
    assert bob.mkcol("/bob/book/") == 201
    assert bob.put("/bob/book/a.vcf", vcard("b-a")) == 201
    _, token, _ = bob.sync("/bob/book/")
    stall = Stall(monkeypatch)
    results: dict[str, object] = {}
    importer = run(lambda: alice.request("PUT", "/alice/cal/", calendar(200), content_type="text/calendar")[0],
                   results, "import")
    try:
        assert stall.entered.wait(60)
        assert bob.put("/bob/book/b.vcf", vcard("b-b")) == 201
        status, token2, changes = bob.sync("/bob/book/", token)
        assert status == 207 and set(changes) == {"/bob/book/b.vcf"}
        assert set(bob.listing("/bob/book/")) == {"/bob/book/a.vcf", "/bob/book/b.vcf"}
        assert bob.delete("/bob/book/a.vcf") == 200
        assert "import" not in results and not stall.order, "the import finished before Bob was answered"
    finally:
        stall.release.set()
        importer.join(120)
    assert results["import"] == 201
    assert len(alice.sync("/alice/cal/")[2]) == 200
    assert set(bob.sync("/bob/book/", token2)[2]) == {"/bob/book/a.vcf"}


@pytest.mark.parametrize("request_of", ["read", "write", "store read"])
def test_requests_on_the_same_root_or_the_whole_store_wait_for_the_import(
        two_users: tuple[Dav, Dav], monkeypatch: pytest.MonkeyPatch, request_of: str) -> None:
    """While Alice's import holds her root, a request of hers on another collection of that root (a read, a
    write), and a PROPFIND of the whole store ("/"), is held until the import is done, and then sees it
    complete: Radicale's semantics within one root."""
    alice, _ = two_users
    assert alice.mkcol("/alice/book/") == 201
    stall = Stall(monkeypatch)
    waits: list[tuple[str, tuple[str, ...]]] = []
    real_free = locks.RootLocks._free

    def free(self: locks.RootLocks, mode: str, roots: tuple[str, ...]) -> bool:
        ok = real_free(self, mode, roots)
        if not ok:
            waits.append((mode, roots))
        return ok

    monkeypatch.setattr(locks.RootLocks, "_free", free)
    results: dict[str, object] = {}
    importer = run(lambda: alice.request("PUT", "/alice/cal/", calendar(50), content_type="text/calendar")[0],
                   results, "import")
    second = None
    try:
        assert stall.entered.wait(60)
        if request_of == "read":
            second = run(lambda: len(alice.sync("/alice/cal/")[2]), results, "second")
        elif request_of == "write":
            second = run(lambda: alice.put("/alice/book/x.vcf", vcard("x")), results, "second")
        else:
            second = run(lambda: alice.request("PROPFIND", "/", depth="1")[0], results, "second")
        wait_until(lambda: bool(waits), 60, "the second request to find the root locked")
        assert "second" not in results
    finally:
        stall.release.set()
        importer.join(120)
        if second is not None:
            second.join(120)
    assert results["import"] == 201
    assert results["second"] == {"read": 50, "write": 201, "store read": 207}[request_of]


def test_another_process_on_the_store_waits_for_our_requests(two_users: tuple[Dav, Dav], tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """While a request of ours runs, Radicale's lock file is held exclusively: another process (stock
    Radicale, ``radicale --verify-storage``) cannot take it even for reading; once we are idle it can."""
    alice, _ = two_users
    lock_path = tmp_path / "store" / "collections" / ".Radicale.lock"
    stall = Stall(monkeypatch)
    results: dict[str, object] = {}
    importer = run(lambda: alice.request("PUT", "/alice/cal/", calendar(5), content_type="text/calendar")[0],
                   results, "import")

    def can_share_lock() -> bool:
        fd = os.open(lock_path, os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False
        finally:
            os.close(fd)

    try:
        assert stall.entered.wait(60)
        assert not can_share_lock()
    finally:
        stall.release.set()
        importer.join(120)
    assert results["import"] == 201
    assert can_share_lock()


@pytest.mark.parametrize(("held", "wanted", "free"), [
    (("w", ("alice",)), ("r", ("bob",)), True),
    (("w", ("alice",)), ("w", ("bob",)), True),
    (("w", ("alice",)), ("r", ("alice",)), False),
    (("w", ("alice",)), ("w", ("alice", "bob")), False),     # a MOVE from bob to alice
    (("r", ("alice",)), ("r", ("alice",)), True),
    (("r", ("alice",)), ("w", ("alice",)), False),
    (("r", ("alice",)), ("w", ()), False),                   # the whole store
    (("r", ()), ("w", ("bob",)), False),
    (("r", ()), ("r", ("bob",)), True),
    (("w", ("bob",)), ("r", ()), False),
    (("w", ()), ("r", ("bob",)), False),
])
def test_root_locks_table(held: tuple[str, tuple[str, ...]], wanted: tuple[str, tuple[str, ...]],
                          free: bool) -> None:
    """Which lock is free while another is held: per root as Radicale's lock, the whole store as its own."""
    rl = locks.RootLocks()
    with rl.hold(*held):
        assert rl._free(*wanted) is free
    assert rl._free(*wanted) is True


@pytest.mark.parametrize(("path", "root"), [("/", ""), ("", ""), ("/alice/", "alice"), ("/alice/cal/x.ics", "alice"),
                                            ("//alice/../bob/c/", "bob"), ("/../..", "")])
def test_root_of(path: str, root: str) -> None:
    assert locks.root_of(path) == root
