"""A NAT rebinding over real UDP: b reaches a through a forwarder (a NAT in
miniature, one UDP socket facing b and one facing a). Mid-stream the forwarder
takes a new socket toward a (a new mapping): a sees b's datagrams from a new
address and drops them, counted, unanswered, its connection untouched, until
its caller moves the connection to the new address (the proxy does so on an
authenticated ping from there). b never moves: its view of a is unchanged. The
transfer completes sha256-equal with no RESET.
"""

from __future__ import annotations

import hashlib
import random
import socket

import trio

from nat.endpoint import open_endpoint

SIZE = 16 << 20


class Forwarder:
    """Datagrams from b's side go to a from the current "mapping" socket; what a
    sends to the current mapping goes back to b. A rebinding closes the mapping
    and opens another (what a sent to the old one is lost)."""

    def __init__(self, a_address: tuple[str, int]) -> None:
        self.a_address = a_address
        self.facing_b = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.mapping = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.b_address: tuple[str, int] | None = None
        self.rebound = trio.Event()
        self._pump_scope = trio.CancelScope()

    async def bind(self) -> None:
        await self.facing_b.bind(("127.0.0.1", 0))
        await self.mapping.bind(("127.0.0.1", 0))

    @property
    def address_for_b(self) -> tuple[str, int]:
        host, port = self.facing_b.getsockname()
        return (host, port)

    @property
    def mapped_address(self) -> tuple[str, int]:
        host, port = self.mapping.getsockname()
        return (host, port)

    async def rebind(self, nursery: trio.Nursery) -> None:
        new = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        await new.bind(("127.0.0.1", 0))
        old, self.mapping = self.mapping, new
        self._pump_scope.cancel()
        old.close()
        self.rebound.set()
        nursery.start_soon(self.a_to_b)

    async def b_to_a(self) -> None:
        while True:
            data, self.b_address = await self.facing_b.recvfrom(65535)
            await self.mapping.sendto(data, self.a_address)

    async def a_to_b(self) -> None:
        """Back to b what a sends to the current mapping (until it is replaced)."""
        mapping = self.mapping
        with trio.CancelScope() as self._pump_scope:
            while True:
                data, _ = await mapping.recvfrom(65535)
                if self.b_address is not None:
                    await self.facing_b.sendto(data, self.b_address)


async def test_a_nat_rebinding_moves_the_connection_only_when_the_caller_does() -> None:
    payload = random.Random(21).randbytes(SIZE)
    async with open_endpoint() as a, open_endpoint() as b, trio.open_nursery() as nursery:
        forwarder = Forwarder(a.address)
        await forwarder.bind()
        nursery.start_soon(forwarder.b_to_a)
        nursery.start_soon(forwarder.a_to_b)
        # b is the sender, behind the NAT: its datagrams reach a from the mapping
        sender = await b.connect(forwarder.address_for_b)
        receiver = await a.accept()
        assert receiver.path == forwarder.mapped_address
        received = bytearray()
        checked = {"mismatch_seen": False}

        async def read() -> None:
            while len(received) < SIZE:
                chunk = await receiver.receive_some(1 << 20)
                assert chunk
                received.extend(chunk)
                if not forwarder.rebound.is_set() and len(received) >= SIZE // 3:
                    old = receiver.path
                    await forwarder.rebind(nursery)
                    # b's datagrams now come from the new mapping: wait until a
                    # dropped some, then check nothing moved
                    with trio.fail_after(10):
                        while a.multiplexer.stats.path_mismatch == 0:
                            await trio.sleep(0.005)
                    assert receiver.path == old and receiver.path_moves == 0
                    checked["mismatch_seen"] = True
                    receiver.move_to(forwarder.mapped_address)  # the caller's decision

        async with trio.open_nursery() as transfer:
            transfer.start_soon(read)
            await sender.send_all(payload)
        assert checked["mismatch_seen"]
        assert hashlib.sha256(received).digest() == hashlib.sha256(payload).digest()
        assert receiver.path == forwarder.mapped_address and receiver.path_moves == 1
        assert sender.path_moves == 0
        for endpoint in (a, b):  # (before the endpoints close, which resets what is open)
            stats = endpoint.multiplexer.stats
            assert stats.resets_sent == stats.resets_received == 0
            assert stats.connections_opened + stats.connections_accepted == 1
        nursery.cancel_scope.cancel()
