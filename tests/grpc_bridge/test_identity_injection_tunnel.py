"""Identity injection behind a real keynode tunnel: grpcio client -> CONNECT -> proxy A
==uTP+TLS==> proxy B -> relay -> unmodified grpcio server.

Until the reverse side calls the per-service splicer itself (the services seam),
proxy B's [server] is a local TCP listener that runs the relay toward the grpcio
server, taking the caller from proxy B's record of the reverse connection that
owns the socket (``get_connection_info_by_reverse``), as the splicer's caller
record will carry it: both NodeIds and the SHA-256 of the caller's leaf
certificate, from the chain the TLS handshake verified.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import grpc
import trio
from cryptography.hazmat.primitives.serialization import Encoding

from grpc_bridge.h2_identity import parse_peer_header
from tests.grpc_bridge.test_identity_injection_support import (
    Caller,
    GrpcServer,
    channel_through_tunnel,
    expected_metadata,
    grpc_server,
    method,
    relay_listener,
)
from tests.proxy.test_proxy_support import Node, running_node

FORGED_METADATA = (("x-keynode-node-id", "vforged"), ("x-keynode-peer-bin", b"\x00"), ("x-keynode-peer", "By=x"))


@dataclass
class Tunnel:
    local: Node
    remote: Node
    server: GrpcServer
    channel: grpc.Channel


@asynccontextmanager
async def identity_tunnel() -> AsyncIterator[Tunnel]:
    holder: dict[str, Node] = {}

    async def identify(stream: trio.SocketStream) -> Caller:
        host, port = stream.socket.getpeername()[:2]
        remote = holder["remote"]
        while True:  # the reverse side connects its server before it reports the connection
            changed = remote.events.changed
            info = remote.proxy.get_connection_info_by_reverse(host, port)
            if info is not None:
                leaf = info.remote_certificates[0].public_bytes(Encoding.DER)
                return Caller(remote.node_id, info.remote_node_id, leaf)
            await changed.wait()

    async with grpc_server() as server, relay_listener(server.port, identify) as listener:
        async with running_node(listener.port) as remote:
            holder["remote"] = remote
            async with channel_through_tunnel(remote, 443) as (local, channel):
                yield Tunnel(local, remote, server, channel)


async def test_the_server_reads_the_verified_caller_from_metadata() -> None:
    with trio.fail_after(90):
        async with identity_tunnel() as tunnel:
            who = method(tunnel.channel, "unary_unary", "Who")
            answer = await trio.to_thread.run_sync(lambda: who(b"", metadata=FORGED_METADATA, timeout=30))
            seen = dict((key, value) for key, value in json.loads(answer))
            assert seen["x-keynode-node-id"] == tunnel.local.node_id.encode()
            leaf = tunnel.local.tls_config.leaf_certificate.public_bytes(Encoding.DER)
            assert parse_peer_header(seen["x-keynode-peer"]) == {
                "by": tunnel.remote.node_id.encode(),
                "nodeid": tunnel.local.node_id.encode(),
                "hash": hashlib.sha256(leaf).hexdigest(),
            }
            assert len(json.loads(answer)) == 2  # nothing forged came along


async def test_streams_concurrency_large_messages_and_cancel_through_the_tunnel() -> None:
    with trio.fail_after(180):
        async with identity_tunnel() as tunnel:
            channel, state = tunnel.channel, tunnel.server.state

            def calls() -> None:
                count = method(channel, "unary_stream", "Count")
                assert len(list(count(b"3000", metadata=FORGED_METADATA, timeout=60))) == 3000
                payload = os.urandom(16 << 20)
                assert method(channel, "unary_unary", "Echo")(payload, timeout=90) == payload
                chunks = [os.urandom(20_000) for _ in range(100)]
                answers = list(method(channel, "stream_stream", "Chat")(iter(chunks), timeout=60))
                assert answers == [chunk[::-1] for chunk in chunks]
                echo = method(channel, "unary_unary", "Echo")
                payloads = [os.urandom(1000 + index) for index in range(100)]
                pending = [echo.future(item, metadata=FORGED_METADATA, timeout=60) for item in payloads]
                assert [future.result() for future in pending] == payloads
                forever = method(channel, "unary_stream", "Forever")(b"", timeout=60)
                assert next(forever) == b"tick"
                forever.cancel()
                assert state.cancelled.wait(30)

            await trio.to_thread.run_sync(calls)
            leaf = tunnel.local.tls_config.leaf_certificate.public_bytes(Encoding.DER)
            identity = expected_metadata(Caller(tunnel.remote.node_id, tunnel.local.node_id, leaf))
            assert state.keynode_metadata == [identity] * (1 + 1 + 1 + 100)  # Count, Echo, Chat, 100 Echo
