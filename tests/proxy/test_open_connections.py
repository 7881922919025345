"""open_connection_forward / open_connection_reverse toward an address that already
has a live connection (issue item 7): the original's no-op, and a prepared reverse
connection that an original forward's early uTP connection joins."""

from __future__ import annotations

import pytest
import trio

from proxy.errors import ConnectionVerifyError
from proxy.identity.tls_config import TLSConfig
from tests.proxy.test_proxy_support import (
    connect_ok,
    echo_round,
    receive_all,
    running_node,
    target_for,
    tcp_server,
)
from tests.proxy.test_strangers import original_node


async def test_open_connection_forward_to_a_live_connection_is_a_no_op() -> None:
    with trio.fail_after(15):
        async with tcp_server() as server, running_node(server.port) as remote, running_node() as local:
            address = ("127.0.0.1", remote.proxy.proxy_port)
            client = await connect_ok(local.proxy, target_for(remote.proxy, remote.node_id))
            await echo_round(client, b"busy")
            # A CONNECT's tunnel is live: opening one ahead of time is the original's no-op.
            for _ in range(2):
                assert await local.proxy.open_connection_forward(remote.node_id, *address) == remote.node_id
            assert local.proxy.connection_forward_count == 1
            assert remote.proxy.connection_reverse_count == 1
            assert len(server.peers) == 1
            # Another NodeId at that address is not answered by the live connection.
            with pytest.raises(ConnectionVerifyError):
                await local.proxy.open_connection_forward(TLSConfig.generate().node_id, *address)
            assert local.proxy.connection_forward_count == 1
            await echo_round(client, b"still there")
            await client.aclose()


async def test_simultaneous_open_connection_forward_calls_open_one_connection() -> None:
    with trio.fail_after(15):
        async with tcp_server() as server, running_node(server.port) as remote, running_node() as local:
            address = ("127.0.0.1", remote.proxy.proxy_port)
            answers: list[object] = []

            async def open_one() -> None:
                answers.append(await local.proxy.open_connection_forward(remote.node_id, *address))

            async with trio.open_nursery() as nursery:
                for _ in range(3):
                    nursery.start_soon(open_one)
            assert answers == [remote.node_id] * 3
            assert local.proxy.connection_forward_count == 1
            assert remote.proxy.connection_reverse_count == 1


async def test_open_connection_reverse_toward_a_live_connection_does_nothing() -> None:
    with trio.fail_after(15):
        async with tcp_server() as server, running_node(server.port) as remote, running_node() as local:
            client = await connect_ok(local.proxy, target_for(remote.proxy, remote.node_id))
            await echo_round(client, b"live")
            assert remote.proxy.connection_reverse_count == 1 and len(server.peers) == 1
            await remote.proxy.open_connection_reverse("127.0.0.1", local.proxy.proxy_port)
            assert remote.proxy.connection_reverse_count == 1
            assert remote.proxy.prepared_reverse_connections() == []
            assert len(server.peers) == 1
            await echo_round(client, b"unchanged")
            await client.aclose()


async def test_an_original_forward_whose_syn_comes_first_joins_the_prepared_connection() -> None:
    """open_connection_reverse punches toward a caller that is an original forward: its
    uTP SYN leaves before its first PING, so its connection arrives while the prepared
    one still waits to hear from it. It must complete the prepared connection (one
    connection, one backend connection), not start a second one beside it."""
    with trio.fail_after(15):
        async with tcp_server() as server, running_node(server.port) as remote:
            target = ("127.0.0.1", remote.proxy.proxy_port)
            # It does not answer PINGs until it has sent its SYN.
            async with original_node(answering=False) as caller, trio.open_nursery() as nursery:
                opened = trio.Event()

                async def open_reverse() -> None:
                    await remote.proxy.open_connection_reverse(*caller.address)
                    opened.set()

                nursery.start_soon(open_reverse)
                await caller.pinged.wait()  # the remote punches, waiting to hear from it
                assert not opened.is_set()
                tls = await caller.connect(target)
                await opened.wait()
                await tls.send_all(b"joined")
                await tls.send_eof()
                assert await receive_all(tls) == b"joined"
                assert len(server.peers) == 1
                assert remote.proxy.connection_reverse_count == 1
                assert [e.remote_node_id for e in remote.events.established] == [caller.tls_config.node_id]
                await tls.aclose()
