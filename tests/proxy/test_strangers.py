"""No work for a stranger (DESIGN.md: "nothing works for a stranger").

An attacker on the internet can send datagrams with any source address. A uTP SYN
costs it 20 bytes; it must not buy a connection to the node's server, nor make the
node send a victim more datagrams than the attacker sent. The spoofing is real: a
raw socket (the tests run as root) writes IPv4 packets whose source is a victim
address on loopback, and the victim counts what reaches it.
"""

from __future__ import annotations

import os
import socket
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import trio

from nat import PING, PONG, open_endpoint
from nat.utp.packet import ST_SYN
from proxy.identity.tls_config import TLSConfig
from proxy.tls import TLSStream
from tests.proxy.test_proxy_support import FAST, receive_all, running_node, tcp_server

VICTIM_HOST = "127.0.0.77"


def udp_packet(source: tuple[str, int], destination: tuple[str, int], payload: bytes) -> bytes:
    """An IPv4 + UDP packet from ``source`` (UDP checksum 0: none, allowed over IPv4)."""
    udp = struct.pack("!HHHH", source[1], destination[1], 8 + len(payload), 0) + payload
    total = 20 + len(udp)
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, total, 0, 0, 64, socket.IPPROTO_UDP, 0,
                         socket.inet_aton(source[0]), socket.inet_aton(destination[0]))
    return header + udp  # the kernel fills in the IP checksum for IP_HDRINCL


def spoofed_syn() -> bytes:
    """A BEP 29 SYN, written out from the wire format: type<<4|version, extension,
    connection id, timestamp, timestamp difference, window, seq_nr, ack_nr."""
    connection_id, seq_nr = struct.unpack("!HH", os.urandom(4))
    return struct.pack("!BBHIIIHH", ST_SYN << 4 | 1, 0, connection_id, 1, 0, 1 << 20, seq_nr, 0)


async def count_received(sock: trio.socket.SocketType, counter: list[int]) -> None:
    while True:
        await sock.recv(65536)
        counter[0] += 1


async def send_spoofed(count: int, victim: tuple[str, int], target: tuple[str, int]) -> None:
    raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    try:
        for _ in range(count):
            raw.sendto(udp_packet(victim, target, spoofed_syn()), target)
    finally:
        raw.close()


async def datagrams_to_victim(node_port: int, spoofed: int, watch: float) -> int:
    """Send ``spoofed`` SYNs that claim to come from a victim, then count what reaches
    the victim for ``watch`` seconds: longer than a connection start may take, so that
    whatever a start would send (punch pings, TLS) or open (the backend) happens in it."""
    victim = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with victim:
        await victim.bind((VICTIM_HOST, 0))
        received = [0]
        async with trio.open_nursery() as nursery:
            nursery.start_soon(count_received, victim, received)
            await send_spoofed(spoofed, victim.getsockname(), ("127.0.0.1", node_port))
            await trio.sleep(watch)  # observing an absence: nothing to wait on
            nursery.cancel_scope.cancel()
    return received[0]


async def test_spoofed_syns_open_no_backend_connection_and_send_victim_at_most_one_datagram_each() -> None:
    spoofed = 10
    async with tcp_server() as server, running_node(server.port, conn_connect_time=0.5) as node:
        received = await datagrams_to_victim(node.proxy.proxy_port, spoofed, 3 * 0.5)
        assert server.peers == [], "a stranger's SYN opened a connection to the server"
        assert received <= spoofed, f"{received} datagrams sent to a victim for {spoofed} spoofed SYNs"
        assert node.proxy.connection_reverse_count == 0


async def test_a_syn_flood_from_one_source_is_rate_limited() -> None:
    # The uTP multiplexer's per-source limit on new connections (nat/utp/multiplexer.py).
    flood = 400
    async with tcp_server() as server, running_node(server.port, conn_connect_time=0.5) as node:
        received = await datagrams_to_victim(node.proxy.proxy_port, flood, 3 * 0.5)
        assert server.peers == []
        assert received <= flood // 4, f"{received} datagrams answered a flood of {flood}"


# --- the original's forward side, as a peer that is not a keynode -----------------------


@dataclass
class OriginalForward:
    """What the original ConnectionForward did: open uTP to the target (its SYN leaves
    before any PING), start TLS as the client, PING every punch interval; ready once
    TLS is up *and* a PING from the target arrived (a PONG is not enough)."""

    endpoint: Any
    nursery: trio.Nursery
    tls_config: TLSConfig = field(default_factory=TLSConfig.generate)
    answering: bool = True  # PINGs are answered with PONGs
    pings_from_target: list[float] = field(default_factory=list)
    pinged: trio.Event = field(default_factory=trio.Event)
    tls: TLSStream | None = None

    @property
    def address(self) -> tuple[str, int]:
        return (self.endpoint.address[0], self.endpoint.address[1])

    async def connect(self, target: tuple[str, int], punch_interval: float = 0.02) -> TLSStream:
        stream = await self.endpoint.connect(target)  # the SYN first, then the pings
        self.answering = True

        async def punch() -> None:
            while True:
                self.endpoint.send_message(PING, target)
                await trio.sleep(punch_interval)

        self.nursery.start_soon(punch)
        self.tls = TLSStream(stream, self.tls_config, server_side=False)
        await self.tls.do_handshake()
        await self.pinged.wait()
        return self.tls


@asynccontextmanager
async def original_node(*, answering: bool = True) -> AsyncIterator[OriginalForward]:
    """An endpoint that answers PINGs (once ``answering``) and records them; connect() later."""
    async with open_endpoint("127.0.0.1", 0) as endpoint, trio.open_nursery() as nursery:
        forward = OriginalForward(endpoint, nursery, answering=answering)

        async def answer(task_status: trio.TaskStatus[None]) -> None:
            with endpoint.subscribe_messages() as messages:
                task_status.started()
                async for message, address in messages:
                    if message == PING:
                        forward.pings_from_target.append(trio.current_time())
                        forward.pinged.set()
                        if forward.answering:
                            endpoint.send_message(PONG, address)

        await nursery.start(answer)
        yield forward
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def original_forward(target: tuple[str, int]) -> AsyncIterator[OriginalForward]:
    async with original_node() as forward:
        await forward.connect(target)
        yield forward


async def test_an_original_forward_still_gets_the_ping_it_waits_for() -> None:
    """The reverse side punches an incoming caller once its first bytes arrived: the
    original forward side, which waits for a PING from the target, still starts
    within conn_connect_time and its tunnel carries data."""
    with trio.fail_after(10):
        async with tcp_server() as server, running_node(server.port) as remote:
            target = ("127.0.0.1", remote.proxy.proxy_port)
            start = trio.current_time()
            async with original_forward(target) as forward:
                assert forward.pings_from_target[0] - start < FAST["conn_connect_time"]
                assert forward.tls is not None
                await forward.tls.send_all(b"original")
                await forward.tls.send_eof()
                assert await receive_all(forward.tls) == b"original"
            assert [e.remote_node_id for e in remote.events.established] == [forward.tls_config.node_id]
