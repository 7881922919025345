"""The grpc-web bridge on the wire, with raw clients: chunked and text bodies in odd
pieces, incremental server streaming, metadata in and out, CORS over HTTP, hostile
requests (each counted against the gRPC handler: none may reach it), non-gRPC and broken
upstream answers mapped to grpc-status, and HTTP/2 clients with many streams at once."""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator, Iterator
from concurrent import futures
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import grpc
import h2.config
import h2.connection
import h2.errors
import h2.events
import pytest
import trio

from grpc_bridge.web_connect import direct_upstream
from tests.grpc_bridge.grpc_server_support import serving_on_loopback
from tests.grpc_bridge.test_web_support import running_bridge
from tests.grpc_bridge.test_web_wire import BINARY, TEXT, WebAnswer, frame, post, scripted_upstream, text_chunks
from tests.proxy.test_proxy_support import receive_all

SERVICE = "keynode.test.Web"


@dataclass
class Recorder:
    calls: int = 0
    metadata: list[dict[str, Any]] = field(default_factory=list)
    time_remaining: list[float | None] = field(default_factory=list)
    gate: threading.Event = field(default_factory=threading.Event)
    server: Any = None

    def echo(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        self.calls += 1
        self.metadata.append(dict(context.invocation_metadata()))
        self.time_remaining.append(context.time_remaining())
        context.send_initial_metadata((("x-initial", "yes"),))
        context.set_trailing_metadata((("x-trailing-bin", b"\xab\xab"),))
        return request

    def gated(self, request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        yield b"first"
        self.gate.wait(30)
        yield b"second"


@asynccontextmanager
async def bridged_recorder(allow_origins: tuple[str, ...] = ()) -> AsyncIterator[tuple[Recorder, tuple[str, int], list[int]]]:
    recorder = Recorder()
    handler = grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "Echo": grpc.unary_unary_rpc_method_handler(recorder.echo),
            "Gated": grpc.unary_stream_rpc_method_handler(recorder.gated),
        },
    )
    recorder.server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    opens: list[int] = []
    async with serving_on_loopback(recorder.server, handler) as port:
        direct = direct_upstream("127.0.0.1", port)

        async def counting() -> trio.abc.Stream:
            opens.append(1)
            return await direct()

        try:
            async with running_bridge(counting, allow_origins) as address:
                yield recorder, address, opens
        finally:
            recorder.gate.set()  # before the server stops: a Gated call in flight returns


ECHO = f"/{SERVICE}/Echo"


async def gated_call_started(address: tuple[str, int]) -> tuple[trio.SocketStream, bytes]:
    """A raw grpc-web call of Gated, read until its first message came: the stream and
    what it read (the server holds "second" until ``recorder.gate`` is set)."""
    stream = await trio.open_tcp_stream(*address)
    request = (
        b"POST /keynode.test.Web/Gated HTTP/1.1\r\nhost: b\r\ncontent-type: application/grpc-web\r\n"
        b"content-length: 5\r\n\r\n" + frame(b"")
    )
    await stream.send_all(request)
    seen = b""
    while frame(b"first") not in seen:
        seen += await stream.receive_some(65536)
    return stream, seen


async def answer_until_closed(address: tuple[str, int], data: bytes) -> bytes:
    """Send ``data`` on a new connection to the bridge; all it answers until it closes."""
    async with await trio.open_tcp_stream(*address) as stream:
        await stream.send_all(data)
        return await receive_all(stream)


def ok_trailers(answer: WebAnswer) -> tuple[list[bytes], dict[bytes, bytes]]:
    assert answer.status == 200, answer
    messages, trailers = answer.parse()
    assert trailers[b"grpc-status"] == b"0", trailers
    return messages, trailers


@pytest.mark.parametrize("piece", [1, 3, 7, 4096])
async def test_chunked_bodies_in_any_pieces_binary_and_text(piece: int) -> None:
    payload = bytes(range(256)) * 40
    body = frame(payload)
    with trio.fail_after(30):
        async with bridged_recorder() as (_, address, opens):
            binary = await post(address, ECHO, [body[i : i + piece] for i in range(0, len(body), piece)])
            assert binary.headers[b"content-type"] == b"application/grpc-web+proto"
            assert ok_trailers(binary)[0] == [payload]
            text = await post(address, ECHO, text_chunks(body, piece), content_type=TEXT)
            assert text.headers[b"content-type"] == b"application/grpc-web-text+proto"
            assert ok_trailers(text)[0] == [payload]
            assert len(opens) == 1  # both calls on one upstream HTTP/2 connection


async def test_server_stream_arrives_incrementally() -> None:
    with trio.fail_after(30):
        async with bridged_recorder() as (recorder, address, opens):
            stream, seen = await gated_call_started(address)
            assert b"second" not in seen
            recorder.gate.set()
            while b"grpc-status:0" not in seen:
                seen += await stream.receive_some(65536)
            assert frame(b"second") in seen
            await stream.aclose()


async def test_metadata_deadline_forwarded_and_hop_by_hop_stripped() -> None:
    headers = [
        (b"x-custom", b"value"), (b"x-custom-bin", b"q6ur"), (b"grpc-timeout", b"20S"), (b"connection", b"keep-alive"),
        (b"keep-alive", b"timeout=5"), (b"proxy-authorization", b"Basic c2VjcmV0"), (b"x-grpc-web", b"1"),
    ]
    with trio.fail_after(30):
        async with bridged_recorder() as (recorder, address, _):
            answer = await post(address, ECHO, [frame(b"hi")], headers=headers)
    messages, trailers = ok_trailers(answer)
    assert answer.headers[b"x-initial"] == b"yes"
    assert trailers[b"x-trailing-bin"] == b"q6s"  # base64 without padding, as gRPC sends -bin values
    seen = recorder.metadata[0]
    assert seen["x-custom"] == "value" and seen["x-custom-bin"] == b"\xab\xab\xab"
    for name in ("connection", "keep-alive", "proxy-authorization", "x-grpc-web"):
        assert name not in seen
    remaining = recorder.time_remaining[0]
    assert remaining is not None and 10 < remaining <= 20


HOSTILE = [
    ("bad base64", TEXT, [b"AAAA!!!!"], 13),
    ("base64 length not a multiple of 4", TEXT, [b"AAAAAA"], 13),
    ("a 4 GiB frame header", BINARY, [b"\x00\xff\xff\xff\xff" + b"x" * 100], 8),
    ("a trailers frame from the client", BINARY, [frame(b"grpc-status:0\r\n", 0x80)], 13),
    ("a frame cut short", BINARY, [frame(b"12345678")[:-3]], 13),
    ("an unknown flag", BINARY, [frame(b"x", 0x42)], 13),
]


@pytest.mark.parametrize("name, content_type, chunks, code", HOSTILE, ids=[case[0] for case in HOSTILE])
async def test_hostile_bodies_get_a_grpc_error_and_never_reach_the_handler(
    name: str, content_type: bytes, chunks: list[bytes], code: int
) -> None:
    with trio.fail_after(30):
        async with bridged_recorder() as (recorder, address, _):
            answer = await post(address, ECHO, chunks, content_type=content_type)
            assert answer.status == 200
            _, trailers = answer.parse()
            assert trailers[b"grpc-status"] == str(code).encode(), (name, trailers)
            assert trailers[b"grpc-message"].startswith(b"bad grpc-web request")
            # The bridge still serves; the handler ran only for the good call.
            ok_trailers(await post(address, ECHO, [frame(b"ok")]))
            assert recorder.calls == 1


async def test_garbage_connections_get_400_and_the_bridge_keeps_serving() -> None:
    with trio.fail_after(30):
        async with bridged_recorder() as (recorder, address, opens):
            for garbage in (b"\x16\x03\x01\x02\x00" + bytes(300), b"GET / HTTP/1.1\r\n" + b"x" * 70000, b"\r\n\r\n\r\n"):
                answer = await answer_until_closed(address, garbage)
                assert answer.startswith(b"HTTP/1.1 400"), answer[:100]
            ok_trailers(await post(address, ECHO, [frame(b"ok")]))
            assert recorder.calls == 1 and len(opens) == 1


async def test_cors_preflight_and_origin_refusal_over_http() -> None:
    origin = b"http://app.example"
    with trio.fail_after(30):
        async with bridged_recorder(allow_origins=("http://app.example",)) as (recorder, address, opens):
            preflight = [(b"origin", origin), (b"access-control-request-method", b"POST"),
                         (b"access-control-request-headers", b"content-type,x-grpc-web,x-custom")]
            allowed = await post(address, ECHO, [], method=b"OPTIONS", headers=preflight)
            assert allowed.status == 204
            assert allowed.headers[b"access-control-allow-origin"] == origin
            assert b"x-custom" in allowed.headers[b"access-control-allow-headers"]
            evil = [(b"origin", b"http://evil.example"), *preflight[1:]]
            refused = await post(address, ECHO, [], method=b"OPTIONS", headers=evil)
            assert refused.status == 403 and b"access-control-allow-origin" not in refused.headers
            # An actual call from a refused origin: 403, and nothing goes upstream.
            call = await post(address, ECHO, [frame(b"x")], headers=[(b"origin", b"http://evil.example")])
            assert call.status == 403
            assert recorder.calls == 0 and opens == []
            good = await post(address, ECHO, [frame(b"x")], headers=[(b"origin", origin)])
            ok_trailers(good)
            exposed = good.headers[b"access-control-expose-headers"]
            assert exposed.startswith(b"grpc-status, grpc-message, grpc-status-details-bin") and b"x-initial" in exposed
            assert (await post(address, ECHO, [], method=b"GET")).status == 405
            assert (await post(address, ECHO, [frame(b"x")], content_type=b"application/json")).status == 415
            assert recorder.calls == 1


def answer_with(status: bytes, content_type: bytes | None, body: bytes = b"", *, end: bool = True) -> Any:
    def script(conn: h2.connection.H2Connection, stream_id: int) -> None:
        headers = [(b":status", status)] + ([(b"content-type", content_type)] if content_type else [])
        conn.send_headers(stream_id, headers, end_stream=not body and end)
        if body:
            conn.send_data(stream_id, body, end_stream=end)
    return script


def trailers_only(conn: h2.connection.H2Connection, stream_id: int) -> None:
    conn.send_headers(stream_id, [(b":status", b"200"), (b"content-type", b"application/grpc"), (b"grpc-status", b"7"),
                                  (b"grpc-message", b"denied"), (b"x-why", b"policy")], end_stream=True)


def refused_stream(conn: h2.connection.H2Connection, stream_id: int) -> None:
    conn.reset_stream(stream_id, h2.errors.ErrorCodes.REFUSED_STREAM)


UPSTREAM_ANSWERS = [
    ("503 with a text body", answer_with(b"503", b"text/plain", b"overloaded, 100%"), b"14", b"overloaded, 100%25"),
    ("404 without a body", answer_with(b"404", None), b"12", None),
    ("401", answer_with(b"401", b"text/plain", b"who?"), b"16", b"who?"),
    ("200 html", answer_with(b"200", b"text/html", b"<html>"), b"2", b"<html>"),
    ("grpc without trailers", answer_with(b"200", b"application/grpc", frame(b"m")), b"13", None),
    ("trailers-only", trailers_only, b"7", b"denied"),
    ("REFUSED_STREAM", refused_stream, b"14", None),
    ("connection closed", lambda conn, stream_id: "close", b"14", None),
]


@pytest.mark.parametrize("name, script, code, message", UPSTREAM_ANSWERS, ids=[case[0] for case in UPSTREAM_ANSWERS])
async def test_upstream_answers_map_to_grpc_status(name: str, script: Any, code: bytes, message: bytes | None) -> None:
    with trio.fail_after(30):
        async with scripted_upstream(script) as upstream:
            async with running_bridge(direct_upstream("127.0.0.1", upstream.port)) as address:
                for content_type in (BINARY, TEXT):
                    body = [frame(b"q")] if content_type is BINARY else text_chunks(frame(b"q"), 100)
                    answer = await post(address, "/a.B/C", body, content_type=content_type)
                    assert answer.status == 200
                    _, trailers = answer.parse()
                    assert trailers[b"grpc-status"] == code, (name, trailers)
                    if message is not None:
                        assert trailers[b"grpc-message"] == message
                    if name == "trailers-only":
                        assert trailers[b"x-why"] == b"policy"
            headers = dict(upstream.requests[0])
            assert headers[b"content-type"] == b"application/grpc" and headers[b"te"] == b"trailers"
            assert headers[b":authority"] == b"test-service"


async def test_unreachable_upstream_is_unavailable() -> None:
    listener = trio.socket.socket()
    await listener.bind(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    listener.close()  # nothing listens there now
    with trio.fail_after(30):
        async with running_bridge(direct_upstream("127.0.0.1", port)) as address:
            _, trailers = (await post(address, "/a.B/C", [frame(b"")])).parse()
    assert trailers[b"grpc-status"] == b"14"


async def test_http2_client_many_concurrent_calls_on_one_connection() -> None:
    calls = 64  # 64 requests of 505 bytes fit the client's initial 64 KiB window: no waiting in the test
    with trio.fail_after(60):
        async with bridged_recorder() as (recorder, address, opens):
            stream = await trio.open_tcp_stream(*address)
            conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
            conn.initiate_connection()
            for index in range(calls):
                stream_id = conn.get_next_available_stream_id()
                conn.send_headers(stream_id, [(b":method", b"POST"), (b":scheme", b"http"), (b":path", ECHO.encode()),
                                              (b":authority", b"b"), (b"content-type", BINARY)])
                conn.send_data(stream_id, frame(index.to_bytes(4, "big") * 100), end_stream=True)
            await stream.send_all(conn.data_to_send())
            bodies: dict[int, bytearray] = {}
            ended: set[int] = set()
            while len(ended) < calls:
                data = await stream.receive_some(65536)
                assert data, "bridge closed the HTTP/2 connection"
                for event in conn.receive_data(data):
                    if isinstance(event, h2.events.DataReceived):
                        bodies.setdefault(event.stream_id, bytearray()).extend(event.data)
                        conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                    elif isinstance(event, h2.events.StreamEnded):
                        ended.add(event.stream_id)
                await stream.send_all(conn.data_to_send())
            await stream.aclose()
    for stream_id, body in bodies.items():
        index = (stream_id - 1) // 2
        messages, trailers = WebAnswer(200, {b"content-type": BINARY}, bytes(body)).parse()
        assert messages == [index.to_bytes(4, "big") * 100] and trailers[b"grpc-status"] == b"0"
    assert recorder.calls == calls and len(opens) == 1


async def test_idle_http1_connection_is_closed_after_the_head_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    from grpc_bridge import web_http1

    monkeypatch.setattr(web_http1, "HEAD_TIMEOUT", 0.2)
    with trio.fail_after(30):
        async with bridged_recorder() as (recorder, address, opens):
            idle = await trio.open_tcp_stream(*address)
            await idle.send_all(b"POST /x HTTP/1.1\r\nhost: b\r\n")  # a head that never ends
            assert await idle.receive_some(65536) == b""  # the bridge hung up
            await idle.aclose()
    assert recorder.calls == 0 and opens == []


async def test_http2_garbage_after_the_preface_ends_only_that_connection() -> None:
    from grpc_bridge.web_http2 import H2_PREFACE

    with trio.fail_after(30):
        async with bridged_recorder() as (recorder, address, opens):
            garbage = H2_PREFACE + b"\x00\x00\x04\x09\xff\x00\x00\x00\x01" + bytes(64)
            received = await answer_until_closed(address, garbage)  # its SETTINGS and a GOAWAY, then it closes
            kinds, position = [], 0
            while position + 9 <= len(received):
                length = int.from_bytes(received[position : position + 3], "big")
                kinds.append(received[position + 3])
                position += 9 + length
            assert kinds[0] == 0x4 and kinds[-1] == 0x7, kinds  # SETTINGS first, GOAWAY last
            ok_trailers(await post(address, ECHO, [frame(b"ok")]))
    assert recorder.calls == 1 and len(opens) == 1


async def test_expect_100_continue_is_answered_before_the_body() -> None:
    body = frame(b"x" * 1000)
    with trio.fail_after(30):
        async with bridged_recorder() as (recorder, address, _):
            stream = await trio.open_tcp_stream(*address)
            head = (
                f"POST {ECHO} HTTP/1.1\r\nhost: b\r\ncontent-type: application/grpc-web\r\n"
                f"expect: 100-continue\r\ncontent-length: {len(body)}\r\n\r\n"
            )
            await stream.send_all(head.encode())
            interim = b""
            while b"\r\n\r\n" not in interim:  # the client sends nothing more until this arrives
                interim += await stream.receive_some(65536)
            assert interim.startswith(b"HTTP/1.1 100 ")
            await stream.send_all(body)
            answer = interim.partition(b"\r\n\r\n")[2]
            while b"grpc-status:0" not in answer:
                answer += await stream.receive_some(65536)
            await stream.aclose()
    assert recorder.calls == 1


async def test_random_hostile_bodies_always_get_a_clean_answer() -> None:
    import base64
    import random

    rng = random.Random(16)
    with trio.fail_after(120):
        async with bridged_recorder() as (recorder, address, opens):
            for _ in range(120):
                body = bytearray(frame(rng.randbytes(rng.randrange(0, 64))) * rng.randrange(1, 3))
                for _ in range(rng.randrange(0, 4)):  # mutate a few bytes, or cut the body short
                    if body and rng.random() < 0.8:
                        body[rng.randrange(len(body))] = rng.randrange(256)
                    else:
                        body = body[: rng.randrange(len(body) + 1)]
                content_type = rng.choice([BINARY, TEXT])
                data = bytes(body)
                if content_type == TEXT:
                    data = base64.b64encode(data)
                    if rng.random() < 0.3:
                        data = data[: rng.randrange(len(data) + 1)] + rng.choice([b"!", b"=", b"A", b""])
                cuts = sorted(rng.randrange(len(data) + 1) for _ in range(rng.randrange(0, 4)))
                pieces = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]
                answer = await post(address, ECHO, [piece for piece in pieces if piece], content_type=content_type)
                assert answer.status == 200
                _, trailers = answer.parse()
                assert trailers[b"grpc-status"].isdigit()
            ok_trailers(await post(address, ECHO, [frame(b"still serving")]))
    assert len(opens) == 1


async def test_bodies_refused_midway_release_their_upstream_streams() -> None:
    # Each call opens an upstream stream with a good first piece, then breaks: unless the
    # bridge resets those streams, each holds one of the server's 8 workers forever.
    with trio.fail_after(60):
        async with bridged_recorder() as (recorder, address, opens):
            for _ in range(20):
                answer = await post(address, ECHO, [frame(b"good")[:6], b"ood" + frame(b"bad", 0x80)])
                assert answer.parse()[1][b"grpc-status"] == b"13"
            ok_trailers(await post(address, ECHO, [frame(b"still served")]))
    assert recorder.calls == 1 and len(opens) == 1


async def test_graceful_server_shutdown_lets_the_call_in_flight_finish() -> None:
    # grpcio's stop(grace) sends GOAWAY, a PING, a second GOAWAY, then waits for calls in
    # flight: the bridge must keep its upstream connection for them (h2 alone would not).
    with trio.fail_after(30):
        async with bridged_recorder() as (recorder, address, opens):
            stream, seen = await gated_call_started(address)
            stopped = recorder.server.stop(grace=20)
            while len(opens) < 2:  # once the bridge has the GOAWAY, a new call opens a new connection
                await post(address, ECHO, [frame(b"x")])
            recorder.gate.set()
            while b"grpc-status:" not in seen:
                seen += await stream.receive_some(65536)
            await stream.aclose()
            await trio.to_thread.run_sync(stopped.wait, 20)
    assert frame(b"second") in seen and b"grpc-status:0" in seen, seen[-200:]


async def test_http2_overlong_frame_header_is_refused_on_arrival() -> None:
    from grpc_bridge.web_http2 import H2_PREFACE

    with trio.fail_after(30):
        async with bridged_recorder() as (recorder, address, opens):
            # A DATA frame header announcing 16 MiB - 1: refused at once, not buffered first.
            frame_header = H2_PREFACE + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00" + b"\xff\xff\xff\x00\x00\x00\x00\x00\x01"
            received = await answer_until_closed(address, frame_header)
    goaway = received.rfind(b"\x07\x00\x00\x00\x00\x00")  # GOAWAY on stream 0
    assert goaway > 0 and received[goaway + 10 : goaway + 14] == (6).to_bytes(4, "big")  # FRAME_SIZE_ERROR
    assert recorder.calls == 0 and opens == []
