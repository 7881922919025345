"""UtpStream over two real endpoints on loopback."""

from __future__ import annotations

import hashlib
import random

import pytest
import trio
import trio.testing

from nat import UtpStream, open_endpoint
from nat.utp.config import UtpConfig

from .conftest import connect_pair

SMALL_BUFFERS = UtpConfig(recv_buffer_size=64 * 1024, send_buffer_size=64 * 1024)
# A closed connection lingers (re-ACKing a lost FIN) before data to it gets a
# RESET; short here so "peer closed -> BrokenResourceError" comes quickly.
SHORT_LINGER = UtpConfig(linger_time=0.3)
SHORT_LINGER_SMALL = UtpConfig(recv_buffer_size=64 * 1024, send_buffer_size=64 * 1024, linger_time=0.3)


async def _receive_all(stream: UtpStream) -> bytes:
    received = bytearray()
    while chunk := await stream.receive_some():
        received += chunk
    return bytes(received)


async def clog(sender: UtpStream, receiver: UtpStream) -> None:
    window = SMALL_BUFFERS.recv_buffer_size - 2 * SMALL_BUFFERS.mtu_payload
    for _ in range(1000):
        free = sender.connection.send_buffer_free
        if free == 0 and receiver.connection.readable_bytes >= window:
            return
        if free:
            await sender.send_all(b"x" * free)  # exactly the free space: never blocks
        await trio.sleep(0.002)
    raise AssertionError("the stream never clogged: no backpressure")


@pytest.mark.parametrize("offload", [False, True], ids=["plain", "offload"])
async def test_check_half_closeable_stream(offload: bool) -> None:
    async with (
        open_endpoint(config=SHORT_LINGER, close_timeout=2.0, offload=offload) as a,
        open_endpoint(config=SHORT_LINGER, close_timeout=2.0, offload=offload) as b,
        open_endpoint(config=SHORT_LINGER_SMALL, close_timeout=2.0, offload=offload) as small_a,
        open_endpoint(config=SHORT_LINGER_SMALL, close_timeout=2.0, offload=offload) as small_b,
    ):

        async def stream_maker() -> tuple[UtpStream, UtpStream]:
            return await connect_pair(a, b)

        async def clogged_stream_maker() -> tuple[UtpStream, UtpStream]:
            client, server = await connect_pair(small_a, small_b)
            # Both ways (the suite also flips the pair): fill the peer's receive
            # buffer and then our send buffer, so send_all blocks until the
            # other side reads.
            for sender, receiver in ((client, server), (server, client)):
                await clog(sender, receiver)
            return client, server

        with trio.fail_after(120):
            await trio.testing.check_half_closeable_stream(stream_maker, clogged_stream_maker)


async def test_half_close_both_ways() -> None:
    async with open_endpoint() as a, open_endpoint() as b:
        client, server = await connect_pair(a, b)
        request = random.Random(1).randbytes(200_000)
        reply = random.Random(2).randbytes(300_000)
        with trio.fail_after(20):
            await client.send_all(request)
            await client.send_eof()
            assert await _receive_all(server) == request
            # The server can still talk after the client's EOF.
            await server.send_all(reply)
            await server.send_eof()
            assert await _receive_all(client) == reply
            assert await client.receive_some(10) == b""
        assert client.bytes_sent == len(request) and client.bytes_received == len(reply)
        await client.aclose()
        await server.aclose()


async def test_backpressure_stops_the_sender_and_bounds_memory() -> None:
    async with open_endpoint(config=SMALL_BUFFERS) as a, open_endpoint(config=SMALL_BUFFERS) as b:
        client, server = await connect_pair(a, b)
        data = random.Random(3).randbytes(4 * 1024 * 1024)
        sent = trio.Event()

        async def sender() -> None:
            await client.send_all(data)
            await client.send_eof()
            sent.set()

        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(sender)
                await trio.sleep(0.5)  # let the window fill while nobody reads
                assert not sent.is_set()
                # Bounded: what left the sender's buffer is at most what the
                # receiver buffers (plus one packet in flight).
                assert server.bytes_received <= SMALL_BUFFERS.recv_buffer_size + 1500
                received = await _receive_all(server)
        assert hashlib.sha256(received).digest() == hashlib.sha256(data).digest()
        await client.aclose()
        await server.aclose()


async def test_graceful_aclose_delivers_everything() -> None:
    async with open_endpoint() as a, open_endpoint() as b:
        client, server = await connect_pair(a, b)
        data = random.Random(4).randbytes(500_000)
        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:

                async def send_then_close() -> None:
                    await client.send_all(data)
                    await client.aclose()

                nursery.start_soon(send_then_close)
                assert await _receive_all(server) == data
            await server.aclose()
        assert a.connection_count == 0
        assert b.connection_count == 0


async def test_many_concurrent_streams() -> None:
    async with open_endpoint() as a, open_endpoint() as b:
        pairs = [await connect_pair(a, b) for _ in range(8)]
        payloads = [random.Random(10 + i).randbytes(100_000 + i) for i in range(8)]
        results: dict[int, bytes] = {}

        async def one(index: int) -> None:
            client, server = pairs[index]
            await client.send_all(payloads[index])
            await client.send_eof()
            results[index] = await _receive_all(server)

        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                for index in range(8):
                    nursery.start_soon(one, index)
        assert [results[i] for i in range(8)] == payloads
        for client, server in pairs:
            await client.aclose()
            await server.aclose()


async def test_aclose_after_our_eof_was_acknowledged_does_not_wait() -> None:
    async with open_endpoint(close_timeout=30) as a, open_endpoint(close_timeout=30) as b:
        client, server = await connect_pair(a, b)
        await client.send_all(b"request")
        await client.send_eof()
        with trio.fail_after(5):
            assert await _receive_all(server) == b"request"
            while not client.connection.all_data_acked:  # our FIN acknowledged
                await trio.sleep(0.001)
            await client.aclose()  # nothing left to wait for
            # The server, still writing, learns that nobody reads any more.
            with pytest.raises(trio.BrokenResourceError):
                for _ in range(1000):
                    await server.send_all(b"x" * 1000)
                    await trio.sleep(0.001)
        await server.aclose()


async def test_segmentation_offload_transfer() -> None:
    """UDP GSO/GRO on both ends (and towards a plain endpoint): same bytes."""
    data = random.Random(9).randbytes(6 * 1024 * 1024)
    async with (
        open_endpoint(offload=True) as a,
        open_endpoint(offload=True) as b,
        open_endpoint() as plain,
    ):
        for sender_endpoint, receiver_endpoint in ((a, b), (a, plain), (plain, b)):
            client, server = await connect_pair(sender_endpoint, receiver_endpoint)
            with trio.fail_after(30):
                async with trio.open_nursery() as nursery:

                    async def send(stream: UtpStream, payload: bytes) -> None:
                        await stream.send_all(payload)
                        await stream.send_eof()

                    nursery.start_soon(send, client, data)
                    nursery.start_soon(send, server, data[::-1])
                    received = await _receive_all(server)
                    echoed = await _receive_all(client)
            assert hashlib.sha256(received).digest() == hashlib.sha256(data).digest()
            assert hashlib.sha256(echoed).digest() == hashlib.sha256(data[::-1]).digest()
            await client.aclose()
            await server.aclose()
        for endpoint in (a, b):
            assert endpoint.stats.offload_failures == 0
        # Runs really went out segmented: far fewer sends than datagrams.
        assert 0 < a.stats.segmented_sends < a.stats.datagrams_sent // 2
