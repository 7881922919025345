"""Shared by the grpc-web tests, the browser tests and bench/grpc_web.py: an unmodified
grpcio server implementing grpc.testing.TestService (the service grpc-web's interop
client calls) with generic handlers and a hand-written protobuf wire codec for the few
messages involved, a bridge in front of it, and the Node clients' runner.

Messages (grpc/grpc src/proto/grpc/testing/messages.proto field numbers):
Payload{body=2}; EchoStatus{code=1, message=2}; SimpleRequest{response_size=2,
payload=3, response_status=7}; SimpleResponse{payload=1};
ResponseParameters{size=1}; StreamingOutputCallRequest{response_parameters=2,
payload=3, response_status=7}; StreamingOutputCallResponse{payload=1}.
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator, Iterator
from concurrent import futures
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import trio

from grpc_bridge.web import WebBridgeSettings, serve_web_bridge
from grpc_bridge.web_connect import direct_upstream
from grpc_bridge.web_upstream import OpenUpstream
from tests.grpc_bridge.grpc_server_support import serving_on_loopback

REPO = Path(__file__).resolve().parents[2]
NODE_DIR = REPO / "tests" / "node"
SERVICE = "grpc.testing.TestService"
ECHO_INITIAL = "x-grpc-test-echo-initial"
ECHO_TRAILING = "x-grpc-test-echo-trailing-bin"
MAX_MESSAGE = 16 << 20
GRPC_OPTIONS = [("grpc.max_receive_message_length", MAX_MESSAGE), ("grpc.max_send_message_length", MAX_MESSAGE)]


# --- protobuf wire format, just what the messages above need ------------------------


def varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def field_bytes(number: int, value: bytes) -> bytes:
    return varint(number << 3 | 2) + varint(len(value)) + value


def field_int(number: int, value: int) -> bytes:
    return varint(number << 3) + varint(value) if value else b""


def parse(data: bytes) -> dict[int, list[Any]]:
    """Field number -> values (ints for varints, bytes for length-delimited)."""
    fields: dict[int, list[Any]] = {}
    position = 0

    def read_varint() -> int:
        nonlocal position
        result = shift = 0
        while True:
            byte = data[position]
            position += 1
            result |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                return result

    while position < len(data):
        key = read_varint()
        number, wire = key >> 3, key & 7
        if wire == 0:
            value: Any = read_varint()
        elif wire == 2:
            size = read_varint()
            value = data[position : position + size]
            position += size
        else:
            raise ValueError(f"wire type {wire} not used by these messages")
        fields.setdefault(number, []).append(value)
    return fields


def payload(size: int) -> bytes:
    return field_bytes(2, bytes(size))


def simple_request(response_size: int = 0, body_size: int = 0, status: tuple[int, str] | None = None) -> bytes:
    out = field_int(2, response_size) + field_bytes(3, payload(body_size))
    if status is not None:
        out += field_bytes(7, field_int(1, status[0]) + field_bytes(2, status[1].encode()))
    return out


def streaming_request(sizes: list[int]) -> bytes:
    return b"".join(field_bytes(2, field_int(1, size)) for size in sizes)


def payload_size(response: bytes) -> int:
    fields = parse(response)
    if 1 not in fields:
        return 0
    body = parse(fields[1][0]).get(2, [b""])[0]
    return len(body)


# --- the service ----------------------------------------------------------------------


def _echo_metadata(context: grpc.ServicerContext) -> None:
    metadata = dict(context.invocation_metadata())
    if ECHO_INITIAL in metadata:
        context.send_initial_metadata(((ECHO_INITIAL, metadata[ECHO_INITIAL]),))
    if ECHO_TRAILING in metadata:
        context.set_trailing_metadata(((ECHO_TRAILING, metadata[ECHO_TRAILING]),))


def _apply_status(fields: dict[int, list[Any]], context: grpc.ServicerContext) -> bool:
    if 7 not in fields:
        return False
    status = parse(fields[7][0])
    code = status.get(1, [0])[0]
    if not code:
        return False
    message = status.get(2, [b""])[0].decode()
    context.set_code(next(c for c in grpc.StatusCode if c.value[0] == code))
    context.set_details(message)
    return True


def empty_call(request: bytes, context: grpc.ServicerContext) -> bytes:
    _echo_metadata(context)
    return b""


def unary_call(request: bytes, context: grpc.ServicerContext) -> bytes:
    _echo_metadata(context)
    fields = parse(request)
    if _apply_status(fields, context):
        return b""
    return field_bytes(1, payload(fields.get(2, [0])[0]))


def streaming_output_call(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
    _echo_metadata(context)
    fields = parse(request)
    for parameters in fields.get(2, []):
        yield field_bytes(1, payload(parse(parameters).get(1, [0])[0]))
    _apply_status(fields, context)


@dataclass
class GrpcServer:
    server: grpc.Server
    port: int


@asynccontextmanager
async def interop_server() -> AsyncIterator[GrpcServer]:
    handler = grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "EmptyCall": grpc.unary_unary_rpc_method_handler(empty_call),
            "UnaryCall": grpc.unary_unary_rpc_method_handler(unary_call),
            "StreamingOutputCall": grpc.unary_stream_rpc_method_handler(streaming_output_call),
        },
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16), options=GRPC_OPTIONS)
    async with serving_on_loopback(server, handler) as port:
        yield GrpcServer(server, port)


@asynccontextmanager
async def running_bridge(
    open_upstream: OpenUpstream, allow_origins: tuple[str, ...] = (), authority: str = "test-service"
) -> AsyncIterator[tuple[str, int]]:
    """A bridge on a free loopback port; yields its (host, port)."""
    async with trio.open_nursery() as nursery:
        settings = WebBridgeSettings("127.0.0.1", 0, allow_origins, authority)
        address = await nursery.start(serve_web_bridge, settings, open_upstream)
        yield address
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def bridged_test_service() -> AsyncIterator[tuple[GrpcServer, tuple[str, int]]]:
    async with interop_server() as server, running_bridge(direct_upstream("127.0.0.1", server.port)) as address:
        yield server, address


# --- Node clients ---------------------------------------------------------------------


def check_node_modules() -> None:
    if not (NODE_DIR / "node_modules" / "@connectrpc" / "connect-node").is_dir():
        raise RuntimeError("tests/node/node_modules lacks the grpc-web clients: run `make node` (make test does)")


async def run_node_client(script: str, *args: str, timeout: float = 120) -> Any:
    """Run tests/node/<script> with args; its last stdout line is a JSON report."""
    check_node_modules()
    with trio.fail_after(timeout):
        result = await trio.run_process(
            ["node", str(NODE_DIR / script), *args], capture_stdout=True, capture_stderr=True, check=False,
            env={**os.environ, "NODE_PATH": str(NODE_DIR / "node_modules")},
        )
    if result.returncode != 0:
        raise AssertionError(f"{script} failed ({result.returncode}): {result.stderr.decode()[-4000:]}")
    return json.loads(result.stdout.decode().strip().splitlines()[-1])
