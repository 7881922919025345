"""Graceful ends, as the original: a rejected chain (526) and a keep-alive timeout end
TLS with close_notify and a uTP FIN, and the peer's answering close_notify, arriving
after our FIN was acknowledged, draws no RESET.

The far side is a raw peer (a TLS server over a bare uTP endpoint) behind a UDP
relay that counts uTP RESET datagrams either way. Virtual time: the peer answers
long after our FIN was acknowledged, at no cost.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import pytest
import trio
from trio.testing import MockClock

from nat.utp.states import CLOSED
from proxy.errors import ConnectionVerifyError
from proxy.identity.tls_config import TLSConfig
from proxy.tls import TLSStream
from proxy.tunnel.connection import EndReason
from tests.proxy.test_proxy_support import RawPeer, UdpRelay, raw_peer, running_node, tcp_server, udp_relay
from tests.proxy.test_proxy_wiring import rotated

END_TIME = 0.5  # the nodes' conn_end_time (test_proxy_support.FAST)


@dataclass
class Observer:
    """What the raw peer saw of our end, and its own uTP stream."""

    tls_config: TLSConfig = field(default_factory=TLSConfig.generate)
    seen: list[str] = field(default_factory=list)
    streams: list[Any] = field(default_factory=list)
    answered: trio.Event = field(default_factory=trio.Event)

    async def handler(self, peer: RawPeer, stream: Any) -> None:
        await self.observe(stream, server_side=True)

    async def observe(self, stream: Any, *, server_side: bool) -> None:
        self.streams.append(stream)
        tls = TLSStream(stream, self.tls_config, server_side=server_side)
        await tls.do_handshake()
        try:
            data = await tls.receive_some(65536)
        except Exception as error:  # TLSTruncatedError (FIN without close_notify), a reset
            self.seen.append(type(error).__name__)
            return
        self.seen.append("close_notify" if data == b"" else f"data {data!r}")
        # Answer long after our FIN was acknowledged (5 ms delayed ACK).
        await trio.sleep(END_TIME / 2)
        await tls.send_eof()  # the answering close_notify and FIN
        self.answered.set()


@asynccontextmanager
async def observed() -> AsyncIterator[tuple[Observer, RawPeer, UdpRelay]]:
    observer = Observer()
    async with raw_peer(observer.handler) as peer, udp_relay(("127.0.0.1", peer.port)) as relay:
        yield observer, peer, relay


async def ended_gracefully(observer: Observer, relay: UdpRelay) -> None:
    with trio.fail_after(5):
        while not observer.seen:
            await trio.sleep(0.01)
    assert observer.seen == ["close_notify"], f"our end reached the peer as {observer.seen}, resets {relay.resets}"
    with trio.fail_after(5):
        await observer.answered.wait()
        (stream,) = observer.streams
        while not stream.connection.is_closed:
            await trio.sleep(0.01)
    assert stream.connection.state is CLOSED and stream.connection.error is None  # both FINs, no RESET
    await trio.sleep(2 * END_TIME)  # whatever our side still does, it has done
    assert relay.resets == 0


async def test_a_rejected_chain_ends_tls_with_close_notify_and_fin(virtual_clock: MockClock) -> None:
    async with observed() as (observer, _, relay), running_node() as local:
        stranger = TLSConfig.generate().node_id  # not the peer's NodeId: 526
        with pytest.raises(ConnectionVerifyError):
            await local.proxy.open_connection_forward(stranger, "127.0.0.1", relay.port)
        await ended_gracefully(observer, relay)
        assert local.proxy.connection_forward_count == 0


async def test_a_keep_alive_timeout_ends_tls_with_close_notify_and_fin(virtual_clock: MockClock) -> None:
    async with observed() as (observer, peer, relay), running_node(conn_keep_alive_timeout_time=0.6) as local:
        # An idle connection (nothing of ours in flight), then the peer falls silent:
        # its pings stop, its uTP still answers.
        await local.proxy.open_connection_forward(observer.tls_config.node_id, "127.0.0.1", relay.port)
        peer.responsive = False
        (lost,) = await local.events.wait_lost(1)
        assert lost.reason == EndReason.KEEP_ALIVE_TIMEOUT
        await ended_gracefully(observer, relay)
        assert local.proxy.connection_forward_count == 0


async def test_a_rejected_client_chain_ends_tls_with_close_notify_and_fin(virtual_clock: MockClock) -> None:
    """The reverse side's 526: the caller's chain (two certificates) is over the limit."""
    observer = Observer(tls_config=rotated(1))
    async with tcp_server() as server, running_node(server.port, max_chain_length=1) as local:
        async with raw_peer() as caller, udp_relay(("127.0.0.1", local.proxy.proxy_port)) as relay:
            stream = await caller.endpoint.connect(("127.0.0.1", relay.port))
            async with trio.open_nursery() as nursery:
                nursery.start_soon(partial(observer.observe, stream, server_side=False))
                await ended_gracefully(observer, relay)
            assert local.proxy.connection_reverse_count == 0
            assert local.events.established == []


async def test_closing_an_idle_connection_lets_the_peer_answer_without_a_reset(virtual_clock: MockClock) -> None:
    async with observed() as (observer, _, relay), running_node() as local:
        await local.proxy.open_connection_forward(observer.tls_config.node_id, "127.0.0.1", relay.port)
        await local.proxy.close_connection_forward("127.0.0.1", relay.port)
        (lost,) = await local.events.wait_lost(1)
        assert lost.reason == EndReason.CLOSED_LOCALLY
        await ended_gracefully(observer, relay)
