"""Per-peer punch/keep-alive state over a real endpoint and a bare UDP socket as the far side."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio

from nat import open_endpoint
from nat.message import PING, PONG, decode_message, encode_message
from proxy.errors import ConnectionKeepAliveTimeout
from proxy.tunnel.peer import PeerRegistry, PeerTimers, normalize_address


@asynccontextmanager
async def registry(timers: PeerTimers) -> AsyncIterator[tuple[PeerRegistry, tuple[str, int]]]:
    async with open_endpoint("127.0.0.1", 0) as endpoint:
        peers = PeerRegistry(endpoint, timers)
        async with trio.open_nursery() as nursery:
            await nursery.start(peers.run)
            yield peers, endpoint.address
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


async def test_punch_until_heard_then_keep_alive_pacing() -> None:
    timers = PeerTimers(punch_interval=0.02, keep_alive_interval=10.0, keep_alive_timeout=30.0)
    with trio.fail_after(10):
        async with registry(timers) as (peers, proxy_address), bare_udp() as far:
            far_address = far.getsockname()
            async with peers.use(far_address) as peer:
                # Punching: PINGs keep coming while the peer is unheard.
                for _ in range(5):
                    message, source = await receive_message(far)
                    assert message == PING and source[1] == proxy_address[1]
                assert not peer.heard.is_set()
                await far.sendto(encode_message(PONG), proxy_address)
                await peer.wait_heard()
                pings_at_heard = peer.pings_sent
                # Keep-alive pacing (10 s) now: no burst of pings follows.
                await trio.sleep(0.2)
                assert peer.pings_sent <= pings_at_heard + 1
                assert not peer.died.is_set()


async def test_ping_is_answered_with_pong_and_heard() -> None:
    timers = PeerTimers(punch_interval=0.02, keep_alive_interval=0.1, keep_alive_timeout=5.0)
    with trio.fail_after(10):
        async with registry(timers) as (peers, proxy_address), bare_udp() as far:
            async with peers.use(far.getsockname()) as peer:
                await far.sendto(encode_message(PING), proxy_address)
                while True:  # skip our own punch pings
                    message, _ = await receive_message(far)
                    if message == PONG:
                        break
                await peer.wait_heard()
                assert peers.pongs_sent >= 1
            # Anyone's ping is answered, even with no peer state for it.
            assert len(peers) == 0
            await far.sendto(encode_message(PING), proxy_address)
            while (await receive_message(far))[0] != PONG:
                pass


async def test_keep_alive_timeout_kills_the_peer_and_a_new_user_gets_a_fresh_one() -> None:
    timers = PeerTimers(punch_interval=0.02, keep_alive_interval=0.05, keep_alive_timeout=0.3)
    with trio.fail_after(10):
        async with registry(timers) as (peers, proxy_address), bare_udp() as far:
            address = far.getsockname()
            async with peers.use(address) as peer:
                await far.sendto(encode_message(PONG), proxy_address)
                await peer.wait_heard()
                # Any message resets the timer: keep it alive for a while.
                for _ in range(8):
                    await trio.sleep(0.1)
                    await far.sendto(encode_message(PONG), proxy_address)
                assert not peer.died.is_set()
                await peer.died.wait()  # then silence
                assert isinstance(peer.death, ConnectionKeepAliveTimeout)
                with pytest.raises(ConnectionKeepAliveTimeout):
                    await peer.wait_heard()
                async with peers.use(address) as fresh:
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
