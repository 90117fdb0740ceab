"""Config parsing and its error messages (reliability.md row B9).

Every error is one line that names the file, the line, the key and what was expected; the CLI turns it
into exit code 2 without a traceback."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from inverse_cloud import cli, config
from inverse_cloud.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent
GOOD = '[server]\ndomain = "laptop.test"\n'

# (name, file text, expected line, fragments the one-line message must contain)
BAD_CONFIGS = [
    ("syntax error", '[server]\ndomain = "a.test"\nhttps_listen = \n', 3,
     ["line 3, column", "TOML syntax error", "[server] https_listen"]),
    ("unknown key", '[server]\ndomain = "a.test"\n[relay]\nhots = "relay.example"\n', 4,
     ["[relay] hots", "unknown key", 'did you mean "host"']),
    ("unknown section", '[server]\ndomain = "a.test"\n[rely]\nhost = "x"\n', 3,
     ["[rely]", "unknown section", 'did you mean "[relay]"']),
    ("wrong type", '[server]\ndomain = "a.test"\n[relay]\nport = "x"\n', 4,
     ["[relay] port", "expected an integer 1-65535", 'got "x"']),
    ("port 70000", '[server]\ndomain = "a.test"\n[relay]\nport = 70000\n', 4,
     ["[relay] port", "expected an integer 1-65535", "got 70000"]),
    ("listen port 70000", '[server]\ndomain = "a.test"\nhttps_listen = "127.0.0.1:70000"\n', 3,
     ["[server] https_listen", "0-65535", '"127.0.0.1:70000"']),
    ("missing domain", '[server]\nhttps_listen = "127.0.0.1:8443"\n', 1,
     ["[server] domain", "missing required key"]),
    ("duplicate key", '[server]\ndomain = "a.test"\ndomain = "b.test"\n', 3,
     ["[server] domain", "defined twice"]),
    ("duplicate table", '[server]\ndomain = "a.test"\n[server]\nlog_level = "info"\n', 3,
     ["[server]", "defined twice"]),
    ("bool for int", '[server]\ndomain = "a.test"\nmax_connections = true\n', 3,
     ["[server] max_connections", "got true"]),
    ("bad domain", '[server]\ndomain = "not a domain"\n', 2,
     ["[server] domain", "expected a DNS name"]),
    ("bad choice", '[server]\ndomain = "a.test"\nlog_level = "loud"\n', 3,
     ["[server] log_level", '"debug"', 'got "loud"']),
    ("locked radicale option", '[server]\ndomain = "a.test"\n[radicale.auth]\ntype = "none"\n', 4,
     ["[radicale.auth] type", "cannot be overridden"]),
    ("radicale option outside a table", '[server]\ndomain = "a.test"\n[radicale]\nfoo = 1\n', 4,
     ["[radicale] foo", "expected a table"]),
]


@pytest.mark.parametrize(("name", "text", "line", "fragments"), BAD_CONFIGS, ids=[c[0] for c in BAD_CONFIGS])
def test_bad_config_is_one_line_naming_file_line_and_key(tmp_path, name, text, line, fragments):
    """Each malformed file raises ConfigError whose message is one line: file, line, key, expectation."""
    path = tmp_path / "config.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        config.load(path)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: line {line}"), message
    for fragment in fragments:
        assert fragment in message, (fragment, message)


@pytest.mark.parametrize(("name", "text", "line", "fragments"), BAD_CONFIGS[:8], ids=[c[0] for c in BAD_CONFIGS[:8]])
def test_cli_maps_config_error_to_exit_2_and_one_line(tmp_path, capsys, name, text, line, fragments):
    """`inverse-cloud serve --config bad.toml` prints one line on stderr, nothing on stdout, exits 2."""
    path = tmp_path / "config.toml"
    path.write_text(text)
    assert cli.main(["serve", "--config", str(path)]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.count("\n") == 1 and err.startswith(f"inverse-cloud: {path}: line {line}"), err
    assert "Traceback" not in err


def test_cli_process_bad_config_exits_2_without_traceback(tmp_path):
    """The real entry point (a child process) exits 2 with a single stderr line."""
    path = tmp_path / "config.toml"
    path.write_text('[server]\ndomain = "a.test"\n[relay]\nhots = "x"\n')
    proc = subprocess.run([sys.executable, "-m", "inverse_cloud.cli", "serve", "--config", str(path)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f'inverse-cloud: {path}: line 4: [relay] hots: unknown key (did you mean "host"?)']


def test_missing_config_file_says_how_to_create_one(tmp_path, capsys):
    path = tmp_path / "nope.toml"
    assert cli.main(["serve", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(path) in err and "inverse-cloud init" in err


def test_defaults_and_derived_paths():
    """A minimal file gets every documented default; paths derive from data_dir/state_dir."""
    cfg = config.loads(GOOD + 'data_dir = "/d"\nstate_dir = "/s"\n', Path("/c.toml"))
    s = cfg.server
    assert s.domain == "laptop.test"
    assert s.https_listen == ("127.0.0.1", 8443) and s.http_listen == ("127.0.0.1", 8080)
    assert s.storage_dir == Path("/d/collections") and s.htpasswd_path == Path("/d/users.htpasswd")
    assert s.cert_dir == Path("/s/tls")
    assert s.idle_timeout_s <= 60, "aiohttp's 3630 s keep-alive default must not leak through"
    assert s.handshake_timeout_s <= 15
    assert cfg.relay.enabled is False and cfg.acme.enabled is False
    assert cfg.relay.key_file == Path("/d/ssh/id_ed25519")


def test_config_is_frozen():
    cfg = config.loads(GOOD)
    with pytest.raises(AttributeError):
        cfg.server.domain = "other.test"  # type: ignore[misc]


def test_relay_host_enables_relay_and_acme_staging_switches_directory():
    cfg = config.loads(GOOD + '[relay]\nhost = "relay.example"\n[acme]\nstaging = true\n')
    assert cfg.relay.enabled and cfg.acme.enabled
    assert cfg.acme.directory == config.LETSENCRYPT_STAGING


@pytest.mark.parametrize(("value", "methods", "caa"), [
    ("http-01", ("http-01",), "http-01"),
    ("tls-alpn-01", ("tls-alpn-01",), "tls-alpn-01"),
    ("auto", ("http-01", "tls-alpn-01"), "http-01,tls-alpn-01"),
])
def test_acme_challenge_choice_sets_methods_and_caa(value, methods, caa):
    cfg = config.loads(GOOD + f'[acme]\nchallenge = "{value}"\ntls_self_check_address = "127.0.0.1:9"\n')
    assert cfg.acme.challenge_methods == methods and cfg.acme.caa_methods == caa
    assert cfg.acme.tls_self_check_address == ("127.0.0.1", 9)


def test_acme_challenge_default_is_http01_and_other_values_are_refused():
    assert config.loads(GOOD).acme.challenge == "http-01"
    with pytest.raises(config.ConfigError, match=r'\[acme\] challenge: .*"tls-alpn-01".*got "dns-01"'):
        config.loads(GOOD + '[acme]\nchallenge = "dns-01"\n')


def test_radicale_pass_through_options():
    cfg = config.loads(GOOD + "[radicale.storage]\nmax_sync_token_age = 100\n[radicale.web]\nx = true\n")
    assert cfg.radicale_extra == {"storage": {"max_sync_token_age": "100"}, "web": {"x": "True"}}


def test_overrides_win_over_file():
    cfg = config.loads(GOOD + "max_connections = 10\n", overrides={"server": {"max_connections": 20}})
    assert cfg.server.max_connections == 20


@pytest.mark.parametrize(("text", "expected"), [
    ("127.0.0.1:8443", ("127.0.0.1", 8443)),
    ("[::1]:443", ("::1", 443)),
    ("localhost:0", ("localhost", 0)),
])
def test_parse_hostport(text, expected):
    assert config.parse_hostport(text) == expected


@pytest.mark.parametrize("text", ["127.0.0.1", "::1:443", "host:99999", ":80"])
def test_parse_hostport_rejects(text):
    with pytest.raises(ValueError):
        config.parse_hostport(text)


def _documented_keys(text: str) -> set[tuple[str, str]]:
    """(section, key) for every option shown in the example file, commented out or not."""
    keys, section = set(), ""
    for raw in text.splitlines():
        line = raw.strip()
        header = re.match(r"^#?\s*\[([a-z.]+)\]", line)
        if header:
            section = header.group(1)
            continue
        key = re.match(r"^#?\s*([a-z_]+)\s*=", line)
        if key:
            keys.add((section, key.group(1)))
    return keys


def test_every_option_is_documented_in_template_and_example():
    """config.example.toml and the init template show every SCHEMA key, and the example loads."""
    schema_keys = {(section, key) for section, keys in config.SCHEMA.items() for key in keys}
    for name in ("config.example.toml", "inverse_cloud/templates/config.toml.in"):
        missing = schema_keys - _documented_keys((REPO / name).read_text())
        assert not missing, f"{name} does not document {sorted(missing)}"
    cfg = config.load(REPO / "config.example.toml")
    assert cfg.server.domain == "contacts.example.org"
