"""Real `keynode run` processes on loopback: a relay node and two nodes configured
with `[relay] servers` only. Status shows observed addresses, the NAT mapping and
each tunnel's path; `keynode id --address` prints a signed record whose sequence
grows; open-forward, forward and CONNECT reach a node by its NodeId alone."""

from __future__ import annotations

import base64
import functools
import json
import os
from pathlib import Path
from typing import Any

import trio

from proxy.app.cli import ExitCode
from proxy.app.node_dir import keygen
from proxy.rendezvous.addresses import record_from_text
from tests.cli.helpers import run_keynode, run_keynode_async, start_keynode, start_node


def make_node(directory: Path, config: str) -> str:
    node_id = str(keygen(directory, force=False).node_id)
    (directory / "config.toml").write_text('[proxy]\nhost = "127.0.0.1"\nport = 0\n' + config)
    return node_id


async def keynode_json(*args: str) -> Any:
    result = await run_keynode_async(*args, "--json")
    assert result.returncode == 0, result.stderr.decode()
    return json.loads(result.stdout)


async def wait_observed(directory: Path) -> dict[str, Any]:
    with trio.fail_after(10):
        while True:
            status = await keynode_json("status", "--dir", str(directory))
            if status["observed_addresses"]:
                return status  # type: ignore[no-any-return]
            await trio.sleep(0.1)


async def echo(stream: trio.SocketStream) -> None:
    while data := await stream.receive_some(65536):
        await stream.send_all(data)


async def test_nodes_reach_each_other_by_node_id_through_a_relay_node(tmp_path: Path) -> None:
    dir_r, dir_a, dir_b = tmp_path / "relay", tmp_path / "a", tmp_path / "b"
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(functools.partial(trio.serve_tcp, echo, 0, host="127.0.0.1"))
        server_port = listeners[0].socket.getsockname()[1]
        id_r = make_node(dir_r, "[relay]\nserve = true\n")
        relay = await start_node(dir_r)
        relay_entry = f"{id_r}@{relay.info['proxy']}"
        id_b = make_node(dir_b, f'[server]\nport = {server_port}\n[relay]\nservers = ["{relay_entry}"]\n')
        id_a = make_node(dir_a, f'[relay]\nservers = ["{relay_entry}"]\n')
        node_b = await start_node(dir_b)
        node_a = await start_node(dir_a)
        try:
            status_a = await wait_observed(dir_a)
            await wait_observed(dir_b)
            assert status_a["observed_addresses"] == [{"address": node_a.info["proxy"], "relay": id_r}]
            assert status_a["nat_mapping"] == "unknown"  # one relay node: no second opinion
            assert status_a["relay_servers"] == [relay_entry]
            human = (await run_keynode_async("status", "--dir", str(dir_a))).stdout.decode()
            assert f"observed: {node_a.info['proxy']} (relay {id_r})" in human and "NAT mapping: unknown" in human
            relay_status = await keynode_json("status", "--dir", str(dir_r))
            assert relay_status["relay_serve"] is True
            assert relay_status["rendezvous"]["registrations"] == 2

            # the signed address record: it verifies, names this node, and its seq grows
            first = await keynode_json("id", "--address", "--dir", str(dir_a))
            second = await keynode_json("id", "--address", "--dir", str(dir_a))
            assert second["seq"] > first["seq"] and first["node_id"] == id_a
            record = record_from_text(second["record"])
            assert str(record.node_id) == id_a
            assert record.addresses == f"utp:{node_a.info['proxy']};relay:{relay_entry}"

            # open-forward by NodeId alone (no [peers] entry anywhere)
            opened = await run_keynode_async("open-forward", id_b, "--dir", str(dir_a))
            assert opened.returncode == 0, opened.stderr.decode()
            assert node_b.info["proxy"] in opened.stdout.decode()
            status_a = await keynode_json("status", "--dir", str(dir_a))
            (row,) = status_a["connections"]
            assert (row["node_id"], row["path"], row["remote"]) == (id_b, "direct", node_b.info["proxy"])

            # CONNECT <NodeId>:<port> through A's forward port
            stream = await trio.open_tcp_stream("127.0.0.1", int(node_a.info["forward"].rpartition(":")[2]))
            token = (dir_a / "auth_token").read_text().strip()
            auth = base64.b64encode(token.encode()).decode()
            await stream.send_all(f"CONNECT {id_b}:443 HTTP/1.1\r\nHost: {id_b}:443\r\n"
                                  f"Proxy-Authorization: Basic {auth}\r\n\r\n".encode())
            answer = b""
            while b"\r\n\r\n" not in answer:
                answer += await stream.receive_some(4096)
            assert answer.startswith(b"HTTP/1.1 200")
            payload = os.urandom(200_000)
            await stream.send_all(payload)
            echoed = b""
            while len(echoed) < len(payload):
                echoed += await stream.receive_some(65536)
            assert echoed == payload
            await stream.aclose()

            # keynode forward NODEID (no [peers]): the running node finds it
            forward, lines = await start_keynode(
                ["forward", "--listen", "127.0.0.1:0", id_b, "--dir", str(dir_a)], tmp_path / "forward.log",
                "listening on",
            )
            listen_port = int(lines[-1].split()[2].rpartition(":")[2])
            tunnel = await trio.open_tcp_stream("127.0.0.1", listen_port)
            await tunnel.send_all(b"through keynode forward")
            assert await tunnel.receive_some(100) == b"through keynode forward"
            await tunnel.aclose()
            forward.terminate()
            assert await forward.wait() == 0

            # an unknown NodeId fails fast with a clear message
            stranger = str(keygen(tmp_path / "stranger", force=False).node_id)
            unknown = await run_keynode_async("open-forward", stranger, "--dir", str(dir_a))
            assert unknown.returncode == ExitCode.REQUEST_FAILED
            assert f"{stranger} is not registered with any relay node" in unknown.stderr.decode()
            assert "observed address" in node_a.log
        finally:
            for node in (node_a, node_b, relay):
                assert await node.stop() == 0
        nursery.cancel_scope.cancel()


def test_id_address_needs_the_running_node(tmp_path: Path) -> None:
    keygen(tmp_path, force=False)
    result = run_keynode("id", "--address", "--dir", str(tmp_path))
    assert result.returncode == ExitCode.CONTROL_UNREACHABLE
    assert "running node" in result.stderr


def test_relay_config_errors_name_the_key(tmp_path: Path) -> None:
    keygen(tmp_path, force=False)
    for config, key in (
        ('[relay]\nservers = ["198.18.0.2:4000"]\n', "relay.servers[0]"),
        ("[relay]\nserve = 1\n", "relay.serve"),
        ('[relay]\nservers = "x"\n', "relay.servers"),
        ('[relay]\nsevre = true\n', "relay.sevre"),
        ('[peers]\n"' + str(keygen(tmp_path / "other", force=False).node_id) + '" = "utp:1.2.3.4"\n', "peers."),
    ):
        (tmp_path / "config.toml").write_text(config)
        result = run_keynode("run", "--dir", str(tmp_path), timeout=30)
        assert result.returncode == ExitCode.CONFIG, result.stderr
        assert key in result.stderr


def test_peers_take_a_host_port_a_multiserver_list_or_a_signed_record(tmp_path: Path) -> None:
    import nacl.signing

    from proxy.app.config import config_from_mapping
    from proxy.app.errors import ConfigError
    from proxy.identity.node_id import NodeId
    from proxy.rendezvous.addresses import SequenceClock, sign_record
    from proxy.tunnel.hosts import HostPort

    key = nacl.signing.SigningKey(bytes(range(32)))
    node_id = NodeId(bytes(key.verify_key))
    relay = NodeId(bytes(32))
    record = sign_record(key, SequenceClock().next(), f"relay:{relay}@198.18.0.2:4000;utp:198.51.100.7:4000")
    other = NodeId(bytes(range(1, 33)))

    def peers(value: str, name: NodeId = node_id) -> Any:
        data = {"auth": {"token": "t"}, "peers": {str(name): value}}
        return config_from_mapping(data, "x.toml", base_dir=tmp_path).peers[name]

    assert peers("198.51.100.7:4000") == HostPort("198.51.100.7", 4000)
    assert peers(f"relay:{relay}@198.18.0.2:4000;utp:2001!:db8!:!:1:4000") == HostPort("2001:db8::1", 4000)
    assert peers(record.to_text()) == HostPort("198.51.100.7", 4000)
    for value, name, reason in (
        (record.to_text(), other, "signed by"),  # filed under another NodeId
        (record.to_text()[:-3] + "AAA", node_id, "signature"),  # forged
        ("utp:198.51.100.7", node_id, "is not a number"),  # one colon: read as host:port
        ("utp:198.51.100.7:x;utp:1.2.3.4:5", node_id, "bad port"),
    ):
        try:
            peers(value, name)
        except ConfigError as error:
            assert reason in str(error) and f"peers.{name}" in str(error)
        else:
            raise AssertionError(f"{value!r} accepted")
    # a list without utp: its relay: entries are the node's home relays (asked for it)
    data = {"auth": {"token": "t"}, "peers": {str(node_id): f"relay:{relay}@198.18.0.2:4000"}}
    config = config_from_mapping(data, "x.toml", base_dir=tmp_path)
    assert node_id not in config.peers
    assert [(str(r.node_id), r.host, r.port) for r in config.peer_relays[node_id]] == [(str(relay), "198.18.0.2", 4000)]
    # host names that merely look like layer names stay host:port
    assert peers("relay.example:4000") == HostPort("relay.example", 4000)
    assert peers("utp:4000") == HostPort("utp", 4000)
