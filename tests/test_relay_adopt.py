"""relay-setup changes the laptop's [relay] settings only once the relay carries the matching side: `--output DIR`
writes the bundle (with the settings it expects, laptop.toml) and leaves the config alone; `--adopt DIR`, run
after setup.sh succeeded on the relay, sets them; `--apply` sets them itself, after setup.sh succeeded there."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from inverse_cloud.cli import main
from inverse_cloud.config import load


def _with_relay(instance: Path) -> Path:
    path = Path(instance)
    path.write_text(path.read_text().replace('host = ""', 'host = "relay.example"'))
    return path


@pytest.mark.parametrize(("extra", "expect"), [
    (["--ssh-on-443"], {"fallback_port": 443}),
    (["--ipv6"], {"listen_host6": "::"}),
    (["--nat", "sni"], {"proxy_protocol": True}),
    (["--nat", "none", "--proxy-protocol"], {"proxy_protocol": True}),
])
def test_output_leaves_the_config_and_adopt_sets_it(instance, tmp_path, capsys, extra, expect):
    """1. `relay-setup --output DIR --no-pin` with a variant that needs new [relay] settings: the config file is
    byte for byte what it was, DIR/laptop.toml holds the settings, and one line says what to run once setup.sh
    succeeded on the relay. 2. That command (`relay-setup --adopt DIR`) sets them. 3. A second --adopt changes
    nothing and says so."""
    cfg = _with_relay(instance)
    before = cfg.read_bytes()
    out = tmp_path / "bundle"
    assert main(["relay-setup", "--config", str(cfg), "--output", str(out), "--no-pin", *extra]) == 0
    assert cfg.read_bytes() == before
    assert (out / "laptop.toml").exists()
    printed = capsys.readouterr().out.splitlines()
    hint = [line for line in printed if "--adopt" in line]
    assert len(hint) == 1, printed
    assert "after setup.sh succeeded on the relay" in hint[0]
    assert f"inverse-cloud relay-setup --config {cfg} --adopt {out}" in hint[0], hint
    assert not [line for line in printed if line.startswith("set [relay]")], printed

    assert main(["relay-setup", "--config", str(cfg), "--adopt", str(out)]) == 0
    relay = load(cfg).relay
    for key, value in expect.items():
        assert getattr(relay, key) == value, (key, cfg.read_text())
    assert "set [relay]" in capsys.readouterr().out
    assert stat.S_IMODE(cfg.stat().st_mode) == 0o600
    adopted = cfg.read_bytes()
    assert main(["relay-setup", "--config", str(cfg), "--adopt", str(out)]) == 0
    assert cfg.read_bytes() == adopted
    assert "already" in capsys.readouterr().out


@pytest.mark.parametrize("extra", [["--ssh-on-443"], ["--nat", "none", "--proxy-protocol"]])
def test_output_readme_names_laptop_toml_and_the_adopt_step(instance, tmp_path, capsys, extra):
    """The bundle's README.txt (what a user reads before running setup.sh on the relay) says that laptop.toml
    holds the [relay] settings this relay side needs, and the exact command to run on the laptop once
    setup.sh succeeded: without it, a user following the bundle alone leaves the laptop without them."""
    cfg = _with_relay(instance)
    out = tmp_path / "bundle"
    assert main(["relay-setup", "--config", str(cfg), "--output", str(out), "--no-pin", *extra]) == 0
    readme = (out / "README.txt").read_text()
    assert "laptop.toml" in readme, readme
    assert f"inverse-cloud relay-setup --config {cfg} --adopt {out}" in readme, readme


def test_output_of_the_default_variant_names_no_adopt_step(instance, tmp_path, capsys):
    """The default DNAT variant needs no new [relay] setting: --output says nothing about --adopt, and --adopt
    of that bundle changes nothing."""
    cfg = _with_relay(instance)
    before = cfg.read_bytes()
    out = tmp_path / "bundle"
    assert main(["relay-setup", "--config", str(cfg), "--output", str(out), "--no-pin"]) == 0
    assert "--adopt" not in capsys.readouterr().out
    assert "--adopt" not in (out / "README.txt").read_text()
    assert main(["relay-setup", "--config", str(cfg), "--adopt", str(out)]) == 0
    assert cfg.read_bytes() == before


@pytest.mark.parametrize(("case", "fragment"), [
    ("other domain", "was written for laptop.test"),
    ("no file", "no laptop.toml"),
    ("foreign key", "not a setting relay-setup adopts"),
])
def test_adopt_refuses_a_bundle_it_cannot_trust_in_one_line(instance, tmp_path, capsys, case, fragment):
    """--adopt of a bundle rendered for another laptop (another domain), of a folder without laptop.toml, or of a
    laptop.toml naming a key relay-setup never writes: one line on stderr, exit 2, the config unchanged."""
    cfg = _with_relay(instance)
    out = tmp_path / "bundle"
    assert main(["relay-setup", "--config", str(cfg), "--output", str(out), "--no-pin", "--ssh-on-443"]) == 0
    capsys.readouterr()
    settings = out / "laptop.toml"
    if case == "other domain":
        cfg.write_text(cfg.read_text().replace('domain = "laptop.test"', 'domain = "other.test"'))
    elif case == "no file":
        settings.unlink()
    else:
        settings.write_text(settings.read_text().replace("fallback_port = 443", 'host_key = "ssh-ed25519 AAAA"'))
    before = cfg.read_bytes()
    assert main(["relay-setup", "--config", str(cfg), "--adopt", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and fragment in err, err
    assert cfg.read_bytes() == before


def test_adopt_goes_alone(instance, tmp_path, capsys):
    """--adopt reads a bundle; it renders and applies nothing, so --output, --apply and variant flags with it are
    refused in one line."""
    cfg = _with_relay(instance)
    for extra in (["--output", str(tmp_path / "b")], ["--apply", "root@relay.example"], ["--ipv6"]):
        assert main(["relay-setup", "--config", str(cfg), "--adopt", str(tmp_path), *extra]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "--adopt" in err, err


def _fake_ssh(tmp_path: Path, monkeypatch, cfg: Path, code: int) -> Path:
    """An `ssh` first on PATH that keeps the script it was given and a copy of the config as it was when ssh ran,
    then exits with ``code``."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    seen = tmp_path / "seen"
    seen.mkdir(exist_ok=True)
    ssh = bin_dir / "ssh"
    ssh.write_text(f"#!/bin/sh\ncat > {seen}/script\ncp {cfg} {seen}/config\n"
                   f"echo 'setup.sh: failed here' >&2\nexit {code}\n")
    ssh.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return seen


def test_apply_sets_the_settings_only_after_setup_sh_succeeded(instance, tmp_path, monkeypatch, capsys):
    """`relay-setup --apply root@relay --ssh-on-443 --ipv6 --no-pin` with an ssh that fails: exit 1 with its last
    line, and the config unchanged. With an ssh that succeeds: the config had not changed yet while setup.sh ran,
    and has both settings afterwards."""
    cfg = _with_relay(instance)
    before = cfg.read_bytes()
    argv = ["relay-setup", "--config", str(cfg), "--apply", "root@relay.example", "--ssh-on-443", "--ipv6",
            "--no-pin"]
    seen = _fake_ssh(tmp_path, monkeypatch, cfg, 1)
    assert main(argv) == 1
    assert "setup.sh: failed here" in capsys.readouterr().err
    assert cfg.read_bytes() == before and "sslh" in (seen / "script").read_text()

    seen = _fake_ssh(tmp_path, monkeypatch, cfg, 0)
    assert main(argv) == 0
    assert (seen / "config").read_bytes() == before
    relay = load(cfg).relay
    assert relay.fallback_port == 443 and relay.listen_host6 == "::"
