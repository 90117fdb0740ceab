"""ACME driver (inverse_cloud/certs/acme_client.py) against a small fake ACME server (aiohttp, loopback, port 0):
the error paths Pebble cannot produce -- 429/503 with Retry-After (seconds and HTTP-date), repeated badNonce,
a CA that forgot our account, ``replaces`` on ARI renewals -- plus the account key's file rules."""

from __future__ import annotations

import base64
import json
import logging
import os
import secrets
import stat
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from inverse_cloud.certs.acme_client import AccountStore, AcmeDriver, generate_key
from inverse_cloud.config import AcmeConfig
from inverse_cloud.dav.web import ChallengeStore
from inverse_cloud.errors import AcmeError, ConfigError, RateLimited
from tests.support import free_port


def b64json(text: str) -> Any:
    return json.loads(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)) or b"null")


class FakeAcme:
    """Just enough RFC 8555 for the driver to reach newOrder; newOrder answers from ``order_answers``."""

    def __init__(self, *, ari: bool = False) -> None:
        self.ari = ari
        self.base = ""
        self.posts: dict[str, int] = {}
        self.payloads: dict[str, list[Any]] = {}
        self.protected: dict[str, list[Any]] = {}
        self.order_answers: list[tuple[int, dict[str, str], dict[str, Any]]] = []
        self.known_keys: set[str] = set()
        self.accounts = 0
        self.renewal_info: tuple[dict[str, Any], dict[str, str]] | None = None

    def _nonce(self) -> dict[str, str]:
        return {"Replay-Nonce": secrets.token_urlsafe(16), "Cache-Control": "no-store"}

    def problem(self, status: int, code: str, detail: str, headers: dict[str, str] | None = None) -> web.Response:
        return web.Response(status=status, headers={**self._nonce(), **(headers or {})},
                            content_type="application/problem+json",
                            text=json.dumps({"type": f"urn:ietf:params:acme:error:{code}", "detail": detail}))

    async def directory(self, request: web.Request) -> web.Response:
        d = {"newNonce": f"{self.base}/nonce", "newAccount": f"{self.base}/acct", "newOrder": f"{self.base}/order",
             "revokeCert": f"{self.base}/revoke", "keyChange": f"{self.base}/key"}
        if self.ari:
            d["renewalInfo"] = f"{self.base}/ari"
        return web.json_response(d)

    async def nonce(self, request: web.Request) -> web.Response:
        return web.Response(status=200, headers=self._nonce())

    async def _record(self, request: web.Request, what: str) -> Any:
        body = await request.json()
        self.posts[what] = self.posts.get(what, 0) + 1
        self.protected.setdefault(what, []).append(b64json(body["protected"]))
        payload = b64json(body["payload"])
        self.payloads.setdefault(what, []).append(payload)
        return payload

    async def account(self, request: web.Request) -> web.Response:
        await self._record(request, "acct")
        jwk = json.dumps(self.protected["acct"][-1].get("jwk"), sort_keys=True)
        headers = {**self._nonce(), "Location": f"{self.base}/acct/{abs(hash(jwk)) % 10**6}"}
        if jwk in self.known_keys:  # RFC 8555 7.3.1: existing key -> 200 + Location of that account
            return web.json_response({"status": "valid"}, status=200, headers=headers)
        self.known_keys.add(jwk)
        self.accounts += 1
        return web.json_response({"status": "valid"}, status=201, headers=headers)

    async def order(self, request: web.Request) -> web.Response:
        await self._record(request, "order")
        status, headers, body = self.order_answers.pop(0) if self.order_answers else (
            429, {"Retry-After": "60"}, {"type": "urn:ietf:params:acme:error:rateLimited", "detail": "slow down"})
        if body.get("type") == "urn:ietf:params:acme:error:accountDoesNotExist":
            self.known_keys.clear()
        return web.Response(status=status, headers={**self._nonce(), **headers},
                            content_type="application/problem+json", text=json.dumps(body))

    async def renewal(self, request: web.Request) -> web.Response:
        assert self.renewal_info is not None
        body, headers = self.renewal_info
        return web.json_response(body, headers=headers)


@pytest.fixture
async def fake_acme():
    fake = FakeAcme()
    app = web.Application()
    app.router.add_get("/dir", fake.directory)
    app.router.add_route("*", "/nonce", fake.nonce)
    app.router.add_post("/acct", fake.account)
    app.router.add_post("/order", fake.order)
    app.router.add_get("/ari/{cert_id}", fake.renewal)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    fake.base = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]
    try:
        yield fake
    finally:
        await runner.cleanup()


def acme_cfg(tmp_path: Path, directory: str) -> AcmeConfig:
    return AcmeConfig(enabled=True, directory=directory, email="", ca_bundle=None, eab_kid="", eab_hmac_key="",
                      key_type="ecdsa-p256", check_interval_s=60, account_dir=tmp_path / "acme")


async def issue_expecting(driver: AcmeDriver, exc_type: type[Exception]) -> Exception:
    with pytest.raises(exc_type) as info:
        await driver.issue(ChallengeStore())
    return info.value


def order_problem(status: int, code: str, headers: dict[str, str] | None = None,
                  detail: str = "x") -> tuple[int, dict[str, str], dict[str, Any]]:
    return status, headers or {}, {"type": f"urn:ietf:params:acme:error:{code}", "detail": detail}


@pytest.mark.parametrize(("status", "code", "retry_after", "expected_s", "words"), [
    (429, "rateLimited", "120", 120.0, "rate-limited by ACME server"),
    (429, "rateLimited", None, None, "rate-limited by ACME server"),
    (503, "serverInternal", "30", 30.0, "unavailable (HTTP 503)"),
])
async def test_rate_limit_keeps_retry_after(tmp_path, fake_acme, status, code, retry_after, expected_s, words):
    """The acme library drops headers on errors; our response hook keeps Retry-After for RateLimited."""
    fake_acme.order_answers = [order_problem(status, code, {"Retry-After": retry_after} if retry_after else {})]
    driver = AcmeDriver(acme_cfg(tmp_path, f"{fake_acme.base}/dir"), "laptop.test")
    try:
        exc = await issue_expecting(driver, RateLimited)
    finally:
        await driver.aclose()
    assert isinstance(exc, RateLimited) and exc.retry_after_s == expected_s
    assert words in str(exc) and fake_acme.base in str(exc) and "\n" not in str(exc)


async def test_retry_after_as_http_date_and_in_problem_detail(tmp_path, fake_acme):
    import email.utils
    import time

    when = email.utils.formatdate(time.time() + 3600, usegmt=True)
    fake_acme.order_answers = [
        order_problem(429, "rateLimited", {"Retry-After": when}),
        order_problem(429, "rateLimited", {}, detail="too many certificates, retry after 2099-01-01 00:00:00 UTC"),
    ]
    driver = AcmeDriver(acme_cfg(tmp_path, f"{fake_acme.base}/dir"), "laptop.test")
    try:
        first = await issue_expecting(driver, RateLimited)
        second = await issue_expecting(driver, RateLimited)
    finally:
        await driver.aclose()
    assert isinstance(first, RateLimited) and first.retry_after_s is not None
    assert 3590 <= first.retry_after_s <= 3600
    assert isinstance(second, RateLimited) and second.retry_after_s == 7 * 86400  # capped at a week


async def test_repeated_bad_nonce_is_retried(tmp_path, fake_acme):
    """Three badNonce answers in a row (the library alone retries once) still reach the real answer."""
    fake_acme.order_answers = [order_problem(400, "badNonce")] * 3 + [order_problem(429, "rateLimited")]
    driver = AcmeDriver(acme_cfg(tmp_path, f"{fake_acme.base}/dir"), "laptop.test")
    try:
        await issue_expecting(driver, RateLimited)
    finally:
        await driver.aclose()
    assert fake_acme.posts["order"] == 4


async def test_unreachable_ca_is_one_line(tmp_path):
    directory = f"http://127.0.0.1:{free_port()}/dir"
    driver = AcmeDriver(acme_cfg(tmp_path, directory), "laptop.test")
    try:
        exc = await issue_expecting(driver, AcmeError)
    finally:
        await driver.aclose()
    assert str(exc) == f"cannot reach ACME server {directory}: connection refused"


async def test_account_is_registered_once_and_found_again_by_key(tmp_path, fake_acme):
    """A second driver (a restart that lost account.json) gets the same account back: no duplicate."""
    cfg = acme_cfg(tmp_path, f"{fake_acme.base}/dir")
    d1 = AcmeDriver(cfg, "laptop.test")
    uri = await d1.ensure_account()
    await d1.aclose()
    (cfg.account_dir / "account.json").unlink()        # crash between "registered" and "URL saved"
    d2 = AcmeDriver(cfg, "laptop.test")
    try:
        assert await d2.ensure_account() == uri
    finally:
        await d2.aclose()
    assert fake_acme.accounts == 1 and fake_acme.posts["acct"] == 2
    assert AccountStore(cfg.account_dir).account_uri(cfg.directory) == uri


async def test_forgotten_account_is_registered_again_with_the_same_key(tmp_path, fake_acme, caplog):
    cfg = acme_cfg(tmp_path, f"{fake_acme.base}/dir")
    d = AcmeDriver(cfg, "laptop.test")
    first = await d.ensure_account()
    key_before = (cfg.account_dir / "account-key.pem").read_bytes()
    fake_acme.order_answers = [order_problem(400, "accountDoesNotExist"), order_problem(429, "rateLimited")]
    caplog.set_level(logging.WARNING, "inverse_cloud.certs.acme_client")
    try:
        await issue_expecting(d, RateLimited)
    finally:
        await d.aclose()
    assert fake_acme.posts["order"] == 2 and fake_acme.accounts == 2
    assert (cfg.account_dir / "account-key.pem").read_bytes() == key_before
    assert "no longer knows account" in caplog.text and first in caplog.text and "cert caa" in caplog.text


async def test_ari_renewal_sends_replaces(tmp_path, fake_acme):
    """With a CA that offers ARI, a renewal order carries ``replaces``; a CA that refuses the replacement
    (alreadyReplaced) gets a plain order instead; a rate limit on it is final (no second order)."""
    fake_acme.ari = True
    cert_id = "aYhba4dGQEHhs3uEe6CuLN4ByNQ.AIdlQyE"
    d = AcmeDriver(acme_cfg(tmp_path, f"{fake_acme.base}/dir"), "laptop.test")
    try:
        fake_acme.order_answers = [order_problem(429, "rateLimited")]
        await issue_expecting(d, RateLimited)                                   # first order: nothing to replace
        fake_acme.order_answers = [order_problem(429, "rateLimited")]
        with pytest.raises(RateLimited):
            await d.issue(ChallengeStore(), replaces=cert_id)
        fake_acme.order_answers = [order_problem(409, "alreadyReplaced"), order_problem(429, "rateLimited")]
        with pytest.raises(RateLimited):
            await d.issue(ChallengeStore(), replaces=cert_id)
    finally:
        await d.aclose()
    payloads = fake_acme.payloads["order"]
    assert len(payloads) == 4
    assert "replaces" not in payloads[0]
    assert payloads[1]["replaces"] == cert_id and payloads[2]["replaces"] == cert_id
    assert "replaces" not in payloads[3]
    assert payloads[1]["identifiers"] == [{"type": "dns", "value": "laptop.test"}]


async def test_renewal_info_window_and_retry_after(tmp_path, fake_acme):
    fake_acme.ari = True
    fake_acme.renewal_info = ({"suggestedWindow": {"start": "2026-04-30T01:00:00Z", "end": "2026-05-01T01:00:00Z"}},
                              {"Retry-After": "21600"})
    d = AcmeDriver(acme_cfg(tmp_path, f"{fake_acme.base}/dir"), "laptop.test")
    try:
        window, retry = await d.renewal_info("aYhba4dGQEHhs3uEe6CuLN4ByNQ.AIdlQyE")
        assert await d.supports_ari()
    finally:
        await d.aclose()
    assert window is not None and window.start.isoformat() == "2026-04-30T01:00:00+00:00"
    assert retry == 21600


def test_account_key_is_private_and_never_replaced(tmp_path):
    store = AccountStore(tmp_path / "acme")
    key = store.load_or_create_key()
    st = os.stat(store.key_path)
    assert stat.S_IMODE(st.st_mode) == 0o600 and stat.S_IMODE(os.stat(store.root).st_mode) == 0o700
    assert store.load_or_create_key().thumbprint() == key.thumbprint()
    os.chmod(store.key_path, 0o640)
    with pytest.raises(ConfigError, match=r"mode 0640; must be 0600 \(run: chmod 600"):
        store.load_or_create_key()
    os.chmod(store.key_path, 0o600)
    store.key_path.write_bytes(b"garbage")
    with pytest.raises(ConfigError, match="restore it from a backup"):
        store.load_or_create_key()
    assert store.key_path.read_bytes() == b"garbage"  # a broken key is reported, never silently replaced


def test_account_uri_per_directory(tmp_path):
    store = AccountStore(tmp_path / "acme")
    store.save_account_uri("https://a/dir", "https://a/acct/1")
    store.save_account_uri("https://b/dir", "https://b/acct/2")
    assert store.account_uri("https://a/dir") == "https://a/acct/1"
    assert store.account_uri("https://b/dir") == "https://b/acct/2"
    assert store.account_uri("https://c/dir") == ""
    assert stat.S_IMODE(os.stat(store.meta_path).st_mode) == 0o600


@pytest.mark.parametrize("key_type", ["ecdsa-p256", "ecdsa-p384", "rsa-2048"])
def test_generate_key(key_type):
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_private_key(generate_key(key_type), password=None)
    assert key.key_size in (256, 384, 2048)


async def test_external_account_binding_is_sent(tmp_path, fake_acme):
    """[acme] eab_kid/eab_hmac_key: newAccount carries an externalAccountBinding JWS (RFC 8555 7.3.4)
    signed with HS256 for the kid, over our account key."""
    import dataclasses

    cfg = dataclasses.replace(acme_cfg(tmp_path, f"{fake_acme.base}/dir"), eab_kid="kid-1",
                              eab_hmac_key=base64.urlsafe_b64encode(b"k" * 32).decode().rstrip("="))
    d = AcmeDriver(cfg, "laptop.test")
    try:
        await d.ensure_account()
    finally:
        await d.aclose()
    eab = fake_acme.payloads["acct"][0]["externalAccountBinding"]
    protected = b64json(eab["protected"])
    assert protected["kid"] == "kid-1" and protected["alg"] == "HS256"
    assert protected["url"] == f"{fake_acme.base}/acct"
    assert b64json(eab["payload"]) == fake_acme.protected["acct"][0]["jwk"]
    assert fake_acme.payloads["acct"][0]["termsOfServiceAgreed"] is True


def test_serving_does_not_load_the_acme_library_until_an_order_is_due(tmp_path):
    """What `serve` imports, plus a driver that reads the directory and ARI, leaves acme, josepy and
    requests unloaded (several MiB of a laptop process); an order loads them. In a fresh interpreter,
    since this test process has long imported them."""
    import subprocess
    import sys

    script = f"""
import asyncio, sys
from pathlib import Path
import inverse_cloud.cli, inverse_cloud.dav.server, inverse_cloud.tunnel.link, inverse_cloud.certs.manager
import inverse_cloud.certs.commands, inverse_cloud.ops.commands, inverse_cloud.tunnel.commands
from inverse_cloud.certs.acme_client import AcmeDriver
from inverse_cloud.config import AcmeConfig
heavy = ("acme", "josepy", "requests")
cfg = AcmeConfig(enabled=True, directory="http://127.0.0.1:9/dir", email="", ca_bundle=None, eab_kid="",
                 eab_hmac_key="", key_type="ecdsa-p256", check_interval_s=60, account_dir=Path({str(tmp_path)!r}))
async def main():
    d = AcmeDriver(cfg, "laptop.test")
    try:
        await d.supports_ari()
    except Exception as exc:
        print("directory:", type(exc).__name__)
    print("before:", [m for m in heavy if m in sys.modules])
    d._make_issuer()
    print("after:", [m for m in heavy if m in sys.modules])
    await d.aclose()
asyncio.run(main())
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True).stdout
    assert "directory: AcmeError" in out, out      # port 9 refuses: the GET really went out
    assert "before: []" in out, out
    assert "after: ['acme', 'josepy', 'requests']" in out, out


@pytest.mark.parametrize("content", ['{"accounts": {"https://a/dir": ', "[1, 2]", '{"accounts": ["x"]}'])
def test_corrupt_account_file_means_look_the_account_up_again(tmp_path, caplog, content):
    """account.json that is not JSON, not an object, or holds no mapping: no account URL (the driver looks it
    up again with the key, which is untouched); unparsable text is one WARNING naming the file; the next save
    writes a good file."""
    import logging

    caplog.set_level(logging.INFO)
    store = AccountStore(tmp_path / "acme")
    key = store.load_or_create_key()
    store.meta_path.write_text(content)
    assert store.account_uri("https://a/dir") == ""
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    if content.startswith('{"accounts": {'):
        assert warnings == [f"ACME account file {store.meta_path} unreadable (" + warnings[0].split(" (", 1)[1]]
        assert warnings[0].endswith("; the account URL will be looked up again")
    else:
        assert warnings == []
    store.save_account_uri("https://a/dir", "https://a/acct/1")
    assert store.account_uri("https://a/dir") == "https://a/acct/1"
    assert store.load_or_create_key().thumbprint() == key.thumbprint()
