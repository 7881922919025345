"""TLSStream over memory streams and real TCP on loopback."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.errors import CertChainUnclaimed, CertificateChainError, TLSError, TLSProtocolError, TLSTruncatedError
from proxy.identity.certificates import certificate_node_id
from proxy.identity.verification import verify_client_certificate_chain, verify_server_certificate_chain
from proxy.tls import TLSStream
from tests.proxy.test_tls_support import (
    handshake_both,
    make_foreign_tls_config,
    make_tls_config,
    memory_tls_pair,
    random_bytes,
    receive_until_eof,
    send_all_then_eof,
    tcp_transport_pair,
)

TRANSPORTS = ["memory", "tcp"]


@asynccontextmanager
async def tls_pair(
    transport: str, client_config: object | None = None, server_config: object | None = None
) -> AsyncIterator[tuple[TLSStream, TLSStream]]:
    """A (client, server) TLSStream pair, handshake not yet done."""
    client_config = client_config or make_tls_config()
    server_config = server_config or make_tls_config()
    if transport == "memory":
        client, server = memory_tls_pair(client_config, server_config)
        try:
            yield client, server
        finally:
            await trio.aclose_forcefully(client)
            await trio.aclose_forcefully(server)
    else:
        async with tcp_transport_pair() as (client_transport, server_transport):
            client = TLSStream(client_transport, client_config, server_side=False)
            server = TLSStream(server_transport, server_config, server_side=True)
            try:
                yield client, server
            finally:
                await trio.aclose_forcefully(client)
                await trio.aclose_forcefully(server)


def der_chain(chain: object) -> list[bytes]:
    from cryptography.hazmat.primitives.serialization import Encoding

    return [certificate.public_bytes(Encoding.DER) for certificate in chain]  # type: ignore[attr-defined]


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_handshake_tls13_and_peer_chains(transport: str) -> None:
    client_config = make_tls_config(3)
    server_config = make_tls_config(2)
    with trio.fail_after(10):
        async with tls_pair(transport, client_config, server_config) as (client, server):
            with pytest.raises(TLSError):
                client.peer_certificate_chain  # noqa: B018 - before the handshake
            await handshake_both(client, server)
            assert client.tls_version == server.tls_version == "TLSv1.3"
            # Both sides see the other's full chain, leaf first, in order.
            assert der_chain(client.peer_certificate_chain) == der_chain(server_config.certificate_chain)
            assert der_chain(server.peer_certificate_chain) == der_chain(client_config.certificate_chain)
            # do_handshake is idempotent
            await client.do_handshake()
            await server.do_handshake()


async def test_first_send_and_receive_run_the_handshake() -> None:
    with trio.fail_after(10):
        async with tls_pair("memory") as (client, server):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(client.send_all, b"hello")
                assert await server.receive_some() == b"hello"
            assert client.handshake_done and server.handshake_done


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_bulk_both_directions_concurrently(transport: str) -> None:
    size = 6 * 1024 * 1024
    upload = random_bytes(size, seed=1)
    download = random_bytes(size, seed=2)
    results: dict[str, bytes] = {}

    async def collect(name: str, stream: TLSStream) -> None:
        results[name] = await receive_until_eof(stream)

    with trio.fail_after(30):
        async with tls_pair(transport) as (client, server):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(send_all_then_eof, client, upload, 1 << 20)
                nursery.start_soon(send_all_then_eof, server, download, 37_000)
                nursery.start_soon(collect, "server", server)
                nursery.start_soon(collect, "client", client)
    assert hashlib.sha256(results["server"]).digest() == hashlib.sha256(upload).digest()
    assert hashlib.sha256(results["client"]).digest() == hashlib.sha256(download).digest()


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_half_close_both_ways(transport: str) -> None:
    with trio.fail_after(10):
        async with tls_pair(transport) as (client, server):
            await handshake_both(client, server)
            await client.send_all(b"request")
            await client.send_eof()  # close_notify: the client is done sending
            with pytest.raises(trio.ClosedResourceError):
                await client.send_all(b"more")
            await client.send_eof()  # idempotent
            assert await receive_until_eof(server) == b"request"
            assert await server.receive_some() == b""  # stays at EOF
            # The server can still answer after the client's close_notify ...
            reply = random_bytes(300_000, seed=3)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(send_all_then_eof, server, reply)
                assert await receive_until_eof(client) == reply
            await client.aclose()
            await server.aclose()


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_server_half_closes_first(transport: str) -> None:
    with trio.fail_after(10):
        async with tls_pair(transport) as (client, server):
            await handshake_both(client, server)
            await server.send_all(b"banner")
            await server.send_eof()
            assert await receive_until_eof(client) == b"banner"
            async with trio.open_nursery() as nursery:
                nursery.start_soon(send_all_then_eof, client, b"answer")
                assert await receive_until_eof(server) == b"answer"


async def test_aclose_sends_close_notify() -> None:
    with trio.fail_after(10):
        async with tls_pair("tcp") as (client, server):
            await handshake_both(client, server)
            await client.send_all(b"last words")
            await client.aclose()
            assert await receive_until_eof(server) == b"last words"


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_transport_eof_without_close_notify_is_truncation(transport: str) -> None:
    with trio.fail_after(10):
        async with tls_pair(transport) as (client, server):
            await handshake_both(client, server)
            await client.send_all(b"partial")
            await client.transport.send_eof()  # transport EOF, no close_notify
            assert await server.receive_some() == b"partial"
            with pytest.raises(TLSTruncatedError):
                await server.receive_some()
            # the stream stays broken
            with pytest.raises(trio.BrokenResourceError):
                await server.receive_some()


async def test_receive_some_limits_and_gathers_records() -> None:
    with trio.fail_after(10):
        async with tls_pair("memory") as (client, server):
            await handshake_both(client, server)
            data = random_bytes(200_000, seed=4)
            await client.send_all(data)
            first = await server.receive_some(5)
            assert first == data[:5]
            # Several buffered records come back in one call, up to max_bytes.
            second = await server.receive_some(100_000)
            assert second == data[5:100_005]
            rest = bytearray()
            while len(rest) < len(data) - 100_005:
                rest += await server.receive_some()
            assert bytes(rest) == data[100_005:]
            with pytest.raises(ValueError):
                await server.receive_some(0)
            with pytest.raises(TypeError):
                await server.receive_some(1.5)  # type: ignore[arg-type]


async def test_send_accepts_bytearray_memoryview_and_empty() -> None:
    with trio.fail_after(10):
        async with tls_pair("memory") as (client, server):
            await handshake_both(client, server)
            await client.send_all(b"")
            await client.send_all(bytearray(b"ab"))
            await client.send_all(memoryview(b"cd"))
            await client.send_all(memoryview(bytearray(b"ef")))
            await client.send_eof()
            assert await receive_until_eof(server) == b"abcdef"


async def test_key_errors_are_typed() -> None:
    config = make_foreign_tls_config()
    stranger = make_foreign_tls_config()
    mismatched = type(config)(private_key=stranger.private_key, certificate_chain=config.certificate_chain)
    client_transport, _ = trio.testing.memory_stream_pair()
    with pytest.raises(TLSError):
        TLSStream(client_transport, mismatched, server_side=False)
    empty = type(config)(private_key=config.private_key, certificate_chain=())
    with pytest.raises(TLSError):
        TLSStream(client_transport, empty, server_side=True)


async def test_protocol_errors_are_broken_resource_errors() -> None:
    # Generic trio code (a relay loop) sees TLS failures as a broken stream.
    assert issubclass(TLSProtocolError, trio.BrokenResourceError)
    assert issubclass(TLSTruncatedError, TLSProtocolError)


async def test_open_tls_stream_both_roles_and_failure_closes_transport() -> None:
    from proxy import TLSStream as ExportedTLSStream
    from proxy import open_tls_stream

    assert ExportedTLSStream is TLSStream
    client_transport, server_transport = trio.testing.memory_stream_pair()
    streams: dict[str, TLSStream] = {}

    async def open_one(name: str, transport: trio.abc.Stream, server_side: bool) -> None:
        streams[name] = await open_tls_stream(transport, make_tls_config(), server_side=server_side)

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(open_one, "client", client_transport, False)
            nursery.start_soon(open_one, "server", server_transport, True)
        assert streams["client"].handshake_done and streams["server"].handshake_done
        ours, theirs = trio.testing.memory_stream_pair()
        await theirs.send_all(b"not TLS at all, not even close" * 10)
        with pytest.raises(TLSError):
            await open_tls_stream(ours, make_tls_config(), server_side=True)
        with pytest.raises(trio.ClosedResourceError):
            await ours.send_all(b"x")  # closed by open_tls_stream


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_each_side_verifies_the_other_with_proxy_verification(transport: str) -> None:
    client_config = make_tls_config(2)
    server_config = make_tls_config(3)
    with trio.fail_after(10):
        async with tls_pair(transport, client_config, server_config) as (client, server):
            await handshake_both(client, server)
            server_chain = client.peer_certificate_chain
            # The forward side knows whom it wants: the current key, or an older
            # key of the same node further up the rotation chain.
            assert verify_server_certificate_chain([server_config.node_id], server_chain) == server_config.node_id
            root_id = certificate_node_id(server_config.certificate_chain[-1])
            assert verify_server_certificate_chain([root_id], server_chain) == root_id
            # The reverse side learns who called.
            assert verify_client_certificate_chain(server.peer_certificate_chain) == client_config.node_id


async def test_wrong_chain_passes_tls_but_fails_verification() -> None:
    """The TLS layer accepts any chain (by design); verification rejects it."""
    foreign = make_foreign_tls_config(2)
    stranger = make_tls_config()
    with trio.fail_after(10):
        async with tls_pair("tcp", foreign, stranger) as (client, server):
            await handshake_both(client, server)
            with pytest.raises(CertChainUnclaimed):
                verify_server_certificate_chain([make_tls_config().node_id], client.peer_certificate_chain)
            with pytest.raises(CertificateChainError):
                verify_client_certificate_chain(server.peer_certificate_chain)


class OneWayClosingStream(trio.abc.Stream):
    """A transport that cannot half-close (a plain trio Stream)."""

    def __init__(self, inner: trio.abc.Stream) -> None:
        self.inner = inner

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        return await self.inner.receive_some(max_bytes)

    async def aclose(self) -> None:
        await self.inner.aclose()


async def test_half_close_over_a_transport_that_cannot_half_close() -> None:
    """close_notify alone carries the EOF: the transport stays open both ways."""
    a, b = trio.testing.memory_stream_pair()
    client = TLSStream(OneWayClosingStream(a), make_tls_config(), server_side=False)
    server = TLSStream(OneWayClosingStream(b), make_tls_config(), server_side=True)
    with trio.fail_after(10):
        await handshake_both(client, server)
        await client.send_all(b"question")
        await client.send_eof()
        assert await receive_until_eof(server) == b"question"
        await server.send_all(b"answer")
        await server.send_eof()
        assert await receive_until_eof(client) == b"answer"
        await client.aclose()
        await server.aclose()


async def test_many_concurrent_connections_over_tcp() -> None:
    """One TLS server config, one client config, many connections at once (the
    proxy's shape): each echoes its own data back intact."""
    client_config, server_config = make_tls_config(2), make_tls_config()
    count = 40
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    echoed: dict[int, bytes] = {}

    async def serve(transport: trio.SocketStream) -> None:
        async with TLSStream(transport, server_config, server_side=True) as stream:
            while chunk := await stream.receive_some():
                await stream.send_all(chunk)
            await stream.send_eof()

    async def call(index: int) -> None:
        transport = await trio.open_tcp_stream("127.0.0.1", port)
        async with TLSStream(transport, client_config, server_side=False) as stream:
            data = random_bytes(50_000 + index, seed=100 + index)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(send_all_then_eof, stream, data, 7_000)
                echoed[index] = await receive_until_eof(stream)
            assert echoed[index] == data

    with trio.fail_after(30):
        async with trio.open_nursery() as server_nursery:
            await server_nursery.start(trio.serve_listeners, serve, listeners)
            async with trio.open_nursery() as nursery:
                for index in range(count):
                    nursery.start_soon(call, index)
            server_nursery.cancel_scope.cancel()
    assert len(echoed) == count


CLIENT_FOR_PROPERTY, SERVER_FOR_PROPERTY = make_tls_config(), make_tls_config()


@settings(max_examples=25, deadline=None)
@given(
    sends=st.lists(st.integers(min_value=0, max_value=40_000), max_size=6),
    # Tiny limits (1..16 KiB) are covered by the conformance suite; here the
    # limits cut across records and across several buffered records.
    receive_sizes=st.lists(st.integers(min_value=500, max_value=100_000), min_size=1, max_size=8),
)
def test_any_chunking_delivers_the_same_bytes(sends: list[int], receive_sizes: list[int]) -> None:
    """Whatever the send_all sizes and receive_some limits, bytes in == bytes out,
    never more than max_bytes per call, and the EOF comes after the last byte."""

    async def scenario() -> None:
        client, server = memory_tls_pair(CLIENT_FOR_PROPERTY, SERVER_FOR_PROPERTY)
        data = random_bytes(sum(sends), seed=len(sends))
        received = bytearray()

        async def send() -> None:
            offset = 0
            for size in sends:
                await client.send_all(data[offset : offset + size])
                offset += size
            await client.send_eof()

        async def receive() -> None:
            for call in range(len(data) + 2):  # each call yields >= 1 byte, or the EOF
                limit = receive_sizes[call % len(receive_sizes)]
                chunk = await server.receive_some(limit)
                assert len(chunk) <= limit
                if not chunk:
                    return
                received.extend(chunk)
            raise AssertionError("no EOF")

        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(send)
                nursery.start_soon(receive)
        assert bytes(received) == data

    trio.run(scenario)
