"""`[relay]` forwarding keys in real `keynode run` processes: a relay node with
`tcp_port`, rate and burst; a node whose UDP toward the relay gets no answer links to
it over TCP + mutual TLS by itself (`servers = ["<NodeId>@host:port:tcp=<port>"]`);
bad values are refused with the key and the reason."""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

import pytest
import trio

from proxy.app.config import load_config
from proxy.app.node_dir import keygen
from proxy.errors import ConfigError
from tests.cli.helpers import run_keynode_async, start_node


def make_node(directory: Path, config: str) -> str:
    node_id = str(keygen(directory, force=False).node_id)
    (directory / "config.toml").write_text('[proxy]\nhost = "127.0.0.1"\nport = 0\n' + config)
    return node_id


async def status(directory: Path) -> Any:
    result = await run_keynode_async("status", "--dir", str(directory), "--json")
    assert result.returncode == 0, result.stderr.decode()
    return json.loads(result.stdout)


async def test_a_node_with_no_udp_answer_links_to_its_relay_over_tcp(tmp_path: Path) -> None:
    dir_r, dir_b = tmp_path / "relay", tmp_path / "blocked"
    id_r = make_node(dir_r, "[relay]\nserve = true\ntcp_port = 0\nrate = 4000000\nburst = 200000\n")
    relay = await start_node(dir_r)
    try:
        relay_status = await status(dir_r)
        tcp_port = relay_status["relay_tcp_port"]
        assert isinstance(tcp_port, int) and tcp_port > 0
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as dead:  # a UDP port nobody answers
            dead.bind(("127.0.0.1", 0))
            dead_port = dead.getsockname()[1]
            make_node(dir_b, f'[relay]\nservers = ["{id_r}@127.0.0.1:{dead_port}:tcp={tcp_port}"]\n')
            node_b = await start_node(dir_b)
            try:
                with trio.fail_after(20):
                    while True:
                        routes = (await status(dir_b))["rendezvous"]["relay_routes"]
                        link = routes["links"].get(id_r)
                        if link is not None and link["registered"]:
                            break
                        await trio.sleep(0.2)
                assert routes["home_relay"] == id_r
                assert link["relay"] == f"{id_r}@127.0.0.1:{tcp_port}"
                forwarding = (await status(dir_r))["rendezvous"]["forwarding"]
                assert forwarding["clients"] == 1 and forwarding["udp_clients"] == 0  # b, over TCP
                assert forwarding["tcp"]["port"] == tcp_port
            finally:
                node_b.process.terminate()
                await node_b.process.wait()
    finally:
        relay.process.terminate()
        await relay.process.wait()


@pytest.mark.parametrize(("text", "key", "reason"), [
    ("[relay]\ntcp_port = 4443\n", "relay.tcp_port", "set serve = true"),
    ("[relay]\nserve = true\ntcp_port = 70000\n", "relay.tcp_port", "out of range 0..65535"),
    ("[relay]\nserve = true\ntcp_port = \"4443\"\n", "relay.tcp_port", "must be an integer"),
    ("[relay]\nserve = true\nrate = 0\n", "relay.rate", "out of range"),
    ("[relay]\nserve = true\nburst = 1000\n", "relay.burst", "at least 65573"),
    ("[relay]\nserve = true\nburst = true\n", "relay.burst", "must be an integer"),
    ("[relay]\nrate = 100000\n", "relay.rate", "set serve = true"),
    ('[relay]\nservers = ["v0@127.0.0.1:4000:tcp=x"]\n', "relay.servers[0]", "bad port"),
    ("[relay]\nprefer_tcp = 1\n", "relay.prefer_tcp", "must be true or false"),
    ("[relay]\npunch_window = \"1s\"\n", "relay.punch_window", "must be a number of seconds"),
    ("[relay]\npunch_window = 0.0\n", "relay.punch_window", "out of range 0.05..10.0"),
    ("[relay]\npunch_window = 60\n", "relay.punch_window", "out of range 0.05..10.0"),
    ("[relay]\npunch_window = nan\n", "relay.punch_window", "out of range 0.05..10.0"),
])
def test_bad_relay_forwarding_keys_name_the_key_and_the_reason(tmp_path: Path, text: str, key: str,
                                                               reason: str) -> None:
    path = tmp_path / "config.toml"
    path.write_text(text + '\n[auth]\ntoken = "t"\n')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.key == key
    assert reason in info.value.reason


def test_relay_defaults_prefer_tcp_and_a_one_second_punch_window(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text('[auth]\ntoken = "t"\n')
    config = load_config(path)
    assert (config.relay_prefer_tcp, config.relay_punch_window) == (True, 1.0)


def test_relay_forwarding_keys_are_read(tmp_path: Path) -> None:
    relay_id = str(keygen(tmp_path / "r", force=False).node_id)
    path = tmp_path / "config.toml"
    path.write_text(f'[relay]\nserve = true\ntcp_port = 4443\nrate = 1000000\nburst = 70000\nprefer_tcp = false\n'
                    'punch_window = 2.5\n'
                    f'servers = ["{relay_id}@198.18.0.2:4000:tcp=4443", "relay:{relay_id}@198.18.0.3:4000"]\n'
                    '[auth]\ntoken = "t"\n')
    config = load_config(path)
    assert (config.relay_tcp_port, config.relay_rate, config.relay_burst) == (4443, 1_000_000, 70_000)
    assert (config.relay_prefer_tcp, config.relay_punch_window) == (False, 2.5)
    assert [(server.host, server.port, server.tcp_port) for server in config.relay_servers] == [
        ("198.18.0.2", 4000, 4443), ("198.18.0.3", 4000, None)]
