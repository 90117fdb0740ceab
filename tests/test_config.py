"""Config parsing and its error messages (docs/test-matrix.md B9).

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
     ["[radicale.auth] type", "not a Radicale option inverse-cloud passes through"]),
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


def test_staging_switches_only_the_default_directory():
    """staging = true with a directory of one's own keeps that directory (staging means Let's Encrypt's)."""
    cfg = config.loads(GOOD + '[acme]\nstaging = true\ndirectory = "https://ca.example/dir"\n')
    assert cfg.acme.directory == "https://ca.example/dir"


def test_relay_fallback_port_and_proxy_protocol_are_read():
    cfg = config.loads(GOOD + '[relay]\nhost = "relay.example"\nfallback_port = 443\nproxy_protocol = true\n'
                       'listen_host6 = "::"\n')
    assert (cfg.relay.fallback_port, cfg.relay.proxy_protocol, cfg.relay.listen_host6) == (443, True, "::")
    assert config.loads(GOOD).relay.listen_host6 == ""


def test_config_path_order(monkeypatch, tmp_path):
    """--config wins over $INVERSE_CLOUD_CONFIG, which wins over the default; ~ is expanded."""
    import argparse

    monkeypatch.setenv("INVERSE_CLOUD_CONFIG", str(tmp_path / "env.toml"))
    assert config.config_path(argparse.Namespace(config=str(tmp_path / "flag.toml"))) == tmp_path / "flag.toml"
    assert config.config_path(argparse.Namespace()) == tmp_path / "env.toml"
    monkeypatch.delenv("INVERSE_CLOUD_CONFIG")
    assert config.config_path(argparse.Namespace(config=None)) == config.default_config_path()
    monkeypatch.setenv("HOME", str(tmp_path))
    assert config.config_path(argparse.Namespace(config="~/c.toml")) == tmp_path / "c.toml"


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
    cfg = config.loads(GOOD + "[radicale.storage]\nmax_sync_token_age = 100\n[radicale.rights]\n"
                              "permit_delete_collection = false\n")
    assert cfg.radicale_extra == {"storage": {"max_sync_token_age": "100"},
                                  "rights": {"permit_delete_collection": "False"}}


def test_overrides_win_over_file():
    cfg = config.loads(GOOD + "max_connections = 10\n", overrides={"server": {"max_connections": 20}})
    assert cfg.server.max_connections == 20
    # a section the file does not have
    assert config.loads(GOOD, overrides={"relay": {"host": "relay.example"}}).relay.host == "relay.example"


@pytest.mark.parametrize(("text", "message"), [
    ('[server]\ndomain = "a.test"\ndomain = "b.test"\n',
     "config: line 3, column 18: TOML syntax error: [server] domain is defined twice"),
    ('[server]\ndomain = "a.test"\n[relay]\nhost = "r"\n[relay]\n',
     "config: line 5, column 7: TOML syntax error: [relay] is defined twice"),
])
def test_a_key_or_table_defined_twice_is_named(text, message):
    """tomllib's "Cannot overwrite a value" / "Cannot declare" become "<name> is defined twice"."""
    with pytest.raises(ConfigError) as caught:
        config.loads(text)
    assert str(caught.value) == message


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
        key = re.match(r"^#?\s*([a-z0-9_]+)\s*=", line)
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


# --- user@host[:port], and the exact wording of errors without a file (mutation survivors) --------------

@pytest.mark.parametrize(("text", "default_user", "expected"), [
    ("alice@relay.example", None, ("alice", "relay.example", 22)),
    ("alice@relay.example:2222", None, ("alice", "relay.example", 2222)),
    ("relay.example:1", "ictunnel", ("ictunnel", "relay.example", 1)),
    ("relay.example:65535", "ictunnel", ("ictunnel", "relay.example", 65535)),
    ("a@b@relay.example", None, ("a@b", "relay.example", 22)),        # the last @ separates the host
    ("alice@::1", None, ("alice", "::1", 22)),                         # two colons: an IPv6 host, no port
])
def test_parse_user_host(text, default_user, expected):
    assert config.parse_user_host(text, "--relay", default_user) == expected


@pytest.mark.parametrize(("text", "default_user", "message"), [
    ("alice@relay.example:0", None, "--relay alice@relay.example:0: port must be 1-65535"),
    ("alice@relay.example:65536", None, "--relay alice@relay.example:65536: port must be 1-65535"),
    ("alice@relay.example:x", None, "--relay alice@relay.example:x: port must be 1-65535"),
    ("relay.example", None, "--relay relay.example: expected USER@HOST[:PORT]"),
    ("alice@", None, "--relay alice@: expected USER@HOST[:PORT]"),
    ("@relay.example", None, "--relay @relay.example: expected USER@HOST[:PORT]"),
    ("alice@:22", "bob", "--relay alice@:22: expected USER@HOST[:PORT]"),
])
def test_parse_user_host_rejects_with_one_line(text, default_user, message):
    with pytest.raises(ConfigError) as caught:
        config.parse_user_host(text, "--relay", default_user)
    assert str(caught.value) == message


@pytest.mark.parametrize(("text", "message"), [
    ('[server]\ndomain = "a.test"\nmax_connections = false\n',
     'config: line 3: [server] max_connections: expected an integer 4-100000, got false'),
    ('[server]\ndomain = "a.test"\n[rely]\nhost = "x"\n',
     'config: line 3: [rely]: unknown section (did you mean "[relay]"?)'),
    ('[server]\ndomain = "a.test"\n"log_level" = "loud"\n',
     "config: line 3: [server] log_level: expected one of"),
    ('[server]\ndomain = "a.test"\n[ "relay" ]\nhots = "x"\n',
     'config: line 4: [relay] hots: unknown key (did you mean "host"?)'),
])
def test_errors_from_text_without_a_file_say_config(text, message):
    """loads() without a path: the message starts 'config: line N:' and names the key as in the file."""
    with pytest.raises(ConfigError) as caught:
        config.loads(text)
    assert str(caught.value).startswith(message), str(caught.value)


@pytest.mark.parametrize(("text", "message"), [
    ('[server]\ndomain = "a.test"\nhttps_listen = \n',
     "config: line 3, column 16: TOML syntax error: [server] https_listen: invalid value"),
    ('[server]\ndomain = "a.test"\n[relay]\n"port" = \n',
     "config: line 4, column 10: TOML syntax error: [relay] port: invalid value"),
    ("domain = \n", "config: line 1, column 10: TOML syntax error: domain: invalid value"),
    ('[server]\ndomain = "a.test"\n[relay\n',
     "config: line 3, column 7: TOML syntax error: Expected ']' at the end of a table declaration"),
])
def test_syntax_errors_name_the_key_on_their_line(text, message):
    """tomllib's message, with the [section] key written on the failing line when there is one."""
    with pytest.raises(ConfigError) as caught:
        config.loads(text)
    assert str(caught.value) == message


def test_replace_server_changes_only_the_named_fields():
    cfg = config.loads(GOOD)
    other = config.replace_server(cfg, max_connections=8)
    assert other.server.max_connections == 8 and cfg.server.max_connections == 512
    assert other.server.domain == cfg.server.domain and other.relay == cfg.relay and other.acme == cfg.acme


@pytest.mark.parametrize(("extra", "message"), [
    ('[relay]\nuser = 5\n', "config: line 4: [relay] user: expected a string, got 5"),
    ('data_dir = ""\n', 'config: line 3: [server] data_dir: expected a non-empty string, got ""'),
    ('[acme]\nenabled = "yes"\n', 'config: line 4: [acme] enabled: expected true or false, got "yes"'),
    ("auth_delay_s = 11\n", "config: line 3: [server] auth_delay_s: expected a number 0-10, got 11"),
    ("auth_delay_s = true\n", "config: line 3: [server] auth_delay_s: expected a number 0-10, got true"),
    ('[relay]\nhost_key = "not a key"\n', 'config: line 4: [relay] host_key: expected an OpenSSH public key line '
                                         'such as "ssh-ed25519 AAAAC3...", got "not a key"'),
])
def test_each_value_check_names_what_it_expected(extra, message):
    with pytest.raises(ConfigError) as caught:
        config.loads(GOOD + extra)
    assert str(caught.value) == message


def test_a_section_that_is_not_a_table():
    with pytest.raises(ConfigError) as caught:
        config.loads('server = 3\n')
    assert str(caught.value) == "config: line 1: server: expected a [table]"


def test_a_config_file_that_is_not_utf8_is_one_line(tmp_path):
    path = tmp_path / "config.toml"
    path.write_bytes(b'[server]\ndomain = "\xff"\n')
    with pytest.raises(ConfigError) as caught:
        config.load(path)
    assert str(caught.value) == (f"{path}: cannot read config file: 'utf-8' codec can't decode byte 0xff in "
                                 "position 19: invalid start byte")


EXACT = {
    "syntax error": "config: line 3, column 16: TOML syntax error: [server] https_listen: invalid value",
    "unknown key": 'config: line 4: [relay] hots: unknown key (did you mean "host"?)',
    "unknown section": 'config: line 3: [rely]: unknown section (did you mean "[relay]"?)',
    "wrong type": 'config: line 4: [relay] port: expected an integer 1-65535, got "x"',
    "port 70000": "config: line 4: [relay] port: expected an integer 1-65535, got 70000",
    "listen port 70000": 'config: line 3: [server] https_listen: port must be 0-65535, got "127.0.0.1:70000"',
    "missing domain": "config: line 1: [server] domain: missing required key",
    "duplicate key": "config: line 3, column 18: TOML syntax error: [server] domain is defined twice",
    "duplicate table": "config: line 3, column 8: TOML syntax error: [server] is defined twice",
    "bool for int": "config: line 3: [server] max_connections: expected an integer 4-100000, got true",
    "bad domain": "config: line 2: [server] domain: expected a DNS name such as contacts.example.org, got "
                  '"not a domain"',
    "bad choice": 'config: line 3: [server] log_level: expected one of "debug", "info", "warning", "error", got "loud"',
    "locked radicale option": "config: line 4: [radicale.auth] type: is not a Radicale option inverse-cloud passes "
                              "through (it could run code, widen access or is set by inverse-cloud itself); "
                              "allowed here: cache_failed_logins_expiry, cache_successful_logins_expiry, realm",
    "radicale option outside a table": "config: line 4: [radicale] foo: expected a table such as [radicale.storage] "
                                       "holding Radicale options",
}


@pytest.mark.parametrize(("name", "text", "line", "fragments"), BAD_CONFIGS, ids=[c[0] for c in BAD_CONFIGS])
def test_bad_config_exact_line(name, text, line, fragments):
    """The whole line, for text given without a file (so it starts 'config:')."""
    with pytest.raises(ConfigError) as caught:
        config.loads(text)
    assert str(caught.value) == EXACT[name]


@pytest.mark.parametrize(("extra", "message"), [
    ("[zzzzqq]\nx=1\n", "config: line 3: [zzzzqq]: unknown section; known: acme, radicale, relay, server"),
    ("[relay]\nqqqqzz = 1\n", "config: line 4: [relay] qqqqzz: unknown key; known keys: enabled, host, port, user, "
                             "key_file, takeover_key_file, host_key, listen_host, https_port, http_port, "
                             "keepalive_interval_s, keepalive_count_max, connect_timeout_s, fallback_port, "
                             "proxy_protocol, listen_host6"),
    ("max_connections = 3\n", "config: line 3: [server] max_connections: expected an integer 4-100000, got 3"),
    ("max_connections = 100001\n",
     "config: line 3: [server] max_connections: expected an integer 4-100000, got 100001"),
    ("auth_delay_s = -0.1\n", "config: line 3: [server] auth_delay_s: expected a number 0-10, got -0.1"),
    ("auth_delay_s = 10.5\n", "config: line 3: [server] auth_delay_s: expected a number 0-10, got 10.5"),
    ('https_listen = "[::1]:65536"\n',
     'config: line 3: [server] https_listen: port must be 0-65535, got "[::1]:65536"'),
    ('https_listen = "nope"\n',
     'config: line 3: [server] https_listen: expected HOST:PORT, e.g. 127.0.0.1:8443, got "nope"'),
])
def test_range_and_name_errors_exact(extra, message):
    with pytest.raises(ConfigError) as caught:
        config.loads(GOOD + extra)
    assert str(caught.value) == message


def test_range_ends_and_normalised_values_are_accepted():
    def server(extra: str) -> config.ServerConfig:
        return config.loads(GOOD + extra).server

    assert server("max_connections = 4\n").max_connections == 4
    assert server("max_connections = 100000\n").max_connections == 100000
    assert server("auth_delay_s = 0\n").auth_delay_s == 0.0 and isinstance(server("auth_delay_s = 0\n").auth_delay_s,
                                                                         float)
    assert server("auth_delay_s = 10\n").auth_delay_s == 10.0
    assert server('https_listen = "[::ABCD]:65535"\n').https_listen == ("::ABCD", 65535)
    assert server('https_listen = "127.0.0.1:0"\n').https_listen == ("127.0.0.1", 0)
    assert server('log_level = "debug"\n').log_level == "debug"
    assert config.loads('[server]\ndomain = "Laptop.Test."\n').server.domain == "laptop.test"
    with pytest.raises(ConfigError, match="expected a DNS name"):
        config.loads('[server]\ndomain = ".laptop.test"\n')
    key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIPdR/oJumYvxBj5EcrtzZ7CKnzQkJornglLlC0nU8PWb"
    assert config.loads(GOOD + f'[relay]\nhost_key = "{key}"\n').relay.host_key == key
    extra = config.loads(GOOD + '[radicale.storage]\nmax_sync_token_age = "100"\n').radicale_extra
    assert dict(extra) == {"storage": {"max_sync_token_age": "100"}}


def test_load_passes_overrides_and_reads_utf8(tmp_path):
    path = tmp_path / "config.toml"
    path.write_text('[server]\ndomain = "a.test"\n# café\n', encoding="utf-8")
    cfg = config.load(path, {"server": {"max_connections": 8}})
    assert cfg.server.max_connections == 8 and cfg.path == path


@pytest.mark.parametrize(("var", "fn", "fallback", "tail"), [
    ("XDG_CONFIG_HOME", config.default_config_path, ".config", "inverse-cloud/config.toml"),
    ("XDG_DATA_HOME", config.default_data_dir, ".local/share", "inverse-cloud"),
    ("XDG_STATE_HOME", config.default_state_dir, ".local/state", "inverse-cloud"),
])
def test_xdg_locations(monkeypatch, tmp_path, var, fn, fallback, tail):
    """An absolute XDG_* wins; unset or relative falls back under the home folder."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv(var, str(tmp_path / "xdg"))
    assert fn() == tmp_path / "xdg" / tail
    monkeypatch.setenv(var, "relative/path")
    assert fn() == tmp_path / "home" / fallback / tail
    monkeypatch.delenv(var)
    assert fn() == tmp_path / "home" / fallback / tail


def test_every_server_field_comes_from_its_own_key(tmp_path):
    text = (f'[server]\ndomain = "a.test"\ndata_dir = "{tmp_path}/d"\nstate_dir = "{tmp_path}/s"\n'
            "max_body_bytes = 123456\nbody_grace_s = 2.5\nbody_min_rate_bps = 777\nidle_timeout_s = 33.0\n"
            "handshake_timeout_s = 4.5\nmax_connections = 99\nradicale_threads = 3\nauth_delay_s = 0.25\n"
            'shutdown_timeout_s = 7.0\nlog_level = "warning"\n'
            '[radicale.storage]\nuse_mtime_and_size_for_item_cache = true\nskip_broken_item = false\n')
    cfg = config.loads(text)
    s = cfg.server
    assert (s.max_body_bytes, s.body_grace_s, s.body_min_rate_bps, s.idle_timeout_s, s.handshake_timeout_s,
            s.max_connections, s.radicale_threads, s.auth_delay_s, s.shutdown_timeout_s, s.log_level) == (
        123456, 2.5, 777, 33.0, 4.5, 99, 3, 0.25, 7.0, "warning")
    assert s.control_socket == tmp_path / "s" / "control.sock"
    assert dict(cfg.radicale_extra) == {"storage": {"use_mtime_and_size_for_item_cache": "True",
                                                 "skip_broken_item": "False"}}
    custom = config.loads(text.replace('log_level = "warning"\n', f'log_level = "warning"\ncontrol_socket = '
                                                                  f'"{tmp_path}/c.sock"\n'))
    assert custom.server.control_socket == tmp_path / "c.sock"


def test_every_relay_and_acme_field_comes_from_its_own_key(tmp_path):
    key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIPdR/oJumYvxBj5EcrtzZ7CKnzQkJornglLlC0nU8PWb"
    text = (f'[server]\ndomain = "a.test"\ndata_dir = "{tmp_path}/d"\nstate_dir = "{tmp_path}/s"\n'
            f'[relay]\nenabled = false\nhost = "relay.example"\nport = 2222\nuser = "bob"\nkey_file = "{tmp_path}/k"\n'
            f'takeover_key_file = "{tmp_path}/t"\nhost_key = "{key}"\nlisten_host = "127.0.0.2"\nhttps_port = 1443\n'
            "http_port = 1080\nkeepalive_interval_s = 7.0\nkeepalive_count_max = 4\nconnect_timeout_s = 9.0\n"
            '[acme]\nenabled = true\ndirectory = "https://ca.example/dir"\nemail = "me@a.test"\n'
            f'ca_bundle = "{tmp_path}/ca.pem"\neab_kid = "kid"\neab_hmac_key = "hmac"\nkey_type = "ecdsa-p384"\n'
            'check_interval_s = 120.0\nself_check_address = "127.0.0.1:8080"\ndns_server = "127.0.0.1:5353"\n'
            'caa_issuer = " Pebble.Test "\n')
    cfg = config.loads(text, tmp_path / "c.toml")
    r, a = cfg.relay, cfg.acme
    assert cfg.path == tmp_path / "c.toml"
    assert (r.enabled, r.host, r.port, r.user, r.key_file, r.takeover_key_file, r.host_key, r.listen_host,
            r.https_port, r.http_port, r.keepalive_interval_s, r.keepalive_count_max, r.connect_timeout_s) == (
        False, "relay.example", 2222, "bob", tmp_path / "k", tmp_path / "t", key, "127.0.0.2", 1443, 1080, 7.0, 4,
        9.0)
    assert (a.enabled, a.directory, a.email, a.ca_bundle, a.eab_kid, a.eab_hmac_key, a.key_type, a.check_interval_s,
            a.account_dir, a.self_check_address, a.dns_server, a.caa_issuer) == (
        True, "https://ca.example/dir", "me@a.test", tmp_path / "ca.pem", "kid", "hmac", "ecdsa-p384", 120.0,
        tmp_path / "d" / "acme", ("127.0.0.1", 8080), ("127.0.0.1", 5353), "pebble.test")
    # Without a relay host: relay off, and ACME follows the relay unless set.
    plain = config.loads(f'[server]\ndomain = "a.test"\ndata_dir = "{tmp_path}/d"\n')
    assert plain.relay.enabled is False and plain.acme.enabled is False
    assert plain.relay.key_file == tmp_path / "d" / "ssh" / "id_ed25519"
    assert plain.relay.takeover_key_file == tmp_path / "d" / "ssh" / "id_ed25519_takeover"


@pytest.mark.parametrize(("section", "option", "value"), [
    ("storage", "hook", '"id > /tmp/pwned"'),           # a shell command run after every write
    ("storage", "type", '"os"'),                         # a Python module Radicale imports
    ("storage", "folder_umask", '"0000"'),               # world-readable contacts
    ("storage", "filesystem_cache_folder", '"/tmp/x"'),
    ("sharing", "type", '"csv"'),                        # password-less token shares
    ("web", "type", '"internal"'),                       # the web UI: [server] web_ui says that
    ("hook", "type", '"email"'),
    ("auth", "strip_domain", "true"),
    ("logging", "request_content_on_debug", "true"),
    ("server", "hosts", '"0.0.0.0:5232"'),
    ("nosuchsection", "x", "1"),
])
def test_radicale_pass_through_refuses_options_outside_the_allowlist(section, option, value):
    """[radicale.*] passes through only options known to be harmless; anything else (a command to run,
    a module to import, sharing, the web UI, a new option a Radicale upgrade adds) is refused with one
    line naming the option."""
    with pytest.raises(ConfigError) as info:
        config.loads(GOOD + f"[radicale.{section}]\n{option} = {value}\n")
    message = str(info.value)
    assert f"[radicale.{section}] {option}" in message and "\n" not in message, message
    assert "line 4" in message, message


def test_web_ui_is_off_unless_asked_for():
    assert config.loads(GOOD).server.web_ui is False
    assert config.loads(GOOD + "web_ui = true\n").server.web_ui is True
