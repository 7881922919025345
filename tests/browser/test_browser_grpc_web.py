"""A real browser through the grpc-web bridge: Debian's headless Chromium loads a page
(bundled with esbuild) from one origin and calls an unmodified grpcio server through
bridges on other origins (so every call passes a real CORS preflight): one bridge
straight to the server, one whose upstream is a keynode tunnel to a remote node in front
of the server, and one that does not allow the page's origin. Clients: connect-web
(fetch, binary) and Google's grpc-web runtime (XHR, text and binary); cases: grpc-web's
interop set plus a 1,000-message server stream. One browser launch for the module."""

from __future__ import annotations

import pytest
import trio

from grpc_bridge.web_connect import direct_upstream, tunnel_upstream
from proxy.tunnel.address_book import AddressBook
from tests.browser.browser_support import page_server, run_page
from tests.grpc_bridge.test_web_support import interop_server, running_bridge
from tests.proxy.test_proxy_support import TOKEN, running_node

pytestmark = pytest.mark.node

CASES = [
    "empty_unary", "empty_unary_with_deadline", "large_unary", "server_streaming", "server_streaming_1000",
    "custom_metadata", "status_code_and_message", "unimplemented_method", "unimplemented_service",
]
CLIENTS = ["connect-web", "grpcweb-text", "grpcweb-binary"]


async def test_chromium_interop_direct_and_through_a_remote_keynode() -> None:
    with trio.fail_after(240):
        async with page_server() as page, interop_server() as server, running_node(server.port) as remote:
            book = AddressBook({remote.node_id: ("127.0.0.1", remote.proxy.proxy_port)})
            async with running_node(address_book=book) as local:
                target = f"{remote.node_id.encode()}:443"
                tunnel = tunnel_upstream(local.proxy.forward_host, local.proxy.forward_port, target, TOKEN)
                direct = direct_upstream("127.0.0.1", server.port)
                refused_opens = []

                async def refused_upstream() -> trio.abc.Stream:
                    refused_opens.append(1)
                    return await direct()

                origins = (page.origin,)
                async with (
                    running_bridge(direct, origins) as direct_bridge,
                    running_bridge(tunnel, origins, authority=target) as tunnel_bridge,
                    running_bridge(refused_upstream, ("http://elsewhere.example",)) as closed_bridge,
                ):
                    plan: list[dict[str, object]] = []
                    for name, (host, port) in (("direct", direct_bridge), ("tunnel", tunnel_bridge)):
                        for client in CLIENTS:
                            plan.append({"label": f"{name}/{client}", "client": client, "baseUrl": f"http://{host}:{port}"})
                    for client in CLIENTS:
                        host, port = closed_bridge
                        plan.append({"label": f"refused/{client}", "client": client, "baseUrl": f"http://{host}:{port}",
                                     "refusedOrigin": True})
                    report = await run_page(page, plan)
    assert "fatal" not in report, report["fatal"]
    for name in ("direct", "tunnel"):
        for client in CLIENTS:
            outcome = report[f"{name}/{client}"]
            assert sorted(outcome) == sorted(CASES)
            failures = {case: text for case, text in outcome.items() if text != "ok"}
            assert not failures, (name, client, failures)
    for client in CLIENTS:
        # The preflight is refused, so the browser never sends the call.
        assert report[f"refused/{client}"]["code"] != 0, report[f"refused/{client}"]
    assert refused_opens == []  # nothing from a refused origin reached the gRPC server
