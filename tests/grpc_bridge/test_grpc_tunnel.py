"""Real gRPC through the tunnel: unmodified grpcio server behind one proxy, client through the other.

Every tunnel test runs twice (``kind``): the server as a "tcp" service (the byte
splice) and as a "grpc" one (the identity relay `keynode run` plugs in, so HTTP/2 is
re-originated toward the server): the in-process caller lookup works in both.

grpcio is threaded: its server runs its own threads, and every blocking client call
goes through ``trio.to_thread`` so the trio loop (both proxies) keeps running.
"""

from __future__ import annotations

import base64
import hashlib
import os
from collections.abc import AsyncIterator, Iterator
from concurrent import futures
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
import trio

from grpc_bridge import CallerLookup, NodeIdentityInterceptor, current_caller, parse_grpc_peer
from proxy.app.grpc_app import service_splicers
from proxy.tunnel.address_book import AddressBook
from proxy.tunnel.services import Service, ServicePolicy
from tests.grpc_bridge.grpc_server_support import serving_on_loopback
from tests.proxy.test_proxy_support import TOKEN, Node, running_node

SERVICE = "keynode.test.Echo"
MAX_MESSAGE = 16 << 20
GRPC_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE),
    ("grpc.max_send_message_length", MAX_MESSAGE),
]


def echo(request: bytes, context: grpc.ServicerContext) -> bytes:
    return request


def count(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
    for index in range(int(request)):
        yield index.to_bytes(4, "big") * 8


def who(request: bytes, context: grpc.ServicerContext) -> bytes:
    caller = current_caller()
    return b"" if caller is None else caller.remote_node_id.encode().encode()


def digest_stream(requests: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
    digest = hashlib.sha256()
    for request in requests:
        digest.update(request)
    return digest.hexdigest().encode()


@dataclass
class GrpcServer:
    server: grpc.Server
    port: int


@asynccontextmanager
async def grpc_server(interceptors: list[grpc.ServerInterceptor] | None = None) -> AsyncIterator[GrpcServer]:
    handler = grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "Echo": grpc.unary_unary_rpc_method_handler(echo),
            "Count": grpc.unary_stream_rpc_method_handler(count),
            "Who": grpc.unary_unary_rpc_method_handler(who),
            "Digest": grpc.stream_unary_rpc_method_handler(digest_stream),
        },
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=64), interceptors=interceptors or [], options=GRPC_OPTIONS)
    async with serving_on_loopback(server, handler) as port:
        yield GrpcServer(server, port)


def channel_via_http_proxy(local: Node, remote: Node) -> grpc.Channel:
    """The NodeId target form, through grpcio's own proxy support (``grpc.http_proxy``)."""
    proxy_url = f"http://user:{TOKEN}@{local.proxy.forward_host}:{local.proxy.forward_port}"
    return grpc.insecure_channel(f"{remote.node_id}:443", options=[*GRPC_OPTIONS, ("grpc.http_proxy", proxy_url)])


def channel_via_connect_server(local: Node, remote: Node) -> grpc.Channel:
    """The original ``HOST:PORT?nodeId=`` form, via grpc.http_connect_server/headers."""
    credentials = base64.b64encode(TOKEN.encode()).decode()
    return grpc.insecure_channel(
        f"{local.proxy.forward_host}:{local.proxy.forward_port}",
        options=[
            *GRPC_OPTIONS,
            ("grpc.http_connect_server", f"127.0.0.1:{remote.proxy.proxy_port}?nodeId={remote.node_id}"),
            ("grpc.http_connect_headers", f"Proxy-Authorization:Basic {credentials}"),
        ],
    )


@dataclass
class Tunnel:
    local: Node
    remote: Node
    server: GrpcServer


@pytest.fixture(params=["tcp", "grpc"])
def kind(request: pytest.FixtureRequest) -> str:
    """The remote server's service kind."""
    return str(request.param)


@asynccontextmanager
async def grpc_tunnel(kind: str = "tcp") -> AsyncIterator[Tunnel]:
    token = trio.lowlevel.current_trio_token()
    holder: dict[str, Any] = {}

    class LateLookup(CallerLookup):  # the proxy exists only after the server is up
        def info_for_peer(self, peer: str) -> Any:
            self.proxy = holder["proxy"]
            return super().info_for_peer(peer)

    interceptor = NodeIdentityInterceptor(LateLookup(None, token))
    async with grpc_server([interceptor]) as server:
        policy = ServicePolicy(default=Service("server", ("127.0.0.1", server.port), None, kind=kind))
        async with running_node(server.port, policy=policy, splicers=service_splicers()) as remote:
            holder["proxy"] = remote.proxy
            book = AddressBook({remote.node_id: ("127.0.0.1", remote.proxy.proxy_port)})
            async with running_node(address_book=book) as local:
                yield Tunnel(local, remote, server)


def call(channel: grpc.Channel, method: str, request: bytes, timeout: float = 20) -> Any:
    return channel.unary_unary(f"/{SERVICE}/{method}")(request, timeout=timeout)


@pytest.mark.parametrize("form", ["http_proxy", "connect_server"])
async def test_unary_calls_and_caller_identity(form: str, kind: str) -> None:
    with trio.fail_after(60):
        async with grpc_tunnel(kind) as tunnel:
            make = channel_via_http_proxy if form == "http_proxy" else channel_via_connect_server
            channel = make(tunnel.local, tunnel.remote)
            try:
                for index in range(20):
                    payload = os.urandom(index * 100)
                    assert await trio.to_thread.run_sync(call, channel, "Echo", payload) == payload
                caller = await trio.to_thread.run_sync(call, channel, "Who", b"")
                assert caller.decode() == tunnel.local.node_id.encode()
                # The server side knows the same caller by the calling proxy's address too.
                info = tunnel.remote.proxy.get_connection_info_by_proxy("127.0.0.1", tunnel.local.proxy.proxy_port)
                assert info is not None and info.remote_node_id == tunnel.local.node_id
            finally:
                await trio.to_thread.run_sync(channel.close)


async def test_server_stream_of_10000_messages(kind: str) -> None:
    with trio.fail_after(90):
        async with grpc_tunnel(kind) as tunnel:
            channel = channel_via_http_proxy(tunnel.local, tunnel.remote)
            try:

                def collect() -> list[bytes]:
                    return list(channel.unary_stream(f"/{SERVICE}/Count")(b"10000", timeout=60))

                messages = await trio.to_thread.run_sync(collect)
                assert len(messages) == 10_000
                assert messages[9_999] == (9_999).to_bytes(4, "big") * 8
            finally:
                await trio.to_thread.run_sync(channel.close)


async def test_4_mib_messages_both_ways(kind: str) -> None:
    with trio.fail_after(90):
        async with grpc_tunnel(kind) as tunnel:
            channel = channel_via_connect_server(tunnel.local, tunnel.remote)
            try:
                payload = os.urandom(4 << 20)
                for _ in range(3):
                    assert await trio.to_thread.run_sync(call, channel, "Echo", payload, 60) == payload

                def upload() -> bytes:
                    chunks = [payload] * 4
                    return channel.stream_unary(f"/{SERVICE}/Digest")(iter(chunks), timeout=60)

                expected = hashlib.sha256(payload * 4).hexdigest().encode()
                assert await trio.to_thread.run_sync(upload) == expected
            finally:
                await trio.to_thread.run_sync(channel.close)


async def test_50_concurrent_calls(kind: str) -> None:
    with trio.fail_after(90):
        async with grpc_tunnel(kind) as tunnel:
            channel = channel_via_http_proxy(tunnel.local, tunnel.remote)
            try:

                def fan_out() -> list[bool]:
                    method = channel.unary_unary(f"/{SERVICE}/Echo")
                    payloads = [os.urandom(1000 + index * 997) for index in range(50)]
                    pending = [method.future(payload, timeout=60) for payload in payloads]
                    return [future.result() == payload for future, payload in zip(pending, payloads)]

                assert await trio.to_thread.run_sync(fan_out) == [True] * 50
            finally:
                await trio.to_thread.run_sync(channel.close)


async def test_direct_call_has_no_caller_and_require_refuses_it() -> None:
    token = trio.lowlevel.current_trio_token()
    with trio.fail_after(30):
        async with running_node() as node:
            lookup = CallerLookup(node.proxy, token)
            for require in (False, True):
                async with grpc_server([NodeIdentityInterceptor(lookup, require=require)]) as server:
                    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}", options=GRPC_OPTIONS)
                    try:
                        if require:
                            with pytest.raises(grpc.RpcError) as info:
                                await trio.to_thread.run_sync(call, channel, "Who", b"")
                            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
                        else:
                            assert await trio.to_thread.run_sync(call, channel, "Who", b"") == b""
                    finally:
                        await trio.to_thread.run_sync(channel.close)


def test_parse_grpc_peer() -> None:
    assert parse_grpc_peer("ipv4:127.0.0.1:5000") == ("127.0.0.1", 5000)
    assert parse_grpc_peer("ipv6:[::1]:5000") == ("::1", 5000)
    assert parse_grpc_peer("ipv6:%5B::1%5D:5000") == ("::1", 5000)
    assert parse_grpc_peer("unix:/tmp/socket") is None
    assert parse_grpc_peer("ipv4:nonsense") is None
