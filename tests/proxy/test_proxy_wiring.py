"""The Proxy's options and helpers wired to the rest of keynode: the shared host rule
for targets, the certificate chain limit, prepared reverse connections."""

from __future__ import annotations

import pytest
import trio

from proxy.errors import ConnectionStartError
from tests.proxy.test_proxy_support import running_node, tcp_server


async def test_targets_follow_the_shared_host_rule() -> None:
    with trio.fail_after(10):
        async with tcp_server() as server, running_node(server.port) as remote, running_node() as local:
            port = remote.proxy.proxy_port
            # Not a host at all: refused by the rule, with its reason, before any lookup.
            with pytest.raises(ConnectionStartError, match=r"cannot connect to 'no such host!'.*neither"):
                await local.proxy.open_connection_forward(remote.node_id, "no such host!", port)
            # "0" is a name getaddrinfo turns into 0.0.0.0, which Linux connects to this
            # host: a wildcard is never a host to connect to, however it is spelled.
            with pytest.raises(ConnectionStartError, match="wildcard"):
                await local.proxy.open_connection_forward(remote.node_id, "0", port)
            with pytest.raises(ConnectionStartError, match="wildcard"):
                await local.proxy.open_connection_reverse("::", port)
            assert local.proxy.connection_forward_count == 0
            assert remote.proxy.connection_reverse_count == 0
            assert server.peers == []
            # A name in another spelling is the same host.
            node_id = await local.proxy.open_connection_forward(remote.node_id, "LOCALHOST.", port)
            assert node_id == remote.node_id
