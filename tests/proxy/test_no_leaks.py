"""Nothing outlives what it serves, and no dead tunnel is handed out.

A CONNECT client that goes away while its tunnel starts leaves no forward
connection and no backend connection on the remote behind it.
"""

from __future__ import annotations

import base64

import trio

from tests.proxy.test_proxy_support import TOKEN, Server, connect_ok, running_node, target_for, tcp_server


def connect_request(target: str) -> bytes:
    token = base64.b64encode(TOKEN.encode()).decode()
    return f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\nProxy-Authorization: Basic {token}\r\n\r\n".encode()


async def until_ended(stream: trio.SocketStream) -> None:
    """Hold a server connection until its other end goes away."""
    try:
        while await stream.receive_some(1 << 16):
            pass
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass


class Backend:
    """A server that holds each connection until it ends, and counts the ends."""

    def __init__(self) -> None:
        self.ended = 0
        self.changed = trio.Event()

    async def handler(self, stream: trio.SocketStream) -> None:
        await until_ended(stream)
        self.ended += 1
        self.changed.set()
        self.changed = trio.Event()

    async def wait_ended(self, server: Server, count: int) -> None:
        while self.ended < count:
            await self.changed.wait()
        assert len(server.peers) == count


async def test_a_connect_client_that_leaves_while_its_tunnel_starts_leaves_nothing_behind() -> None:
    backend = Backend()
    async with tcp_server(backend.handler) as server, running_node(server.port) as remote:
        async with running_node() as local:
            for _ in range(3):
                client = await trio.open_tcp_stream(local.proxy.forward_host, local.proxy.forward_port)
                await client.send_all(connect_request(target_for(remote.proxy, remote.node_id)))
                await client.aclose()  # gone before the tunnel started
            # The starts complete (the remote connects its server) and end at once.
            with trio.fail_after(5):
                await backend.wait_ended(server, 3)
                while local.proxy.connection_forward_count or remote.proxy.connection_reverse_count:
                    await trio.sleep(0.01)


# --- idle connections watch their far side ---------------------------------------------


async def greet_then_echo(stream: trio.SocketStream) -> None:
    """A server that speaks first (as SSH and SMTP servers do), then echoes."""
    await stream.send_all(b"hello from the server\n")
    while data := await stream.receive_some(1 << 16):
        await stream.send_all(data)


async def receive_exactly(stream: trio.abc.ReceiveStream, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = await stream.receive_some(size - len(data))
        assert chunk, f"EOF after {data!r}"
        data += chunk
    return data


async def test_an_idle_forward_connection_the_remote_closes_is_removed_and_never_handed_out() -> None:
    with trio.fail_after(10):
        async with tcp_server(greet_then_echo) as server, running_node(server.port) as remote:
            async with running_node() as local:
                await local.proxy.open_connection_forward(remote.node_id, "127.0.0.1", remote.proxy.proxy_port)
                while not remote.proxy.connection_reverse_count:
                    await remote.events.changed.wait()
                await remote.proxy.close_connection_reverse("127.0.0.1", local.proxy.proxy_port)
                (lost,) = await local.events.wait_lost(1)  # noticed while idle
                assert lost.remote_node_id == remote.node_id
                assert local.proxy.connection_forward_count == 0
                # The next CONNECT gets a tunnel of its own, not the dead one.
                client = await connect_ok(local.proxy, target_for(remote.proxy, remote.node_id))
                assert await receive_exactly(client, 22) == b"hello from the server\n"
                await client.send_all(b"ping")
                assert await receive_exactly(client, 4) == b"ping"
                await client.aclose()


async def test_an_idle_forward_connection_whose_remote_stops_is_removed() -> None:
    with trio.fail_after(10):
        # A keep-alive timeout far beyond the test's bound: noticing must not wait for it.
        async with tcp_server() as server, running_node(conn_keep_alive_timeout_time=60.0) as local:
            async with running_node(server.port) as remote:
                await local.proxy.open_connection_forward(remote.node_id, "127.0.0.1", remote.proxy.proxy_port)
            (lost,) = await local.events.wait_lost(1)
            assert lost.remote_node_id == remote.node_id
            assert local.proxy.connection_forward_count == 0


async def test_an_idle_forward_connection_keeps_what_the_server_said_first() -> None:
    with trio.fail_after(10):
        async with tcp_server(greet_then_echo) as server, running_node(server.port) as remote:
            async with running_node() as local:
                await local.proxy.open_connection_forward(remote.node_id, "127.0.0.1", remote.proxy.proxy_port)
                await server.accepted.wait()
                client = await connect_ok(local.proxy, target_for(remote.proxy, remote.node_id))
                assert await receive_exactly(client, 22) == b"hello from the server\n"
                await client.send_all(b"ping")
                assert await receive_exactly(client, 4) == b"ping"
                assert local.proxy.connection_forward_count == 1  # the idle one was taken
                await client.aclose()


async def test_a_prepared_reverse_connection_whose_server_closes_is_removed_and_never_joined() -> None:
    first = trio.Event()

    async def close_first_then_greet(stream: trio.SocketStream) -> None:
        if not first.is_set():
            first.set()
            return  # the server ends the prepared connection
        await greet_then_echo(stream)

    with trio.fail_after(10):
        async with tcp_server(close_first_then_greet) as server, running_node(server.port) as remote:
            async with running_node() as local:
                await remote.proxy.open_connection_reverse("127.0.0.1", local.proxy.proxy_port)
                await first.wait()
                while remote.proxy.connection_reverse_count:  # noticed while waiting for its peer
                    await trio.sleep(0.01)
                assert remote.proxy.prepared_reverse_connections() == []
                client = await connect_ok(local.proxy, target_for(remote.proxy, remote.node_id))
                assert await receive_exactly(client, 22) == b"hello from the server\n"
                await client.aclose()
                assert len(server.peers) == 2


async def test_a_prepared_reverse_connection_keeps_what_the_server_said_first() -> None:
    with trio.fail_after(10):
        async with tcp_server(greet_then_echo) as server, running_node(server.port) as remote:
            async with running_node() as local:
                await remote.proxy.open_connection_reverse("127.0.0.1", local.proxy.proxy_port)
                await server.accepted.wait()
                client = await connect_ok(local.proxy, target_for(remote.proxy, remote.node_id))
                assert await receive_exactly(client, 22) == b"hello from the server\n"
                await client.send_all(b"ping")
                assert await receive_exactly(client, 4) == b"ping"
                assert len(server.peers) == 1  # the prepared connection was the one used
                await client.aclose()
