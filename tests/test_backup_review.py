"""What an import would change, listed before anything is written (ops/backup_review.py): the users, the keys
and pinned host key, the ACME state, and with no config yet the exported config's relay, ACME and Radicale
settings. Table tests of the pure function, on folders made here."""

from __future__ import annotations

from pathlib import Path

import pytest

from inverse_cloud import config
from inverse_cloud.ops.backup_review import describe_changes


def tree(root: Path, files: dict[str, str | bytes]) -> Path:
    for rel, content in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            p.write_bytes(content)
        else:
            p.write_text(content)
    return root


@pytest.mark.parametrize(("staged", "current", "lines"), [
    ("alice:$2y$new\n", "alice:$2y$new\n", []),
    ("alice:$2y$a\nbob:$2y$b\n", "alice:$2y$a\n", ["users: adds bob (with the passwords set in the export)"]),
    ("alice:$2y$a\n", "alice:$2y$a\ncarol:$2y$c\ndave:$2y$d\n", ["users: removes carol, dave"]),
    ("alice:$2y$other \n", "alice:$2y$a\n", ["users: replaces the password of alice"]),
    # comments, blank lines and lines without a colon are not users; trailing blanks are not a new password
    ("# alice:x\n\nnocolon\nbob:$2y$b  \n", "bob:$2y$b\n", []),
    ("zed:1\namy:2\n", "", ["users: adds amy, zed (with the passwords set in the export)"]),
    ("b:1\nc:9\n", "a:1\nc:2\n", ["users: adds b (with the passwords set in the export)", "users: removes a",
                                   "users: replaces the password of c"]),
    ("x:1\ny:1\n", "x:2\ny:2\n", ["users: replaces the password of x, y"]),
])
def test_user_changes(tmp_path, staged, current, lines):
    staging = tree(tmp_path / "staging", {"data/users.htpasswd": staged})
    target = tree(tmp_path / "target", {"users.htpasswd": current} if current else {})
    (tmp_path / "target").mkdir(exist_ok=True)
    assert describe_changes(staging, target, None, False) == lines


def test_an_unreadable_htpasswd_counts_as_no_users(tmp_path):
    """A current htpasswd that is not UTF-8 is read as empty: every staged user is listed as added."""
    staging = tree(tmp_path / "staging", {"data/users.htpasswd": "alice:x\n"})
    target = tree(tmp_path / "target", {"users.htpasswd": b"\xff\xfe:x\n"})
    assert describe_changes(staging, target, None, False) == [
        "users: adds alice (with the passwords set in the export)"]


def test_file_changes_name_keys_and_acme_state_and_skip_the_store(tmp_path):
    """A different or new file outside the store is listed with what it is (ssh/ -> key or pinned host key,
    acme/ -> ACME state, else "file") and whether it replaces or adds; identical files, the collections and
    the htpasswd (listed as users) are not."""
    staging = tree(tmp_path / "staging", {
        "data/acme/0-same.json": "same", "data/ssh/id_ed25519": "new key", "data/ssh/known_hosts": "same",
        "data/acme/account.json": "{}", "data/other.txt": "x",
        "data/collections/collection-root/alice/card.vcf": "BEGIN:VCARD", "data/users.htpasswd": "",
    })
    target = tree(tmp_path / "target", {"acme/0-same.json": "same", "ssh/id_ed25519": "old key",
                                        "ssh/known_hosts": "same"})
    assert describe_changes(staging, target, None, False) == [
        f"ACME account key or state: adds {target / 'acme' / 'account.json'}",
        f"file: adds {target / 'other.txt'}",
        f"SSH key or pinned relay host key: replaces {target / 'ssh' / 'id_ed25519'}",
    ]


def test_an_unreadable_current_file_is_listed_as_replaced(tmp_path):
    """A current file that cannot be read (a folder in its place) cannot be proven the same: it is listed."""
    staging = tree(tmp_path / "staging", {"data/ssh/id_ed25519": "key"})
    target = tmp_path / "target"
    (target / "ssh" / "id_ed25519").mkdir(parents=True)
    assert describe_changes(staging, target, None, False) == [
        f"SSH key or pinned relay host key: replaces {target / 'ssh' / 'id_ed25519'}"]


def test_the_exported_config_is_summarised_only_when_it_will_be_written(tmp_path):
    """writes_config: the domain, the relay (user@host:port and pinned key, or none), ACME (directory and
    email, or off), each pass-through Radicale option sorted, and web_ui when on. Without it: nothing."""
    staging = tree(tmp_path / "staging", {"data/users.htpasswd": ""})
    target = tmp_path / "target"
    target.mkdir()
    full = config.loads('[server]\ndomain = "laptop.test"\nweb_ui = true\n'
                        '[relay]\nhost = "relay.example"\nuser = "tun"\nport = 2222\nhost_key = "ssh-ed25519 AAAA"\n'
                        '[acme]\nemail = "me@example.org"\ndirectory = "https://ca.example/dir"\n'
                        '[radicale.storage]\nmax_sync_token_age = 100\n'
                        '[radicale.rights]\npermit_delete_collection = false\n')
    assert describe_changes(staging, target, full, True) == [
        "config: domain laptop.test",
        "config: relay tun@relay.example:2222, pinned host key ssh-ed25519 AAAA",
        "config: ACME https://ca.example/dir, email me@example.org",
        "config: [radicale.rights] permit_delete_collection = False",
        "config: [radicale.storage] max_sync_token_age = 100",
        "config: Radicale's web interface on (web_ui = true)",
    ]
    assert describe_changes(staging, target, full, False) == []
    bare = config.loads('[server]\ndomain = "laptop.test"\n[relay]\nhost = "relay.example"\n[acme]\nemail = ""\n')
    lines = describe_changes(staging, target, bare, True)
    assert lines[1].endswith(", pinned host key (none)") and lines[2].endswith(", email (none)"), lines
    off = config.loads('[server]\ndomain = "laptop.test"\n[acme]\nenabled = false\n')
    assert describe_changes(staging, target, off, True)[1:] == ["config: no relay", "config: ACME off"]
    # users and files first, then the config
    tree(staging, {"data/users.htpasswd": "alice:1\n"})
    assert describe_changes(staging, target, full, True)[:2] == [
        "users: adds alice (with the passwords set in the export)", "config: domain laptop.test"]
