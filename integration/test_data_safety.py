"""Data safety under load and faults (docs/test-matrix.md L1, F9, F10, F11), against the real process:

* L1  ten vdirsyncer clients, each with an own 200-card address book, three rounds of two-way changes,
      all syncing at once: nothing lost, every edit on both sides, no 5xx, storage verifies;
* F9  a full disk during PUT gives 507, the stored item stays byte-identical, no partial file is left,
      GET keeps working and the retried PUT succeeds once space is freed;
* F10 SIGTERM while five clients write: the request in flight is answered, new connections are refused,
      exit code 0, every acknowledged PUT is there after a restart;
* F11 SIGKILL at random moments while clients write (20 repetitions, as the row asks): never a truncated item, every
      acknowledged PUT present, ``radicale --verify-storage`` passes.
"""

from __future__ import annotations

import base64
import errno
import os
import random
import re
import signal
import socket
import ssl
import subprocess
import threading
import time
from pathlib import Path

import pytest
from dav_helpers import (
    DOMAIN,
    DavClient,
    Vdirsyncer,
    item_files,
    new_uid,
    prop,
    require_root_tools,
    selfsigned_cert,
    storage_snapshot,
    vcard,
    verify_storage,
)

from inverse_cloud.config import load
from tests.support import ServeProcess, init_instance, wait_until

CONTACTS = "/radicale/alice/contacts/"
F11_REPETITIONS = 20


def contacts_dir(storage: Path) -> Path:
    return storage / "collection-root" / "alice" / "contacts"


# --- L1 ---------------------------------------------------------------------------------------------------

L1_USERS = 10
L1_CARDS = 200
L1_ROUNDS = 3
L1_BOUND_S = 300.0  # docs/test-matrix.md L1: the three rounds are bounded at 5 min (a deadline, never a timing check)
L1_SETUP_S = 300.0  # discover + the initial upload of 10 x 200 cards, before the rounds (deadline as well)

# What the checks compare per UID: (FN, NOTE).
Card = tuple[str | None, str | None]


def percentile(values: list[float], q: float) -> float:
    """The ``q``-th percentile (0..100) of a non-empty sample, linearly interpolated between ranks."""
    s = sorted(values)
    k = (len(s) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def seconds_left(deadline: float, what: str) -> float:
    left = deadline - time.monotonic()
    assert left > 0, f"the deadline ran out before {what}"
    return left


def add_user_with_cli(config: Path, name: str, password: str) -> None:
    """``inverse-cloud user add NAME --password-file F``, as a user adds a second person."""
    import sys

    pw = config.parent / f"password-{name}"
    pw.write_text(password)
    proc = subprocess.run([sys.executable, "-m", "inverse_cloud.cli", "user", "add", name, "--password-file",
                           str(pw), "--config", str(config)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"user add {name}: {proc.stdout}{proc.stderr}"


class L1User:
    """One DAV user: their vdirsyncer client (address book only), a DavClient for "another device", and
    the expected content of their address book (UID -> (FN, NOTE))."""

    def __init__(self, name: str, password: str, work: Path, port: int, cafile: Path) -> None:
        self.name = name
        self.book = f"/radicale/{name}/contacts/"
        self.client = Vdirsyncer(work / name, port, cafile, user=name, password=password, calendar=False)
        self.dav = DavClient(port, cafile, user=name, password=password)
        self.expected: dict[str, Card] = {}


class L1Workload:
    """docs/test-matrix.md L1 against one server on 127.0.0.1:``port`` whose certificate is for laptop.test:
    each user has an own vdirsyncer client and an own address book (``contacts``) of ``cards`` cards; all
    clients sync at once; before every round each client changes some cards locally and "another device"
    changes other cards of the same book on the server. bench/l1_bench.py drives the same workload against
    the seed stack (Radicale's own server behind nginx), so the steps are methods, not one function.

    Per round and side (200 cards): 10 edits, 3 deletes, 5 additions (5%, 1.5%, 2.5%, at least one each).
    The cards the two sides touch in a round are disjoint, so there is no conflict to resolve and the union
    of the edits is well defined. The choice is seeded (``seed``)."""

    def __init__(self, work: Path, port: int, cafile: Path, users: list[tuple[str, str]], cards: int = L1_CARDS,
                 seed: int = 0) -> None:
        self.rng = random.Random(seed)
        self.cards = cards
        self.n_edit, self.n_delete, self.n_add = max(1, cards // 20), max(1, cards * 3 // 200), max(1, cards // 40)
        self.users = [L1User(name, password, work, port, cafile) for name, password in users]

    def close(self) -> None:
        for u in self.users:
            u.dav.close()

    @staticmethod
    def card_bytes(uid: str, card: Card) -> bytes:
        return vcard(uid, card[0] or "", note=card[1] or "")

    def _all_at_once(self, action: str, timeout_s: float) -> list[float]:
        """Run ``vdirsyncer ACTION`` for every user at the same moment; each one's duration (s), in user order.

        :raises AssertionError: naming every client that failed or ran past ``timeout_s`` (and was killed).
        """
        from concurrent.futures import ThreadPoolExecutor

        def one(u: L1User) -> float:
            t0 = time.monotonic()
            u.client.run(action, timeout_s=timeout_s)  # subprocess.run: the child is killed at the timeout
            return time.monotonic() - t0

        with ThreadPoolExecutor(len(self.users)) as pool:
            futures = [pool.submit(one, u) for u in self.users]
        failures = [f"{u.name}: {type(exc).__name__}: {exc}" for u, f in zip(self.users, futures, strict=True)
                    if (exc := f.exception()) is not None]
        assert not failures, "\n".join(failures)
        return [f.result() for f in futures]

    def prepare(self, timeout_s: float) -> None:
        """Give every user an address book (Radicale's own server has no predefined collections; ours
        creates ``contacts`` at first login), run ``vdirsyncer discover`` for all at once, and put ``cards``
        new cards into each client's local folder (the first sync uploads them)."""
        for u in self.users:
            ensure_address_book(u.dav, u.book)
            u.dav.close()
        self._all_at_once("discover", timeout_s)
        for u in self.users:
            for j in range(self.cards):
                uid = new_uid()
                u.expected[uid] = (f"{u.name} Card{j}", "created on the laptop")
                u.client.write_item("contacts", uid, self.card_bytes(uid, u.expected[uid]))

    def sync_all(self, timeout_s: float) -> list[float]:
        """One ``vdirsyncer sync`` per user, all at once; their durations (s)."""
        return self._all_at_once("sync", timeout_s)

    def change_both_sides(self, round_no: int) -> None:
        """Before round ``round_no``: each client edits, deletes and adds cards in its local folder; another
        device of the same user edits, deletes (PUT/DELETE at the server's hrefs) and adds other cards."""
        for u in self.users:
            u.dav.close()  # a connection idle since the last phase may be closed by now (server idle timeout)
            on_server = server_cards(u.dav, u.book)
            picked = self.rng.sample(sorted(u.expected), 2 * (self.n_edit + self.n_delete))
            laptop, device = picked[: self.n_edit + self.n_delete], picked[self.n_edit + self.n_delete:]
            for uid in laptop[: self.n_edit]:
                u.expected[uid] = (f"{u.name} {uid[:8]} r{round_no}", f"edited on the laptop in round {round_no}")
                u.client.write_item("contacts", uid, self.card_bytes(uid, u.expected[uid]))
            for uid in laptop[self.n_edit:]:
                u.client.delete_item("contacts", uid)
                del u.expected[uid]
            for uid in device[: self.n_edit]:
                u.expected[uid] = (f"{u.name} {uid[:8]} r{round_no}", f"edited on another device in round {round_no}")
                r = u.dav.put(on_server[uid][0], self.card_bytes(uid, u.expected[uid]))
                assert r.status in (200, 201, 204), (u.name, uid, r.status, r.text[:300])
            for uid in device[self.n_edit:]:
                r = u.dav.request("DELETE", on_server[uid][0])
                assert r.status in (200, 204), (u.name, uid, r.status, r.text[:300])
                del u.expected[uid]
            for k in range(self.n_add):
                uid = new_uid()
                u.expected[uid] = (f"{u.name} r{round_no} laptop new {k}", "added on the laptop")
                u.client.write_item("contacts", uid, self.card_bytes(uid, u.expected[uid]))
                uid = new_uid()
                u.expected[uid] = (f"{u.name} r{round_no} device new {k}", "added on another device")
                r = u.dav.request("PUT", f"{u.book}{uid}.vcf", self.card_bytes(uid, u.expected[uid]),
                                  {"Content-Type": "text/vcard; charset=utf-8", "If-None-Match": "*"})
                assert r.status == 201, (u.name, uid, r.status, r.text[:300])

    def mismatches(self) -> list[str]:
        """For every user, where the server collection or the client's folder differs from the expected union
        of all edits (empty: nothing lost, nothing extra, every edit in place)."""
        out = []
        for u in self.users:
            u.dav.close()  # fresh connection: the last one may have been idle past the server's idle timeout
            server = {uid: card for uid, (_, card) in server_cards(u.dav, u.book).items()}
            local = {uid: (prop(data, "FN"), prop(data, "NOTE")) for uid, data in u.client.local("contacts").items()}
            for side, got in (("server", server), ("client", local)):
                if got != u.expected:
                    missing = sorted(set(u.expected) - set(got))
                    extra = sorted(set(got) - set(u.expected))
                    wrong = sorted(uid for uid in set(got) & set(u.expected) if got[uid] != u.expected[uid])
                    out.append(f"{u.name} {side}: {len(missing)} missing {missing[:3]}, {len(extra)} extra "
                               f"{extra[:3]}, {len(wrong)} stale "
                               + ", ".join(f"{uid}: {got[uid]} != {u.expected[uid]}" for uid in wrong[:3]))
        return out


def ensure_address_book(dav: DavClient, book: str) -> None:
    r = dav.request("PROPFIND", book, headers={"Depth": "0"})
    if r.status == 404:
        body = (b'<?xml version="1.0" encoding="utf-8"?><D:mkcol xmlns:D="DAV:" '
                b'xmlns:C="urn:ietf:params:xml:ns:carddav"><D:set><D:prop><D:resourcetype><D:collection/>'
                b"<C:addressbook/></D:resourcetype><D:displayname>Contacts</D:displayname></D:prop></D:set>"
                b"</D:mkcol>")
        r = dav.request("MKCOL", book, body, {"Content-Type": "application/xml; charset=utf-8"})
        assert r.status == 201, (book, r.status, r.text[:300])
    else:
        assert r.status == 207, (book, r.status, r.text[:300])


def server_cards(dav: DavClient, book: str) -> dict[str, tuple[str, Card]]:
    """UID -> (href, (FN, NOTE)) of every card in ``book``: PROPFIND Depth 1, then one addressbook-multiget.

    :raises AssertionError: a request failed, or two items carry the same UID.
    """
    from xml.sax.saxutils import escape

    from defusedxml import ElementTree

    hrefs = sorted(dav.hrefs(book))
    if not hrefs:
        return {}
    body = ('<?xml version="1.0" encoding="utf-8"?><C:addressbook-multiget xmlns:D="DAV:" '
            'xmlns:C="urn:ietf:params:xml:ns:carddav"><D:prop><D:getetag/><C:address-data/></D:prop>'
            + "".join(f"<D:href>{escape(h)}</D:href>" for h in hrefs) + "</C:addressbook-multiget>")
    r = dav.request("REPORT", book, body.encode(), {"Depth": "1", "Content-Type": "application/xml; charset=utf-8"})
    assert r.status == 207, (book, r.status, r.text[:300])
    out: dict[str, tuple[str, Card]] = {}
    for resp in ElementTree.fromstring(r.body).iter("{DAV:}response"):
        href = resp.findtext("{DAV:}href") or ""
        data = (resp.findtext(".//{urn:ietf:params:xml:ns:carddav}address-data") or "").encode()
        uid = prop(data, "UID")
        assert uid is not None, f"{href}: no card in the multiget answer"
        assert uid not in out, f"UID {uid} twice on the server: {out[uid][0]} and {href}"
        out[uid] = (href, (prop(data, "FN"), prop(data, "NOTE")))
    assert len(out) == len(hrefs), f"{book}: {len(hrefs)} hrefs listed, {len(out)} cards in the multiget"
    return out


def print_sync_times(label: str, durations: list[float]) -> None:
    print(f"{label}: {len(durations)} clients at once, sync p50 {percentile(durations, 50):.2f} s, "
          f"p95 {percentile(durations, 95):.2f} s, max {max(durations):.2f} s", flush=True)


@pytest.mark.slow
def test_ten_vdirsyncer_clients_at_once_lose_nothing(tmp_path: Path) -> None:
    """docs/test-matrix.md L1. Ten DAV users are added with ``inverse-cloud user add``; each has an own vdirsyncer
    client and an own address book, filled by the client with 200 cards (the initial sync, all ten at once).
    Three rounds follow: before each, every client edits 10, deletes 3 and adds 5 cards locally, and another
    device of the same user edits 10, deletes 3 and adds 5 *other* cards on the server (DavClient); then all
    ten sync at once. After every round, for every user, the server collection (PROPFIND + multiget) and the
    client's folder both equal the expected union of all edits (FN and NOTE per UID; nothing missing, nothing
    extra, no duplicate UID). A last sync of all ten, with no changes, must leave that state as it is.

    No in-turn sync is needed to converge: the users' books are separate, and the other device's changes are
    made before a round starts, so a single vdirsyncer run moves the changes of both sides (the check after
    each round proves it). Afterwards: no 5xx in the server's access log, no Traceback, exit 0 on SIGTERM,
    ``radicale --verify-storage`` passes. The rounds run under one 5 min deadline (each sync's timeout is
    what is left of it); the p50/p95 of the ten sync durations are printed per round, never asserted."""
    from dav_helpers import access_statuses

    require_root_tools()
    cfg_path = init_instance(tmp_path / "ic")
    cafile = selfsigned_cert(tmp_path / "ic")
    users = [(f"user{i}", f"password of user {i}") for i in range(L1_USERS)]
    for name, password in users:
        add_user_with_cli(cfg_path, name, password)
    seed = random.randrange(1 << 30)
    print(f"\nseed {seed}")
    with ServeProcess(cfg_path) as srv:
        workload = L1Workload(tmp_path / "clients", srv.https_port, cafile, users, seed=seed)
        try:
            setup_deadline = time.monotonic() + L1_SETUP_S
            workload.prepare(seconds_left(setup_deadline, "discover"))
            print_sync_times(f"initial upload ({L1_CARDS} cards each)",
                             workload.sync_all(seconds_left(setup_deadline, "the initial upload")))
            assert not (problems := workload.mismatches()), "\n".join(problems)
            t0 = time.monotonic()
            deadline = t0 + L1_BOUND_S
            for r in range(1, L1_ROUNDS + 1):
                workload.change_both_sides(r)
                durations = workload.sync_all(seconds_left(deadline, f"round {r}"))
                print_sync_times(f"round {r} (two-way changes)", durations)
                assert not (problems := workload.mismatches()), f"after round {r}:\n" + "\n".join(problems)
            print_sync_times("last sync (no changes)", workload.sync_all(seconds_left(deadline, "the last sync")))
            assert not (problems := workload.mismatches()), "after the no-change sync:\n" + "\n".join(problems)
            print(f"rounds done in {time.monotonic() - t0:.0f} s (bound {L1_BOUND_S:.0f} s); "
                  f"{sum(len(u.expected) for u in workload.users)} cards in {L1_USERS} books")
        finally:
            workload.close()
        log = srv.log()
        statuses = access_statuses(log)
        assert statuses, "no access-log lines: the 5xx check would be empty"
        assert not [s for s in statuses if s >= 500], "a 5xx was served"
        assert "Traceback" not in log
        assert srv.stop() == 0
    verify_storage(load(cfg_path).server.storage_dir, tmp_path)


# --- F9 ---------------------------------------------------------------------------------------------------

def tmpfs_python(tmp_path: Path, storage: Path, size: str = "512k") -> str:
    """A stand-in for the Python interpreter that first mounts a small tmpfs over the storage folder in a
    private mount namespace (the rest of the system never sees it), then execs Python in place: the pid
    ServeProcess signals is the server's."""
    import sys

    script = tmp_path / "python-on-tmpfs"
    script.write_text("#!/bin/sh\n"
                      f"exec unshare -m sh -c 'mount -t tmpfs -o size={size},mode=0700 tmpfs \"$0\" && "
                      f"exec \"$@\"' '{storage}' '{sys.executable}' \"$@\"\n")
    script.chmod(0o700)
    return str(script)


def fill(path: Path) -> int:
    """Write zeros to ``path`` until the file system is full; return the bytes written."""
    written = 0
    with open(path, "wb", buffering=0) as f:
        for _ in range(100_000):  # bounded: 400 MB at most
            try:
                f.write(b"\0" * 4096)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, exc
                return written
            written += 4096
    raise AssertionError("the file system never filled up: is the tmpfs mounted?")


def test_full_disk_during_put_gives_507_and_keeps_stored_items(tmp_path):
    """Storage on a 512 KiB tmpfs. A card is stored; the disk is filled; a new card and an update to the
    stored one both get 507 with a readable body; the stored file is byte-identical, no new or temporary
    file appears; GET still works; the log names the storage folder and "no space left"; after space is
    freed the same PUTs succeed."""
    require_root_tools()
    cfg_path = init_instance(tmp_path / "ic")
    storage = load(cfg_path).server.storage_dir
    cafile = selfsigned_cert(tmp_path / "ic")
    srv = ServeProcess(cfg_path, python=tmpfs_python(tmp_path, storage))
    with srv, DavClient(srv.https_port, cafile) as dav:
        seen = Path(f"/proc/{srv.pid}/root") / storage.relative_to("/")  # the storage as the server sees it
        assert os.statvfs(seen).f_blocks * os.statvfs(seen).f_frsize <= 1024 * 1024, "not on the small tmpfs"
        uid_a, uid_b = new_uid(), new_uid()
        assert dav.put(f"{CONTACTS}a.vcf", vcard(uid_a, "Stored Card")).status == 201
        before_files = item_files(contacts_dir(seen))
        before_all = storage_snapshot(seen)
        print(f"\nfilled the tmpfs with {fill(seen / 'filler') // 1024} KiB")
        mark = len(srv.log())

        new = dav.put(f"{CONTACTS}b.vcf", vcard(uid_b, "New Card"))
        update = dav.put(f"{CONTACTS}a.vcf", vcard(uid_a, "Changed Card"))
        for r in (new, update):
            assert r.status == 507, (r.status, r.text)
            assert "disk is full" in r.text
        assert item_files(contacts_dir(seen)) == before_files
        leftovers = [p.name for p in contacts_dir(seen).iterdir() if p.name.startswith(".Radicale.tmp")]
        assert not leftovers, leftovers
        assert {k: v for k, v in storage_snapshot(seen).items() if k != "filler"} == before_all
        got = dav.request("GET", f"{CONTACTS}a.vcf")
        assert got.status == 200 and prop(got.body, "FN") == "Stored Card"
        lines = srv.log()[mark:].splitlines()
        full = [line for line in lines if "no space left" in line]
        assert len(full) == 2 and all(str(storage) in line for line in full), lines
        assert "Traceback" not in srv.log()

        (seen / "filler").unlink()
        assert dav.put(f"{CONTACTS}b.vcf", vcard(uid_b, "New Card")).status == 201
        assert dav.put(f"{CONTACTS}a.vcf", vcard(uid_a, "Changed Card")).status in (200, 201, 204)
        assert prop(dav.request("GET", f"{CONTACTS}a.vcf").body, "FN") == "Changed Card"
        assert srv.stop() == 0


# --- F10 --------------------------------------------------------------------------------------------------

class Writers:
    """``n`` threads, each on its own connection, PUT new cards in a loop and record what was acknowledged."""

    def __init__(self, port: int, cafile: Path, n: int, prefix: str, max_puts: int = 2000) -> None:
        self.port, self.cafile, self.prefix, self.max_puts = port, cafile, prefix, max_puts
        self.acked: dict[str, str] = {}  # href -> FN
        self.errors: list[str] = []
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(k,), daemon=True) for k in range(n)]

    def _run(self, k: int) -> None:
        with DavClient(self.port, self.cafile, timeout=30) as dav:
            for i in range(self.max_puts):
                if self.stop.is_set():
                    return
                uid = f"{self.prefix}-{k}-{i}-{new_uid()}"
                href = f"{CONTACTS}{uid}.vcf"
                try:
                    r = dav.put(href, vcard(uid, f"Writer{k} Card{i}"))
                except (OSError, ConnectionError) as exc:
                    with self.lock:
                        self.errors.append(f"{type(exc).__name__}")
                    return
                if r.status == 201:
                    with self.lock:
                        self.acked[href] = f"Writer{k} Card{i}"
                else:
                    with self.lock:
                        self.errors.append(str(r.status))
                    return

    def start(self) -> Writers:
        for t in self.threads:
            t.start()
        return self

    def join(self, timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        for t in self.threads:
            t.join(max(0.1, deadline - time.monotonic()))
        assert not any(t.is_alive() for t in self.threads), "a writer thread hangs"

    def count(self) -> int:
        with self.lock:
            return len(self.acked)


def tls_socket(port: int, cafile: Path) -> ssl.SSLSocket:
    ctx = ssl.create_default_context(cafile=str(cafile))
    return ctx.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=30), server_hostname=DOMAIN)


def test_sigterm_during_writes_drains_them_and_exits_0(tmp_path):
    """Five clients PUT in a loop; a sixth is half-way through sending a PUT body when SIGTERM arrives.
    New connections are then refused; the half-sent PUT, completed afterwards, is answered 201; the process
    exits 0; after a restart every acknowledged PUT (and the drained one) is there."""
    cfg_path = init_instance(tmp_path / "ic")
    cafile = selfsigned_cert(tmp_path / "ic")
    srv = ServeProcess(cfg_path).start()
    try:
        port = srv.https_port
        with DavClient(port, cafile) as warm:  # creates the address book; proves the credentials
            assert warm.request("PROPFIND", CONTACTS, headers={"Depth": "0"}).status == 207
        writers = Writers(port, cafile, 5, "f10").start()
        wait_until(lambda: writers.count() >= 30, 60, "30 acknowledged PUTs", on_timeout=srv.log)

        slow_uid = f"drained-{new_uid()}"
        card = vcard(slow_uid, "Drained Card", note="x" * 2000)
        slow = tls_socket(port, cafile)
        auth = base64.b64encode(b"alice:correct horse").decode()
        # Expect: 100-continue makes the server say when the request is being handled, so SIGTERM
        # certainly lands while this PUT is in flight (headers read, body half sent).
        slow.sendall(f"PUT {CONTACTS}{slow_uid}.vcf HTTP/1.1\r\nHost: {DOMAIN}\r\nAuthorization: Basic {auth}\r\n"
                     f"Content-Type: text/vcard\r\nContent-Length: {len(card)}\r\nExpect: 100-continue\r\n\r\n"
                     .encode())
        assert slow.recv(100).startswith(b"HTTP/1.1 100"), "no 100 Continue"
        slow.sendall(card[:1000])
        mark = len(srv.log())
        srv.signal(signal.SIGTERM)
        wait_until(lambda: "stopping (SIGTERM)" in srv.log()[mark:], 30, "SIGTERM to be handled", on_timeout=srv.log)

        def refused() -> bool:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=2).close()
            except ConnectionRefusedError:
                return True
            return False

        wait_until(refused, 30, "the listener to stop accepting")
        slow.sendall(card[1000:])
        answer = slow.recv(4096)
        slow.close()
        assert answer.startswith(b"HTTP/1.1 201"), answer[:200]
        assert srv.proc is not None
        code = srv.proc.wait(60)
        writers.stop.set()
        writers.join()
        assert code == 0, srv.log()
        first_log = srv.log()
        assert "Traceback" not in first_log
    finally:
        srv.stop()
    print(f"\nacknowledged before SIGTERM: {len(writers.acked)}; writer endings: {sorted(set(writers.errors))}")

    with ServeProcess(cfg_path) as again, DavClient(again.https_port, cafile) as dav:
        stored = dav.hrefs(CONTACTS)
        missing = set(writers.acked) - stored
        assert not missing, f"{len(missing)} acknowledged PUTs lost, e.g. {sorted(missing)[:3]}"
        assert f"{CONTACTS}{slow_uid}.vcf" in stored
        for href in random.Random(1).sample(sorted(writers.acked), 10):
            assert prop(dav.request("GET", href).body, "FN") == writers.acked[href]


# --- F11 --------------------------------------------------------------------------------------------------

class Overwriters:
    """Threads that each overwrite their own 5 cards with increasing versions (NOTE:v<N>) and add new ones.
    ``acked`` (highest acknowledged version per href) and ``attempted`` (last version sent) persist across
    repetitions; each href is only ever written by one thread at a time."""

    def __init__(self, port: int, cafile: Path, n: int, rep: int, acked: dict[str, int],
                 attempted: dict[str, int]) -> None:
        self.port, self.cafile, self.rep = port, cafile, rep
        self.acked, self.attempted = acked, attempted
        self.acks_this_rep = 0
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, args=(k,), daemon=True) for k in range(n)]

    def _run(self, k: int) -> None:
        own = [f"{CONTACTS}w{k}-card{j}.vcf" for j in range(5)]
        with DavClient(self.port, self.cafile, timeout=15) as dav:
            for i in range(1000):
                href = own[i % 5] if i % 3 else f"{CONTACTS}w{k}-r{self.rep}-new{i}.vcf"
                with self.lock:
                    version = self.attempted[href] = self.attempted.get(href, 0) + 1
                uid = href.rsplit("/", 1)[1].removesuffix(".vcf")
                try:
                    r = dav.put(href, vcard(uid, f"Card {uid}", note=f"v{version} " + "p" * 300))
                except (OSError, ConnectionError):
                    return
                if r.status not in (200, 201, 204):
                    return
                with self.lock:
                    self.acked[href] = max(self.acked.get(href, 0), version)
                    self.acks_this_rep += 1

    def start(self) -> Overwriters:
        for t in self.threads:
            t.start()
        return self


def stored_versions(collection: Path) -> dict[str, int]:
    """href -> version of every item file on disk; fails on any item that is not a whole vCard."""
    out = {}
    for name, data in item_files(collection).items():
        text = data.decode("utf-8")
        assert text.startswith("BEGIN:VCARD") and text.rstrip().endswith("END:VCARD"), f"truncated item {name}"
        note = prop(data, "NOTE")
        assert note and re.match(r"v\d+ p{300}$", note), f"damaged item {name}: {note!r}"
        out[f"{CONTACTS}{name}"] = int(note.split()[0][1:])
    return out


@pytest.mark.slow
def sync_collection(dav: DavClient, token: str) -> tuple[str, set[str]]:
    """(new token, hrefs reported) of a sync-collection on CONTACTS from ``token``."""
    body = ('<?xml version="1.0"?><sync-collection xmlns="DAV:"><sync-token>' + token + '</sync-token>'
            '<sync-level>1</sync-level><prop><getetag/></prop></sync-collection>').encode()
    r = dav.request("REPORT", CONTACTS, body, {"Depth": "1", "Content-Type": "application/xml"})
    assert r.status == 207, (r.status, r.text[:300])
    new = re.search(r"<sync-token>([^<]+)</sync-token>", r.text)
    assert new, r.text[:300]
    return new.group(1), set(re.findall(r"<href>([^<]+)</href>", r.text))


def test_sigkill_at_random_moments_never_loses_an_acknowledged_put(tmp_path):
    """Twenty times (F11_REPETITIONS): start the server, three clients overwrite and add cards, SIGKILL
    at a random moment (seeded, printed). After each kill every item on disk is a whole vCard and no
    acknowledged version is missing (the stored version is the acknowledged one or the one in flight). At
    the end the server starts on that storage, serves every card, its storage index agrees with the files (a
    sync from scratch lists exactly the items on disk), and radicale --verify-storage passes."""
    cfg_path = init_instance(tmp_path / "ic")
    cafile = selfsigned_cert(tmp_path / "ic")
    storage = load(cfg_path).server.storage_dir
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    print(f"\nseed {seed}")
    acked: dict[str, int] = {}
    attempted: dict[str, int] = {}
    tmp_left = 0
    for rep in range(F11_REPETITIONS):
        srv = ServeProcess(cfg_path).start()
        try:
            if rep == 0:
                with DavClient(srv.https_port, cafile) as dav:
                    assert dav.request("PROPFIND", CONTACTS, headers={"Depth": "0"}).status == 207
            writers = Overwriters(srv.https_port, cafile, 3, rep, acked, attempted).start()
            wait_until(lambda w=writers: w.acks_this_rep >= 3, 30, "writes to begin", on_timeout=srv.log)
            # Then kill at a random moment within the next second (a chosen delay, not a wait for the server).
            threading.Event().wait(rng.uniform(0.0, 1.0))
            srv.kill()
            for t in writers.threads:
                t.join(30)
            assert not any(t.is_alive() for t in writers.threads)
        finally:
            srv.kill()
        on_disk = stored_versions(contacts_dir(storage))
        for href, version in acked.items():
            assert href in on_disk, f"rep {rep}: acknowledged {href} v{version} is gone"
            assert version <= on_disk[href] <= attempted[href], (
                f"rep {rep}: {href} acknowledged v{version}, on disk v{on_disk[href]}")
        tmp_left = sum(1 for p in contacts_dir(storage).iterdir() if p.name.startswith(".Radicale.tmp"))
    # Radicale writes a temporary file and renames it: a kill can leave the temporary file, never a torn item.
    print(f"acknowledged cards: {len(acked)}; temporary files left by the kills: {tmp_left}")

    with ServeProcess(cfg_path) as srv, DavClient(srv.https_port, cafile) as dav:
        assert dav.hrefs(CONTACTS) >= set(acked)
        # The storage index agrees with the files after the kills: a sync from scratch lists exactly the items
        # on disk, and a sync with the token it gave reports no change.
        on_disk = stored_versions(contacts_dir(storage))
        token, listed = sync_collection(dav, "")
        assert listed == set(on_disk), (sorted(listed ^ set(on_disk))[:10], len(listed), len(on_disk))
        assert sync_collection(dav, token) == (token, set())
        for href in rng.sample(sorted(acked), 15):
            note = prop(dav.request("GET", href).body, "NOTE") or ""
            assert int(note.split()[0][1:]) >= acked[href]
        assert "Traceback" not in srv.log()
    verify_storage(storage, tmp_path)
