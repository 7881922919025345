"""The grpc-web interop cases with real Node clients through the bridge to an unmodified
grpcio server: connect-node's grpc-web transport (binary; HTTP/1.1 with chunked request
bodies, and HTTP/2 with prior knowledge) and Google's grpc-web runtime with xhr2 (binary
and text). Directly, and through a real keynode tunnel (two in-process proxies, the
bridge's upstream a CONNECT to the local node's forward port)."""

from __future__ import annotations

import pytest
import trio

from proxy.app.grpc_web_config import open_upstream_for, read_grpc_web, serve_grpc_web
from proxy.tunnel.address_book import AddressBook
from tests.grpc_bridge.test_web_support import bridged_test_service, interop_server, run_node_client
from tests.proxy.test_proxy_support import TOKEN, running_node

CLIENTS = ["connect-http1", "connect-http2", "grpcweb-binary", "grpcweb-text"]
ALL_CASES = [
    "empty_unary", "empty_unary_with_deadline", "large_unary", "server_streaming", "server_streaming_1000",
    "custom_metadata", "status_code_and_message", "unimplemented_method", "unimplemented_service",
]


def assert_all_ok(report: dict[str, str]) -> None:
    assert sorted(report) == sorted(ALL_CASES)
    failures = {name: outcome for name, outcome in report.items() if outcome != "ok"}
    assert not failures, failures


pytestmark = pytest.mark.node


@pytest.mark.parametrize("client", CLIENTS)
async def test_interop_cases_direct(client: str) -> None:
    with trio.fail_after(120):
        async with bridged_test_service() as (_, (host, port)):
            assert_all_ok(await run_node_client("grpcweb_node_client.js", client, f"http://{host}:{port}"))


@pytest.mark.parametrize("client", ["connect-http1", "grpcweb-text"])
async def test_interop_cases_through_keynode_tunnel(client: str) -> None:
    with trio.fail_after(120):
        async with interop_server() as server, running_node(server.port) as remote:
            book = AddressBook({remote.node_id: ("127.0.0.1", remote.proxy.proxy_port)})
            async with running_node(address_book=book) as local:
                # Configured and started the way the node does it: [grpc_web] with a NodeId target.
                table = {"listen": "127.0.0.1:0", "target": f"{remote.node_id.encode()}:443"}
                config = read_grpc_web(table)
                assert config is not None
                tunnel = open_upstream_for(config, local.proxy.forward_host, local.proxy.forward_port, TOKEN)
                opened = []

                async def counting_opener() -> trio.abc.Stream:
                    opened.append(1)
                    return await tunnel()

                async with trio.open_nursery() as nursery:
                    host, port = await nursery.start(serve_grpc_web, config, counting_opener)
                    assert_all_ok(await run_node_client("grpcweb_node_client.js", client, f"http://{host}:{port}"))
                    nursery.cancel_scope.cancel()
                # Every call of the run (concurrent or not) shared one CONNECT: one multiplexed HTTP/2 connection.
                assert len(opened) == 1
