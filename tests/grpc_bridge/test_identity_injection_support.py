"""Shared by the identity-injection tests: an unmodified grpcio server that reports
what metadata it saw, a TCP listener running the h2 identity relay toward it, and a
grpcio channel to a remote node's service through a local node's CONNECT port.

grpcio is threaded: blocking client calls go through ``trio.to_thread``.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from concurrent import futures
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import grpc
import trio

from grpc_bridge.h2_identity import certificate_sha256, identity_headers, identity_relay, relay_with_identity, run_relay
from grpc_bridge.h2_relay import H2IdentityRelay
from proxy.identity.node_id import NodeId
from proxy.tunnel.address_book import AddressBook
from tests.grpc_bridge.grpc_server_support import serving_on_loopback
from tests.proxy.test_proxy_support import TOKEN, Node, running_node

SERVICE = "keynode.test.Identity"
MAX_MESSAGE = 64 << 20
GRPC_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE),
    ("grpc.max_send_message_length", MAX_MESSAGE),
    ("grpc.enable_http_proxy", 0),
]


@dataclass
class ServerState:
    """What the server observed, written from grpcio's threads."""

    cancelled: threading.Event = field(default_factory=threading.Event)
    slow_delay: float = 0.0  # seconds per message in SlowDigest
    keynode_metadata: list[list[tuple[str, Any]]] = field(default_factory=list)


def keynode_metadata(context: grpc.ServicerContext) -> list[tuple[str, Any]]:
    return [(key, value) for key, value in context.invocation_metadata() if key.startswith("x-keynode-")]


def handlers(state: ServerState) -> dict[str, grpc.RpcMethodHandler]:
    def who(request: bytes, context: grpc.ServicerContext) -> bytes:
        seen = keynode_metadata(context)
        state.keynode_metadata.append(seen)
        return json.dumps([[key, value if isinstance(value, str) else value.hex()] for key, value in seen]).encode()

    def echo(request: bytes, context: grpc.ServicerContext) -> bytes:
        state.keynode_metadata.append(keynode_metadata(context))
        context.send_initial_metadata((("x-initial", "hello"),))
        return request

    def count(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        state.keynode_metadata.append(keynode_metadata(context))
        for index in range(int(request)):
            yield index.to_bytes(4, "big") * 64

    def digest(requests: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
        state.keynode_metadata.append(keynode_metadata(context))
        hashed = hashlib.sha256()
        for request in requests:
            hashed.update(request)
        return hashed.hexdigest().encode()

    def slow_digest(requests: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
        hashed, total = hashlib.sha256(), 0
        for request in requests:
            hashed.update(request)
            total += len(request)
            time.sleep(state.slow_delay)  # a server slower than its caller
        return f"{total} {hashed.hexdigest()}".encode()

    def chat(requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        state.keynode_metadata.append(keynode_metadata(context))
        for request in requests:
            yield request[::-1]

    def fail(request: bytes, context: grpc.ServicerContext) -> bytes:
        context.set_trailing_metadata((("x-detail", "why"), ("x-trace-bin", b"\x00\x01\xff")))
        context.abort(grpc.StatusCode.PERMISSION_DENIED, request.decode())
        raise AssertionError("abort returns never")

    def ticks(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        for index in range(int(request)):
            yield index.to_bytes(4, "big")
            time.sleep(0.05)

    def forever(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        context.add_callback(state.cancelled.set)
        while not state.cancelled.is_set():
            yield b"tick"
            state.cancelled.wait(0.01)

    return {
        "Who": grpc.unary_unary_rpc_method_handler(who),
        "Echo": grpc.unary_unary_rpc_method_handler(echo),
        "Count": grpc.unary_stream_rpc_method_handler(count),
        "Digest": grpc.stream_unary_rpc_method_handler(digest),
        "SlowDigest": grpc.stream_unary_rpc_method_handler(slow_digest),
        "Chat": grpc.stream_stream_rpc_method_handler(chat),
        "Fail": grpc.unary_unary_rpc_method_handler(fail),
        "Forever": grpc.unary_stream_rpc_method_handler(forever),
        "Ticks": grpc.unary_stream_rpc_method_handler(ticks),
    }


@dataclass
class GrpcServer:
    port: int
    state: ServerState
    server: grpc.Server


@asynccontextmanager
async def grpc_server() -> AsyncIterator[GrpcServer]:
    """An unmodified grpcio server on 127.0.0.1 (bytes in, bytes out: no generated code)."""
    state = ServerState()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=64), options=GRPC_OPTIONS)
    async with serving_on_loopback(server, grpc.method_handlers_generic_handler(SERVICE, handlers(state))) as port:
        yield GrpcServer(port, state, server)


@dataclass(frozen=True)
class Caller:
    """A caller record as the reverse side would hand it to the splicer."""

    local_node_id: NodeId
    peer_node_id: NodeId
    peer_certificate_der: bytes


TEST_CALLER = Caller(NodeId(b"\x01" * 32), NodeId(b"\x02" * 32), b"leaf certificate")


def caller_headers(caller: Caller) -> list[tuple[bytes, bytes]]:
    return identity_headers(caller.local_node_id, caller.peer_node_id, certificate_sha256(caller.peer_certificate_der))


def expected_metadata(caller: Caller) -> list[tuple[str, str]]:
    headers = caller_headers(caller)
    return [(name.decode(), value.decode()) for name, value in headers]


@dataclass
class RelayListener:
    port: int
    relays: list[H2IdentityRelay] = field(default_factory=list)
    connections: int = 0


@asynccontextmanager
async def relay_listener(
    server_port: int, identify: Callable[[trio.SocketStream], Awaitable[Caller]], *, splicer: bool = False, **relay_options: int
) -> AsyncIterator[RelayListener]:
    """A TCP listener: each connection runs the identity relay toward the server,
    with the caller ``identify`` says; ``splicer``: through ``relay_with_identity``
    exactly as the reverse side calls it (then ``relays`` stays empty)."""
    async with trio.open_nursery() as nursery:
        listener = RelayListener(0)

        async def serve(tunnel: trio.SocketStream) -> None:
            listener.connections += 1
            caller = await identify(tunnel)
            try:
                server = await trio.open_tcp_stream("127.0.0.1", server_port)
            except OSError:
                await tunnel.aclose()  # no server (stopped): the caller sees the connection close
                return
            async with server, tunnel:
                if splicer:
                    await relay_with_identity(tunnel, server, caller)
                    return
                relay = identity_relay(caller, **relay_options)
                listener.relays.append(relay)
                await run_relay(relay, tunnel, server)

        listeners = await nursery.start(partial(trio.serve_tcp, serve, 0, host="127.0.0.1"))
        listener.port = listeners[0].socket.getsockname()[1]
        yield listener
        nursery.cancel_scope.cancel()


async def fixed_caller(stream: trio.SocketStream) -> Caller:
    return TEST_CALLER


def channel_to(port: int) -> grpc.Channel:
    return grpc.insecure_channel(f"127.0.0.1:{port}", options=GRPC_OPTIONS)


@asynccontextmanager
async def closing_channel(channel: grpc.Channel) -> AsyncIterator[grpc.Channel]:
    """``channel``, closed on exit in a worker thread (grpcio's close blocks)."""
    try:
        yield channel
    finally:
        await trio.to_thread.run_sync(channel.close)


@asynccontextmanager
async def channel_through_tunnel(remote: Node, port: int) -> AsyncIterator[tuple[Node, grpc.Channel]]:
    """A local node that knows where ``remote`` is, and a grpcio channel to the NodeId
    target ``remote``:``port`` through the local node's CONNECT port (``grpc.http_proxy``)."""
    book = AddressBook({remote.node_id: ("127.0.0.1", remote.proxy.proxy_port)})
    async with running_node(address_book=book) as local:
        proxy_url = f"http://user:{TOKEN}@{local.proxy.forward_host}:{local.proxy.forward_port}"
        options: list[tuple[str, Any]] = [*GRPC_OPTIONS[:2], ("grpc.http_proxy", proxy_url)]
        async with closing_channel(grpc.insecure_channel(f"{remote.node_id}:{port}", options=options)) as channel:
            yield local, channel


def method(channel: grpc.Channel, kind: str, name: str) -> Any:
    return getattr(channel, kind)(f"/{SERVICE}/{name}")
