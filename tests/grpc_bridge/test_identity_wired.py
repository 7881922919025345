"""Identity injection as `keynode run` wires it: proxies whose splicers are the
application's (``proxy.app.grpc_app.service_splicers``), a remote service of kind
"grpc", a grpcio client through the local CONNECT port. The server is unmodified
grpcio and reads the caller with ``context.invocation_metadata()`` on every call;
forged ``x-keynode-*`` metadata (every form a client can send) never reaches it,
and a raw HTTP/2 caller's forgeries (duplicates, ``-bin``, upper case) neither."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import grpc
import h2.config
import h2.connection
import h2.events
import trio
from cryptography.hazmat.primitives.serialization import Encoding

from grpc_bridge.h2_identity import parse_peer_header
from proxy.app.grpc_app import service_splicers
from proxy.tunnel.services import Service, ServicePolicy
from tests.grpc_bridge.test_identity_injection_support import (
    SERVICE,
    Caller,
    GrpcServer,
    channel_through_tunnel,
    expected_metadata,
    grpc_server,
    method,
)
from tests.proxy.test_proxy_support import Node, connect_ok, running_node

RPC_PORT = 50051
# Every x-keynode-* form grpcio lets a client send: both headers, duplicates, -bin,
# and names that only start like them.
FORGED_METADATA = (
    ("x-keynode-node-id", "vforged"),
    ("x-keynode-node-id", "vforged-again"),
    ("x-keynode-peer", "By=vme;NodeId=vforged;Hash=00"),
    ("x-keynode-peer", "By=vother"),
    ("x-keynode-node-id-bin", b"\x00forged"),
    ("x-keynode-peer-bin", b"\xff"),
    ("x-keynode-", "empty suffix"),
    ("x-keynode-anything", "else"),
)


@dataclass
class WiredTunnel:
    local: Node
    remote: Node
    server: GrpcServer
    channel: grpc.Channel

    def expected(self) -> list[tuple[str, str]]:
        leaf = self.local.tls_config.leaf_certificate.public_bytes(Encoding.DER)
        return expected_metadata(Caller(self.remote.node_id, self.local.node_id, leaf))


@asynccontextmanager
async def wired_tunnel() -> AsyncIterator[WiredTunnel]:
    """Remote: a "tcp" default service (nothing listens: never reached) and the grpcio
    server as service "rpc" of kind "grpc" on port 50051; local: a caller."""
    async with grpc_server() as server, running_node(None, splicers=service_splicers()) as remote:
        remote.proxy.set_policy(
            ServicePolicy(services=(Service("rpc", ("127.0.0.1", server.port), RPC_PORT, kind="grpc"),))
        )
        async with channel_through_tunnel(remote, RPC_PORT) as (local, channel):
            yield WiredTunnel(local, remote, server, channel)


async def test_every_call_kind_reads_the_verified_caller_and_no_forgery() -> None:
    with trio.fail_after(120):
        async with wired_tunnel() as tunnel:
            channel = tunnel.channel

            def calls() -> dict[str, Any]:
                who = method(channel, "unary_unary", "Who")
                seen = json.loads(who(b"", metadata=FORGED_METADATA, timeout=30))
                echo = method(channel, "unary_unary", "Echo")
                payloads = [os.urandom(100 * index) for index in range(20)]
                echoed = [echo(payload, metadata=FORGED_METADATA, timeout=30) for payload in payloads]
                count = method(channel, "unary_stream", "Count")
                streamed = len(list(count(b"1000", metadata=FORGED_METADATA, timeout=30)))
                chunks = [os.urandom(50_000) for _ in range(40)]
                digest = method(channel, "stream_unary", "Digest")(iter(chunks), metadata=FORGED_METADATA, timeout=30)
                chat = list(method(channel, "stream_stream", "Chat")(iter(chunks), metadata=FORGED_METADATA, timeout=30))
                return {"seen": seen, "echo_ok": echoed == payloads, "streamed": streamed,
                        "digest_ok": digest == hashlib.sha256(b"".join(chunks)).hexdigest().encode(),
                        "chat_ok": chat == [chunk[::-1] for chunk in chunks]}

            result = await trio.to_thread.run_sync(calls)
            assert (result["echo_ok"], result["streamed"], result["digest_ok"], result["chat_ok"]) == (True, 1000, True, True)
            seen = dict(result["seen"])
            assert len(result["seen"]) == 2 and seen["x-keynode-node-id"] == tunnel.local.node_id.encode()
            leaf = tunnel.local.tls_config.leaf_certificate.public_bytes(Encoding.DER)
            assert parse_peer_header(seen["x-keynode-peer"]) == {
                "by": tunnel.remote.node_id.encode(),
                "nodeid": tunnel.local.node_id.encode(),
                "hash": hashlib.sha256(leaf).hexdigest(),
            }
            # Who, 20 Echo, Count, Digest, Chat: each saw exactly the injected pair.
            assert tunnel.server.state.keynode_metadata == [tunnel.expected()] * (1 + 20 + 3)
            rows = [status.info for status in tunnel.remote.proxy.connections()]
            assert [(info.service, info.remote_node_id) for info in rows] == [("rpc", tunnel.local.node_id)]


def grpc_request_headers(path: str, extra: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    return [(b":method", b"POST"), (b":scheme", b"http"), (b":path", path.encode()), (b":authority", b"rpc"),
            (b"content-type", b"application/grpc"), (b"te", b"trailers"), *extra]


async def raw_h2_call(stream: trio.SocketStream, headers: list[tuple[bytes, bytes]]) -> bytes | None:
    """One gRPC call (empty message) by hand over HTTP/2, name validation off so any
    header goes out as written; the response's gRPC message, or None if the
    connection ended without one."""
    config = h2.config.H2Configuration(client_side=True, validate_outbound_headers=False, normalize_outbound_headers=False)
    connection = h2.connection.H2Connection(config)
    connection.initiate_connection()
    connection.send_headers(1, headers)
    connection.send_data(1, b"\x00\x00\x00\x00\x00", end_stream=True)
    await stream.send_all(connection.data_to_send())
    body = bytearray()
    while True:
        try:
            data = await stream.receive_some(65536)
        except (trio.BrokenResourceError, OSError):
            data = b""
        if not data:
            return None
        for event in connection.receive_data(data):
            if isinstance(event, h2.events.DataReceived):
                body += event.data
                connection.acknowledge_received_data(event.flow_controlled_length, 1)
            elif isinstance(event, h2.events.StreamEnded | h2.events.StreamReset):
                return bytes(body[5:])
            elif isinstance(event, h2.events.ConnectionTerminated):
                return None
        await stream.send_all(connection.data_to_send())


async def test_a_raw_http2_caller_cannot_forge_either_header() -> None:
    """Forged copies in the request headers are dropped; an upper-case name (not
    HTTP/2) ends that connection before any request reaches the server."""
    with trio.fail_after(60):
        async with wired_tunnel() as tunnel:
            target = f"{tunnel.remote.node_id}:{RPC_PORT}"
            forged = [(b"x-keynode-node-id", b"vforged"), (b"x-keynode-node-id", b"vforged2"),
                      (b"x-keynode-peer", b"By=x"), (b"x-keynode-peer-bin", b"AAAA")]
            stream = await connect_ok(tunnel.local.proxy, target)
            async with stream:
                answer = await raw_h2_call(stream, grpc_request_headers(f"/{SERVICE}/Who", forged))
            assert answer is not None
            assert json.loads(answer) == [list(pair) for pair in tunnel.expected()]
            for name in (b"X-Keynode-Node-Id", b"x-KEYNODE-peer"):
                stream = await connect_ok(tunnel.local.proxy, target)
                async with stream:
                    answer = await raw_h2_call(stream, grpc_request_headers(f"/{SERVICE}/Who", [(name, b"vforged")]))
                assert answer is None
            assert tunnel.server.state.keynode_metadata == [tunnel.expected()]  # only the first call arrived
