"""Paths, not addresses (proxy/tunnel/paths.py), with real things on loopback: a
rendezvous relay node (UDP), a relay node over TCP + mutual TLS (serve_relay), two
Proxies with RelayLinks, real uTP + TLS, a real TCP echo server.

Punching is made to fail by the target ignoring keyed messages (as behind a NAT
that lets none of the caller's in): a CONNECT by NodeId then starts over the relay;
once the target answers again, both sides' background punches prove a direct path
and the live tunnel moves to it, every byte kept."""

from __future__ import annotations

import hashlib
import random
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import trio

from nat.utp.packet import ST_STATE, encode_packet
from nat.utp.paths import VirtualPath
from proxy.identity.node_id import NodeId
from proxy.identity.tls_config import TLSConfig
from proxy.relay.limits import RelayLimits
from proxy.relay.link import RelayLink
from proxy.relay.paths import RelayPaths
from proxy.relay.serve import RelayServer, serve_relay
from proxy.tunnel.paths import PathTimers
from proxy.tunnel.records import ConnectionEvent, ConnectionStatus

from .test_proxy_support import Node, connect_ok, running_node, tcp_server
from .test_rendezvous_proxy import registered, relay_of

TIMERS = PathTimers(punch_window=0.5, silent_after=1.0, upgrade_retry=0.3, check_interval=0.05)


@dataclass
class Moves:
    events: list[ConnectionEvent] = field(default_factory=list)

    def __call__(self, event: ConnectionEvent) -> None:
        self.events.append(event)


@dataclass
class Pair:
    caller: Node
    target: Node
    server: RelayServer
    relay_id: NodeId  # the TCP relay node's
    caller_moves: Moves
    target_moves: Moves


@asynccontextmanager
async def relayed_pair(handler: Any = None, **options: Any) -> AsyncIterator[Pair]:
    """A caller and a target, both registered with a rendezvous relay node and linked
    to a TCP relay node, the target serving a TCP echo server."""
    relay_tls = TLSConfig.generate()
    limits = RelayLimits(rate=1 << 30, burst=64 << 20, queue_bytes=8 << 20, queue_frames=8192)
    caller_moves, target_moves = Moves(), Moves()
    async with trio.open_nursery() as nursery:
        server: RelayServer = await nursery.start(
            lambda task_status: serve_relay(relay_tls, host="127.0.0.1", limits=limits, task_status=task_status))
        tcp_relay = f"{relay_tls.node_id}@127.0.0.1:{server.port}"
        async with tcp_server(*(() if handler is None else (handler,))) as echo, \
                running_node(relay_serve=True) as rendezvous:
            relays = (relay_of(rendezvous),)
            async with running_node(relay_servers=relays, path_timers=TIMERS,
                                    path_changed_callback=caller_moves, **options) as caller, \
                    running_node(echo.port, relay_servers=relays, path_timers=TIMERS,
                                 path_changed_callback=target_moves, **options) as target:
                await registered(caller.proxy)
                await registered(target.proxy)
                links = []
                for node in (caller, target):
                    paths = RelayPaths(node.proxy.endpoint, RelayLink(node.tls_config, tcp_relay))
                    await nursery.start(paths.link.run)
                    with trio.fail_after(10):
                        await paths.link.wait_registered()
                    node.proxy.set_relay_routes(paths)
                    links.append(paths)
                yield Pair(caller, target, server, relay_tls.node_id, caller_moves, target_moves)
                for paths in links:
                    paths.link.close()
        nursery.cancel_scope.cancel()


def only_status(node: Node) -> ConnectionStatus:
    (status,) = node.proxy.connections()
    return status


def block_punching(target: Node) -> Any:
    """The target ignores keyed messages: no introduction, no PONG, so no punch."""
    handler = target.proxy.endpoint.on_keyed_message
    target.proxy.endpoint.on_keyed_message = None
    return handler


async def until(check: Any, timeout: float = 20) -> None:
    with trio.fail_after(timeout):
        while not check():
            await trio.sleep(0.02)


async def stream_through(stream: trio.SocketStream, size: int, during: Any) -> tuple[str, str, int]:
    """Send ``size`` random bytes through the echoing tunnel while ``during`` runs
    (started once a quarter is through); the sha256 sent, received, and bytes received."""
    data = random.Random(7).randbytes(size)
    received = hashlib.sha256()
    got = 0
    quarter = trio.Event()

    async def send() -> None:
        for start in range(0, size, 64 * 1024):
            await stream.send_all(data[start:start + 64 * 1024])
            if start >= size // 4:
                quarter.set()
        # no EOF yet: the tunnel stays up for the status checks that follow

    async def receive() -> None:
        nonlocal got
        while got < size:
            chunk = await stream.receive_some(1 << 16)
            assert chunk
            received.update(chunk)
            got += len(chunk)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(send)
        nursery.start_soon(receive)
        await quarter.wait()
        await during()
    return hashlib.sha256(data).hexdigest(), received.hexdigest(), got


async def test_a_connect_that_cannot_punch_starts_relayed_and_moves_to_direct_mid_stream() -> None:
    async with relayed_pair() as pair:
        caller, target, server, caller_moves, target_moves = (
            pair.caller, pair.target, pair.server, pair.caller_moves, pair.target_moves)
        keyed = block_punching(target)
        stream = await connect_ok(caller.proxy, f"{target.node_id}:443")
        status = only_status(caller)
        assert (status.info.path, status.info.via, status.move_count) == ("relay", pair.relay_id, 0)
        assert status.info.remote_node_id == target.node_id
        await until(lambda: len(target.proxy.connections()) == 1)
        reverse = only_status(target)
        assert (reverse.info.path, reverse.info.via, reverse.info.remote_node_id) == (
            "relay", pair.relay_id, caller.node_id)
        relayed_before = server.core.stats.bytes_forwarded

        async def unblock_and_wait_for_direct() -> None:
            target.proxy.endpoint.on_keyed_message = keyed  # the punch can succeed now
            await until(lambda: only_status(caller).info.path == "direct" and only_status(target).info.path == "direct")

        sent, received, size = await stream_through(stream, 24 << 20, unblock_and_wait_for_direct)
        assert (received, size) == (sent, 24 << 20)
        assert server.core.stats.bytes_forwarded > relayed_before  # a part really went through the relay
        forward, reverse = only_status(caller), only_status(target)
        assert (forward.info.remote_host, forward.info.remote_port) == ("127.0.0.1", target.proxy.proxy_port)
        assert (reverse.info.remote_host, reverse.info.remote_port) == ("127.0.0.1", caller.proxy.proxy_port)
        for status in (forward, reverse):
            assert status.move_count == 1 and status.info.via is None
            (move,) = status.moves
            assert (move.from_path, move.to_path) == ("relay", "direct")
            assert move.reason == "direct path proven by authenticated ping/pong"
        # the callbacks heard of it, on each side
        assert [(event.path, event.move.to_path if event.move else None) for event in caller_moves.events] == [
            ("direct", "direct")]
        assert [event.remote_node_id for event in target_moves.events] == [caller.node_id]
        # one uTP connection each side, never reset: the same TLS session carried every byte
        for node in (caller, target):
            stats = node.proxy.endpoint.multiplexer.stats
            assert (stats.resets_sent, stats.resets_received, stats.path_moves) == (0, 0, 1)
        await stream.aclose()


async def test_spoofed_datagrams_from_a_new_address_move_nothing() -> None:
    async with relayed_pair() as pair:
        caller, target, target_moves = pair.caller, pair.target, pair.target_moves
        block_punching(target)
        stream = await connect_ok(caller.proxy, f"{target.node_id}:443")
        await stream.send_all(b"before")
        assert await stream.receive_some(100) == b"before"
        await until(lambda: len(target.proxy.connections()) == 1)
        (connection,) = target.proxy._registry.reverse
        utp = connection.utp
        assert utp is not None and type(utp.path) is VirtualPath
        conn = utp._conn
        mismatched = target.proxy.endpoint.multiplexer.stats.path_mismatch
        spoofs = 200
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as spoofer:
            spoofer.bind(("127.0.0.1", 0))
            spoofer.setblocking(False)
            for _ in range(spoofs):
                # the live connection's id and sequence numbers, as an on-path observer would send
                datagram = encode_packet(ST_STATE, conn.recv_id, conn._rx.rcv_nxt, conn._tx.snd_nxt - 1,
                                         wnd_size=1 << 20)
                spoofer.sendto(datagram, ("127.0.0.1", target.proxy.proxy_port))
                spoofer.sendto(b"\x00\x00\x00\x00", ("127.0.0.1", target.proxy.proxy_port))  # a 4-byte PING
            await until(lambda: target.proxy.endpoint.multiplexer.stats.path_mismatch - mismatched >= spoofs)
            assert target.proxy.endpoint.multiplexer.stats.path_mismatch - mismatched == spoofs
            answers = 0
            while True:
                try:
                    data = spoofer.recv(2048)
                except BlockingIOError:
                    break
                assert data == b"\x00\x00\x00\x01"  # only the original's PONGs to PINGs, never uTP
                answers += 1
        assert answers <= spoofs
        status = only_status(target)
        assert (status.info.path, status.move_count, target_moves.events) == ("relay", 0, [])
        assert utp.path_moves == 0 and target.proxy.endpoint.multiplexer.stats.resets_sent == 0
        await stream.send_all(b"after")
        assert await stream.receive_some(100) == b"after"
        await stream.aclose()


async def test_a_connect_that_punches_in_time_is_direct_and_stays_so() -> None:
    async with relayed_pair() as pair:
        caller, target, server, caller_moves = pair.caller, pair.target, pair.server, pair.caller_moves
        stream = await connect_ok(caller.proxy, f"{target.node_id}:443")
        await stream.send_all(b"x" * 10000)
        got = b""
        while len(got) < 10000:
            got += await stream.receive_some(65536)
        status = only_status(caller)
        assert (status.info.path, status.info.via, status.move_count) == ("direct", None, 0)
        assert server.core.stats.bytes_forwarded == 0
        assert caller.proxy.paths is not None and caller.proxy.paths.fallbacks == 0
        assert caller_moves.events == []
        await stream.aclose()
