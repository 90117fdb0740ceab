"""TLS-ALPN-01 through the tunnel with port 80 closed: Pebble validates by connecting to the relay's
forwarded HTTPS port (the "public 443" stand-in) with ALPN acme-tls/1 -> real sshd -> the SSH tunnel -> our
HTTPS listener, which answers with the challenge certificate while phones on the same listener keep the
real one. Nothing listens on the "public 80" stand-in."""

from __future__ import annotations

import json

import pytest
from acme_support import DOMAIN, SyncLoad, cert_cli, configure_acme, wait_issued
from pebble import PebbleCA
from test_acme_tunnel import curl_propfind

from tests.support import ServeProcess, free_port, wait_until


@pytest.mark.slow
def test_tls_alpn_01_through_the_relay_with_port_80_closed(relay_instance, tmp_path):
    """1. `[acme] challenge = "auto"`, public port 80 closed (nothing listens), Pebble validates TLS-ALPN-01
       on the relay's forwarded HTTPS port. serve starts: the http-01 self-check is refused, the tls-alpn-01
       self-check passes through relay + tunnel, one line "using tls-alpn-01: public path http://laptop.test/
       does not reach this laptop (...)"; Pebble validates with TLS-ALPN-01 and issues; curl through the
       relay verifies against Pebble's root (207).
    2. A sync load (one long-lived connection + a fresh verified handshake per round) runs while `cert renew
       --force` renews through TLS-ALPN-01 again: 0 failed handshakes, 0 failed requests (no phone was ever
       handed the challenge certificate), and the new serial is served.
    3. `cert status --json` recommends a CAA record with validationmethods=http-01,tls-alpn-01."""
    cfg, relay = relay_instance
    closed80 = free_port()
    with PebbleCA(tmp_path / "pebble", http_port=closed80, tls_port=relay.https_port, validity_s=3600) as ca:
        configure_acme(cfg, ca, closed80, challenge="auto", tls_self_check_address=f"127.0.0.1:{relay.https_port}")
        root = ca.write_root(tmp_path / "root.pem")
        with ServeProcess(cfg) as srv:
            relay.wait_forwards(30, on_timeout=srv.log)
            first = wait_issued(relay.https_port, root, 60, srv.log)
            log = srv.log()
            assert "using tls-alpn-01: public path http://laptop.test/ does not reach this laptop (connecting " \
                   f"to 127.0.0.1:{closed80} failed (connection refused))" in log, log
            # Pebble logs HTTP-01 attempts only; nothing listens on 80, so the order passed on 443 alone.
            assert ca.orders() == 1 and "Attempting to validate w/ HTTP" not in ca.run_log()
            assert curl_propfind(relay.https_port, root).stdout == "207"

            load = SyncLoad(relay.https_port, root).start()
            try:
                # Its answer is not checked: `cert renew` can report a periodic check that finished just after
                # the request ("not due") while the forced renewal is still running; the new serial is the proof.
                out = cert_cli(cfg, "renew", "--force")
                assert out.returncode == 0, (out, srv.log())
                renewed = wait_issued(relay.https_port, root, 30, srv.log, not_serial=first)
                rounds = load.handshakes_ok
                wait_until(lambda: load.handshakes_ok > rounds + 5, 30, "load rounds after the renewal")
            finally:
                load.stop()
            assert load.failures == [] and load.reconnects == 0, load
            assert load.fresh_serials[0] == first and load.fresh_serials[-1] == renewed
            assert srv.log().count("using tls-alpn-01") == 2
            assert ca.orders() == 2 and "Attempting to validate w/ HTTP" not in ca.run_log()
        status = json.loads(cert_cli(cfg, "status", "--json").stdout)
        assert status["caa"]["record"].endswith('validationmethods=http-01,tls-alpn-01"'), status
        assert DOMAIN in status["caa"]["record"]


@pytest.mark.slow
def test_cert_renew_without_a_server_answers_tls_alpn_01(tmp_path):
    """No server running, `[acme] challenge = "tls-alpn-01"`, nothing on the "public 80" stand-in: `cert renew`
    answers on a temporary listener on [server] https_listen (where Pebble's TLS-ALPN-01 validation connects),
    obtains and stores a certificate (Pebble never tried HTTP-01); `serve` then presents that very certificate."""
    from acme_support import verified_serial

    from tests.support import init_instance

    cfg = init_instance(tmp_path / "ic")
    from inverse_cloud.config import load

    https = load(cfg).server.https_listen[1]
    closed80 = free_port()
    with PebbleCA(tmp_path / "pebble", http_port=closed80, tls_port=https, validity_s=3600) as ca:
        configure_acme(cfg, ca, closed80, challenge="tls-alpn-01", tls_self_check_address=f"127.0.0.1:{https}")
        root = ca.write_root(tmp_path / "root.pem")
        out = cert_cli(cfg, "renew")
        assert out.returncode == 0 and "renewed: serial" in out.stdout, out
        serial = out.stdout.split("serial ")[1].split()[0]
        assert ca.orders() == 1 and "Attempting to validate w/ HTTP" not in ca.run_log()
        with ServeProcess(cfg) as srv:
            assert verified_serial(srv.https_port, root) == int(serial, 16)
