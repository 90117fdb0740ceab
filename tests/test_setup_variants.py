"""`inverse-cloud setup --nat sni | --ipv6 | --ssh-on-443`: each choice goes from setup's own command line to the
relay-setup bundle its relay step applies, the laptop's [relay] settings follow only after that setup.sh
succeeded, a rerun keeps the choice, a changed choice runs the relay and dns steps again, and with --ipv6 the
dns step prints the AAAA record and waits for it."""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from pathlib import Path

import pytest

from inverse_cloud.cli import build_parser
from inverse_cloud.config import load, loads
from inverse_cloud.ops import setup_steps
from inverse_cloud.ops.setup import Lines, SetupState, relay_choices
from inverse_cloud.tunnel import commands as tunnel_commands
from tests.support import init_instance
from tests.test_setup import ThreadedDns, ThreadedSsh


@pytest.fixture
def relay() -> Iterator[ThreadedSsh]:
    server = ThreadedSsh()
    try:
        yield server
    finally:
        server.close()


def _parse(*flags: str) -> argparse.Namespace:
    return build_parser().parse_args(["setup", "--config", "/nonexistent/config.toml", *flags])


def _relay_step(cfg: Path, relay: ThreadedSsh, answers: dict[str, str], monkeypatch) -> tuple[str, str, str]:
    """Run the relay step with an admin login; ssh is recorded (the script, and the config as it was while the
    script ran) instead of reaching a relay. Returns (script, config text during ssh, step line)."""
    seen: list[tuple[str, str]] = []
    monkeypatch.setattr(tunnel_commands, "apply_over_ssh",
                        lambda target, script: seen.append((script, cfg.read_text())))
    ctx = setup_steps.Context(args=argparse.Namespace(yes=True), cfg_path=cfg, password="", out=Lines(),
                              answers={"relay": f"127.0.0.1:{relay.port}", "relay_admin": "root", **answers},
                              interactive=False)
    line = setup_steps.step_relay(ctx)
    assert len(seen) == 1
    return seen[0][0], seen[0][1], line


@pytest.mark.parametrize(("flags", "in_script", "setting", "value"), [
    (["--ipv6"], "table ip6 inverse_cloud", "listen_host6", "::"),
    (["--nat", "sni"], "/etc/inverse-cloud/sites/", "proxy_protocol", True),
    (["--ssh-on-443"], "sslh", "fallback_port", 443),
    (["--nat", "sni", "--ipv6"], "listen [::]:443", "proxy_protocol", True),
])
def test_each_setup_choice_reaches_the_relay_side_it_applies(tmp_path, relay, monkeypatch, flags, in_script,
                                                             setting, value):
    """`setup FLAGS` parsed by the real command line, saved as answers, then the relay step: the setup.sh it runs
    over ssh is relay-setup's bundle of that variant; while it runs the config does not have the new [relay]
    setting yet; afterwards it has it, and the step's line names the variant and the setting."""
    cfg = init_instance(tmp_path / "ic", relay=f"inverse-cloud@127.0.0.1:{relay.port}")
    state = SetupState(tmp_path / "state.json", {}, [])
    answers = relay_choices(_parse(*flags), state)
    assert SetupState.load(tmp_path / "state.json").answers == answers
    script, during, line = _relay_step(cfg, relay, answers, monkeypatch)
    assert in_script in script, script[:2000]
    assert getattr(load(cfg).relay, setting) == value
    assert getattr(loads(during, cfg).relay, setting) != value   # not yet while setup.sh ran
    for flag in flags:
        assert flag in line, line
    assert f"[relay] {setting} = " in line and relay.fingerprint in line, line


def test_the_default_variant_applies_the_dnat_bundle_and_sets_nothing(tmp_path, relay, monkeypatch):
    """No variant flag: the relay step applies the nft bundle, as before, and the config keeps its [relay]."""
    cfg = init_instance(tmp_path / "ic", relay=f"inverse-cloud@127.0.0.1:{relay.port}")
    answers = relay_choices(_parse(), SetupState(tmp_path / "state.json", {}, []))
    assert answers == {"nat": "nft", "ipv6": "no", "ssh_on_443": "no"}
    script, _during, line = _relay_step(cfg, relay, answers, monkeypatch)
    assert "nat.nft" in script and "sslh" not in script and "table ip6" not in script
    assert "[relay]" not in line
    r = load(cfg).relay
    assert (r.fallback_port, r.listen_host6, r.proxy_protocol) == (0, "", False)


def test_a_variant_turned_off_again_resets_what_it_set(tmp_path, relay, monkeypatch):
    """setup --ipv6 --ssh-on-443, then setup --no-ipv6 --no-ssh-on-443: the second relay step applies the plain
    DNAT bundle and puts listen_host6 and fallback_port back (the relay no longer permits [::] forwards nor runs
    sslh)."""
    cfg = init_instance(tmp_path / "ic", relay=f"inverse-cloud@127.0.0.1:{relay.port}")
    state = SetupState(tmp_path / "state.json", {}, [])
    _relay_step(cfg, relay, relay_choices(_parse("--ipv6", "--ssh-on-443"), state), monkeypatch)
    assert (load(cfg).relay.listen_host6, load(cfg).relay.fallback_port) == ("::", 443)
    _script, _during, line = _relay_step(cfg, relay, relay_choices(_parse("--no-ipv6", "--no-ssh-on-443"), state),
                                         monkeypatch)
    assert (load(cfg).relay.listen_host6, load(cfg).relay.fallback_port) == ("", 0)
    assert '[relay] listen_host6 = ""' in line and "[relay] fallback_port = 0" in line, line


def test_choices_are_kept_and_a_changed_one_runs_relay_and_dns_again(tmp_path, capsys):
    """A flag is saved; a plain rerun keeps it and leaves the finished steps alone; a rerun with another choice
    (--no-ipv6, --nat sni) drops relay and dns from the finished steps, with one line naming the change, and
    keeps the others."""
    path = tmp_path / "state.json"
    state = SetupState(path, {}, [])
    assert relay_choices(_parse("--ipv6"), state)["ipv6"] == "yes"
    state.done = ["init", "relay", "dns", "account"]
    state.save()
    state = SetupState.load(path)
    assert relay_choices(_parse(), state) == {"nat": "nft", "ipv6": "yes", "ssh_on_443": "no"}
    assert state.done == ["init", "relay", "dns", "account"] and capsys.readouterr().out == ""
    assert relay_choices(_parse("--ipv6"), state)["ipv6"] == "yes" and "relay" in state.done   # same choice
    assert relay_choices(_parse("--no-ipv6", "--nat", "sni"), state) == {"nat": "sni", "ipv6": "no",
                                                                         "ssh_on_443": "no"}
    assert SetupState.load(path).done == ["init", "account"]
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "nat nft -> sni" in out and "ipv6 yes -> no" in out, out
    assert "the relay and dns steps run again" in out


def test_sni_with_ssh_on_443_is_a_variant_like_the_others(tmp_path):
    """--nat sni --ssh-on-443 (nginx alone routes SSH on the shared 443; refused before): saved like any choice,
    also when one of them was saved before."""
    path = tmp_path / "state.json"
    state = SetupState(path, {}, [])
    assert relay_choices(_parse("--nat", "sni", "--ssh-on-443"), state) == {"nat": "sni", "ipv6": "no",
                                                                             "ssh_on_443": "yes"}
    state = SetupState(path, {}, [])
    relay_choices(_parse("--nat", "sni"), state)
    assert relay_choices(_parse("--ssh-on-443"), state)["nat"] == "sni"
    assert SetupState.load(path).answers["ssh_on_443"] == "yes"


def _dns_ctx(cfg: Path, dns: ThreadedDns, answers: dict[str, str], wait_s: float) -> setup_steps.Context:
    args = argparse.Namespace(dns_server=f"127.0.0.1:{dns.port}", wait=wait_s)
    return setup_steps.Context(args=args, cfg_path=cfg, password="", out=Lines(), interactive=False,
                               answers={"relay": "relay.test", "relay_admin": "root", **answers})


def test_dns_step_with_ipv6_prints_the_aaaa_record_and_waits_for_it(tmp_path, monkeypatch, capsys):
    """--ipv6, the relay at 192.0.2.7 and 2001:db8::7: the dns step prints the A and the AAAA record. With only
    the A record published it does not finish (no AAAA record yet); once the AAAA is there too it does. Without
    --ipv6 the same step prints no AAAA and says why."""
    cfg = init_instance(tmp_path / "ic", relay="inverse-cloud@relay.test")
    monkeypatch.setattr(setup_steps, "relay_addresses", lambda host: ["192.0.2.7", "2001:db8::7"])
    dns = ThreadedDns({("laptop.test", "A"): ["192.0.2.7"]})
    try:
        with pytest.raises(setup_steps.SetupError, match=r"the A and AAAA records of laptop.test are not visible"):
            setup_steps.step_dns(_dns_ctx(cfg, dns, {"ipv6": "yes"}, 0))
        out = capsys.readouterr().out
        assert "laptop.test. A 192.0.2.7" in out and "laptop.test. AAAA 2001:db8::7" in out, out
        assert "no AAAA record yet" in out, out
        dns.records[("laptop.test", "AAAA")] = ["2001:db8::7"]
        line = setup_steps.step_dns(_dns_ctx(cfg, dns, {"ipv6": "yes"}, 0))
        assert line == "laptop.test -> 192.0.2.7, 2001:db8::7 at every authoritative server", line
        del dns.records[("laptop.test", "AAAA")]
        capsys.readouterr()
        assert setup_steps.step_dns(_dns_ctx(cfg, dns, {"ipv6": "no"}, 0)).startswith("laptop.test -> 192.0.2.7 ")
        out = capsys.readouterr().out
        assert "AAAA 2001" not in out and "no AAAA record: the relay forwards IPv4 only" in out, out
    finally:
        dns.close()


def test_dns_step_with_ipv6_refuses_a_relay_without_ipv6(tmp_path, monkeypatch):
    cfg = init_instance(tmp_path / "ic", relay="inverse-cloud@relay.test")
    monkeypatch.setattr(setup_steps, "relay_addresses", lambda host: ["192.0.2.7"])
    dns = ThreadedDns({})
    try:
        with pytest.raises(setup_steps.SetupError, match=r"has no IPv6 address .*setup --no-ipv6"):
            setup_steps.step_dns(_dns_ctx(cfg, dns, {"ipv6": "yes"}, 0))
    finally:
        dns.close()
