"""Nothing outlives what it serves, and no dead tunnel is handed out.

A CONNECT client that goes away while its tunnel starts leaves no forward
connection and no backend connection on the remote behind it.
"""

from __future__ import annotations

import base64

import trio

from tests.proxy.test_proxy_support import TOKEN, Server, running_node, target_for, tcp_server


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
