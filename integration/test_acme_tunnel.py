"""Certificates through the tunnel, with real parts only: Pebble validates http://laptop.test:<public 80>/
-> a TCP stand-in for the relay's DNAT -> the relay's forwarded port on a real sshd -> the SSH tunnel ->
our HTTP listener; the served certificate is checked with verified handshakes through the relay's
forwarded HTTPS port. One test walks F13, first issuance, F6 (CA down in the renewal window, restart of
serve during the outage, Pebble back with a new root) and the automatic retry, with a sync load across
the swap."""

from __future__ import annotations

import datetime as dt
import json
import re
import subprocess
import time

import pytest
from acme_support import DOMAIN, PASSWORD, SyncLoad, cert_cli, configure_acme, verified_serial, wait_issued
from chaos_proxy import ChaosProxy
from pebble import PebbleCA

from inverse_cloud.config import load
from tests.support import ServeProcess, wait_until

# Renewal due at 120 s (half, under 10 days); the first retry 60 s after the failure, at 180 s: a minute
# before the certificate expires, so a slow machine does not see it expire first.
VALIDITY_S = 240


def curl_propfind(port: int, cafile) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["curl", "-s", "--max-time", "20", "--cacert", str(cafile), "--resolve", f"{DOMAIN}:{port}:127.0.0.1",
         "-u", f"alice:{PASSWORD}", "-X", "PROPFIND", "-H", "Depth: 0", "-o", "/dev/null", "-w", "%{http_code}",
         f"https://{DOMAIN}:{port}/radicale/alice/"], capture_output=True, text=True, timeout=30, check=False)


def status_json(cfg) -> dict:
    return json.loads(cert_cli(cfg, "status", "--json").stdout)


@pytest.mark.slow
def test_certificates_through_the_tunnel(relay_instance, tmp_path):
    """1. F13: the public port 80 stand-in refuses (DNAT rule gone) while the tunnel is up -> one line
       "public path http://laptop.test/ does not reach this laptop ...; not requesting a certificate",
       Pebble holds no order and no account. 2. Path fixed, `cert renew` (early retry) -> Pebble validates
       through relay + sshd + tunnel; curl through the relay verifies against Pebble's root (207).
    3. F6: Pebble stopped -> at the renewal window one line "certificate renewal failed: cannot reach ACME
       server ...: connection refused; retry in 1m ..."; the old certificate is still served through the
       relay. serve is restarted during the outage: the failure streak survives (status), no immediate
       retry. Pebble restarts (new root, accounts forgotten) -> the next automatic retry registers the same
       key again and renews; a sync load through the relay sees 0 failed handshakes and 0 failed requests,
       and its long-lived connection stays up."""
    cfg, relay = relay_instance
    c = load(cfg)
    with ChaosProxy(target_port=relay.http_port) as public80:
        public80.set_mode("refuse")
        with PebbleCA(tmp_path / "pebble", http_port=public80.port, validity_s=VALIDITY_S) as ca:
            configure_acme(cfg, ca, public80.port)
            root1 = ca.write_root(tmp_path / "root1.pem")
            srv = ServeProcess(cfg).start()
            try:
                relay.wait_forwards(30, on_timeout=srv.log)
                wait_until(lambda: "does not reach this laptop" in srv.log(), 30, "the self-check line",
                           on_timeout=srv.log)
                line = next(ln for ln in srv.log().splitlines() if "does not reach this laptop" in ln)
                assert f"public path http://{DOMAIN}/ does not reach this laptop (" in line
                assert "not requesting a certificate; retry in 15s" in line
                assert ca.orders() == 0 and ca.accounts() == 0 and not c.acme.account_dir.exists()

                public80.set_mode("pass")
                out = cert_cli(cfg, "renew")
                assert out.returncode == 0 and "renewed: serial" in out.stdout, (out, srv.log())
                first = wait_issued(relay.https_port, root1, 30, srv.log)
                assert curl_propfind(relay.https_port, root1).stdout == "207"
                assert f"Attempting to validate w/ HTTP: http://{DOMAIN}:{public80.port}/" in ca.run_log()

                ca.stop_pebble()
                failed = f"certificate renewal failed: cannot reach ACME server {ca.directory}: connection refused; " \
                         "retry in 1m ("
                wait_until(lambda: failed in srv.log(), VALIDITY_S, "the renewal failure line", on_timeout=srv.log)
                line = next(ln for ln in srv.log().splitlines() if failed in ln)
                assert re.search(r"current certificate valid until \S+ \S+ UTC \(\S+ left\)", line), line
                assert verified_serial(relay.https_port, root1) == first
            finally:
                srv.stop()
            before = status_json(cfg)
            assert before["failures"] == 1 and before["next_attempt"], before

            with ServeProcess(cfg) as srv2:
                wait_issued(relay.https_port, root1, 30, srv2.log)      # the tunnel is back, old cert served
                wait_until(lambda: (status_json(cfg)["last_check"] or "0") > before["last_check"], 30,
                           "the restarted server's first check", on_timeout=srv2.log)
                assert "renewing a certificate" not in srv2.log()     # the backoff survived the restart
                assert time.time() < dt.datetime.fromisoformat(before["next_attempt"]).timestamp()

                ca.start_pebble()                                       # a new root, no accounts
                root2 = ca.write_root(tmp_path / "root2.pem")
                both = tmp_path / "roots.pem"
                both.write_bytes(root1.read_bytes() + root2.read_bytes())
                load_ = SyncLoad(relay.https_port, both).start()
                try:
                    renewed = wait_issued(relay.https_port, root2, 90, srv2.log)
                    rounds = load_.handshakes_ok
                    wait_until(lambda: load_.handshakes_ok > rounds + 5, 30, "load rounds after the swap")
                finally:
                    load_.stop()
                assert curl_propfind(relay.https_port, root2).stdout == "207"
                log = srv2.log()
        assert renewed != first
        assert load_.failures == [] and load_.reconnects == 0 and load_.long_serial == first, load_
        assert load_.fresh_serials[-1] == renewed
        # Every round of the one long-lived connection still presented the old certificate, including
        # rounds whose fresh handshake already got the new one.
        assert {long for long, _ in load_.rounds} == {first}, load_.rounds
        assert any(fresh == renewed for _, fresh in load_.rounds), load_.rounds
        assert "no longer knows account" in log and ca.accounts() == 1
        assert status_json(cfg)["failures"] == 0
