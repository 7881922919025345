"""Real grpcio through the h2 identity relay over TCP: grpcio client -> relay (trio)
-> unmodified grpcio server reading ``context.invocation_metadata()``."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import grpc
import pytest
import trio

from tests.grpc_bridge.test_identity_injection_support import (
    TEST_CALLER,
    GrpcServer,
    RelayListener,
    channel_to,
    closing_channel,
    expected_metadata,
    fixed_caller,
    grpc_server,
    method,
    relay_listener,
)

FORGED_METADATA = (
    ("x-keynode-node-id", "vforged"),
    ("x-keynode-node-id", "vforged-twice"),
    ("x-keynode-peer", "By=vme;NodeId=vforged;Hash=00"),
    ("x-keynode-node-id-bin", b"\x00\x01forged"),
    ("x-keynode-peer-bin", b"\xff"),
    ("x-keynode-role", "admin"),
    ("x-other", "kept"),
)


@dataclass
class Setup:
    server: GrpcServer
    listener: RelayListener
    channel: grpc.Channel


@asynccontextmanager
async def relayed(**relay_options: int) -> AsyncIterator[Setup]:
    async with grpc_server() as server, relay_listener(server.port, fixed_caller, **relay_options) as listener:
        async with closing_channel(channel_to(listener.port)) as channel:
            yield Setup(server, listener, channel)



async def test_unary_carries_the_identity_and_no_forgery() -> None:
    with trio.fail_after(60):
        async with relayed() as setup:
            who = method(setup.channel, "unary_unary", "Who")
            answer = await trio.to_thread.run_sync(lambda: who(b"", metadata=FORGED_METADATA, timeout=20))
            assert [tuple(pair) for pair in json.loads(answer)] == expected_metadata(TEST_CALLER)
            answer = await trio.to_thread.run_sync(lambda: who(b"", timeout=20))
            assert [tuple(pair) for pair in json.loads(answer)] == expected_metadata(TEST_CALLER)


async def test_every_call_kind_sees_exactly_the_injected_identity() -> None:
    with trio.fail_after(60):
        async with relayed() as setup:
            channel = setup.channel

            def calls() -> None:
                echo = method(channel, "unary_unary", "Echo")
                reply, call = echo.with_call(b"ping", metadata=FORGED_METADATA, timeout=20)
                assert reply == b"ping" and ("x-initial", "hello") in call.initial_metadata()
                count = method(channel, "unary_stream", "Count")
                replies = list(count(b"2000", metadata=FORGED_METADATA, timeout=30))
                assert len(replies) == 2000 and replies[-1] == (1999).to_bytes(4, "big") * 64
                chunks = [os.urandom(10_000 + index) for index in range(300)]
                digest = method(channel, "stream_unary", "Digest")
                expected = hashlib.sha256(b"".join(chunks)).hexdigest().encode()
                assert digest(iter(chunks), metadata=FORGED_METADATA, timeout=30) == expected
                chat = method(channel, "stream_stream", "Chat")
                answers = list(chat(iter(chunks), metadata=FORGED_METADATA, timeout=30))
                assert answers == [chunk[::-1] for chunk in chunks]

            await trio.to_thread.run_sync(calls)
            assert setup.server.state.keynode_metadata == [expected_metadata(TEST_CALLER)] * 4


async def test_many_concurrent_calls_and_streams() -> None:
    with trio.fail_after(90):
        async with relayed() as setup:
            channel = setup.channel

            def fan_out() -> list[bool]:
                echo = method(channel, "unary_unary", "Echo")
                count = method(channel, "unary_stream", "Count")
                payloads = [os.urandom(100 + index * 137) for index in range(300)]
                pending = [echo.future(payload, metadata=FORGED_METADATA, timeout=60) for payload in payloads]
                streams = [count(b"500", timeout=60) for _ in range(30)]
                results = [future.result() == payload for future, payload in zip(pending, payloads)]
                results += [len(list(stream)) == 500 for stream in streams]
                return results

            assert await trio.to_thread.run_sync(fan_out) == [True] * 330
            assert setup.server.state.keynode_metadata == [expected_metadata(TEST_CALLER)] * 330
            assert len(setup.listener.relays) == 1  # one HTTP/2 connection carried them all
            assert setup.listener.relays[0].requests_relayed == 330


async def test_large_messages_both_ways() -> None:
    with trio.fail_after(120):
        async with relayed() as setup:
            payload = os.urandom(24 << 20)
            echo = method(setup.channel, "unary_unary", "Echo")
            assert await trio.to_thread.run_sync(lambda: echo(payload, timeout=60)) == payload
            digest = method(setup.channel, "stream_unary", "Digest")
            expected = hashlib.sha256(payload * 2).hexdigest().encode()
            assert await trio.to_thread.run_sync(lambda: digest(iter([payload, payload]), timeout=60)) == expected


async def test_status_codes_messages_and_trailers_pass_faithfully() -> None:
    with trio.fail_after(60):
        async with relayed() as setup:
            fail = method(setup.channel, "unary_unary", "Fail")
            with pytest.raises(grpc.RpcError) as raised:
                await trio.to_thread.run_sync(lambda: fail("not for you: ünïcode".encode(), timeout=20))
            error = raised.value
            assert error.code() == grpc.StatusCode.PERMISSION_DENIED
            assert error.details() == "not for you: ünïcode"
            trailers = dict(error.trailing_metadata())
            assert trailers["x-detail"] == "why" and trailers["x-trace-bin"] == b"\x00\x01\xff"
            missing = setup.channel.unary_unary("/keynode.test.Nothing/Here")
            with pytest.raises(grpc.RpcError) as raised:
                await trio.to_thread.run_sync(lambda: missing(b"", timeout=20))
            assert raised.value.code() == grpc.StatusCode.UNIMPLEMENTED


async def test_client_cancel_resets_the_stream_at_the_server() -> None:
    with trio.fail_after(60):
        async with relayed() as setup:
            forever = method(setup.channel, "unary_stream", "Forever")

            def start_and_cancel() -> bool:
                call = forever(b"", timeout=30)
                first = next(call)
                call.cancel()
                return first == b"tick" and setup.server.state.cancelled.wait(20)

            assert await trio.to_thread.run_sync(start_and_cancel)
            relay = setup.listener.relays[0]
            # The channel stays usable, and the cancelled stream is forgotten by the relay.
            echo = method(setup.channel, "unary_unary", "Echo")
            assert await trio.to_thread.run_sync(lambda: echo(b"after", timeout=20)) == b"after"
            assert relay.open_streams == 0


async def test_256_mib_to_a_slow_server_keeps_the_relay_bounded() -> None:
    connection_window, high_water = 1 << 20, 128 << 10
    options = dict(stream_window=256 << 10, connection_window=connection_window, outbound_high_water=high_water)
    with trio.fail_after(300):
        async with relayed(**options) as setup:
            setup.server.state.slow_delay = 0.004
            block = hashlib.sha256(b"block").digest() * (1 << 15)  # 1 MiB
            total = 256 << 20

            def upload() -> bytes:
                blocks: Iterator[bytes] = (block for _ in range(total // len(block)))
                return method(setup.channel, "stream_unary", "SlowDigest")(blocks, timeout=240)

            expected = hashlib.sha256()
            for _ in range(total // len(block)):
                expected.update(block)
            answer = await trio.to_thread.run_sync(upload)
            assert answer == f"{total} {expected.hexdigest()}".encode()
            [relay] = setup.listener.relays
            # What the relay held at any moment: DATA waiting for the server's window plus
            # output not yet written. Bounded by our window and the high-water mark, not by
            # the 256 MiB.
            bound = connection_window + 2 * high_water + (64 << 10)
            print(f"relay held at most {relay.peak_buffered_bytes} bytes (bound {bound})")
            assert 0 < relay.peak_buffered_bytes <= bound, relay.peak_buffered_bytes


async def test_garbage_from_the_caller_ends_only_its_connection() -> None:
    with trio.fail_after(60):
        async with relayed() as setup:
            echo = method(setup.channel, "unary_unary", "Echo")
            assert await trio.to_thread.run_sync(lambda: echo(b"before", timeout=20)) == b"before"
            preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
            hostile = [
                (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", False),  # not HTTP/2 at all
                (preface + b"\x00\x00\x05\x04\x00\x00\x00\x00\x00" + b"\x00" * 5, False),  # SETTINGS of a bad length
                (preface + b"\x00\x00\x04\x00\x01\x00\x00\x00\x00abcd", False),  # DATA on stream 0
                (preface + os.urandom(5000), True),  # noise, then the caller leaves
            ]
            for garbage, then_eof in hostile:
                stream = await trio.open_tcp_stream("127.0.0.1", setup.listener.port)
                async with stream:
                    await stream.send_all(garbage)
                    if then_eof:
                        await stream.send_eof()
                    received = b""
                    try:
                        while chunk := await stream.receive_some(65536):
                            received += chunk
                    except trio.BrokenResourceError:
                        pass  # closed with unread bytes: a reset is an end too
                    assert received.startswith(b"\x00\x00")  # our SETTINGS came first
            assert all(relay.ended for relay in setup.listener.relays[1:])
            assert await trio.to_thread.run_sync(lambda: echo(b"after", timeout=20)) == b"after"
            assert setup.server.state.keynode_metadata == [expected_metadata(TEST_CALLER)] * 2


async def test_server_goaway_lets_the_call_in_flight_finish() -> None:
    with trio.fail_after(60):
        async with relayed() as setup:
            ticks = method(setup.channel, "unary_stream", "Ticks")

            def call_across_a_graceful_stop() -> list[bytes]:
                call = ticks(b"20", timeout=30)
                received = [next(call)]
                setup.server.server.stop(grace=20)  # GOAWAY now; the open stream may finish
                received += list(call)
                return received

            received = await trio.to_thread.run_sync(call_across_a_graceful_stop)
            assert received == [index.to_bytes(4, "big") for index in range(20)]
            [relay] = setup.listener.relays
            while not relay.ended:  # the server closes its end once the stream is done
                await trio.sleep(0.01)
