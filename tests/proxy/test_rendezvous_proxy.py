"""Reaching a node by its NodeId alone through a relay node (real UDP on loopback,
real uTP + TLS): registration, observed addresses, lookup, introduction, both sides
punching, then the ordinary tunnel start."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import trio

from proxy.identity.node_id import NodeId
from proxy.rendezvous.addresses import RelayAddress, record_from_text
from proxy.tunnel.proxy import Proxy

from .test_proxy_support import TOKEN, Node, connect_ok, echo_round, running_node, tcp_server


async def refused_connect(proxy: Proxy, target: str) -> bytes:
    """The whole answer to a CONNECT the proxy refuses (status line, headers, text)."""
    stream = await trio.open_tcp_stream(proxy.forward_host, proxy.forward_port)
    token = base64.b64encode(TOKEN.encode()).decode()
    request = f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\nProxy-Authorization: Basic {token}\r\n\r\n"
    await stream.send_all(request.encode())
    answer = b""
    with trio.fail_after(10):
        while chunk := await stream.receive_some(65536):
            answer += chunk
    return answer


def relay_of(node: Node) -> RelayAddress:
    return RelayAddress(node.node_id, "127.0.0.1", node.proxy.proxy_port)


async def registered(proxy: Proxy, relays: int = 1) -> None:
    with trio.fail_after(5):
        while proxy.rendezvous is None or len(proxy.rendezvous.observed_addresses()) < relays:
            await trio.sleep(0.01)


@asynccontextmanager
async def three_nodes(**options: Any) -> AsyncIterator[tuple[Node, Node, Node, Any]]:
    async with tcp_server() as server, running_node(relay_serve=True) as relay:
        relays = (relay_of(relay),)
        async with running_node(relay_servers=relays, **options) as caller, \
                running_node(server.port, relay_servers=relays, **options) as target:
            await registered(caller.proxy)
            await registered(target.proxy)
            yield relay, caller, target, server


async def test_connect_by_node_id_alone_through_a_relay_node() -> None:
    async with three_nodes() as (relay, caller, target, server):
        assert target.node_id not in caller.proxy.address_book
        stream = await connect_ok(caller.proxy, f"{target.node_id}:443")
        await echo_round(stream, b"by NodeId alone" * 1000)
        await stream.aclose()
        # the tunnel went straight to the target's socket (no relay in the data path)
        (status,) = caller.proxy.connections()
        assert (status.info.remote_host, status.info.remote_port) == ("127.0.0.1", target.proxy.proxy_port)
        assert status.info.remote_node_id == target.node_id
        counters = relay.proxy.rendezvous.counters["relay"]  # type: ignore[union-attr]
        assert counters["introductions"] == 1 and counters["registrations"] >= 2
        assert target.proxy.rendezvous.counters["introductions"] == 1  # type: ignore[union-attr]
        # observed addresses: what the relay saw of each node
        (seen,) = caller.proxy.rendezvous.observed_addresses()  # type: ignore[union-attr]
        assert seen == {"address": f"127.0.0.1:{caller.proxy.proxy_port}", "relay": str(relay.node_id)}
        assert caller.proxy.rendezvous.nat_mapping() == "unknown"  # type: ignore[union-attr]


async def test_open_connection_forward_by_node_id_then_connect_reuses_the_path() -> None:
    async with three_nodes() as (relay, caller, target, _server):
        verified = await caller.proxy.open_connection_forward(target.node_id)
        assert verified == target.node_id
        assert caller.proxy.connection_forward_count == 1
        introductions = relay.proxy.rendezvous.counters["relay"]["introductions"]  # type: ignore[union-attr]
        # `<NodeId>:443` names the remote's service port 443 (services.py), not the
        # default service the pre-opened connection reached, so it gets a connection of
        # its own; the path the first one punched is reused: no second introduction.
        stream = await connect_ok(caller.proxy, f"{target.node_id}:443")
        await echo_round(stream, b"x" * 5000)
        assert caller.proxy.connection_forward_count == 2
        assert relay.proxy.rendezvous.counters["relay"]["introductions"] == introductions  # type: ignore[union-attr]


async def test_an_unknown_node_id_fails_fast_with_a_clear_status() -> None:
    async with three_nodes() as (_relay, caller, _target, _server):
        stranger = NodeId(bytes(range(32)))
        started = trio.current_time()
        answer = await refused_connect(caller.proxy, f"{stranger}:443")
        assert answer.startswith(b"HTTP/1.1 502 ")
        assert b"is not registered with any relay node" in answer
        assert trio.current_time() - started < 3.0  # every relay said "not found": no waiting


async def test_a_node_that_does_not_answer_punches_fails_with_no_direct_path() -> None:
    async with tcp_server() as server, running_node(relay_serve=True) as relay:
        relays = (relay_of(relay),)
        async with running_node(relay_servers=relays) as caller:
            async with running_node(server.port, relay_servers=relays) as target:
                await registered(caller.proxy)
                await registered(target.proxy)
                # the target stops answering keyed messages (as behind a NAT that drops them)
                target.proxy.endpoint.on_keyed_message = None
                # and the caller has no relayed path to fall back on (with one it starts
                # relayed: tests/proxy/test_paths.py)
                caller.proxy.set_relay_routes(None)
                answer = await refused_connect(caller.proxy, f"{target.node_id}:443")
                assert answer.startswith(b"HTTP/1.1 502 ")
                assert b"no direct path could be punched to " + str(target.node_id).encode() in answer
                assert b"needs a relay" in answer


async def test_two_relays_classify_the_mapping_and_records_are_signed() -> None:
    async with running_node(relay_serve=True) as first, running_node(relay_serve=True) as second:
        async with running_node(relay_servers=(relay_of(first), relay_of(second))) as node:
            await registered(node.proxy, relays=2)
            service = node.proxy.rendezvous
            assert service is not None
            assert service.nat_mapping() == "endpoint-independent"  # loopback: one port for both
            one, two = service.address_record(), service.address_record()
            assert two.seq > one.seq
            parsed = record_from_text(two.to_text())
            assert parsed.node_id == node.node_id
            assert f"utp:127.0.0.1:{node.proxy.proxy_port}" in parsed.addresses
            assert f"relay:{first.node_id}@127.0.0.1:{first.proxy.proxy_port}" in parsed.addresses


async def test_original_ping_pong_and_peers_still_work_beside_rendezvous() -> None:
    async with three_nodes() as (_relay, caller, target, _server):
        host_target = f"127.0.0.1:{target.proxy.proxy_port}?nodeId={target.node_id}"
        stream = await connect_ok(caller.proxy, host_target)
        await echo_round(stream, b"plain address")
        assert caller.proxy.endpoint.stats.keyed_unhandled == 0


async def test_a_rotated_identity_registers_its_new_node_id() -> None:
    from proxy.identity.tls_config import TLSConfig
    from proxy.rendezvous.keys import KeyRing

    async with three_nodes() as (relay, caller, target, _server):
        new = TLSConfig.generate()
        target.proxy.set_tls_config(new)
        assert target.proxy.rendezvous is not None
        target.proxy.rendezvous.set_identity(KeyRing.from_private_key(new.private_key))
        with trio.fail_after(5):
            while bytes(new.node_id) not in relay.proxy.rendezvous.core.relay.registrations:  # type: ignore[union-attr]
                await trio.sleep(0.01)
        stream = await connect_ok(caller.proxy, f"{new.node_id}:443")
        await echo_round(stream, b"new identity")


async def test_a_peer_s_home_relay_from_its_address_list_is_asked_for_it() -> None:
    # The caller registers with no relay node: its [peers] entry for the target names
    # only the target's home relay (a relay: address, as in the target's record).
    async with tcp_server() as server, running_node(relay_serve=True) as relay:
        async with running_node(server.port, relay_servers=(relay_of(relay),)) as target:
            await registered(target.proxy)
            async with running_node(peer_relays={target.node_id: (relay_of(relay),)}) as caller:
                assert caller.proxy.rendezvous is not None
                assert caller.proxy.rendezvous.observed_addresses() == []  # registered nowhere
                stream = await connect_ok(caller.proxy, f"{target.node_id}:443")
                await echo_round(stream, b"via the home relay")
                stranger = NodeId(bytes(range(32)))  # not in [peers]: no relay to ask
                answer = await refused_connect(caller.proxy, f"{stranger}:443")
                assert answer.startswith(b"HTTP/1.1 502 ") and b"no [relay] servers" in answer


async def test_a_relay_node_is_reached_by_its_node_id_too() -> None:
    async with tcp_server() as server, running_node(server.port, relay_serve=True) as relay:
        async with running_node(relay_servers=(relay_of(relay),)) as caller:
            await registered(caller.proxy)
            stream = await connect_ok(caller.proxy, f"{relay.node_id}:443")
            await echo_round(stream, b"to the relay node itself")


async def test_a_relay_node_listing_itself_skips_that_entry() -> None:
    from proxy.identity.tls_config import TLSConfig

    tls_config = TLSConfig.generate()
    async with running_node(relay_serve=True) as other:
        own = RelayAddress(tls_config.node_id, "127.0.0.1", 9)  # its own entry (port unknown yet)
        async with running_node(tls_config=tls_config, relay_serve=True,
                                relay_servers=(own, relay_of(other))) as relay:
            await registered(relay.proxy)
            service = relay.proxy.rendezvous
            assert service is not None and service.core is not None
            assert list(service.core.node.relays) == [bytes(other.node_id)]


async def test_connects_beside_a_live_tunnel_ask_no_relay() -> None:
    async with three_nodes() as (relay, caller, target, _server):
        first = await connect_ok(caller.proxy, f"{target.node_id}:443")
        await echo_round(first, b"first")
        counters = relay.proxy.rendezvous.counters["relay"]  # type: ignore[union-attr]
        lookups = counters["lookups"]
        await trio.sleep(3.5)  # the punch session is over: only the live tunnel knows the path
        streams = [await connect_ok(caller.proxy, f"{target.node_id}:443") for _ in range(30)]
        for stream in streams:
            await echo_round(stream, b"more")
        assert relay.proxy.rendezvous.counters["relay"]["lookups"] == lookups  # type: ignore[union-attr]
        # the reverse side reaches the caller the same way (its tunnel from it is live)
        assert target.proxy.rendezvous is not None
        assert caller.node_id not in target.proxy.address_book
        path = await target.proxy.find_path(caller.node_id)
        assert path == ("127.0.0.1", caller.proxy.proxy_port)


async def test_an_address_record_too_long_to_register_is_left_out(caplog: Any) -> None:
    # fifteen more relay nodes with long names (unreachable): the record would not fit
    # in a REGISTER; the node registers without one and says so
    far = tuple(RelayAddress(NodeId(bytes([index]) * 32), f"relay-{index}-" + "x" * 40 + ".invalid", 4000)
                for index in range(1, 16))
    async with running_node(relay_serve=True) as relay:
        async with running_node(relay_servers=(relay_of(relay), *far)) as node:
            with trio.fail_after(5):
                while bytes(node.node_id) not in relay.proxy.rendezvous.core.relay.registrations:  # type: ignore
                    await trio.sleep(0.01)
            await registered(node.proxy)
            await trio.sleep(0.2)
            entry = relay.proxy.rendezvous.core.relay.registrations[bytes(node.node_id)]  # type: ignore
            assert entry.record == b""
            assert "too long to register" in caplog.text
            record = node.proxy.rendezvous.address_record()  # type: ignore[union-attr]
            assert len(record.to_bytes()) > 1024  # `keynode id --address` still prints it
