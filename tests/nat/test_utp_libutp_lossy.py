"""The sans-IO core against real libutp (utp-native under Node) through a lossy,
reordering UDP relay on loopback: selective ACKs, fast retransmit, timeouts and
FIN handling must interoperate both ways, not just the clean path.

The core is driven here by a minimal pump on a trio UDP socket (not nat/endpoint.py),
so this tests the wire behaviour of nat/utp alone.
"""

from __future__ import annotations

import hashlib
import os
import random
from collections.abc import Callable

import pytest
import trio
import trio.socket

from nat.utp.events import IncomingConnection
from nat.utp.multiplexer import UtpMultiplexer
from nat.utp.sim import StreamApp

from .conftest import node_peer, utp_native_echo_server

pytestmark = pytest.mark.node

SIZE = 1 << 20
LOSS = 0.03
REORDER = 0.05
TIMEOUT = 90


async def udp_socket() -> trio.socket.SocketType:
    sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM)
    await sock.bind(("127.0.0.1", 0))
    return sock


async def lossy_relay(
    front: trio.socket.SocketType, back: trio.socket.SocketType, target: tuple, seed: int
) -> None:
    """Forward front <-> target through ``back``, dropping and delaying some datagrams."""
    rng = random.Random(seed)
    peer: list[tuple] = []

    async def forward(sock: trio.socket.SocketType, data: bytes, address: tuple) -> None:
        if rng.random() < REORDER:
            await trio.sleep(rng.uniform(0.002, 0.02))
        await sock.sendto(data, address)

    async with trio.open_nursery() as nursery:

        async def front_to_back() -> None:
            while True:
                data, address = await front.recvfrom(65536)
                if not peer:
                    peer.append(address)
                if rng.random() >= LOSS:
                    nursery.start_soon(forward, back, data, target)

        async def back_to_front() -> None:
            while True:
                data, _ = await back.recvfrom(65536)
                if peer and rng.random() >= LOSS:
                    nursery.start_soon(forward, front, data, peer[0])

        nursery.start_soon(front_to_back)
        nursery.start_soon(back_to_front)


async def pump(sock: trio.socket.SocketType, mux: UtpMultiplexer, step: Callable[[], bool]) -> None:
    """Drive ``mux`` on ``sock`` until ``step()`` (the application) returns True."""
    while True:
        now = trio.current_time()
        timer = mux.get_timer()
        if timer is not None and timer <= now:
            mux.handle_timer(now)
        done = step()
        for data, address in mux.datagrams_to_send(now):
            await sock.sendto(data, address)
        if done:
            return
        timer = mux.get_timer()
        wake = now + 0.05 if timer is None else min(timer, now + 0.05)
        with trio.move_on_at(wake):
            data, address = await sock.recvfrom(65536)
            mux.receive_datagram(data, address, trio.current_time())


async def test_core_client_to_libutp_echo_server_through_loss() -> None:
    payload = os.urandom(SIZE)
    async with utp_native_echo_server() as server_address:
        with trio.fail_after(TIMEOUT):
            front, back, ours = await udp_socket(), await udp_socket(), await udp_socket()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(lossy_relay, front, back, server_address, 1)
                mux = UtpMultiplexer()
                app = StreamApp(mux.connect(front.getsockname(), trio.current_time()), payload)

                def step() -> bool:
                    while mux.next_event() is not None:
                        pass
                    app.pump()
                    return app.conn.at_eof and app.conn.all_data_acked

                await pump(ours, mux, step)
                nursery.cancel_scope.cancel()
            for sock in (front, back, ours):
                sock.close()
    assert hashlib.sha256(app.received).hexdigest() == hashlib.sha256(payload).hexdigest()
    assert app.conn.error is None
    assert mux.stats.retransmits > 0  # the relay really dropped packets


async def test_libutp_client_to_core_echo_server_through_loss() -> None:
    with trio.fail_after(TIMEOUT):
        front, back, ours = await udp_socket(), await udp_socket(), await udp_socket()
        mux = UtpMultiplexer()
        echoes: list[StreamApp] = []

        def step() -> bool:
            while (event := mux.next_event()) is not None:
                if isinstance(event, IncomingConnection):
                    echoes.append(StreamApp(event.conn, b"", send_eof=False))
            for echo in echoes:
                echo.pump()
                # echo what arrived; half-close after the client's EOF
                fresh = bytes(echo.received[len(echo.outgoing) :])
                if fresh:
                    echo.outgoing = memoryview(bytes(echo.outgoing) + fresh)
                if echo.conn.at_eof and echo.sent_all and not echo.conn.eof_sent:
                    echo.conn.send_eof()
            return bool(echoes) and echoes[0].conn.is_closed

        async with trio.open_nursery() as nursery:
            nursery.start_soon(lossy_relay, front, back, ours.getsockname(), 2)
            nursery.start_soon(pump, ours, mux, step)
            host, port = front.getsockname()
            async with node_peer("utp_client.js", host, port, SIZE) as client:
                report = await client.read_event()
            nursery.cancel_scope.cancel()
        for sock in (front, back, ours):
            sock.close()
    assert report["event"] == "done", report
    assert report["received_bytes"] == SIZE
    assert report["received_sha256"] == report["sent_sha256"]
    assert mux.stats.retransmits > 0
