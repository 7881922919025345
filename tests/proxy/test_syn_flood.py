"""A flood of spoofed uTP SYNs from one source is rate-limited.

Needs a per-source-address limit on new incoming connections in the uTP
multiplexer (nat/), which sends the SYN-ACK. Moved out of test_strangers.py
(the proxy side of "no work for a stranger") until that limit lands.
"""

from __future__ import annotations

import socket

import trio

from tests.proxy.test_proxy_support import running_node, tcp_server
from tests.proxy.test_strangers import VICTIM_HOST, count_received, send_spoofed


async def test_a_syn_flood_from_one_source_is_rate_limited() -> None:
    flood = 400
    async with tcp_server() as server, running_node(server.port, conn_connect_time=0.5) as node:
        victim = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        await victim.bind((VICTIM_HOST, 0))
        received = [0]
        async with trio.open_nursery() as nursery:
            nursery.start_soon(count_received, victim, received)
            await send_spoofed(flood, victim.getsockname(), ("127.0.0.1", node.proxy.proxy_port))
            await trio.sleep(3 * 0.5)
            nursery.cancel_scope.cancel()
        victim.close()
        assert server.peers == []
        # per-source limit: a burst of SYNs from one address gets a bounded answer
        assert received[0] <= flood // 4, f"{received[0]} datagrams answered a flood of {flood}"
