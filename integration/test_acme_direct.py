"""Certificates from a real Pebble (Debian's pebble + pebble-challtestsrv), validation reaching our HTTP
listener directly (the through-the-relay variant is test_acme_tunnel.py): first issuance and automatic
renewal under a nonce storm with a sync connection held across the swap, a restart in the middle of an
order, F7 (429 + Retry-After from a shim in front of Pebble), F8 (corrupt files on disk) and CAA."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import ssl
import threading
import time
from pathlib import Path

import aiohttp
import pytest
from acme_support import DOMAIN, SyncLoad, cert_cli, configure_acme, verified_serial, wait_issued
from aiohttp import web
from chaos_proxy import ChaosProxy
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from pebble import PebbleCA

from inverse_cloud.config import load
from tests.support import ServeProcess, init_instance, served_certificate_serial, wait_until


def http_port(cfg: Path) -> int:
    return load(cfg).server.http_listen[1]


def account_uri(cfg: Path) -> str:
    c = load(cfg)
    return json.loads((c.acme.account_dir / "account.json").read_text())["accounts"][c.acme.directory]


@pytest.mark.slow
def test_issue_and_renew_under_a_nonce_storm_without_dropping_a_request(tmp_path):
    """Pebble rejects 20% of good nonces (4x its default) and issues 20 s certificates. serve on an empty
    data dir obtains one (validation hits our HTTP listener), a client verifies it against this Pebble's
    root; a sync load holds one keep-alive connection and makes a fresh handshake per round while the
    manager renews at half the lifetime on its own. Expected: the served serial changes, zero failed
    handshakes, zero failed requests, the long-lived connection never reconnects, one ACME account."""
    cfg = init_instance(tmp_path / "ic")
    port80 = http_port(cfg)
    with PebbleCA(tmp_path / "pebble", http_port=port80, validity_s=20, nonce_reject=20) as ca:
        configure_acme(cfg, ca, port80)
        root = ca.write_root(tmp_path / "root.pem")
        started = time.monotonic()
        with ServeProcess(cfg) as srv:
            first = wait_issued(srv.https_port, root, 60, srv.log)
            print(f"\nfirst certificate served {time.monotonic() - started:.2f} s after serve started "
                  "(direct, 20% nonce rejection)")
            load_ = SyncLoad(srv.https_port, root).start()
            try:
                renewed = wait_issued(srv.https_port, root, 60, srv.log, not_serial=first)
                rounds = load_.handshakes_ok
                wait_until(lambda: load_.handshakes_ok > rounds + 5, 30, "load rounds after the swap")
            finally:
                load_.stop()
            log = srv.log()
        assert renewed != first
        assert load_.failures == [], load_.failures
        assert load_.reconnects == 0 and load_.long_serial == first      # old connection kept its certificate
        assert load_.fresh_serials[-1] == renewed and load_.requests_ok > 10
        m = re.search(r"certificate renewed: serial [0-9a-f]+ .*\((\d+\.\d+) s", log)
        assert m, log
        nonces = sum(int(n) for n in re.findall(r"(\d+) badNonce answer", log))
        print(f"renewal (self-check + order + swap + served-serial proof): {m.group(1)} s; "
              f"{load_.requests_ok} requests and {load_.handshakes_ok} handshakes across it, 0 failed; "
              f"{nonces} badNonce answers retried over both issuances")
        assert "a fresh handshake to our listener presents it" in log
        assert ca.accounts() == 1


def test_restart_in_the_middle_of_an_order(tmp_path):
    """Pebble validates through a proxy that freezes its connection, so the order is pending with the
    challenge answered; serve is killed (SIGKILL) right then. A new serve completes issuance with the same
    account: same key, same account URL, Pebble still holds one account."""
    cfg = init_instance(tmp_path / "ic")
    port80 = http_port(cfg)
    with ChaosProxy(target_port=port80) as va_path:
        va_path.set_mode("freeze")
        with PebbleCA(tmp_path / "pebble", http_port=va_path.port, validity_s=3600) as ca:
            configure_acme(cfg, ca, port80)
            root = ca.write_root(tmp_path / "root.pem")
            c = load(cfg)
            srv = ServeProcess(cfg).start()
            try:
                wait_until(lambda: va_path.open_connections() > 0, 30, "Pebble's validation to connect",
                           on_timeout=srv.log)
                key = (c.acme.account_dir / "account-key.pem").read_bytes()
                uri = account_uri(cfg)
                srv.kill()
            finally:
                srv.stop()
            assert ca.orders() == 1 and not (c.server.cert_dir / "current").exists()
            va_path.set_mode("cut")        # the frozen validation dies; new ones flow
            with ServeProcess(cfg) as again:
                wait_issued(again.https_port, root, 60, again.log)
                log = again.log()
        assert (c.acme.account_dir / "account-key.pem").read_bytes() == key
        assert account_uri(cfg) == uri and ca.accounts() == 1
        assert "created ACME account key" not in log and ca.orders() == 2


class RateLimitShim:
    """HTTPS in front of Pebble (Pebble's own certificate): forwards everything with the client's Host, so
    Pebble's URLs and JWS url checks point at the shim; answers newOrder with 429 + Retry-After while
    ``limit`` > 0. Records when each newOrder arrived and whether it was limited. Own loop in a thread."""

    def __init__(self, ca: PebbleCA, retry_after_s: int) -> None:
        self.ca, self.retry_after_s = ca, retry_after_s
        self.limit = 0
        self.orders: list[tuple[float, bool]] = []
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._main, daemon=True)

    def __enter__(self) -> RateLimitShim:
        self._thread.start()
        assert self._ready.wait(20), "shim did not start"
        return self

    def __exit__(self, *exc: object) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(20)

    @property
    def directory(self) -> str:
        return f"https://127.0.0.1:{self.port}/dir"

    def _main(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._start())
        self._ready.set()
        self._loop.run_forever()
        self._loop.run_until_complete(self._runner.cleanup())
        self._loop.run_until_complete(self._session.close())
        self._loop.close()

    async def _start(self) -> None:
        server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        server_ctx.load_cert_chain(self.ca.wfe_cert, self.ca.wfe_key)
        client_ctx = ssl.create_default_context(cafile=str(self.ca.wfe_ca))
        self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=client_ctx))
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0, ssl_context=server_ctx)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        upstream = f"https://127.0.0.1:{self.ca.port}{request.path_qs}"
        if request.method == "POST" and request.path == "/order-plz":
            limited = self.limit > 0
            self.orders.append((time.time(), limited))
            if limited:
                self.limit -= 1
                async with self._session.head(f"https://127.0.0.1:{self.ca.port}/nonce-plz") as r:
                    nonce = r.headers.get("Replay-Nonce", "")
                body = {"type": "urn:ietf:params:acme:error:rateLimited",
                        "detail": "too many new orders recently (shim)"}
                return web.Response(status=429, text=json.dumps(body), content_type="application/problem+json",
                                    headers={"Retry-After": str(self.retry_after_s), "Replay-Nonce": nonce})
        headers = {"Host": request.host}
        if "Content-Type" in request.headers:
            headers["Content-Type"] = request.headers["Content-Type"]
        async with self._session.request(request.method, upstream, data=await request.read(),
                                         headers=headers, allow_redirects=False) as r:
            body = await r.read()
            out = {k: v for k, v in r.headers.items()
                   if k.lower() not in ("content-length", "transfer-encoding", "connection", "content-encoding",
                                        "date", "server")}
            return web.Response(status=r.status, body=body, headers=out)


def test_rate_limited_order_waits_for_retry_after(tmp_path):
    """F7: a valid certificate is served; the shim answers the next newOrder with 429 + Retry-After: 6.
    `cert renew --force` reports the rate limit; the served certificate is kept; an immediate second
    `cert renew --force` places no order ("not retrying yet"); once 6 s have passed it renews. No newOrder
    reached the shim inside the Retry-After window."""
    cfg = init_instance(tmp_path / "ic")
    port80 = http_port(cfg)
    with PebbleCA(tmp_path / "pebble", http_port=port80, validity_s=3600) as ca, RateLimitShim(ca, 6) as shim:
        configure_acme(cfg, ca, port80, directory=shim.directory)
        root = ca.write_root(tmp_path / "root.pem")
        with ServeProcess(cfg) as srv:
            first = wait_issued(srv.https_port, root, 60, srv.log)
            shim.limit = 1
            limited = cert_cli(cfg, "renew", "--force")
            assert limited.returncode == 1, limited
            assert "rate-limited by ACME server" in limited.stderr
            t429 = shim.orders[-1][0]
            assert shim.orders[-1][1] and verified_serial(srv.https_port, root) == first
            assert re.search(r"rate-limited by ACME server .*; next attempt at \d{4}-\d\d-\d\d ", srv.log())
            held = cert_cli(cfg, "renew", "--force")
            assert held.returncode == 1 and "not retrying yet" in held.stdout, held
            assert shim.orders[-1][0] == t429                                   # no order placed meanwhile
            wait_until(lambda: time.time() >= t429 + 6, 20, "Retry-After to pass")
            done = cert_cli(cfg, "renew", "--force")
            assert done.returncode == 0 and "renewed: serial" in done.stdout, (done, srv.log())
            assert verified_serial(srv.https_port, root) not in (None, first)
        late = [t for t, was_limited in shim.orders if t > t429]
        assert late and min(late) >= t429 + 6, shim.orders


def test_corrupt_files_keep_the_loaded_certificate_and_restart_reissues(tmp_path):
    """F8 + CAA: with a certificate served, `cert caa` prints the record naming our account (DNS: missing);
    with it published in challtestsrv it reads ok. fullchain.pem truncated + SIGHUP: the in-memory
    certificate keeps being served (verified handshakes). A mismatched privkey.pem + SIGHUP: same. Restart:
    the damaged pair is refused, a new certificate is obtained, and the server's CAA check reads ok."""
    cfg = init_instance(tmp_path / "ic")
    port80 = http_port(cfg)
    c = load(cfg)
    with PebbleCA(tmp_path / "pebble", http_port=port80, validity_s=3600) as ca:
        configure_acme(cfg, ca, port80)
        root = ca.write_root(tmp_path / "root.pem")
        with ServeProcess(cfg) as srv:
            first = wait_issued(srv.https_port, root, 60, srv.log)
            uri = account_uri(cfg)
            record = f'{DOMAIN}. CAA 0 issue "pebble.test; accounturi={uri}; validationmethods=http-01"'
            out = cert_cli(cfg, "caa")
            assert out.returncode == 0 and out.stdout.splitlines()[0] == record, out
            assert "; DNS now: missing" in out.stdout
            wait_until(lambda: "CAA for laptop.test: missing" in srv.log(), 20, "the CAA warning", on_timeout=srv.log)
            ca.add_caa(DOMAIN, [("issue", f"pebble.test; accounturi={uri}; validationmethods=http-01")])
            assert "; DNS now: ok" in cert_cli(cfg, "caa").stdout

            live = (c.server.cert_dir / "current").resolve()
            chain = (live / "fullchain.pem").read_bytes()
            (live / "fullchain.pem").write_bytes(chain[: len(chain) // 3])
            srv.signal(signal.SIGHUP)
            wait_until(lambda: srv.log().count(" refused: ") >= 1, 20, "the refused reload", on_timeout=srv.log)
            assert verified_serial(srv.https_port, root) == first
            (live / "fullchain.pem").write_bytes(chain)
            other = ec.generate_private_key(ec.SECP256R1()).private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
            (live / "privkey.pem").write_bytes(other)
            srv.signal(signal.SIGHUP)
            wait_until(lambda: srv.log().count(" refused: ") >= 2, 20, "the second refused reload",
                       on_timeout=srv.log)
            assert verified_serial(srv.https_port, root) == first
            assert served_certificate_serial("127.0.0.1", srv.https_port) == first
        with ServeProcess(cfg) as again:
            reissued = wait_issued(again.https_port, root, 60, again.log, not_serial=first)
            wait_until(lambda: json.loads(cert_cli(cfg, "status", "--json").stdout)["caa"]["state"] == "ok", 30,
                       "the server's CAA check to read ok", on_timeout=again.log)
            log = again.log()
        assert reissued != first and "falling back to a self-signed certificate" in log
        assert ca.accounts() == 1 and account_uri(cfg) == uri


def test_cert_renew_and_status_without_a_server(tmp_path):
    """No server running: `cert renew` answers HTTP-01 on [server] http_listen itself, obtains and stores a
    certificate; `cert status` reads it from the files; a second `cert renew` says it is not due; `serve`
    then presents that very certificate."""
    cfg = init_instance(tmp_path / "ic")
    port80 = http_port(cfg)
    with PebbleCA(tmp_path / "pebble", http_port=port80, validity_s=3600) as ca:
        configure_acme(cfg, ca, port80)
        root = ca.write_root(tmp_path / "root.pem")
        none = cert_cli(cfg, "status")
        assert none.returncode == 1 and "none issued yet" in none.stdout and "not running" in none.stdout
        out = cert_cli(cfg, "renew")
        assert out.returncode == 0 and "renewed: serial" in out.stdout, out
        serial = out.stdout.split("serial ")[1].split()[0]
        status = cert_cli(cfg, "status")
        assert status.returncode == 0 and f"serial {serial} for {DOMAIN}" in status.stdout, status
        again = cert_cli(cfg, "renew")
        assert again.returncode == 0 and "is not due for renewal" in again.stdout, again
        with ServeProcess(cfg) as srv:
            assert verified_serial(srv.https_port, root) == int(serial, 16)
        assert ca.orders() == 1
