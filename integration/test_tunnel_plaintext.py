"""docs/test-matrix.md row P: the relay never sees plaintext.

A recording proxy sits where the relay operator sits: in front of the relay's forwarded HTTPS port (and
one in front of the HTTP port). Two real vdirsyncer clients sync canary contacts through it (one uploads
20, the other downloads them and edits 5), and curl fetches one with Basic auth. Then every recorded
connection must parse as TLS records end to end, the ServerHello must pick TLS 1.3 or an AEAD suite, no
handshake record may follow application data, and none of the canaries, the password, the Authorization
header or its base64 may appear -- in raw bytes or base64. Port 80 carries only our redirect and ACME
answers, never DAV content.
"""

from __future__ import annotations

import base64
import os
import re
import subprocess
import uuid

from chaos_proxy import ChaosProxy
from dav_helpers import Vdirsyncer, prop, selfsigned_cert, vcard
from relay_sshd import TEST_USER, configure, relay_sshd, sshd_available

from tests.support import ServeProcess, free_port, init_instance

PASSWORD = "correct horse"
AEAD_TLS12 = {0xC02B, 0xC02C, 0xC02F, 0xC030, 0xCCA8, 0xCCA9}
TLS13 = {0x1301, 0x1302, 0x1303}


def tls_records(data: bytes) -> list[tuple[int, bytes]]:
    """Split a byte stream into TLS records; fail on any byte that is not part of a well-formed record."""
    out, i = [], 0
    while i < len(data):
        assert len(data) - i >= 5, f"truncated record header at {i}"
        rtype, version, length = data[i], int.from_bytes(data[i + 1:i + 3], "big"), int.from_bytes(
            data[i + 3:i + 5], "big")
        assert rtype in (20, 21, 22, 23), f"not a TLS record type at {i}: {rtype}"
        assert 0x0301 <= version <= 0x0303, f"bad record version {version:#06x} at {i}"
        assert length <= 2 ** 14 + 256, f"record too long ({length}) at {i}"
        assert i + 5 + length <= len(data), f"truncated record at {i}"
        out.append((rtype, data[i + 5:i + 5 + length]))
        i += 5 + length
    return out


def server_hello_suite(records: list[tuple[int, bytes]]) -> tuple[int, bool]:
    """(cipher suite, TLS 1.3?) from the ServerHello in the server's first handshake record."""
    rtype, body = records[0]
    assert rtype == 22 and body[0] == 2, "first server record is not a ServerHello"
    pos = 4 + 2 + 32
    pos += 1 + body[pos]
    suite = int.from_bytes(body[pos:pos + 2], "big")
    return suite, b"\x00\x2b\x00\x02\x03\x04" in body      # supported_versions = TLS 1.3


def check_stream(name: str, data: bytes, forbidden: list[bytes]) -> list[tuple[int, bytes]]:
    low = data.lower()
    for needle in forbidden:
        assert needle.lower() not in low, f"{name}: plaintext {needle[:40]!r} seen by the relay"
    records = tls_records(data)
    types = [t for t, _ in records]
    if 23 in types:
        assert 22 not in types[types.index(23):], f"{name}: handshake record after application data"
    return records


def test_relay_sees_only_tls_records(tmp_path):
    """Two vdirsyncer phones and curl through recording proxies in front of the relay's forwarded ports: the
    canaries make it through (uploaded, downloaded, five edited); then every recorded HTTPS connection parses
    as TLS records (no handshake record after application data) with a TLS 1.3 or AEAD TLS 1.2 suite, none of
    the canaries, the password, 'authorization:' or their base64 appear, at least 3 connections and 40 kB
    were recorded; port 80 answered a PROPFIND with a 308 and no WWW-Authenticate, and carried no DAV
    content."""
    missing = sshd_available()
    assert missing is None, missing
    cfg = init_instance(tmp_path / "ic", relay=f"{TEST_USER}@127.0.0.1:{free_port()}")
    configure(cfg, "relay", keepalive_interval_s=5)
    canaries = [f"ZZCANARY-{uuid.uuid4()}" for _ in range(20)]
    notes = {c: base64.b32encode(os.urandom(1280)).decode() for c in canaries}
    with relay_sshd(cfg) as relay, ServeProcess(cfg) as srv:
        relay.wait_forwards(30, on_timeout=srv.log)
        with ChaosProxy(relay.https_port, record=True) as tap, ChaosProxy(relay.http_port, record=True) as tap80:
            cafile = selfsigned_cert(cfg.parent)
            up = Vdirsyncer(tmp_path / "phone1", tap.port, cafile, calendar=False)
            up.discover()
            for c in canaries:
                up.write_item("contacts", c.lower(), vcard(c.lower(), c, notes[c]))
            up.sync()
            down = Vdirsyncer(tmp_path / "phone2", tap.port, cafile, calendar=False)
            down.discover()
            down.sync()
            got = {prop(v, "FN") for v in down.local("contacts").values()}
            assert set(canaries) <= got, "the canaries did not make it through the relay"
            for c in canaries[:5]:
                down.write_item("contacts", c.lower(), vcard(c.lower(), c + "-edited", notes[c]))
            down.sync()
            href = f"https://laptop.test:{tap.port}/radicale/alice/contacts/"
            listing = subprocess.run(["curl", "-s", "--cacert", str(cafile), "--resolve",
                                      f"laptop.test:{tap.port}:127.0.0.1", "-u", f"alice:{PASSWORD}", "-X",
                                      "PROPFIND", "-H", "Depth: 1", href], capture_output=True, text=True,
                                     timeout=30, check=True).stdout
            assert canaries[0].lower() in listing
            http = subprocess.run(["curl", "-s", "-i", "-u", f"alice:{PASSWORD}", "-X", "PROPFIND",
                                   f"http://127.0.0.1:{tap80.port}/radicale/alice/contacts/"],
                                  capture_output=True, text=True, timeout=30, check=True).stdout
            assert http.startswith("HTTP/1.1 308") and "WWW-Authenticate" not in http
        captures = list(tap.captures)
        captures80 = list(tap80.captures)

    cred = f"alice:{PASSWORD}".encode()
    forbidden = [PASSWORD.encode(), b"authorization:", base64.b64encode(cred), b"BEGIN:VCARD", b"ZZCANARY"]
    for c in canaries:
        forbidden += [c.encode(), notes[c][:32].encode(), base64.b64encode(c.encode())[:24]]
    total = 0
    suites = set()
    for n, cap in enumerate(captures):
        if not cap.upstream and not cap.downstream:
            continue
        check_stream(f"connection {n} client->relay", bytes(cap.upstream), forbidden)
        down_records = check_stream(f"connection {n} relay->client", bytes(cap.downstream), forbidden)
        suite, tls13 = server_hello_suite(down_records)
        assert suite in (TLS13 if tls13 else AEAD_TLS12), f"connection {n}: cipher suite {suite:#06x}"
        suites.add((suite, tls13))
        total += len(cap.upstream) + len(cap.downstream)
    assert len(captures) >= 3 and total > 20 * 2000, (len(captures), total)
    print(f"\n[plaintext] {len(captures)} TLS connections, {total} bytes captured at the relay, suites {suites}: "
          "all TLS records, no canary/password/Authorization")
    # Port 80: the PROPFIND was answered with a redirect only; the request (sent by curl in clear text, as
    # any client on port 80 would) got nothing DAV back.
    assert captures80 and all(not re.search(rb"ZZCANARY|BEGIN:VCARD|<multistatus", bytes(c.downstream), re.I)
                              for c in captures80)
