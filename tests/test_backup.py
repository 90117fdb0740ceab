"""export/import: a snapshot under Radicale's storage lock, restored into an empty store that Radicale's own
`--verify-storage` accepts; a non-empty store, a damaged file and a running server are refused without
changing anything."""

from __future__ import annotations

import base64
import fcntl
import hashlib
import io
import json
import os
import stat
import subprocess
import sys
import tarfile
import threading
from pathlib import Path

import pytest

from inverse_cloud import config as config_mod
from inverse_cloud.dav.radicale_app import build_application
from inverse_cloud.ops.backup import BackupError, export_backup, import_backup, storage_lock
from tests.support import ServeProcess, wait_until

AUTH = "Basic " + base64.b64encode(b"alice:correct horse").decode()


def _dav(app, method: str, path: str, body: bytes = b"", ctype: str = "text/vcard") -> int:
    environ = {
        "REQUEST_METHOD": method, "SCRIPT_NAME": "/radicale", "PATH_INFO": path, "QUERY_STRING": "",
        "SERVER_NAME": "laptop.test", "SERVER_PORT": "443", "SERVER_PROTOCOL": "HTTP/1.1", "REMOTE_ADDR": "127.0.0.1",
        "wsgi.url_scheme": "https", "wsgi.input": io.BytesIO(body), "wsgi.errors": sys.stderr,
        "CONTENT_LENGTH": str(len(body)), "CONTENT_TYPE": ctype, "HTTP_AUTHORIZATION": AUTH, "HTTP_DEPTH": "1",
    }
    status: list[str] = []
    b"".join(app(environ, lambda s, h, e=None: status.append(s)))
    return int(status[0].split()[0])


def _card(i: int) -> bytes:
    return (f"BEGIN:VCARD\r\nVERSION:3.0\r\nUID:card-{i}\r\nFN:Person {i}\r\nN:{i};Person;;;\r\n"
            f"EMAIL:p{i}@example.org\r\nEND:VCARD\r\n").encode()


def _event(i: int) -> bytes:
    return (f"BEGIN:VCALENDAR\r\nVERSION:2.0\r\nPRODID:-//test//EN\r\nBEGIN:VEVENT\r\nUID:ev-{i}\r\n"
            f"DTSTAMP:20261101T000000Z\r\nDTSTART:2026110{i % 9 + 1}T100000Z\r\nDURATION:PT1H\r\n"
            f"SUMMARY:Event {i}\r\nEND:VEVENT\r\nEND:VCALENDAR\r\n").encode()


def _fill(cfg, cards: int = 5, events: int = 3):
    app = build_application(cfg)
    assert _dav(app, "PROPFIND", "/alice/", ctype="application/xml") == 207  # creates the predefined collections
    for i in range(cards):
        assert _dav(app, "PUT", f"/alice/contacts/card-{i}.vcf", _card(i)) == 201
    for i in range(events):
        assert _dav(app, "PUT", f"/alice/calendar/ev-{i}.ics", _event(i), "text/calendar") == 201
    return app


def _tree_hash(root: Path) -> dict[str, str]:
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and ".Radicale.cache" not in p.parts and p.name != ".Radicale.lock":
            out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _items(cfg) -> dict[str, bytes]:
    root = cfg.server.storage_dir / "collection-root"
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)}


def test_export_then_import_on_a_new_laptop(instance, tmp_path):
    """export -> a 0600 tar with a manifest -> import with no config on the "new laptop" writes the config
    with the new data folder, restores every item byte for byte, the user file, the SSH and ACME keys ->
    `radicale --verify-storage` accepts the restored store -> serve answers alice's old password."""
    cfg = config_mod.load(instance)
    _fill(cfg)
    (cfg.acme.account_dir).mkdir(parents=True, exist_ok=True, mode=0o700)
    (cfg.acme.account_dir / "account-key.pem").write_bytes(b"not really a key")
    os.chmod(cfg.acme.account_dir / "account-key.pem", 0o600)
    dest = tmp_path / "backups" / "ic.tar.gz"
    result = export_backup(cfg, dest, None)
    assert result.items == 8
    assert stat.S_IMODE(dest.stat().st_mode) == 0o600
    with tarfile.open(dest) as tar:
        names = tar.getnames()
    assert "MANIFEST.json" in names and "config.toml" in names
    assert "data/users.htpasswd" in names and "data/acme/account-key.pem" in names
    assert "data/ssh/id_ed25519" in names
    assert not [n for n in names if ".Radicale.lock" in n or ".Radicale.cache" in n]

    new_root = tmp_path / "new-laptop"
    new_cfg_path = new_root / "config.toml"
    out = subprocess.run([sys.executable, "-m", "inverse_cloud.cli", "import", str(dest), "--config",
                          str(new_cfg_path), "--data-dir", str(new_root / "data"), "--accept-changes"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "restored" in out.stdout and "Radicale verified the store" in out.stdout
    new_cfg = config_mod.load(new_cfg_path)
    assert new_cfg.server.data_dir == new_root / "data"
    assert _items(new_cfg) == _items(cfg)
    assert (new_cfg.acme.account_dir / "account-key.pem").read_bytes() == b"not really a key"
    assert new_cfg.relay.key_file.read_bytes() == cfg.relay.key_file.read_bytes()
    assert stat.S_IMODE(new_cfg.relay.key_file.stat().st_mode) == 0o600
    verify = subprocess.run([sys.executable, "-m", "radicale", "--config", "",
                             f"--storage-filesystem-folder={new_cfg.server.storage_dir}", "--verify-storage"],
                            capture_output=True, text=True, timeout=120)
    assert verify.returncode == 0, verify.stderr
    # The restored server serves the items with alice's old password.
    with ServeProcess(new_cfg_path) as srv:
        got = subprocess.run(["curl", "-sk", "-u", "alice:correct horse",
                              f"https://127.0.0.1:{srv.https_port}/radicale/alice/contacts/card-3.vcf"],
                             capture_output=True, timeout=30)
    assert b"UID:card-3" in got.stdout and b"FN:Person 3" in got.stdout


def test_import_refuses_a_non_empty_store_and_changes_nothing(instance, tmp_path):
    """A store holding items (this laptop's, phones synced with it) is never overwritten: exit 1, one line,
    every file unchanged."""
    cfg = config_mod.load(instance)
    _fill(cfg, cards=2, events=1)
    dest = tmp_path / "b.tar.gz"
    export_backup(cfg, dest, None)
    app = build_application(cfg)
    assert _dav(app, "PUT", "/alice/contacts/newer.vcf", _card(99)) == 201  # a change after the export
    before = _tree_hash(cfg.server.data_dir)
    out = subprocess.run([sys.executable, "-m", "inverse_cloud.cli", "import", str(dest), "--config", str(instance)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 1
    assert "refusing to import: the store" in out.stderr and "already holds 4 item(s)" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
    assert _tree_hash(cfg.server.data_dir) == before


def test_import_refuses_a_damaged_file(instance, tmp_path):
    """One flipped byte in an item: the checksum check refuses the whole file before anything moves."""
    cfg = config_mod.load(instance)
    _fill(cfg, cards=2, events=0)
    dest = tmp_path / "b.tar.gz"
    export_backup(cfg, dest, None)
    with tarfile.open(dest) as tar:
        members = [(m, tar.extractfile(m).read() if m.isfile() else b"") for m in tar.getmembers()]
    bad = tmp_path / "bad.tar.gz"
    with tarfile.open(bad, "w:gz") as tar:
        for m, data in members:
            if m.name.endswith("card-1.vcf"):
                data = data.replace(b"Person", b"Persoff")
            m.size = len(data)
            tar.addfile(m, io.BytesIO(data))
    fresh = tmp_path / "fresh"
    with pytest.raises(BackupError, match="does not match its checksum"):
        import_backup(bad, None, config_path=fresh / "config.toml", data_dir=fresh / "data")
    assert not (fresh / "config.toml").exists()
    assert not (fresh / "data" / "collections").exists()


def test_import_refuses_while_the_server_runs(instance, tmp_path):
    cfg = config_mod.load(instance)
    dest = tmp_path / "empty.tar.gz"
    export_backup(cfg, dest, None)
    with ServeProcess(instance):
        with pytest.raises(BackupError, match="while inverse-cloud is running"):
            import_backup(dest, cfg, config_path=instance)


class _FlockSpy:
    """Stands in for the fcntl module inside ops.backup: every call goes to the real one; a lock request
    refused because another process holds the lock sets ``refused``."""

    def __init__(self) -> None:
        self.refused = threading.Event()

    def __getattr__(self, name: str) -> object:
        return getattr(fcntl, name)

    def flock(self, fd: int, operation: int) -> None:
        try:
            fcntl.flock(fd, operation)
        except BlockingIOError:
            self.refused.set()
            raise


def test_export_waits_for_a_writer_and_includes_its_item(instance, tmp_path, monkeypatch):
    """A writer holds Radicale's exclusive lock: the export asks for the lock, is refused and waits (it has
    not finished); the writer completes an item and releases; the item is in the snapshot (nothing
    half-written, nothing acknowledged missing)."""
    from inverse_cloud.ops import backup as backup_mod

    spy = _FlockSpy()
    monkeypatch.setattr(backup_mod, "fcntl", spy)
    cfg = config_mod.load(instance)
    _fill(cfg, cards=1, events=0)
    coll = cfg.server.storage_dir / "collection-root" / "alice" / "contacts"
    lock_path = cfg.server.storage_dir / ".Radicale.lock"
    holder = open(lock_path, "w+")  # noqa: SIM115 -- held across threads on purpose
    fcntl.flock(holder.fileno(), fcntl.LOCK_EX)
    results: dict[str, object] = {}

    def run() -> None:
        results["r"] = export_backup(cfg, tmp_path / "during-write.tar.gz", None)

    t = threading.Thread(target=run)
    t.start()
    try:
        # Either the export is now waiting for the lock, or (broken) it finished without asking.
        wait_until(lambda: spy.refused.is_set() or not t.is_alive(), 10, "the export to ask for the lock")
        assert "r" not in results, "export finished while the storage was locked for writing"
        assert spy.refused.is_set()
        # The write in progress: the item is complete before the writer releases the lock.
        (coll / "late.vcf").write_bytes(_card(42))
    finally:
        fcntl.flock(holder.fileno(), fcntl.LOCK_UN)
        holder.close()
    t.join(30)
    result = results["r"]
    with tarfile.open(tmp_path / "during-write.tar.gz") as tar:
        assert "data/collections/collection-root/alice/contacts/late.vcf" in tar.getnames()
    assert result.items == 2  # type: ignore[attr-defined]
    assert result.lock_wait_s > 0  # type: ignore[attr-defined]


def test_lock_timeout_is_one_line(tmp_path):
    storage = tmp_path / "collections"
    storage.mkdir()
    holder = open(storage / ".Radicale.lock", "w+")  # noqa: SIM115
    fcntl.flock(holder.fileno(), fcntl.LOCK_EX)
    try:
        with pytest.raises(BackupError, match="stayed locked for 0 s"), storage_lock(storage, timeout_s=0.2):
            pass
    finally:
        holder.close()


def test_export_refuses_a_destination_inside_the_data_folder(instance):
    cfg = config_mod.load(instance)
    with pytest.raises(BackupError, match="inside the data folder"):
        export_backup(cfg, cfg.server.data_dir / "x.tar.gz", None)


def test_export_command(instance, tmp_path):
    out = subprocess.run([sys.executable, "-m", "inverse_cloud.cli", "export", str(tmp_path / "e.tgz"), "--config",
                          str(instance), "--no-encrypt"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "wrote" in out.stdout and "unencrypted: keep it private" in out.stdout
    wait_until(lambda: (tmp_path / "e.tgz").exists(), 5, "export file")


def _retar(src: Path, dest: Path, change) -> Path:
    """Copy export ``src`` to ``dest``, passing each (TarInfo, bytes) through ``change`` (None drops it)."""
    with tarfile.open(src) as tar:
        members = [(m, tar.extractfile(m).read() if m.isfile() else b"") for m in tar.getmembers()]
    with tarfile.open(dest, "w:gz") as tar:
        for m, data in members:
            for out in change(m, data) or []:
                info, body = out
                info.size = len(body)
                tar.addfile(info, io.BytesIO(body))
    return dest


def test_import_in_process_into_an_initialised_laptop(instance, tmp_path):
    """Export A, then import it into B (initialised, nothing stored, no server running): the items and the
    user file are A's, B's empty collections folder is moved aside (never deleted), Radicale verified the
    store, B's config is kept; into a fresh folder without a config, the exported config is written with
    the new data folder."""
    cfg = config_mod.load(instance)
    _fill(cfg, cards=3, events=1)
    dest = tmp_path / "a.tar.gz"
    export_backup(cfg, dest, None)
    from tests.support import init_instance

    b_path = init_instance(tmp_path / "b", password="another long password")
    b = config_mod.load(b_path)
    b.server.storage_dir.mkdir(parents=True, exist_ok=True)
    (b.server.storage_dir / "collection-root").mkdir()
    b_config_text = b_path.read_text()
    with tarfile.open(dest) as tar:
        exported = len(tar.getnames()) - 1     # all but the manifest
    result = import_backup(dest, b, config_path=b_path, accept_changes=True)   # A's users replace B's
    assert (result.files, result.items, result.config_written) == (exported, 4, None)
    assert result.moved_aside is not None and result.moved_aside.name.startswith("collections.before-import-")
    assert (result.moved_aside / "collection-root").is_dir()
    assert _items(b) == _items(cfg)
    assert b.server.htpasswd_path.read_bytes() == cfg.server.htpasswd_path.read_bytes()
    assert b_path.read_text() == b_config_text
    fresh = tmp_path / "fresh"
    again = import_backup(dest, None, config_path=fresh / "config.toml", data_dir=fresh / "data",
                          accept_changes=True)
    assert again.config_written == fresh / "config.toml" and again.moved_aside is None
    written = config_mod.load(fresh / "config.toml")
    assert written.server.data_dir == fresh / "data" and _items(written) == _items(cfg)
    assert stat.S_IMODE((fresh / "config.toml").stat().st_mode) == 0o600


@pytest.mark.parametrize(("case", "message"), [
    ("no manifest", "is not an inverse-cloud export (no valid MANIFEST.json)"),
    ("other format", "export format 99 is not supported by this version"),
    ("absolute name", "unexpected entry '/etc/x'; refusing the whole file"),
    ("dot-dot name", "unexpected entry 'data/../../x'; refusing the whole file"),
    ("not in manifest", "data/extra.txt is not in the manifest; refusing the whole file"),
    ("missing file", "1 file(s) listed in the manifest are missing"),
    ("not a tar", "not a readable export (file could not be opened successfully)"),
])
def test_import_refuses_a_malformed_export_with_one_line(instance, tmp_path, case, message):
    cfg = config_mod.load(instance)
    _fill(cfg, cards=1, events=0)
    dest = tmp_path / "a.tar.gz"
    export_backup(cfg, dest, None)

    def change(m, data):
        if case == "no manifest" and m.name == "MANIFEST.json":
            return []
        if case == "other format" and m.name == "MANIFEST.json":
            return [(m, json.dumps({**json.loads(data), "format": 99}).encode())]
        if case == "missing file" and m.name == "data/users.htpasswd":
            return []
        out = [(m, data)]
        if m.name == "config.toml" and case in ("absolute name", "dot-dot name", "not in manifest"):
            extra = tarfile.TarInfo({"absolute name": "/etc/x", "dot-dot name": "data/../../x",
                                     "not in manifest": "data/extra.txt"}[case])
            out.append((extra, b"x"))
        return out

    bad = tmp_path / "bad.tar.gz"
    if case == "not a tar":
        bad.write_bytes(b"this is not a tar file at all")
    else:
        _retar(dest, bad, change)
    fresh = tmp_path / "fresh"
    with pytest.raises(BackupError) as caught:
        import_backup(bad, None, config_path=fresh / "config.toml", data_dir=fresh / "data")
    assert message in str(caught.value) and str(caught.value).startswith(str(bad))
    assert "\n" not in str(caught.value)
    assert not (fresh / "config.toml").exists() and not (fresh / "data" / "collections").exists()


# --- hardening: a backup from an untrusted place ------------------------------------------------------

def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "inverse_cloud.cli", *args], capture_output=True, text=True,
                          timeout=180)


def _rewrite(src: Path, dest: Path, change) -> None:
    """Copy a plain export, letting ``change(name, data)`` return new bytes for a member (or None to keep
    it), and recompute the manifest's sums as an attacker would."""
    import json

    with tarfile.open(src) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}
    manifest = json.loads(members.pop("MANIFEST.json"))
    extra = change(None, None) or {}
    for name in list(members):
        new = change(name, members[name])
        if new is not None:
            members[name] = new
    members.update(extra)
    manifest["files"] = {name: hashlib.sha256(data).hexdigest() for name, data in members.items()}
    members["MANIFEST.json"] = json.dumps(manifest).encode()
    with tarfile.open(dest, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o600
            tar.addfile(info, io.BytesIO(data))


def test_export_is_encrypted_by_default_and_a_wrong_passphrase_or_a_flipped_bit_is_refused(instance, tmp_path):
    """`export` asks for a passphrase (here from a file) and writes the age format: no vCard, user name or
    key is readable in it. Import with a wrong passphrase, or of the file with one bit flipped, is refused
    with one line before anything is written; the right passphrase restores it."""
    cfg = config_mod.load(instance)
    _fill(cfg, cards=2, events=1)
    secret = tmp_path / "pass"
    secret.write_text("a long backup passphrase\n")
    dest = tmp_path / "ic.age"
    out = _cli("export", str(dest), "--config", str(instance), "--passphrase-file", str(secret))
    assert out.returncode == 0, out.stderr
    blob = dest.read_bytes()
    assert blob.startswith(b"age-encryption.org/v1\n")
    for clear in (b"BEGIN:VCARD", b"alice", b"OPENSSH PRIVATE KEY", b"MANIFEST"):
        assert clear not in blob
    wrong = tmp_path / "wrong"
    wrong.write_text("not the passphrase\n")
    flipped = tmp_path / "flipped.age"
    tampered = bytearray(blob)
    tampered[len(tampered) // 2] ^= 0x01
    flipped.write_bytes(bytes(tampered))
    fresh = tmp_path / "fresh"
    for src, pw in ((dest, wrong), (flipped, secret)):
        out = _cli("import", str(src), "--config", str(fresh / "config.toml"), "--data-dir", str(fresh / "data"),
                   "--passphrase-file", str(pw), "--accept-changes")
        assert out.returncode == 1, out.stderr
        assert "wrong passphrase, or the file was modified" in out.stderr
        assert len(out.stderr.strip().splitlines()) == 1, out.stderr
        assert not fresh.exists() or not any(fresh.rglob("*")), list(fresh.rglob("*"))
    out = _cli("import", str(dest), "--config", str(fresh / "config.toml"), "--data-dir", str(fresh / "data"),
               "--passphrase-file", str(secret), "--accept-changes")
    assert out.returncode == 0, out.stderr
    assert _items(config_mod.load(fresh / "config.toml")) == _items(cfg)


def test_import_lists_what_it_would_change_and_needs_accept_changes(instance, tmp_path):
    """A tampered (plain) export that adds a user and replaces the relay's pinned host key, with the
    manifest recomputed: import onto this laptop lists both changes and changes nothing; with
    --accept-changes it goes ahead."""
    cfg = config_mod.load(instance)
    plain = tmp_path / "plain.tar.gz"
    export_backup(cfg, plain, None)
    evil = tmp_path / "evil.tar.gz"

    def change(name, data):
        if name is None:
            return {"data/ssh/relay_known_hosts": b"[relay.evil]:22 ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIEvil\n"}
        if name == "data/users.htpasswd":
            return data + b"mallory:$2b$12$abcdefghijklmnopqrstuuN0Pq0pUyZ3yvyCTJzXqQ9uzZkTzh6hG\n"
        return None

    _rewrite(plain, evil, change)
    before = _tree_hash(cfg.server.data_dir)
    out = _cli("import", str(evil), "--config", str(instance))
    assert out.returncode == 1, out.stderr
    assert "users: adds mallory" in out.stdout, out.stdout
    assert "relay_known_hosts" in out.stdout, out.stdout
    assert "--accept-changes" in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert _tree_hash(cfg.server.data_dir) == before
    out = _cli("import", str(evil), "--config", str(instance), "--accept-changes")
    assert out.returncode == 0, out.stderr
    assert "mallory" in (cfg.server.htpasswd_path).read_text()


@pytest.mark.parametrize("evil_option", ['[radicale.storage]\nhook = "touch {marker}"\n',
                                         '[radicale.storage]\ntype = "tests.pwned_{marker_name}"\n'])
def test_import_refuses_an_exported_config_that_runs_code(instance, tmp_path, evil_option):
    """An export whose config.toml sets storage.hook (a shell command after every write) or storage.type
    (a module imported while the store is verified), with the manifest recomputed: import onto a new
    laptop is refused with one line, even with --accept-changes, and nothing is written. Before, it was
    imported ("Radicale verified the store") and the first PUT ran the command."""
    cfg = config_mod.load(instance)
    plain = tmp_path / "plain.tar.gz"
    export_backup(cfg, plain, None)
    marker = tmp_path / "pwned"
    option = evil_option.format(marker=marker, marker_name="x")
    _rewrite(plain, tmp_path / "evil.tar.gz",
             lambda name, data: data + b"\n" + option.encode() if name == "config.toml" else None)
    fresh = tmp_path / "fresh"
    out = _cli("import", str(tmp_path / "evil.tar.gz"), "--config", str(fresh / "config.toml"),
               "--data-dir", str(fresh / "data"), "--accept-changes")
    assert out.returncode == 1, out.stdout + out.stderr
    assert "its config is refused" in out.stderr and "not a Radicale option" in out.stderr, out.stderr
    assert not (fresh / "config.toml").exists() and not (fresh / "data" / "collections").exists()
    assert not marker.exists()


class _Zeros:
    def __init__(self, size: int) -> None:
        self.left = size

    def read(self, n: int = -1) -> bytes:
        n = self.left if n < 0 else min(n, self.left)
        self.left -= n
        return bytes(n)


def _bomb(dest: Path, size: int) -> None:
    """A small .tar.gz holding one item of ``size`` zero bytes, listed in a valid manifest."""
    import json

    digest = hashlib.sha256()
    zeros = _Zeros(size)
    while chunk := zeros.read(1 << 20):
        digest.update(chunk)
    name = "data/collections/collection-root/alice/contacts/big.vcf"
    manifest = {"format": 1, "files": {name: digest.hexdigest()}, "items": 1}
    with tarfile.open(dest, "w:gz") as tar:
        info = tarfile.TarInfo(name)
        info.size = size
        tar.addfile(info, _Zeros(size))
        data = json.dumps(manifest).encode()
        info = tarfile.TarInfo("MANIFEST.json")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))


def test_import_streams_members_to_disk(tmp_path):
    """A 64 MiB item in a .tar.gz of a few hundred KB is written without ever holding it in memory (peak
    traced allocation under 16 MiB; reading it whole took more than 64 MiB)."""
    import tracemalloc

    bomb = tmp_path / "bomb.tar.gz"
    _bomb(bomb, 64 << 20)
    assert bomb.stat().st_size < 1 << 20
    fresh = tmp_path / "fresh"
    tracemalloc.start()
    try:
        import_backup(bomb, None, config_path=fresh / "config.toml", data_dir=fresh / "data", check_running=False)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    print(f"peak traced allocation importing a 64 MiB member: {peak / 2**20:.1f} MiB")
    assert peak < 16 << 20, peak
    assert (fresh / "data/collections/collection-root/alice/contacts/big.vcf").stat().st_size == 64 << 20


@pytest.mark.parametrize(("member_cap", "total_cap", "message"), [
    (1 << 20, 1 << 30, "over the 1048576-byte cap per file"),
    (1 << 30, 2 << 20, "over the import's cap"),
])
def test_import_caps_each_member_and_the_total(tmp_path, member_cap, total_cap, message):
    """A member over the per-file cap, or members over the total cap, refuse the whole file before any of
    it is written; nothing is left behind."""
    bomb = tmp_path / "bomb.tar.gz"
    _bomb(bomb, 3 << 20)
    fresh = tmp_path / "fresh"
    with pytest.raises(BackupError, match=message):
        import_backup(bomb, None, config_path=fresh / "config.toml", data_dir=fresh / "data", check_running=False,
                      max_member_bytes=member_cap, max_total_bytes=total_cap)
    assert not [p for p in fresh.rglob("*") if p.is_file()]
