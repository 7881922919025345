"""Live connections moved between real UDP on loopback and a relayed virtual
path (a relay in memory) with the Endpoint: 32 MiB sha256-equal across six
moves, no RESET, no new connection; the wall time each move took is printed
(timing is reported, never asserted). A spoofer on a third socket sends the
connection's own ids and numbers meanwhile: nothing moves, nothing answers it.
"""

from __future__ import annotations

import hashlib
import random
import socket

import trio

from nat.endpoint import open_endpoint
from nat.stream import UtpStream
from nat.utp.packet import ST_DATA, ST_STATE, pack_header
from tests.nat.test_paths_support import memory_relay

SIZE = 32 << 20
MOVES = 6


async def test_thirty_two_mib_moved_between_direct_and_relay_six_times() -> None:
    payload = random.Random(14).randbytes(SIZE)
    reply = random.Random(15).randbytes(1 << 20)
    async with open_endpoint() as a, open_endpoint() as b, memory_relay(a, b) as relay:
        client = await a.connect(b.address)
        server = await b.accept()
        spoofer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        spoofer.bind(("127.0.0.1", 0))
        spoofer.setblocking(False)
        spoofed = 0
        received = bytearray()
        took: list[tuple[str, float]] = []
        pending: list[tuple[str, float, int]] = []

        def move(index: int) -> None:
            to_relay = index % 2 == 0
            mark = client.connection.next_seq
            client.move_to(relay.a_to_b if to_relay else b.address)
            server.move_to(relay.b_to_a if to_relay else a.address)
            pending.append(("relay" if to_relay else "direct", trio.current_time(), mark))

        def spoof() -> int:
            sc, cc = server.connection, client.connection
            data = pack_header(ST_DATA, sc.recv_id, 0, 0, 1 << 20, cc.next_seq & 0xFFFF, (sc.next_seq - 1) & 0xFFFF)
            spoofer.sendto(data + b"EVIL" * 100, b.address)
            ack = pack_header(ST_STATE, cc.recv_id, 0, 0, 1 << 20, sc.next_seq & 0xFFFF, (cc.next_seq - 1) & 0xFFFF)
            spoofer.sendto(ack, a.address)
            return 1

        async def read_and_move(stream: UtpStream) -> None:
            nonlocal spoofed
            moves = 0
            while len(received) < SIZE:
                chunk = await stream.receive_some(1 << 20)
                assert chunk
                received.extend(chunk)
                if moves < MOVES and len(received) >= (moves + 1) * SIZE // (MOVES + 2):
                    move(moves)
                    moves += 1
                if len(received) < SIZE // 2:
                    spoofed += spoof()
                for name, started, mark in list(pending):
                    if client.connection.oldest_unacked_seq >= mark:
                        took.append((name, trio.current_time() - started))
                        pending.remove((name, started, mark))
            assert moves == MOVES

        back = bytearray()

        async def read_back() -> None:
            while len(back) < len(reply):
                back.extend(await client.receive_some(1 << 20))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(read_and_move, server)
            nursery.start_soon(read_back)
            nursery.start_soon(server.send_all, reply)
            await client.send_all(payload)
        await client.send_eof()
        assert await server.receive_some() == b""
        assert hashlib.sha256(received).digest() == hashlib.sha256(payload).digest()
        assert hashlib.sha256(back).digest() == hashlib.sha256(reply).digest()
        for endpoint in (a, b):
            stats = endpoint.multiplexer.stats
            assert stats.resets_sent == stats.resets_received == 0
            assert stats.connections_opened + stats.connections_accepted == 1
            assert stats.path_moves == MOVES
            assert endpoint.stats.path_unrouted == endpoint.stats.path_send_errors == 0
        assert client.path_moves == server.path_moves == MOVES
        assert client.path == b.address and server.path == a.address  # the last move was to direct
        assert relay.forwarded > 0
        # the spoofer's datagrams: dropped and counted, never answered
        assert spoofed > 0
        assert b.multiplexer.stats.path_mismatch == spoofed
        assert a.multiplexer.stats.path_mismatch == spoofed
        try:
            spoofer.recv(65535)
            raise AssertionError("something was sent to the spoofed source")
        except BlockingIOError:
            pass
        spoofer.close()
        print(
            f"\n32 MiB + 1 MiB back over loopback, {MOVES} moves; each move (wall clock until what was in flight "
            f"was acknowledged): " + ", ".join(f"{name} {seconds * 1000:.1f} ms" for name, seconds in took)
        )
