"""The relay transport across transports and relay nodes: a node whose UDP gets no
answer relays over TCP + mutual TLS (one RelayCore serves both, so it reaches and
is reached by a node on UDP), and two independent relay nodes with a node homed on
each (the caller registers with the other's home on demand)."""

from __future__ import annotations

import os

import pytest
import trio

from proxy.rendezvous.addresses import RelayAddress
from proxy.rendezvous.errors import NoDirectPath
from proxy.rendezvous.routes import relay_path

from .test_relay_udp_support import (
    MarkerScan,
    digest,
    payload,
    registered_with,
    tunnel_both_ways,
    udp_node,
    wait_for,
)

SIZE = 4 * 1024 * 1024


async def test_a_node_whose_udp_gets_no_answer_relays_over_tcp_and_is_reached_by_node_id() -> None:
    marker = b"keynode tcp relay marker " + os.urandom(6).hex().encode()
    with trio.fail_after(120):
        async with udp_node(serve=True, tcp_port=0) as relay:
            server = relay.service.relay_server
            assert server is not None and server.port > 0
            scan = MarkerScan(marker)
            assert relay.service.relay_core is not None
            relay.service.relay_core.capture = scan
            # Its UDP toward the relay goes nowhere (a port nobody answers): only TCP works.
            with trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM) as dead:
                await dead.bind(("127.0.0.1", 0))
                dead_port = dead.getsockname()[1]
                blocked = RelayAddress(relay.node_id, "127.0.0.1", dead_port, server.port)
                async with udp_node(relays=(blocked,), tcp_fallback_after=0.2) as tcp_only, \
                        udp_node(relays=(relay.relay_address(),)) as on_udp:
                    await wait_for(lambda: registered_with(on_udp, relay))
                    await wait_for(lambda: tcp_only.service.routes.links.get(bytes(relay.node_id)) is not None)
                    link = tcp_only.service.routes.links[bytes(relay.node_id)]
                    await wait_for(lambda: link.registered)
                    assert not registered_with(tcp_only, relay)
                    assert tcp_only.service.routes.home_relay == relay.node_id
                    # its own lookups go over the link (KEYED frames): the UDP node is found
                    # (NodeNotFound otherwise), and nothing answers a punch from a stranger
                    with pytest.raises(NoDirectPath):
                        await tcp_only.service.find_path(on_udp.node_id)
                    relay_counters = relay.service.counters["relay"]
                    assert relay_counters["lookups"] >= 1 and relay_counters["introductions"] == 0
                    # the node on UDP finds the TCP-only node by NodeId: found, no address to punch
                    core = on_udp.service.core
                    assert core is not None
                    core.lookup(bytes(tcp_only.node_id), trio.current_time())
                    on_udp.service.wake()
                    await wait_for(lambda: on_udp.service.routes.relay_for(tcp_only.node_id) == relay.node_id)
                    # a tunnel from the UDP node to the TCP-only one, both ways
                    a_to_b, b_to_a = payload(SIZE, 3, marker), payload(SIZE, 4, marker)
                    path = on_udp.service.routes.path_to(tcp_only.node_id)
                    assert path == relay_path(relay.node_id, tcp_only.node_id)
                    results = await tunnel_both_ways(on_udp, tcp_only, path, a_to_b, b_to_a)
                    # and the TCP-only node reaches the UDP one by NodeId, liveness both ways
                    assert await tcp_only.service.routes.ping(on_udp.node_id) > 0
                    assert await on_udp.service.routes.ping(tcp_only.node_id) > 0
                    # ... and opens its own tunnel toward it
                    reverse = tcp_only.service.routes.path_to(on_udp.node_id)
                    assert reverse == relay_path(relay.node_id, on_udp.node_id)
                    back = await tunnel_both_ways(tcp_only, on_udp, reverse, b"from tcp" * 1000, b"from udp" * 1000)
                    tcp_stats = tcp_only.endpoint.stats
    print(f"relayed UDP <-> TCP: {2 * SIZE / results['seconds'] / 2**20:.1f} MiB/s (both directions together)")
    assert results["at b"] == digest(a_to_b) and results["at a"] == digest(b_to_a)
    assert results["b saw"] == on_udp.node_id and results["a saw"] == tcp_only.node_id
    assert results["b path"] == relay_path(relay.node_id, on_udp.node_id)
    assert back["at b"] == digest(b"from tcp" * 1000) and back["at a"] == digest(b"from udp" * 1000)
    # the TCP-only node's uTP never touched its UDP socket
    assert tcp_stats.utp_datagrams_received == 0 and tcp_stats.path_datagrams_sent > 0
    assert scan.bytes >= 2 * SIZE and scan.hits == 0


async def test_two_relays_no_cluster_a_homed_on_one_reaches_b_homed_on_the_other() -> None:
    with trio.fail_after(60):
        async with udp_node(serve=True) as r1, udp_node(serve=True) as r2:
            async with udp_node(relays=(r2.relay_address(),)) as b:
                await wait_for(lambda: registered_with(b, r2))
                # a knows b only by its address list ([peers]: relay:<r2>@...), not r2 itself
                async with udp_node(relays=(r1.relay_address(),),
                                    home_relays={b.node_id: (r2.relay_address(),)}) as a:
                    await wait_for(lambda: registered_with(a, r1))
                    assert a.service.routes.home_relay == r1.node_id
                    assert b.service.routes.home_relay == r2.node_id
                    assert a.service.routes.relay_for(b.node_id) == r2.node_id
                    path = a.service.routes.path_to(b.node_id)  # registers with r2 on demand
                    assert path == relay_path(r2.node_id, b.node_id)
                    await wait_for(lambda: registered_with(a, r2))
                    assert a.service.routes.home_relay == r1.node_id  # an on-demand relay is no home
                    results = await tunnel_both_ways(a, b, path, b"a to b" * 50_000, b"b to a" * 50_000)
                    assert await a.service.routes.ping(b.node_id) > 0
                    assert b.service.routes.relay_for(a.node_id) == r2.node_id  # it answers the way a came
    assert results["at b"] == digest(b"a to b" * 50_000) and results["at a"] == digest(b"b to a" * 50_000)
    assert results["b path"] == relay_path(r2.node_id, a.node_id)
    core1, core2 = r1.service.relay_core, r2.service.relay_core
    assert core1 is not None and core2 is not None
    assert core1.stats.frames_forwarded == 0 and core2.stats.frames_forwarded > 0  # no relay-to-relay anything


async def test_nodes_that_prefer_tcp_relay_over_their_links_though_udp_works() -> None:
    with trio.fail_after(60):
        async with udp_node(serve=True, tcp_port=0) as relay:
            server = relay.service.relay_server
            assert server is not None
            offered = (relay.relay_address(tcp_port=server.port),)
            async with udp_node(relays=offered) as a, udp_node(relays=offered) as b:
                for node in (a, b):
                    node.service.routes.prefer_tcp = True
                await wait_for(lambda: registered_with(a, relay) and registered_with(b, relay))
                await wait_for(lambda: all(bytes(relay.node_id) in node.service.routes.links
                                           and node.service.routes.links[bytes(relay.node_id)].registered
                                           for node in (a, b)))
                front = relay.service.relay_front
                assert front is not None
                before = front.counters["received"]
                path = a.service.routes.path_to(b.node_id)
                assert path == relay_path(relay.node_id, b.node_id)
                data = payload(SIZE, 5, b"no marker needed")
                results = await tunnel_both_ways(a, b, path, data, b"back" * 1000)
                assert front.counters["received"] == before  # no relayed datagram came over UDP
    print(f"relayed over TCP links: {SIZE / results['seconds'] / 2**20:.1f} MiB/s one way")
    assert results["at b"] == digest(data) and results["at a"] == digest(b"back" * 1000)
    core = relay.service.relay_core
    assert core is not None and core.stats.frames_forwarded > SIZE // 1500
