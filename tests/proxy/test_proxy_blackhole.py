"""A path that goes dark (a UDP middlebox dropping everything), and a peer that resets."""

from __future__ import annotations

from functools import partial
from typing import Any

import trio
from trio.testing import MockClock

from proxy.errors import ConnectionKeepAliveTimeout, ConnectionResetByPeer
from proxy.identity.tls_config import TLSConfig
from proxy.tls import TLSStream
from proxy.tunnel.connection import EndReason
from tests.proxy.test_proxy_support import (
    VIRTUAL_TOLERANCE,
    connect_ok,
    connection_ended,
    echo_round,
    http_connect,
    raw_peer,
    running_node,
    tcp_server,
    udp_relay,
    virtual,
)


async def test_503_while_stopping_and_connections_end_within_conn_end_time(virtual_clock: MockClock) -> None:
    # Virtual time: once the path is dark nothing is in flight but timers.
    end_time = 1.0
    with trio.fail_after(20):
        async with tcp_server() as server, running_node(server.port) as remote:
            async with (
                udp_relay(("127.0.0.1", remote.proxy.proxy_port)) as relay,
                udp_relay(("127.0.0.1", remote.proxy.proxy_port)) as idle_relay,
            ):
                async with running_node(conn_end_time=end_time) as local:
                    target = f"127.0.0.1:{relay.port}?nodeId={remote.node_id}"
                    client = await connect_ok(local.proxy, target)
                    await echo_round(client, b"before the dark")
                    # An idle connection too: nothing of ours in flight, so it says goodbye.
                    # (Over its own path: toward an address with a live connection
                    # open_connection_forward is the original's no-op.)
                    await local.proxy.open_connection_forward(remote.node_id, "127.0.0.1", idle_relay.port)
                    relay.drop = idle_relay.drop = True  # the graceful close can no longer complete
                    stopped_after: list[float] = []

                    async def stop() -> None:
                        start = trio.current_time()
                        await local.proxy.stop()
                        stopped_after.append(trio.current_time() - start)

                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(stop)
                        while local.proxy.running:  # until the stop has begun
                            await trio.sleep(0)
                        reply = await http_connect(local.proxy, target)
                        assert reply.status == 503
                        await reply.stream.aclose()
                    # Bounded by conn_end_time, not by the dead path: the idle connection's
                    # graceful close gave up at conn_end_time, to the tick. (The spliced one,
                    # its client's direction still open, was reset at once: truncation
                    # is never silent, test_truncation.py.)
                    assert stopped_after[0] == virtual(end_time)
                    assert local.proxy.connection_forward_count == 0
                    assert await connection_ended(client)
                    assert [lost.reason for lost in local.events.lost] == [EndReason.CLOSED_LOCALLY] * 2
                    await client.aclose()


async def test_keep_alive_timeout_between_two_proxies(virtual_clock: MockClock) -> None:
    timeout, interval = 0.6, 0.1
    options: dict[str, Any] = dict(conn_keep_alive_timeout_time=timeout, conn_keep_alive_interval_time=interval)
    with trio.fail_after(20):
        async with tcp_server() as server, running_node(server.port, **options) as remote:
            async with udp_relay(("127.0.0.1", remote.proxy.proxy_port)) as relay:
                async with running_node(**options) as local:
                    client = await connect_ok(local.proxy, f"127.0.0.1:{relay.port}?nodeId={remote.node_id}")
                    await echo_round(client, b"alive")
                    local_peer = local.proxy.peers.get(("127.0.0.1", relay.port))
                    remote_peer = remote.proxy.peers.get(("127.0.0.1", relay.back_port))
                    assert local_peer is not None and remote_peer is not None
                    # Quiet but alive: keep-alive pings keep both sides up for five timeouts.
                    await trio.sleep(5 * timeout)
                    await echo_round(client, b"still alive")
                    assert local.events.lost == [] and remote.events.lost == []
                    relay.drop = True
                    dark_at = trio.current_time()
                    assert await connection_ended(client)
                    (local_lost,) = await local.events.wait_lost(1)
                    (remote_lost,) = await remote.events.wait_lost(1)
                    for lost in (local_lost, remote_lost):
                        assert lost.reason == EndReason.KEEP_ALIVE_TIMEOUT
                        assert isinstance(lost.error, ConnectionKeepAliveTimeout)
                    # Each side heard the other up to the dark (a ping every interval)
                    # and ended its connection conn_keep_alive_timeout_time after that.
                    for node, peer in ((local, local_peer), (remote, remote_peer)):
                        assert peer.last_heard is not None
                        assert dark_at - peer.last_heard <= interval + VIRTUAL_TOLERANCE
                        assert node.events.lost_at[0] - peer.last_heard == virtual(timeout)
                    assert local.proxy.connection_forward_count == 0
                    assert remote.proxy.connection_reverse_count == 0
                    await client.aclose()


async def test_reset_by_peer_mid_transfer_is_reported_as_reset() -> None:
    config = TLSConfig.generate()

    async def reset_after_first_bytes(peer: Any, stream: Any) -> None:
        tls = TLSStream(stream, config, server_side=True)
        await tls.do_handshake()
        await tls.receive_some(10)
        await trio.aclose_forcefully(stream)  # uTP RESET, no TLS goodbye

    with trio.fail_after(15):
        async with raw_peer(partial(reset_after_first_bytes)) as remote, running_node() as local:
            client = await connect_ok(local.proxy, f"127.0.0.1:{remote.port}?nodeId={config.node_id}")
            await client.send_all(b"some bytes")
            assert await connection_ended(client)
            (lost,) = await local.events.wait_lost(1)
            assert lost.reason == EndReason.RESET
            assert isinstance(lost.error, ConnectionResetByPeer)
            await client.aclose()


async def test_connect_starting_when_stop_begins_gets_503() -> None:
    with trio.fail_after(15):
        hanging = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM)
        with hanging:
            await hanging.bind(("127.0.0.1", 0))
            port = hanging.getsockname()[1]
            async with running_node(conn_connect_time=10.0) as local:
                replies: list[int] = []

                async def connect() -> None:
                    reply = await http_connect(local.proxy, f"127.0.0.1:{port}?nodeId={local.node_id}")
                    replies.append(reply.status)
                    await reply.stream.aclose()

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(connect)
                    await hanging.recvfrom(2048)  # the start is under way: it pings the silent remote
                    await local.proxy.stop()
                assert replies == [503]
