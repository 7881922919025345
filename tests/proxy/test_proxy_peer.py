"""Per-peer punch/keep-alive state.

The timers' pacing and the keep-alive timeout run on trio's MockClock over an
in-memory stand-in for the endpoint's message API, so they are checked to the
tick and take no wall time; the PING/PONG exchange runs over a real endpoint and
a bare UDP socket as the far side.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager

import pytest
import trio
import trio.testing

from nat import open_endpoint
from nat.message import PING, PONG, decode_message, encode_message
from proxy.errors import ConnectionKeepAliveTimeout
from proxy.tunnel.peer import Address, PeerRegistry, PeerTimers, normalize_address
from tests.proxy.test_proxy_support import virtual

FAR: Address = ("192.0.2.7", 4000)


@asynccontextmanager
async def registry(timers: PeerTimers) -> AsyncIterator[tuple[PeerRegistry, tuple[str, int]]]:
    async with open_endpoint("127.0.0.1", 0) as endpoint:
        peers = PeerRegistry(endpoint, timers)
        async with trio.open_nursery() as nursery:
            await nursery.start(peers.run)
            yield peers, endpoint.address
            nursery.cancel_scope.cancel()


class MemoryEndpoint:
    """The part of nat.Endpoint that peers use (send_message, subscribe_messages), in
    memory: sent messages are recorded with the trio time they left at, and the
    test hands messages in with ``deliver``. No socket, so nothing is ever in
    flight while MockClock jumps."""

    def __init__(self) -> None:
        self.sent: list[tuple[float, int, Address]] = []
        self._subscribers: list[trio.MemorySendChannel[tuple[int, Address]]] = []

    def send_message(self, message: int | bytes, address: tuple[object, ...]) -> None:
        assert isinstance(message, int)
        self.sent.append((trio.current_time(), message, normalize_address(address)))

    @contextmanager
    def subscribe_messages(self) -> Iterator[trio.MemoryReceiveChannel[tuple[int, Address]]]:
        send, receive = trio.open_memory_channel[tuple[int, Address]](math.inf)
        self._subscribers.append(send)
        try:
            with receive:
                yield receive
        finally:
            self._subscribers.remove(send)

    def deliver(self, message: int, address: Address) -> None:
        for subscriber in self._subscribers:
            subscriber.send_nowait((message, address))

    def pings_since(self, start: float) -> list[float]:
        """When each PING left, relative to ``start``."""
        return [at - start for at, message, _ in self.sent if message == PING and at >= start]


@asynccontextmanager
async def memory_registry(timers: PeerTimers) -> AsyncIterator[tuple[PeerRegistry, MemoryEndpoint]]:
    endpoint = MemoryEndpoint()
    peers = PeerRegistry(endpoint, timers)
    async with trio.open_nursery() as nursery:
        await nursery.start(peers.run)
        yield peers, endpoint
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def bare_udp() -> AsyncIterator[trio.socket.SocketType]:
    sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM)
    with sock:
        await sock.bind(("127.0.0.1", 0))
        yield sock


async def receive_message(sock: trio.socket.SocketType) -> tuple[int, tuple[str, int]]:
    data, address = await sock.recvfrom(2048)
    return decode_message(data), address


def test_normalize_address() -> None:
    assert normalize_address(("::ffff:127.0.0.1", 5, 0, 0)) == ("127.0.0.1", 5)
    assert normalize_address(("0:0::1", 5)) == ("::1", 5)
    assert normalize_address(("fe80::1%eth0", 5, 0, 2)) == ("fe80::1", 5)
    assert normalize_address(("example.org", "7")) == ("example.org", 7)


async def test_punch_until_heard_then_keep_alive_pacing(virtual_clock: trio.testing.MockClock) -> None:
    timers = PeerTimers(punch_interval=0.02, keep_alive_interval=10.0, keep_alive_timeout=30.0)
    with trio.fail_after(60):
        async with memory_registry(timers) as (peers, endpoint):
            start = trio.current_time()
            async with peers.use(FAR) as peer:
                await trio.sleep(0.09)
                # Punching: a PING at once, then one every punch_interval while unheard.
                assert endpoint.pings_since(start) == virtual([0.0, 0.02, 0.04, 0.06, 0.08])
                assert {address for _, _, address in endpoint.sent} == {FAR}
                assert not peer.heard.is_set()
                endpoint.deliver(PONG, FAR)
                heard_at = trio.current_time()
                await peer.wait_heard()
                await trio.sleep(25.0)
                # Keep-alive pacing now: one PING as the pacing switches, then one per
                # keep_alive_interval (10 s); no burst of punches.
                assert endpoint.pings_since(heard_at) == virtual([0.0, 10.0, 20.0])
                assert peer.pings_sent == 8
                assert not peer.died.is_set()


async def test_ping_is_answered_with_pong_and_heard() -> None:
    timers = PeerTimers(punch_interval=0.02, keep_alive_interval=0.1, keep_alive_timeout=5.0)
    with trio.fail_after(10):
        async with registry(timers) as (peers, proxy_address), bare_udp() as far:
            async with peers.use(far.getsockname()) as peer:
                await far.sendto(encode_message(PING), proxy_address)
                while True:  # skip our own punch pings
                    message, source = await receive_message(far)
                    assert source[1] == proxy_address[1]  # from the endpoint's own port
                    if message == PONG:
                        break
                await peer.wait_heard()
                assert peers.pongs_sent >= 1
            # Anyone's ping is answered, even with no peer state for it.
            assert len(peers) == 0
            await far.sendto(encode_message(PING), proxy_address)
            while (await receive_message(far))[0] != PONG:
                pass


async def test_keep_alive_timeout_kills_the_peer_and_a_new_user_gets_a_fresh_one(
    virtual_clock: trio.testing.MockClock,
) -> None:
    timers = PeerTimers(punch_interval=0.02, keep_alive_interval=0.05, keep_alive_timeout=0.3)
    with trio.fail_after(60):
        async with memory_registry(timers) as (peers, endpoint):
            async with peers.use(FAR) as peer:
                endpoint.deliver(PONG, FAR)
                await peer.wait_heard()
                # Any message resets the timer: one every 0.1 s keeps the peer alive
                # for 0.8 s, well past the 0.3 s timeout.
                for _ in range(8):
                    await trio.sleep(0.1)
                    endpoint.deliver(PONG, FAR)
                await trio.testing.wait_all_tasks_blocked()
                last_message_at = trio.current_time()
                assert peer.last_heard == virtual(last_message_at)
                assert not peer.died.is_set()
                await peer.died.wait()  # then silence
                # Dead keep_alive_timeout after the last message, not a tick earlier or later.
                assert trio.current_time() - last_message_at == virtual(0.3)
                assert isinstance(peer.death, ConnectionKeepAliveTimeout)
                assert "in 0.3s" in str(peer.death)
                # Keep-alive pings went out every keep_alive_interval meanwhile.
                pings = endpoint.pings_since(last_message_at)
                assert len(pings) >= 5
                gaps = [later - earlier for earlier, later in zip(pings, pings[1:], strict=False)]
                assert gaps == virtual([0.05] * len(gaps))
                with pytest.raises(ConnectionKeepAliveTimeout):
                    await peer.wait_heard()
                async with peers.use(FAR) as fresh:
                    assert fresh is not peer and not fresh.died.is_set()


async def test_peer_is_shared_and_dropped_with_its_last_user() -> None:
    timers = PeerTimers(punch_interval=0.02, keep_alive_interval=0.1, keep_alive_timeout=5.0)
    with trio.fail_after(10):
        async with registry(timers) as (peers, _), bare_udp() as far:
            address = far.getsockname()
            async with peers.use(address) as first:
                async with peers.use(("127.0.0.1", address[1])) as second:
                    assert first is second and len(peers) == 1
                assert peers.get(address) is first
            assert peers.get(address) is None and len(peers) == 0
