"""One host/port syntax for config, CLI, control socket and the CONNECT edge."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.app.config import config_from_mapping
from proxy.errors import BadConnectRequest, ConfigError
from proxy.tunnel.hosts import (
    HostPort,
    HostPortInvalid,
    WildcardHost,
    parse_host,
    parse_host_port,
    parse_port,
    parse_port_text,
)
from proxy.tunnel.http_connect import parse_connect_target


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1", "127.0.0.1"),
        ("::FFFF:1.2.3.4", "::ffff:102:304"),
        ("0:0::1", "::1"),
        ("fe80::1%eth0.100", "fe80::1%eth0.100"),
        ("Example.COM.", "example.com"),
        ("a-b.c", "a-b.c"),
        ("x" * 63 + ".y", "x" * 63 + ".y"),
    ],
)
def test_hosts_come_back_in_one_spelling(text: str, expected: str) -> None:
    assert parse_host(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "", "bad host", "bad_host", "-a.b", "a-.b", "a..b", "x" * 64, "a." * 127 + "ab",
        "host\n", "h\x00", "[::1]", "fe80::1%\n", "fe80::1% x",
    ],
)
def test_bad_hosts_are_refused_with_a_reason(text: str) -> None:
    with pytest.raises(HostPortInvalid) as info:
        parse_host(text)
    assert str(info.value)


def test_wildcards_bind_but_do_not_connect() -> None:
    assert parse_host("0.0.0.0") == "0.0.0.0" and parse_host("::") == "::"
    for wildcard in ("0.0.0.0", "::", "0:0::0"):
        with pytest.raises(WildcardHost):
            parse_host(wildcard, allow_wildcard=False)


def test_ports() -> None:
    assert parse_port(0, allow_zero=True) == 0 and parse_port_text("65535", allow_zero=False) == 65535
    for bad in (True, 1.0, "80", -1, 65536):
        with pytest.raises(HostPortInvalid):
            parse_port(bad, allow_zero=True)
    for text in ("", "+1", " 1", "1 ", "٣", "123456", "0"):
        with pytest.raises(HostPortInvalid):
            parse_port_text(text, allow_zero=False)


def test_host_port_text() -> None:
    assert parse_host_port("[::1]:80") == HostPort("::1", 80)
    assert str(HostPort("::1", 80)) == "[::1]:80"
    for bad in ("[1.2.3.4]:80", "::1:80", "[::1]80", "h:0", "0.0.0.0:1\n"):
        with pytest.raises(HostPortInvalid):
            parse_host_port(bad)
    with pytest.raises(WildcardHost):
        parse_host_port("[::]:4000", allow_wildcard=False)


def test_config_and_connect_edge_agree(tmp_path: Path) -> None:
    """A name the config accepts the CONNECT edge accepts, and the other way round:
    before, the config let `_` and a trailing newline through and the edge refused them."""
    for host in ("peer_1.example", "peer\n"):
        with pytest.raises(ConfigError, match="server.host"):
            config_from_mapping({"server": {"host": host, "port": 1}}, "c.toml", base_dir=tmp_path, read_auth=False)
        with pytest.raises(BadConnectRequest):
            parse_connect_target(f"{host}:1?nodeId=x")


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=70))
def test_any_text_is_a_host_or_a_reason(text: str) -> None:
    try:
        host = parse_host(text)
    except HostPortInvalid:
        return
    assert host == parse_host(host)  # the one spelling is a fixed point
    assert host.isascii() and host.isprintable() and " " not in host
