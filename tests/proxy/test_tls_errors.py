"""Hostile and broken peers: typed errors within a bound, never a hang."""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import pytest
import trio
import trio.testing

from proxy.errors import TLSHandshakeError, TLSProtocolError, TLSTruncatedError
from proxy.tls import TLSStream
from tests.proxy.test_tls_support import (
    handshake_both,
    make_tls_config,
    memory_tls_pair,
    random_bytes,
    tcp_transport_pair,
)


async def test_server_rejects_client_without_certificate() -> None:
    """A stdlib-ssl client that presents no certificate: our server's handshake
    fails, and the client learns it from the alert."""
    client_context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client_context.check_hostname = False
    client_context.verify_mode = ssl.CERT_NONE
    client_context.minimum_version = ssl.TLSVersion.TLSv1_3
    with trio.fail_after(10):
        async with tcp_transport_pair() as (client_transport, server_transport):
            client = trio.SSLStream(client_transport, client_context)
            server = TLSStream(server_transport, make_tls_config(), server_side=True)

            async def client_side() -> None:
                # TLS 1.3: the client's handshake ends before the server has
                # judged its (missing) certificate; the refusal arrives as an alert.
                await client.do_handshake()
                with pytest.raises(trio.BrokenResourceError) as caught:
                    await client.receive_some(10)
                assert "CERTIFICATE_REQUIRED" in repr(caught.value.__cause__).upper()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(client_side)
                with pytest.raises(TLSHandshakeError, match="(?i)certificate"):
                    await server.do_handshake()
            with pytest.raises(trio.BrokenResourceError):
                await server.receive_some()


@pytest.mark.parametrize("server_side", [True, False])
@pytest.mark.parametrize(
    "garbage",
    [
        random_bytes(4096, seed=5),
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        # A plausible record header (handshake, TLS 1.2) with a body of junk.
        b"\x16\x03\x03\x00\x40" + random_bytes(64, seed=6),
        # A record longer than TLS allows.
        b"\x16\x03\x03\xff\xff" + b"\x00" * 100,
    ],
    ids=["random", "http", "junk-record", "oversized-record"],
)
async def test_garbage_peer_gets_handshake_error(garbage: bytes, server_side: bool) -> None:
    ours, theirs = trio.testing.memory_stream_pair()
    stream = TLSStream(ours, make_tls_config(), server_side=server_side)

    async def peer() -> None:
        if not server_side:
            await theirs.receive_some()  # the ClientHello
        await theirs.send_all(garbage)
        # Stay open and silent: the error must come from the bytes, not an EOF.
        await trio.sleep_forever()

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(peer)
            with pytest.raises(TLSHandshakeError):
                await stream.do_handshake()
            nursery.cancel_scope.cancel()


async def test_garbage_after_handshake_is_protocol_error() -> None:
    with trio.fail_after(5):
        client, server = memory_tls_pair()
        await handshake_both(client, server)
        await client.send_all(b"good data")
        # Bytes injected under the client's TLS, as a tampering middlebox would.
        await client.transport.send_all(b"\x17\x03\x03\x00\x20" + random_bytes(32, seed=7))
        assert await server.receive_some() == b"good data"
        with pytest.raises(TLSProtocolError):
            await server.receive_some()
        with pytest.raises(trio.BrokenResourceError):
            await server.receive_some()


class Middlebox:
    """Sits on the wire between a client and a server TLSStream and forwards
    ciphertext; ``mangle`` (when set) rewrites the next client-to-server chunk."""

    def __init__(self) -> None:
        self.client_transport, self._client_side = trio.testing.memory_stream_pair()
        self._server_side, self.server_transport = trio.testing.memory_stream_pair()
        self.mangle: Callable[[bytes], bytes | None] | None = None

    async def _forward(self, source: trio.abc.Stream, sink: trio.abc.Stream, upstream: bool) -> None:
        while chunk := await source.receive_some():
            if upstream and self.mangle is not None:
                mangle, self.mangle = self.mangle, None
                replacement = mangle(chunk)
                if replacement is None:  # cut the wire here
                    await sink.send_all(chunk[: len(chunk) // 2])
                    await sink.send_eof()
                    return
                chunk = replacement
            await sink.send_all(chunk)
        await sink.send_eof()

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._forward, self._client_side, self._server_side, True)
            nursery.start_soon(self._forward, self._server_side, self._client_side, False)


@asynccontextmanager
async def through_middlebox() -> AsyncIterator[tuple[TLSStream, TLSStream, Middlebox]]:
    box = Middlebox()
    client = TLSStream(box.client_transport, make_tls_config(), server_side=False)
    server = TLSStream(box.server_transport, make_tls_config(), server_side=True)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(box.run)
        await handshake_both(client, server)
        yield client, server, box
        nursery.cancel_scope.cancel()


def flip_last_bit(chunk: bytes) -> bytes:
    return chunk[:-1] + bytes([chunk[-1] ^ 1])


async def test_tampered_record_is_protocol_error() -> None:
    with trio.fail_after(5):
        async with through_middlebox() as (client, server, box):
            box.mangle = flip_last_bit
            await client.send_all(b"x" * 1000)
            with pytest.raises(TLSProtocolError):
                await server.receive_some()


async def test_wire_cut_mid_record_is_truncation() -> None:
    with trio.fail_after(5):
        async with through_middlebox() as (client, server, box):
            box.mangle = lambda chunk: None
            await client.send_all(b"y" * 5000)
            with pytest.raises(TLSTruncatedError):
                await server.receive_some()


async def test_peer_closing_during_handshake() -> None:
    ours, theirs = trio.testing.memory_stream_pair()
    stream = TLSStream(ours, make_tls_config(), server_side=False)

    async def peer() -> None:
        await theirs.receive_some()
        await theirs.aclose()

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(peer)
            with pytest.raises(TLSHandshakeError, match="closed"):
                await stream.do_handshake()


async def test_peer_resetting_during_handshake() -> None:
    with trio.fail_after(5):
        async with tcp_transport_pair() as (client_transport, server_transport):
            stream = TLSStream(client_transport, make_tls_config(), server_side=False)

            async def peer() -> None:
                await server_transport.receive_some()
                # Unread data + close makes the kernel send RST.
                server_transport.socket.close()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(peer)
                with pytest.raises(TLSHandshakeError):
                    await stream.do_handshake()


# The cancel-scope tests run on virtual time (memory streams only): the caller's
# deadline expires exactly when the operation is blocked, however slow the machine.


async def test_handshake_bounded_by_callers_cancel_scope(virtual_clock: trio.testing.MockClock) -> None:
    ours, theirs = trio.testing.memory_stream_pair()  # the peer never answers
    stream = TLSStream(ours, make_tls_config(), server_side=False)
    with trio.fail_after(5):
        with trio.move_on_after(0.2) as scope:
            await stream.do_handshake()
        assert scope.cancelled_caught
        # A half-done handshake cannot be resumed safely: the stream is broken.
        with pytest.raises(trio.BrokenResourceError):
            await stream.send_all(b"x")
        await stream.aclose()
        with pytest.raises(trio.ClosedResourceError):
            await stream.receive_some()


async def test_cancelled_receive_loses_nothing_and_breaks_nothing(virtual_clock: trio.testing.MockClock) -> None:
    with trio.fail_after(5):
        client, server = memory_tls_pair()
        await handshake_both(client, server)
        with trio.move_on_after(0.05) as scope:
            await server.receive_some()  # nothing sent yet
        assert scope.cancelled_caught
        await client.send_all(b"after the cancel")
        assert await server.receive_some() == b"after the cancel"


async def test_cancelled_send_midway_breaks_the_stream(virtual_clock: trio.testing.MockClock) -> None:
    with trio.fail_after(5):
        client, server = memory_tls_pair(pair_maker=trio.testing.lockstep_stream_pair)
        await handshake_both(client, server)
        with trio.move_on_after(0.05) as scope:
            await client.send_all(b"z" * 100_000)  # nobody reads: blocks in the transport
        assert scope.cancelled_caught
        # Part of a record may be on the wire: the stream cannot go on.
        with pytest.raises(trio.BrokenResourceError, match="cancelled midway"):
            await client.send_all(b"more")
        await client.aclose()
        await server.aclose()
