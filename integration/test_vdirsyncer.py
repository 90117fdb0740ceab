"""Real clients against ``inverse-cloud serve``: vdirsyncer two-way sync of an address book and a
calendar (200 items, edits and deletes on both sides), a certificate swap during a long sync, curl
against the self-signed and then a swapped-in certificate, and the well-known redirects as DAVx5
follows them."""

from __future__ import annotations

import signal
import subprocess
import time

import pytest
from dav_helpers import (
    DOMAIN,
    DavClient,
    LocalCA,
    Vdirsyncer,
    new_uid,
    prop,
    selfsigned_cert,
    vcard,
    verify_storage,
    vevent,
)

from inverse_cloud.certs.store import CertStore
from inverse_cloud.config import load
from tests.support import ServeProcess, init_instance, served_certificate_serial, wait_until

CARDS, EVENTS = 150, 50  # 200 items


def curl(port: int, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["curl", "-sS", "--resolve", f"{DOMAIN}:{port}:127.0.0.1", *args],
                          capture_output=True, text=True, timeout=60)


def server_items(dav: DavClient, collection: str) -> dict[str, bytes]:
    """UID -> content of every item in a collection, read back over HTTPS."""
    out = {}
    for href in dav.hrefs(collection):
        r = dav.request("GET", href)
        assert r.status == 200, (href, r.status)
        uid = prop(r.body, "UID")
        assert uid and uid not in out, f"missing or duplicate UID at {href}"
        out[uid] = r.body
    return out


def summaries(items: dict[str, bytes], name: str) -> dict[str, str | None]:
    return {uid: prop(data, name) for uid, data in items.items()}


@pytest.mark.slow
def test_two_way_sync_of_address_book_and_calendar_loses_nothing(tmp_path):
    """Client A uploads 150 cards and 50 events; client B downloads them; then both sides edit and delete
    different items (A: 20 edits + 10 deletes per kind-ish, B likewise) and sync in turn until quiet. Both
    clients and the server end with exactly the expected set, with every edit, and no deleted item."""
    cfg_path = init_instance(tmp_path / "ic")
    cafile = selfsigned_cert(tmp_path / "ic")
    with ServeProcess(cfg_path) as srv, DavClient(srv.https_port, cafile) as dav:
        a = Vdirsyncer(tmp_path / "a", srv.https_port, cafile)
        b = Vdirsyncer(tmp_path / "b", srv.https_port, cafile)
        a.discover()
        b.discover()
        expected = {"contacts": {}, "calendar": {}}
        for i in range(CARDS):
            uid = new_uid()
            expected["contacts"][uid] = f"Person {i}"
            a.write_item("contacts", uid, vcard(uid, f"Person {i}"))
        for i in range(EVENTS):
            uid = new_uid()
            expected["calendar"][uid] = f"Meeting {i}"
            a.write_item("calendar", uid, vevent(uid, f"Meeting {i}", day=i))
        t0 = time.monotonic()
        a.sync()
        print(f"\nupload of {CARDS} cards + {EVENTS} events by vdirsyncer: {time.monotonic() - t0:.1f} s")
        t0 = time.monotonic()
        b.sync()
        print(f"download of the same by a second vdirsyncer: {time.monotonic() - t0:.1f} s")
        assert summaries(b.local("contacts"), "FN") == expected["contacts"]
        assert summaries(b.local("calendar"), "SUMMARY") == expected["calendar"]

        # Disjoint edits and deletes on both sides.
        prop_name = {"contacts": "FN", "calendar": "SUMMARY"}
        for kind, make in (("contacts", vcard), ("calendar", vevent)):
            uids = sorted(expected[kind])
            n_edit, n_del = (20, 10) if kind == "contacts" else (10, 5)
            a_edit, b_edit = uids[:n_edit], uids[n_edit:2 * n_edit]
            a_del = uids[2 * n_edit:2 * n_edit + n_del]
            b_del = uids[2 * n_edit + n_del:2 * n_edit + 2 * n_del]
            for client, edits, tag in ((a, a_edit, "edited by A"), (b, b_edit, "edited by B")):
                for uid in edits:
                    expected[kind][uid] = f"{expected[kind][uid]} {tag}"
                    client.write_item(kind, uid, make(uid, expected[kind][uid]))
            for client, deletes in ((a, a_del), (b, b_del)):
                for uid in deletes:
                    client.delete_item(kind, uid)
                    del expected[kind][uid]
            # And one new item on each side.
            for client, tag in ((a, "new on A"), (b, "new on B")):
                uid = new_uid()
                expected[kind][uid] = tag
                client.write_item(kind, uid, make(uid, tag))
        for client in (a, b, a, b):
            client.sync()

        for client in (a, b):
            assert summaries(client.local("contacts"), "FN") == expected["contacts"]
            assert summaries(client.local("calendar"), "SUMMARY") == expected["calendar"]
        assert summaries(server_items(dav, "/radicale/alice/contacts/"), prop_name["contacts"]) == expected["contacts"]
        assert summaries(server_items(dav, "/radicale/alice/calendar/"), prop_name["calendar"]) == expected["calendar"]
        assert "Traceback" not in srv.log()
        assert srv.stop() == 0
    verify_storage(load(cfg_path).server.storage_dir, tmp_path)


@pytest.mark.slow
def test_certificate_swap_during_a_long_sync_keeps_it_alive(tmp_path):
    """The server serves a CA-issued certificate A. While vdirsyncer uploads 200 cards (a sync of several
    seconds, many requests), certificate B is stored and SIGHUP sent. The sync finishes without error and
    nothing is lost; requests were served after the swap; an open keep-alive connection kept working with A
    across the swap; the next handshake shows B's serial."""
    cfg_path = init_instance(tmp_path / "ic")
    cfg = load(cfg_path)
    ca = LocalCA(tmp_path)
    store = CertStore(cfg.server.cert_dir)
    chain_a, key_a, serial_a = ca.issue()
    store.save(chain_a, key_a)
    with ServeProcess(cfg_path) as srv, DavClient(srv.https_port, ca.cafile) as held:
        assert served_certificate_serial("127.0.0.1", srv.https_port) == serial_a
        assert held.request("PROPFIND", "/radicale/alice/", headers={"Depth": "0"}).status == 207
        assert held.peer_serial() == serial_a
        client = Vdirsyncer(tmp_path / "a", srv.https_port, ca.cafile, calendar=False)
        client.discover()
        uids = [new_uid() for _ in range(200)]
        for i, uid in enumerate(uids):
            client.write_item("contacts", uid, vcard(uid, f"Person {i}"))
        sync = client.start_sync()
        try:
            # Swap once the upload is under way.
            wait_until(lambda: srv.log().count('"PUT /radicale/alice/contacts/') >= 20 or sync.poll() is not None,
                       60, "vdirsyncer's first PUTs", on_timeout=srv.log)
            assert sync.poll() is None, "the sync finished before the swap: make it longer"
            chain_b, key_b, serial_b = ca.issue()
            store.save(chain_b, key_b)
            swap_at = len(srv.log())
            srv.signal(signal.SIGHUP)
            wait_until(lambda: format(serial_b, "x") in srv.log()[swap_at:], 30, "the swap to be logged",
                       on_timeout=srv.log)
            puts_before = srv.log()[:swap_at].count('"PUT /radicale/alice/contacts/')
            out, err = sync.communicate(timeout=180)
        finally:
            if sync.poll() is None:
                sync.kill()
                sync.wait(10)
        assert sync.returncode == 0, f"vdirsyncer failed across the swap:\n{out[-2000:]}\n{err[-2000:]}"
        puts_after = srv.log()[swap_at:].count('"PUT /radicale/alice/contacts/')
        print(f"\nPUTs before the swap: {puts_before}, after: {puts_after}")
        assert puts_after > 0, "no request was served after the swap"
        # The connection opened before the swap still works and still has certificate A.
        assert held.request("PROPFIND", "/radicale/alice/", headers={"Depth": "0"}).status == 207
        assert held.peer_serial() == serial_a
        assert served_certificate_serial("127.0.0.1", srv.https_port) == serial_b
        with DavClient(srv.https_port, ca.cafile) as fresh:
            assert len(fresh.hrefs("/radicale/alice/contacts/")) == 200
            assert fresh.peer_serial() == serial_b
        assert "Traceback" not in srv.log()


def test_curl_self_signed_then_swapped_in_then_corrupt_pair_refused(tmp_path):
    """curl trusts the self-signed certificate by file; after a CA-issued pair is stored and SIGHUP sent,
    curl needs the CA (the self-signed file no longer verifies) and sees the new serial. A corrupt pair
    stored next is refused with one log line and the issued certificate keeps being served."""
    cfg_path = init_instance(tmp_path / "ic")
    cfg = load(cfg_path)
    selfsigned = selfsigned_cert(tmp_path / "ic")
    ca = LocalCA(tmp_path)
    with ServeProcess(cfg_path) as srv:
        port = srv.https_port
        url = f"https://{DOMAIN}:{port}/radicale/alice/"
        propfind = ["-u", "alice:correct horse", "-X", "PROPFIND", "-H", "Depth: 0", "-o", "/dev/null",
                    "-w", "%{http_code}"]
        r = curl(port, "--cacert", str(selfsigned), *propfind, url)
        assert (r.returncode, r.stdout) == (0, "207"), r.stderr
        assert "self-signed" in srv.log()

        chain, key, serial = ca.issue()
        CertStore(cfg.server.cert_dir).save(chain, key)
        srv.signal(signal.SIGHUP)
        wait_until(lambda: served_certificate_serial("127.0.0.1", port) == serial, 30, "the new certificate")
        r = curl(port, "--cacert", str(ca.cafile), *propfind, url)
        assert (r.returncode, r.stdout) == (0, "207"), r.stderr
        r = curl(port, "--cacert", str(selfsigned), *propfind, url)
        assert r.returncode == 60, "the old self-signed certificate must no longer be what is served"

        # A broken renewal on disk: refused, the good one stays.
        chain2, _, _ = ca.issue()
        version = CertStore(cfg.server.cert_dir).save(chain2, key)  # key of the previous certificate
        assert version.exists()
        mark = len(srv.log())
        srv.signal(signal.SIGHUP)
        wait_until(lambda: "refused" in srv.log()[mark:], 30, "the refusal line", on_timeout=srv.log)
        refusals = [line for line in srv.log()[mark:].splitlines() if "refused" in line]
        assert len(refusals) == 1 and "keeping" in refusals[0]
        assert served_certificate_serial("127.0.0.1", port) == serial
        r = curl(port, "--cacert", str(ca.cafile), *propfind, url)
        assert (r.returncode, r.stdout) == (0, "207"), r.stderr
        assert srv.stop() == 0
        assert "Traceback" not in srv.log()


@pytest.mark.parametrize("path", ["/.well-known/carddav", "/.well-known/caldav", "/"])
def test_well_known_redirects_as_davx5_follows_them(tmp_path_factory, path):
    """PROPFIND on the well-known URIs (and / for Thunderbird) is redirected to /radicale/; following it
    with the same method and credentials, as DAVx5 does, reaches the principal (207 with
    current-user-principal)."""
    root = tmp_path_factory.mktemp("wk")
    cfg_path = init_instance(root / "ic")
    with ServeProcess(cfg_path) as srv:
        body = ('<?xml version="1.0"?><propfind xmlns="DAV:"><prop><current-user-principal/></prop></propfind>')
        r = curl(srv.https_port, "--cacert", str(selfsigned_cert(root / "ic")), "-L", "--post301",
                 "-u", "alice:correct horse", "-X", "PROPFIND", "-H", "Depth: 0", "-H",
                 "Content-Type: application/xml", "--data", body,
                 "-w", "\n%{http_code} %{num_redirects} %{url_effective}",
                 f"https://{DOMAIN}:{srv.https_port}{path}")
        assert r.returncode == 0, r.stderr
        *xml, last = r.stdout.splitlines()
        code, redirects, effective = last.split()
        assert code == "207" and redirects == "1" and effective.endswith("/radicale/")
        assert "<href>/radicale/alice/</href>" in "\n".join(xml)


def test_radicale_config_files_do_not_change_behaviour(tmp_path):
    """A stray RADICALE_CONFIG (auth none, other storage) must not change what is served."""
    cfg_path = init_instance(tmp_path / "ic")
    stray = tmp_path / "stray.conf"
    stray.write_text(f"[auth]\ntype = none\n[storage]\nfilesystem_folder = {tmp_path / 'elsewhere'}\n")
    with ServeProcess(cfg_path, env={"RADICALE_CONFIG": str(stray)}) as srv:
        r = curl(srv.https_port, "--cacert", str(selfsigned_cert(tmp_path / "ic")), "-X", "PROPFIND", "-o",
                 "/dev/null", "-w", "%{http_code}", f"https://{DOMAIN}:{srv.https_port}/radicale/alice/")
        assert r.stdout == "401", "authentication must stay on"
    assert not (tmp_path / "elsewhere").exists()
