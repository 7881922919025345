"""The relay over real TCP + mutual TLS on loopback: RelayLink clients and
serve_relay, including what attackers must not get through."""

from __future__ import annotations

import struct
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import pytest
import trio

from proxy.identity.node_id import NodeId
from proxy.identity.tls_config import TLSConfig
from proxy.relay.errors import RelayAddressInvalid
from proxy.relay.frames import GONE_DISCONNECTED, MAX_FRAME, Recv, Send, ServerInfo, decode_frames, encode_frame
from proxy.relay.limits import RelayLimits
from proxy.relay.link import RelayAddress, RelayLink
from proxy.relay.serve import ALPN, RelayServer, serve_relay
from proxy.tls import TLSStream
from tests.proxy.test_tls_support import LocalTLSConfig, make_foreign_tls_config, make_tls_config


async def wait_until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.005)


@asynccontextmanager
async def relay_server(limits: RelayLimits | None = None, port: int = 0) -> AsyncIterator[RelayServer]:
    config = TLSConfig.generate()
    async with trio.open_nursery() as nursery:
        server: RelayServer = await nursery.start(
            lambda task_status: serve_relay(config, host="127.0.0.1", port=port, limits=limits, task_status=task_status))
        server.test_address = f"{config.node_id}@127.0.0.1:{server.port}"  # type: ignore[attr-defined]
        yield server
        nursery.cancel_scope.cancel()


class Node:
    """A RelayLink with what it received."""

    def __init__(self, address: str, config: TLSConfig | None = None, **options: float) -> None:
        self.config = config or TLSConfig.generate()
        self.received: list[tuple[NodeId, bytes]] = []
        self.gone: list[tuple[NodeId, int]] = []
        self.link = RelayLink(self.config, address, lambda src, data: self.received.append((src, data)),
                              on_peer_gone=lambda node, reason: self.gone.append((node, reason)), **options)

    @property
    def node_id(self) -> NodeId:
        return self.config.node_id


@asynccontextmanager
async def linked(nursery: trio.Nursery, address: str, config: TLSConfig | None = None, **options: float
                 ) -> AsyncIterator[Node]:
    node = Node(address, config, **options)
    await nursery.start(node.link.run)
    with trio.fail_after(10):
        await node.link.wait_registered()
    try:
        yield node
    finally:
        node.link.close()


async def raw_client(port: int, config: object) -> TLSStream:
    """A hand-driven client: TLS to the relay, no RelayLink (an attacker's tool)."""
    tcp = await trio.open_tcp_stream("127.0.0.1", port)
    return TLSStream(tcp, config, server_side=False, alpn=(ALPN,))  # type: ignore[arg-type]


async def read_until_closed(stream: TLSStream) -> bytes:
    """Everything the relay sends `stream` until it ends the connection (within 10 s)."""
    received = b""
    with trio.fail_after(10):
        try:
            while chunk := await stream.receive_some():
                received += chunk
        except trio.BrokenResourceError:
            pass
    return received


async def test_a_datagram_crosses_the_relay_tagged_with_the_senders_nodeid() -> None:
    async with relay_server() as server, trio.open_nursery() as nursery:
        async with linked(nursery, server.test_address) as a, linked(nursery, server.test_address) as b:
            assert a.link.send(b.node_id, b"hello through the relay")
            await wait_until(lambda: bool(b.received))
            assert b.received == [(a.node_id, b"hello through the relay")]
            for n in range(200):
                b.link.send(a.node_id, n.to_bytes(2, "big") * 700)
            await wait_until(lambda: len(a.received) == 200)
            assert [data for _, data in a.received] == [n.to_bytes(2, "big") * 700 for n in range(200)]
            assert server.core.stats.frames_forwarded == 201
            status = server.status()
            assert status["clients"] == 2 and status["datagrams_forwarded"] == 201 and status["drops"] == {}
            assert a.link.status()["registered"] is True and a.link.status()["relay"] == server.test_address
        nursery.cancel_scope.cancel()


async def test_a_relay_that_is_not_the_named_nodeid_is_refused() -> None:
    async with relay_server() as server, trio.open_nursery() as nursery:
        impostor = f"{TLSConfig.generate().node_id}@127.0.0.1:{server.port}"
        node = Node(impostor, connect_timeout=2.0, backoff_min=5.0)
        await nursery.start(node.link.run)
        await wait_until(lambda: node.link.stats.failures >= 1)
        assert "RelayIdentityMismatch" in node.link.stats.last_error
        assert not node.link.registered and node.link.stats.registrations == 0
        assert not node.link.send(node.node_id, b"x") and node.link.drops["not_connected"] == 1
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("chain", ["foreign", "broken link", "claims another key"])
async def test_an_unauthenticated_client_cannot_register_or_send(chain: str) -> None:
    victim_config = TLSConfig.generate()
    if chain == "foreign":  # plain certificates, not a NodeId identity
        config: object = make_foreign_tls_config()
    elif chain == "broken link":  # a rotated chain whose second certificate is another node's
        rotated = make_tls_config(2)
        config = LocalTLSConfig(rotated.private_key, (rotated.certificate_chain[0], victim_config.leaf_certificate))
    else:  # the victim's certificate names the victim; here it is presented as a parent of our own leaf
        own = make_tls_config(1)
        config = LocalTLSConfig(own.private_key, (own.leaf_certificate, victim_config.leaf_certificate))
    async with relay_server() as server, trio.open_nursery() as nursery:
        async with linked(nursery, server.test_address, victim_config) as victim:
            stream = await raw_client(server.port, config)
            sent = received = b""
            try:
                await stream.do_handshake()  # TLS 1.3: the client finishes before the server checks
                sent = encode_frame(Send(victim.node_id, b"let me in")) * 50
                await stream.send_all(sent)
                with trio.fail_after(10):
                    while chunk := await stream.receive_some():
                        received += chunk
            except trio.BrokenResourceError:
                pass  # closed by the relay
            assert sent  # the attacker did get its frames out
            assert received == b""  # not even SERVER_INFO
            assert victim.received == []
            assert server.core.client_count == 1 and server.core.stats.registered == 1
            assert server.core.stats.frames_forwarded == 0
            assert server.stats.chains_rejected == 1
        nursery.cancel_scope.cancel()


async def test_a_client_cannot_forge_the_sender_tag() -> None:
    async with relay_server() as server, trio.open_nursery() as nursery:
        async with linked(nursery, server.test_address) as a, linked(nursery, server.test_address) as b:
            mallory_config = TLSConfig.generate()
            stream = await raw_client(server.port, mallory_config)
            await stream.send_all(encode_frame(Send(b.node_id, b"honest")))
            await wait_until(lambda: len(b.received) == 1)
            # a RECV naming A, written by Mallory: the relay ends Mallory's connection
            await stream.send_all(encode_frame(Recv(a.node_id, b"I am A")))
            received = await read_until_closed(stream)
            assert isinstance(decode_frames(received)[0], ServerInfo)
            assert b.received == [(mallory_config.node_id, b"honest")]
            assert server.stats.protocol_errors == 1 and a.received == []
        nursery.cancel_scope.cancel()


async def test_sending_to_an_unregistered_nodeid_is_counted_and_goes_nowhere() -> None:
    async with relay_server() as server, trio.open_nursery() as nursery:
        async with linked(nursery, server.test_address) as a, linked(nursery, server.test_address) as b:
            nobody = TLSConfig.generate().node_id
            frames_before = b.link._session.frames_received if b.link._session else 0  # noqa: SLF001
            for _ in range(100):
                assert a.link.send(nobody, b"x" * 500)
            a.link.send(b.node_id, b"marker")  # in order after the 100: once it arrives they were handled
            await wait_until(lambda: bool(b.received))
            assert server.core.stats.drops == {"no_such_peer": 100}
            assert b.received == [(a.node_id, b"marker")] and a.received == []
            assert server.core.stats.frames_forwarded == 1
            assert b.link._session is not None and b.link._session.frames_received == frames_before + 1  # noqa: SLF001
        nursery.cancel_scope.cancel()


async def test_a_flood_from_one_nodeid_is_held_to_its_rate() -> None:
    rate, burst = 1_000_000, 200_000
    async with relay_server(RelayLimits(rate=rate, burst=burst)) as server, trio.open_nursery() as nursery:
        async with linked(nursery, server.test_address) as a, linked(nursery, server.test_address) as b:
            frame = encode_frame(Send(b.node_id, b"f" * 1163))  # 1200 bytes on the wire
            flood = await raw_client(server.port, a.config)  # last connection wins: the flooder is A now
            await flood.do_handshake()
            start = trio.current_time()
            offered = 0
            while trio.current_time() - start < 1.0:
                await flood.send_all(frame * 200)
                offered += 200 * len(frame)
            await wait_until(lambda: server.core.stats.drops["rate_limited"] + len(b.received) >= offered // 1200)
            # every frame was handled (forwarded or dropped) by now: no token came later
            elapsed = trio.current_time() - start
            arrived = len(b.received) * 1200
            assert arrived <= burst + rate * elapsed
            assert offered >= 3 * arrived  # it was a flood, and most of it was held back
            assert server.core.stats.drops["rate_limited"] == offered // 1200 - len(b.received)
            assert all(source == a.node_id for source, _ in b.received)
        nursery.cancel_scope.cancel()


async def test_the_last_connection_of_a_nodeid_wins() -> None:
    async with relay_server() as server, trio.open_nursery() as nursery:
        config = TLSConfig.generate()
        async with linked(nursery, server.test_address, config, backoff_max=60.0) as first, \
                linked(nursery, server.test_address) as b:
            async with linked(nursery, server.test_address, config) as second:
                await wait_until(lambda: first.link.stats.replaced == 1 and not first.link.registered)
                assert not first.link.registered and second.link.registered
                b.link.send(config.node_id, b"to the newest")
                await wait_until(lambda: bool(second.received))
                assert second.received == [(b.node_id, b"to the newest")] and first.received == []
                assert server.core.stats.replaced == 1 and server.core.client_count == 2
        nursery.cancel_scope.cancel()


async def test_senders_hear_peer_gone_and_links_reconnect_after_a_relay_restart() -> None:
    async with trio.open_nursery() as nursery:
        config = TLSConfig.generate()
        relay_scope = trio.CancelScope()

        async def run_relay(port: int, task_status: trio.TaskStatus[RelayServer]) -> None:
            with relay_scope:
                await serve_relay(config, host="127.0.0.1", port=port, task_status=task_status)

        server: RelayServer = await nursery.start(run_relay, 0)
        port = server.port
        address = f"{config.node_id}@127.0.0.1:{port}"
        async with linked(nursery, address, backoff_min=0.05, backoff_max=0.2) as a, \
                linked(nursery, address, backoff_min=0.05, backoff_max=0.2) as b:
            a.link.send(b.node_id, b"hi")
            await wait_until(lambda: bool(b.received))
            async with linked(nursery, address) as c:
                b.link.send(c.node_id, b"hi c")  # b is one of c's senders now
                await wait_until(lambda: bool(c.received))
            await wait_until(lambda: bool(b.gone))
            assert b.gone == [(c.node_id, GONE_DISCONNECTED)] and a.gone == []
            await server.restart(reconnect_in=0.3, try_for=5.0)
            await wait_until(lambda: a.link.restart_delay == 0.3 and b.link.restart_delay == 0.3)
            relay_scope.cancel()
            await wait_until(lambda: not a.link.registered and not b.link.registered)
            relay_scope = trio.CancelScope()
            await nursery.start(run_relay, port)
            await wait_until(lambda: a.link.registered and b.link.registered)
            assert a.link.stats.registrations == 2
            a.link.send(b.node_id, b"after the restart")
            await wait_until(lambda: len(b.received) == 2)
        nursery.cancel_scope.cancel()


def test_relay_addresses_parse_and_print() -> None:
    node = TLSConfig.generate().node_id
    for text in (f"{node}@198.18.0.2:4000", f"{node}@[2001:db8::1]:443", f"{node}@relay.example:5"):
        assert str(RelayAddress.parse(text)) == text
    for bad in ("198.18.0.2:4000", f"{node}@host", f"{node}@host:0", f"{node}@host:70000", "v123@host:1"):
        with pytest.raises(RelayAddressInvalid):
            RelayAddress.parse(bad)


async def test_an_oversized_frame_header_ends_only_that_clients_connection() -> None:
    async with relay_server() as server, trio.open_nursery() as nursery:
        async with linked(nursery, server.test_address) as a, linked(nursery, server.test_address) as b:
            stream = await raw_client(server.port, TLSConfig.generate())
            await stream.send_all(struct.pack("!BI", 0x01, MAX_FRAME + 1) + b"x" * 1000)
            received = await read_until_closed(stream)
            assert [type(frame) for frame in decode_frames(received)] == [ServerInfo]
            assert server.stats.protocol_errors == 1 and server.core.client_count == 2
            a.link.send(b.node_id, b"still relaying")
            await wait_until(lambda: bool(b.received))
        nursery.cancel_scope.cancel()


async def test_a_client_that_stops_reading_is_bounded_then_closed() -> None:
    """A destination that never reads holds at most its queue at the relay: the rest
    is dropped (queue_full) and, once a write has waited write_timeout, it is closed."""
    limits = RelayLimits(rate=1 << 30, burst=64 << 20, queue_bytes=1 << 20, write_timeout=0.5)
    async with relay_server(limits) as server, trio.open_nursery() as nursery:
        async with linked(nursery, server.test_address) as a:
            sleeper_config = TLSConfig.generate()
            sleeper = await raw_client(server.port, sleeper_config)
            await sleeper.do_handshake()
            await wait_until(lambda: server.core.client(sleeper_config.node_id) is not None)
            datagram = b"z" * 16000
            sent = 0
            with trio.fail_after(30):
                while server.core.client(sleeper_config.node_id) is not None:
                    if a.link.output_pending < 1 << 20 and a.link.send(sleeper_config.node_id, datagram):
                        sent += 1
                    await trio.sleep(0)
            assert server.stats.slow_clients == 1
            assert server.core.stats.drops["queue_full"] > 0
            assert server.core.client_count == 1  # a is still served
            assert sent * len(datagram) > 3 * (1 << 20)
        nursery.cancel_scope.cancel()
