"""The command line fits a person's habits: every command says what it does, every option says its default,
``--config`` goes before or after the command (or comes from ``INVERSE_CLOUD_CONFIG``), exit codes are
written down, and ``status --watch`` keeps showing the state."""

from __future__ import annotations

import argparse
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from inverse_cloud import cli, config
from tests.support import ServeProcess

ROOT = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-m", "inverse_cloud.cli"]
FLAG_ACTIONS = (argparse._StoreTrueAction, argparse._StoreFalseAction, argparse._HelpAction,
                argparse._VersionAction)


def parsers(parser: argparse.ArgumentParser, name: str = "inverse-cloud"
            ) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub_name, sub in action.choices.items():
                yield from parsers(sub, f"{name} {sub_name}")


def test_every_command_has_a_description_and_every_option_its_default():
    """Walk the whole parser. Every (sub)command has a description; every option and argument has help
    text (none hidden); every option that takes a value says its default in its help."""
    missing: list[str] = []
    for name, parser in parsers(cli.build_parser()):
        if not parser.description:
            missing.append(f"{name}: no description")
        for action in parser._actions:
            if isinstance(action, (argparse._SubParsersAction, argparse._HelpAction, argparse._VersionAction)):
                continue
            what = f"{name} {'/'.join(action.option_strings) or action.dest}"
            if not action.help or action.help == argparse.SUPPRESS:
                missing.append(f"{what}: no help")
            elif action.option_strings and not isinstance(action, FLAG_ACTIONS) and "default" not in action.help:
                missing.append(f"{what}: help does not say the default ({action.help!r})")
    assert not missing, "\n".join(missing)


def test_config_before_or_after_the_command_and_from_the_environment(instance, monkeypatch):
    """`inverse-cloud --config X status`, `inverse-cloud status --config X` and INVERSE_CLOUD_CONFIG=X all
    name the same file; a --config on the command line wins over the environment."""
    parser = cli.build_parser()
    before = parser.parse_args(["--config", str(instance), "status"])
    after = parser.parse_args(["status", "--config", str(instance)])
    nested = parser.parse_args(["--config", str(instance), "cert", "status"])
    middle = parser.parse_args(["cert", "--config", str(instance), "status"])
    leaf = parser.parse_args(["cert", "status", "--config", str(instance)])
    assert {config.config_path(a) for a in (before, after, nested, middle, leaf)} == {instance}
    monkeypatch.setenv("INVERSE_CLOUD_CONFIG", str(instance))
    assert config.config_path(parser.parse_args(["status"])) == instance
    other = instance.parent / "other.toml"
    assert config.config_path(parser.parse_args(["status", "--config", str(other)])) == other
    assert config.config_path(parser.parse_args(["--config", str(other), "status"])) == other


def test_config_before_the_command_in_a_child_process(instance):
    """The case the issue names: `inverse-cloud --config X status` gave `invalid choice`."""
    proc = subprocess.run([*CLI, "--config", str(instance), "status"], capture_output=True, text=True, timeout=60)
    assert "invalid choice" not in proc.stderr and proc.returncode == 2, proc.stderr
    assert "not running" in proc.stdout, proc.stdout


def test_exit_codes_are_documented():
    """README's "Exit codes" table lists every code cli.py returns."""
    text = (ROOT / "README.md").read_text()
    assert "## Exit codes" in text
    section = text.split("## Exit codes", 1)[1].split("\n## ", 1)[0]
    for code in ("0", "1", "2", "3", "130", "141"):
        assert f"| {code} " in section, code


@pytest.mark.parametrize("running", [False, True])
def test_status_watch_refreshes(instance, running):
    """`status --watch --interval 0.1 --count 3` prints the state three times (with or without a server),
    then exits with the last state's code."""
    argv = [*CLI, "status", "--watch", "--interval", "0.1", "--count", "3", "--config", str(instance)]
    if running:
        with ServeProcess(instance):
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        heads = [ln for ln in proc.stdout.splitlines() if ln.startswith("inverse-cloud ")]
        assert proc.returncode == 0, proc.stdout + proc.stderr
    else:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        heads = [ln for ln in proc.stdout.splitlines() if "not running" in ln and "ready" not in ln]
        assert proc.returncode == 2, proc.stdout + proc.stderr
    assert len(heads) == 3, proc.stdout
    assert proc.stdout.count("ready for phones: ") == 3, proc.stdout


@pytest.mark.parametrize(("doc", "ready", "fragment"), [
    (None, False, "not running"),
    ({"relay": {"enabled": False}, "listeners": {"https": "127.0.0.1:8443"}}, False, "this machine only"),
    ({"relay": {"enabled": False}, "listeners": {"https": "0.0.0.0:8443"}}, False, "self-signed"),
    ({"relay": {"enabled": True}, "tunnel": {"state": "reconnecting", "last_error": "refused"}}, False,
     "tunnel to the relay is reconnecting (refused)"),
    ({"relay": {"enabled": True}, "tunnel": {"state": "up"}, "acme_enabled": True,
      "certificate": {"served": {"self_signed": True}}}, False, "no certificate from the CA yet"),
    ({"relay": {"enabled": True}, "tunnel": {"state": "up"}, "now": "2027-01-01T00:00:00Z",
      "certificate": {"served": {"self_signed": False, "not_after": "2026-12-01T00:00:00Z"}}}, False, "expired"),
    ({"relay": {"enabled": True}, "tunnel": {"state": "up"}, "now": "2027-01-01T00:00:00Z",
      "certificate": {"served": {"self_signed": False, "not_after": "2027-03-01T00:00:00Z"}}}, True, ""),
])
def test_ready_for_phones_is_one_pure_decision(doc, ready, fragment):
    """status, doctor, phone and the home page print the same line, decided from the status document."""
    from inverse_cloud.ops.ready import readiness, ready_line

    got, because = readiness(doc)
    assert got is ready and fragment in because, because
    want = "ready for phones: yes" if ready else f"ready for phones: no, because {because}"
    assert ready_line(got, because) == want
