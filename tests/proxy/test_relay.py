"""The relay (proxy/relay.py) on its own: real uTP endpoints, real TLS, real TCP.

Each test joins a local TCP connection to TLS over uTP with ``relay`` on one side;
the other side is a plain TLSStream over the peer's UtpStream, so the test can do
what a misbehaving remote node would: end uTP without close_notify, send bytes
that are not TLS, fall silent. The proxy-level tests (test_proxy*.py) cover the
relay inside whole connections; these pin down its own paths.
"""

from __future__ import annotations

import hashlib
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import pytest
import trio
import trio.testing

import proxy.tunnel.splice as relay_module
from nat import open_endpoint
from nat.stream import UtpStream
from proxy.errors import ConnectionKeepAliveTimeout, TLSProtocolError, TLSTruncatedError
from proxy.tls import TLSStream
from proxy.tunnel.connection import EndReason
from proxy.tunnel.peer import Peer, PeerTimers
from proxy.tunnel.splice import PipeOutcome, relay
from tests.proxy.test_tls_support import handshake_both, make_tls_config, random_bytes


@dataclass
class Rig:
    app: trio.SocketStream  # the local application's end of the TCP connection
    local: trio.SocketStream  # the relay's end of it
    tls: TLSStream  # the relay's TLS over uTP
    remote: TLSStream  # the other node's TLS over uTP, driven by the test
    remote_utp: UtpStream
    peer: Peer


@asynccontextmanager
async def rig(*, app_receive_buffer: int | None = None) -> AsyncIterator[Rig]:
    async with open_endpoint() as near, open_endpoint() as far:
        accepted: list[UtpStream] = []
        async with trio.open_nursery() as nursery:

            async def accept() -> None:
                accepted.append(await far.accept())

            nursery.start_soon(accept)
            near_utp = await near.connect(far.address)
        tls = TLSStream(near_utp, make_tls_config(1), server_side=False)
        remote = TLSStream(accepted[0], make_tls_config(2), server_side=True)
        await handshake_both(tls, remote)

        listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
        app_socket = trio.socket.socket()
        if app_receive_buffer is not None:
            # A small window on the application's side makes the relay's writes
            # meet a full socket (its BLOCKED path).
            app_socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, app_receive_buffer)
        await app_socket.connect(listener.socket.getsockname())
        app = trio.SocketStream(app_socket)
        local = await listener.accept()
        await listener.aclose()
        if app_receive_buffer is not None:
            local.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, app_receive_buffer)
        peer = Peer(near, far.address, PeerTimers())  # not run: the test decides its death
        try:
            yield Rig(app, local, tls, remote, accepted[0], peer)
        finally:
            for stream in (app, local, tls, remote):
                await trio.aclose_forcefully(stream)


@asynccontextmanager
async def relaying(r: Rig) -> AsyncIterator[list[PipeOutcome]]:
    """Run the relay for the block; the block's end waits for the relay to end,
    and the list then holds its outcome."""
    outcome: list[PipeOutcome] = []
    async with trio.open_nursery() as nursery:

        async def run() -> None:
            outcome.append(await relay(r.local, r.tls, r.peer))

        nursery.start_soon(run)
        yield outcome


async def read_to_eof(stream: trio.abc.ReceiveStream, pace: float = 0.0) -> bytes:
    chunks = []
    while data := await stream.receive_some(65536):
        chunks.append(data)
        if pace:
            await trio.sleep(pace)
    return b"".join(chunks)


async def test_both_directions_with_half_close_and_counts() -> None:
    upload, download = random_bytes(3 << 20, seed=1), random_bytes(2 << 20, seed=2)
    with trio.fail_after(60):
        async with rig() as r:
            got: dict[str, bytes] = {}
            async with relaying(r) as outcome, trio.open_nursery() as nursery:
                async def app() -> None:
                    await r.app.send_all(upload)
                    await r.app.send_eof()  # the local side ends first ...
                    got["download"] = await read_to_eof(r.app)

                async def remote() -> None:
                    got["upload"] = await read_to_eof(r.remote)
                    await r.remote.send_all(download)  # ... while the reply still flows
                    await r.remote.send_eof()

                nursery.start_soon(app)
                nursery.start_soon(remote)
            assert hashlib.sha256(got["upload"]).digest() == hashlib.sha256(upload).digest()
            assert hashlib.sha256(got["download"]).digest() == hashlib.sha256(download).digest()
            (result,) = outcome
            assert result.error is None
            assert (result.first_eof, result.local_eof, result.peer_eof) == ("local", True, True)
            assert (result.bytes_to_peer, result.bytes_from_peer) == (len(upload), len(download))
            assert result.reason is EndReason.CLOSED_LOCALLY
            assert r.tls.transport.on_readable is None  # the relay unhooked itself


async def test_slow_local_reader_gets_every_byte_with_backpressure(monkeypatch: pytest.MonkeyPatch) -> None:
    download = random_bytes(8 << 20, seed=3)
    drains = []
    original_drain = relay_module._Relay._drain_pending

    async def counted_drain(self: relay_module._Relay) -> None:
        drains.append(len(self.pending or b""))
        await original_drain(self)

    monkeypatch.setattr(relay_module._Relay, "_drain_pending", counted_drain)
    with trio.fail_after(90):
        async with rig(app_receive_buffer=16384) as r:
            got: dict[str, bytes] = {}
            read_so_far = [0]
            read_when_remote_done: list[int] = []
            async with relaying(r) as outcome, trio.open_nursery() as nursery:
                async def app() -> None:
                    chunks = []
                    while data := await r.app.receive_some(65536):
                        chunks.append(data)
                        read_so_far[0] += len(data)
                        await trio.sleep(0.002)
                    got["download"] = b"".join(chunks)
                    await r.app.send_eof()

                async def remote() -> None:
                    await r.remote.send_all(download)
                    read_when_remote_done.append(read_so_far[0])
                    await r.remote.send_eof()
                    assert await read_to_eof(r.remote) == b""

                nursery.start_soon(app)
                nursery.start_soon(remote)
            assert hashlib.sha256(got["download"]).digest() == hashlib.sha256(download).digest()
            (result,) = outcome
            assert result.error is None and result.first_eof == "peer"
            assert result.reason is EndReason.CLOSED_BY_PEER
            assert drains, "the relay never met a full socket: the test did not slow the reader down"
            # Backpressure: the remote's send_all could only finish once the reader
            # had taken all but what the buffers in between hold (uTP send and
            # receive buffers, 1 MiB each; the relay's pending chunk and TLS input,
            # 256 KiB each; the socket buffers).
            assert read_when_remote_done[0] >= len(download) - (3 << 20) - (512 << 10)


async def test_data_that_came_with_the_handshake_is_delivered() -> None:
    with trio.fail_after(20):
        async with rig() as r:
            # Sent (and arrived) before the relay started: it must be in the
            # TLS or uTP buffers, where only the relay's first pump finds it.
            before = r.tls.transport.bytes_received
            await r.remote.send_all(b"early bytes")
            # Until it arrived (its TLS record is one small datagram: all or nothing).
            while r.tls.transport.bytes_received - before < len(b"early bytes"):
                await trio.sleep(0.001)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(relay, r.local, r.tls, r.peer)
                assert await r.app.receive_some(100) == b"early bytes"
                nursery.cancel_scope.cancel()
            assert r.tls.transport.on_readable is None


async def test_transport_end_without_close_notify_is_truncation() -> None:
    with trio.fail_after(20):
        async with rig() as r:
            async with relaying(r) as outcome:
                await r.remote.send_all(b"last words")
                assert await r.app.receive_some(100) == b"last words"
                await r.remote_utp.send_eof()  # uTP FIN, no TLS close_notify
            (result,) = outcome
            assert isinstance(result.error, TLSTruncatedError)
            assert result.reason is EndReason.RESET


async def test_bytes_that_are_not_tls_fail_the_relay_not_the_endpoint() -> None:
    with trio.fail_after(20):
        async with rig() as r:
            async with relaying(r) as outcome:
                await r.remote_utp.send_all(b"\x17\x03\x03\x00\x20" + b"\xee" * 32)  # a forged record
            (result,) = outcome
            assert isinstance(result.error, TLSProtocolError)
            assert result.reason is EndReason.RESET
            # The endpoint that ran the failing callback still serves connections.
            endpoint = r.tls.transport._endpoint
            assert not endpoint.closed
            async with open_endpoint() as other, trio.open_nursery() as nursery:
                nursery.start_soon(other.accept)
                fresh = await endpoint.connect(other.address)
                await fresh.send_all(b"x")
                nursery.cancel_scope.cancel()


async def test_peer_death_ends_the_relay_with_keep_alive_timeout() -> None:
    with trio.fail_after(20):
        async with rig() as r:
            async with relaying(r) as outcome:
                await trio.testing.wait_all_tasks_blocked()  # the relay runs and waits
                r.peer.death = ConnectionKeepAliveTimeout("peer fell silent")
                r.peer.died.set()
            (result,) = outcome
            assert result.error is r.peer.death
            assert result.reason is EndReason.KEEP_ALIVE_TIMEOUT
            assert r.tls.transport.on_readable is None


async def test_local_reset_is_reported_as_an_error() -> None:
    with trio.fail_after(20):
        async with rig() as r:
            async with relaying(r) as outcome:
                await r.remote.send_all(b"ping")
                assert await r.app.receive_some(100) == b"ping"
                # RST instead of FIN: SO_LINGER with a zero timeout, then close.
                r.app.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                r.app.socket.close()
                await r.remote.send_all(b"more")
            (result,) = outcome
            assert isinstance(result.error, OSError)
            assert result.reason is EndReason.RESET
