"""The TOML config: defaults, every section, and rejection of bad input."""

from __future__ import annotations

import os
import string
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.app.config import (
    Config,
    HostPort,
    Timeouts,
    config_from_mapping,
    default_node_dir,
    load_config,
    parse_host_port,
)
from proxy.errors import ConfigError
from proxy.identity.node_id import NodeId


def fresh_node_id() -> NodeId:
    return NodeId.from_public_key(Ed25519PrivateKey.generate().public_key())


def write(tmp_path: Path, text: str, name: str = "keynode.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def node_dir_with_token(tmp_path: Path, token: str = "secret-token") -> Path:
    node_dir = tmp_path / "node"
    node_dir.mkdir()
    token_path = node_dir / "auth_token"
    token_path.write_text(token + "\n")
    token_path.chmod(0o600)
    return node_dir


def test_full_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    peer = fresh_node_id()
    monkeypatch.setenv("KEYNODE_TEST_TOKEN", "from-env")
    path = write(
        tmp_path,
        f"""
[node]
dir = "nodedir"
[forward]
host = "::1"
port = 8080
[proxy]
host = "0.0.0.0"
port = 4000
[server]
host = "localhost"
port = 50051
[auth]
token_env = "KEYNODE_TEST_TOKEN"
[timeouts]
conn_connect_time = 20
conn_keep_alive_timeout_time = 30.5
conn_end_time = 0.5
conn_punch_interval_time = 0.1
conn_keep_alive_interval_time = 2
[transport]
congestion = "tolerant"
[peers]
"{peer}" = "[2001:db8::1]:4000"
[log]
level = "debug"
format = "json"
[control]
socket = "/tmp/kn.sock"
""",
    )
    config = load_config(path)
    assert isinstance(config, Config)
    assert config.node_dir == tmp_path / "nodedir"
    assert config.forward == HostPort("::1", 8080)
    assert config.proxy == HostPort("0.0.0.0", 4000)
    assert config.server == HostPort("localhost", 50051)
    assert config.auth.value == "from-env" and config.auth.source == "token_env"
    assert config.timeouts == Timeouts(20.0, 30.5, 0.5, 0.1, 2.0)
    assert config.peers == {peer: HostPort("2001:db8::1", 4000)}
    assert (config.log_level, config.log_format) == ("debug", "json")
    assert config.control_socket == Path("/tmp/kn.sock")
    assert config.congestion == "tolerant"
    assert config.key_path == tmp_path / "nodedir" / "key.pem"


def test_defaults_use_node_dir_token_file(tmp_path: Path) -> None:
    node_dir = node_dir_with_token(tmp_path, "tok")
    config = load_config(write(tmp_path, f'[node]\ndir = "{node_dir}"\n'))
    assert config.forward == HostPort("127.0.0.1", 0)
    assert config.proxy == HostPort("0.0.0.0", 0)
    assert config.server is None
    assert config.auth.value == "tok" and config.auth.origin == str(node_dir / "auth_token")
    assert config.timeouts == Timeouts()
    assert config.timeouts.conn_connect_time == 2.0
    assert config.peers == {}
    assert (config.log_level, config.log_format) == ("info", "text")
    assert config.control_socket == node_dir / "control.sock"
    assert config.congestion == "rate"


def test_default_node_dir_follows_xdg(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
    assert default_node_dir() == tmp_path / "keynode"
    monkeypatch.setenv("XDG_DATA_HOME", "relative/is/ignored")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert default_node_dir() == tmp_path / ".local" / "share" / "keynode"


def test_inline_token_and_token_file(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, '[auth]\ntoken = "  inline  "\n'))
    assert config.auth.value == "inline" and config.auth.source == "token"
    token_file = tmp_path / "tok"
    token_file.write_text("filetoken\n")
    token_file.chmod(0o600)
    config = load_config(write(tmp_path, '[auth]\ntoken_file = "tok"\n'))
    assert config.auth.value == "filetoken" and config.auth.origin == str(token_file)


BAD_CONFIGS = [
    ("colour = 1\n", "colour", "unknown key"),
    ("[forward]\nhots = 'x'\n", "forward.hots", "unknown key"),
    ("[forward]\nport = 70000\n", "forward.port", "out of range"),
    ("[forward]\nport = true\n", "forward.port", "integer"),
    ("[forward]\nport = '80'\n", "forward.port", "integer"),
    ("[proxy]\nhost = 'bad host'\n", "proxy.host", "neither"),
    ("[proxy]\nhost = ''\n", "proxy.host", "empty"),
    ("[server]\nhost = '127.0.0.1'\n", "server.port", "missing"),
    ("[server]\nport = 0\n", "server.port", "out of range"),
    ("forward = 3\n", "forward", "must be a table"),
    ("[timeouts]\nconn_connect_time = 21\n", "timeouts.conn_connect_time", "out of range"),
    ("[timeouts]\nconn_connect_time = 0\n", "timeouts.conn_connect_time", "out of range"),
    ("[timeouts]\nconn_end_time = nan\n", "timeouts.conn_end_time", "out of range"),
    ("[timeouts]\nconn_end_time = inf\n", "timeouts.conn_end_time", "out of range"),
    ("[timeouts]\nconn_end_time = '1'\n", "timeouts.conn_end_time", "number"),
    ("[timeouts]\nconn_connect_timeout = 1\n", "timeouts.conn_connect_timeout", "unknown key"),
    (
        "[timeouts]\nconn_keep_alive_interval_time = 30\n",
        "timeouts.conn_keep_alive_interval_time",
        "shorter",
    ),
    ("[peers]\nvnotanodeid = '1.2.3.4:5'\n", "peers.vnotanodeid", "not a NodeId"),
    ("[log]\nlevel = 'loud'\n", "log.level", "not one of"),
    ("[transport]\ncongestion = 'cubic'\n", "transport.congestion", "not one of"),
    ("[transport]\nmtu = 1200\n", "transport.mtu", "unknown key"),
    ("[tls]\nmax_chain_length = 0\n", "tls.max_chain_length", "out of range 1..1024"),
    ("[tls]\nmax_chain_length = 1025\n", "tls.max_chain_length", "out of range 1..1024"),
    ("[tls]\nmax_chain_length = 8.0\n", "tls.max_chain_length", "integer"),
    ("[tls]\nmax_chain_length = true\n", "tls.max_chain_length", "integer"),
    ("[tls]\nciphers = 'x'\n", "tls.ciphers", "unknown key"),
    ("[log]\nformat = 'xml'\n", "log.format", "not one of"),
    ("[auth]\ntoken = 'a'\ntoken_env = 'B'\n", "auth.token_env", "exactly one"),
    ("[auth]\ntoken = ''\n", "auth.token", "empty"),
    ('[auth]\ntoken = "a\\u0007b"\n', "auth.token", "printable"),
    ("[auth]\ntoken_env = 'KEYNODE_SURELY_UNSET_VARIABLE'\n", "auth.token_env", "not set"),
    ("[auth]\ntoken_file = 'missing'\n", "auth.token_file", "does not exist"),
    ("[control]\nsocket = '" + "/x" * 60 + "'\n", "control.socket", "107 bytes"),
    ("[node]\ndir = 3\n", "node.dir", "string"),
    ("[node\n", "(file)", "not valid TOML"),
]


@pytest.mark.parametrize(("text", "key", "reason"), BAD_CONFIGS)
def test_bad_config_names_file_key_reason(tmp_path: Path, text: str, key: str, reason: str) -> None:
    # A valid token so that only the line under test is wrong.
    if "[auth]" not in text:
        text = text + "\n[auth]\ntoken = 't'\n"
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    error = info.value
    assert error.path == str(path)
    assert error.key == key
    assert reason in error.reason
    assert str(path) in str(error) and key in str(error)


def test_valid_peer_with_bad_address(tmp_path: Path) -> None:
    peer = fresh_node_id()
    path = write(tmp_path, f'[auth]\ntoken = "t"\n[peers]\n"{peer}" = "1.2.3.4"\n')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.key == f"peers.{peer}"


def test_token_file_readable_by_others_is_rejected(tmp_path: Path) -> None:
    token_file = tmp_path / "tok"
    token_file.write_text("t")
    token_file.chmod(0o644)
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, '[auth]\ntoken_file = "tok"\n'))
    assert "chmod 600" in info.value.reason


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "absent.toml")
    assert info.value.key == "(file)" and "no such file" in info.value.reason


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:80", HostPort("127.0.0.1", 80)),
        ("example.com:65535", HostPort("example.com", 65535)),
        ("[::1]:1", HostPort("::1", 1)),
    ],
)
def test_parse_host_port(text: str, expected: HostPort) -> None:
    assert parse_host_port(text) == expected
    assert parse_host_port(str(expected)) == expected


@pytest.mark.parametrize(
    "text", ["", "host", ":80", "::1:80", "[::1]80", "[1.2.3.4]:80", "h:0", "h:99999", "h:+1", "h:٣"]
)
def test_parse_host_port_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_host_port(text)


# --- hostile values: anything TOML can hold gives a Config or a ConfigError -------------

toml_scalars = st.one_of(
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=40),
)
toml_values = st.recursive(
    toml_scalars,
    lambda children: st.lists(children, max_size=3)
    | st.dictionaries(st.text(max_size=10), children, max_size=3),
    max_leaves=8,
)
section_names = st.sampled_from(
    ["node", "forward", "proxy", "server", "auth", "timeouts", "tls", "peers", "log", "control", "x"]
)
key_names = st.sampled_from(
    ["dir", "host", "port", "token", "token_file", "token_env", "conn_connect_time",
     "conn_end_time", "level", "format", "socket", "max_chain_length", "zz"]
) | st.text(alphabet=string.printable, max_size=12)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    data=st.dictionaries(section_names, st.dictionaries(key_names, toml_values, max_size=4) | toml_values, max_size=4)
)
def test_hostile_values_never_escape_as_other_errors(tmp_path: Path, data: dict) -> None:
    try:
        config = config_from_mapping(data, "hostile.toml", base_dir=tmp_path)
    except ConfigError as error:
        assert error.path == "hostile.toml" and error.key and error.reason
    else:
        assert 0 <= config.forward.port <= 65535
        assert 0.01 <= config.timeouts.conn_connect_time <= 20


@settings(max_examples=200, deadline=None)
@given(text=st.text(max_size=60))
def test_parse_host_port_total(text: str) -> None:
    try:
        result = parse_host_port(text)
    except ValueError:
        return
    assert 1 <= result.port <= 65535 and result.host
    assert os.sep not in result.host


def test_config_congestion_names_are_real_controllers() -> None:
    from nat.utp.congestion import CONTROLLERS
    from proxy.app.config import CONGESTION_CONTROLLERS

    assert set(CONGESTION_CONTROLLERS) <= set(CONTROLLERS)


def test_tls_max_chain_length(tmp_path: Path) -> None:
    from proxy.identity.verification import DEFAULT_MAX_CHAIN_LENGTH

    config = load_config(write(tmp_path, '[auth]\ntoken = "t"\n'))
    assert config.max_chain_length == DEFAULT_MAX_CHAIN_LENGTH == 32
    for value in (1, 121, 1024):
        config = load_config(write(tmp_path, f'[auth]\ntoken = "t"\n[tls]\nmax_chain_length = {value}\n'))
        assert config.max_chain_length == value
