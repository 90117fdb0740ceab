"""The phone page at https://<domain>/ and `inverse-cloud phone`: URLs, QR code, authentication. The page is
fetched with curl and rendered by headless Chromium; the QR code in the screenshot is decoded by zbarimg,
as a phone camera would."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from inverse_cloud.ops.phone import HtpasswdChecker, account, render_html, render_terminal
from tests.support import ServeProcess

ARTIFACTS = Path(os.environ.get("INVERSE_CLOUD_ARTIFACTS", Path(__file__).resolve().parent.parent / "test-artifacts"))


def test_account_urls_carry_no_password():
    a = account("alice", "contacts.example.org")
    assert a.dav_root == "https://contacts.example.org/radicale/"
    assert a.carddav == "https://contacts.example.org/radicale/alice/contacts/"
    assert a.caldav == "https://contacts.example.org/radicale/alice/calendar/"
    assert a.davx5_link == "davx5://alice@contacts.example.org/radicale/"
    assert a.carddavs_link == "carddavs://alice@contacts.example.org/radicale/"
    assert account("bob@home", "h.test", 8443).davx5_link == "davx5://bob%40home@h.test:8443/radicale/"


def test_page_escapes_everything():
    """A collection name is user-controlled (PROPPATCH displayname): it is escaped, no markup gets in."""
    html = render_html(account("alice", "h.test"),
                       [{"collection": "x", "type": "addressbook", "name": "<script>alert(1)</script>", "items": 2}])
    assert "<script>" not in html and "&lt;script&gt;" in html
    assert "<svg" in html and "davx5://alice@h.test/radicale/" in html


def test_terminal_output_has_qr_and_thunderbird_lines():
    text = render_terminal(account("alice", "h.test"))
    assert "▀" in text or "█" in text
    assert "location https://h.test/radicale/alice/contacts/" in text
    assert "location https://h.test/radicale/alice/calendar/" in text


async def test_htpasswd_checker_caches_until_file_changes(tmp_path):
    """Right password -> True (then cached); wrong -> False; after `user passwd` the old one fails."""
    from inverse_cloud.dav import users

    path = tmp_path / "users.htpasswd"
    users.add_user(path, "alice", "one password")
    checker = HtpasswdChecker(path)
    try:
        assert await checker.check("alice", "one password")
        assert not await checker.check("alice", "wrong")
        assert not await checker.check("mallory", "one password")
        users.set_password(path, "alice", "another password")
        assert not await checker.check("alice", "one password")
        assert await checker.check("alice", "another password")
    finally:
        checker.close()


def _curl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["curl", "-sk", *args], capture_output=True, text=True, timeout=30)


def test_page_requires_authentication_over_real_tls(instance):
    """No credentials -> 401 with a Basic challenge; a wrong password -> 401; alice's password -> 200 with
    her URLs and the QR code, strict headers, and never the password."""
    with ServeProcess(instance) as srv:
        base = f"https://127.0.0.1:{srv.https_port}/"
        anon = _curl("-D", "-", "-o", "/dev/null", base)
        assert anon.stdout.startswith("HTTP/1.1 401") and 'www-authenticate: basic realm="inverse-cloud"' in \
            anon.stdout.lower()
        wrong = _curl("-o", "/dev/null", "-w", "%{http_code}", "-u", "alice:nope", base)
        assert wrong.stdout == "401"
        good = _curl("-D", "-", "-u", "alice:correct horse", base)
        head, _, body = good.stdout.partition("\n\n")
        assert head.startswith("HTTP/1.1 200")
        assert "content-security-policy: default-src 'none'" in head.lower()
        assert "cache-control: no-store" in head.lower()
        assert "https://laptop.test/radicale/alice/contacts/" in body
        assert "davx5://alice@laptop.test/radicale/" in body and "<svg" in body
        assert "correct horse" not in body and "correct%20horse" not in body
        # PROPFIND / still goes to DAV discovery, not to the page.
        pf = _curl("-o", "/dev/null", "-w", "%{http_code} %{redirect_url}", "-X", "PROPFIND", base)
        assert pf.stdout.startswith("301 ") and pf.stdout.endswith("/radicale/")
    assert "correct horse" not in srv.log()


def test_page_in_headless_chromium_with_readable_qr(instance):
    """Chromium renders the page (screenshot kept in test-artifacts/phone-page.png); zbarimg decodes the QR
    code from the screenshot to exactly davx5://alice@laptop.test/radicale/."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.fail("chromium is missing: apt-get install chromium")
    if shutil.which("zbarimg") is None:
        pytest.fail("zbarimg is missing: apt-get install zbar-tools")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / "phone-page.png"
    shot.unlink(missing_ok=True)
    with ServeProcess(instance) as srv:
        url = f"https://alice:correct%20horse@127.0.0.1:{srv.https_port}/"
        flags = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--ignore-certificate-errors",
                 "--hide-scrollbars", f"--user-data-dir={instance.parent / 'chromium'}"]
        dom = subprocess.run([*flags, "--dump-dom", url], capture_output=True, text=True, timeout=120)
        assert 'id="carddav">https://laptop.test/radicale/alice/contacts/<' in dom.stdout, dom.stderr[-2000:]
        subprocess.run([*flags, "--window-size=900,1400", f"--screenshot={shot}", url], capture_output=True,
                       text=True, timeout=120)
    assert shot.exists() and shot.stat().st_size > 10_000, "no screenshot written"
    decoded = subprocess.run(["zbarimg", "-q", "--raw", str(shot)], capture_output=True, text=True, timeout=60)
    assert decoded.stdout.splitlines()[0] == "davx5://alice@laptop.test/radicale/"


def test_phone_command(instance):
    out = subprocess.run([sys.executable, "-m", "inverse_cloud.cli", "phone", "--config", str(instance)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "davx5://alice@laptop.test/radicale/" in out.stdout
    bad = subprocess.run([sys.executable, "-m", "inverse_cloud.cli", "phone", "--user", "bob", "--config",
                          str(instance)], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1 and "no user 'bob'" in bad.stderr


async def test_unknown_user_costs_one_bcrypt_check_like_a_known_one(tmp_path, monkeypatch):
    """The phone page's check runs bcrypt once, at the same cost, whether the user exists or not (a
    fixed dummy hash for unknown users), so the answer time does not tell which user names exist.
    Before, an unknown user was answered without any bcrypt work: about half the time."""
    from inverse_cloud.dav import users
    from inverse_cloud.ops import phone

    path = tmp_path / "users.htpasswd"
    users.add_user(path, "alice", "one password")
    calls: list[bytes] = []
    real = phone.bcrypt.checkpw

    def counting(password: bytes, hashed: bytes) -> bool:
        calls.append(hashed)
        return real(password, hashed)

    monkeypatch.setattr(phone.bcrypt, "checkpw", counting)
    checker = HtpasswdChecker(path)
    try:
        for user, password, expected in [("alice", "wrong", False), ("mallory", "wrong", False),
                                         ("mallory", "one password", False), ("alice", "one password", True)]:
            calls.clear()
            assert await checker.check(user, password) is expected
            assert len(calls) == 1, (user, calls)
            assert calls[0].split(b"$")[2] == str(users.BCRYPT_ROUNDS).encode(), calls[0]
    finally:
        checker.close()
