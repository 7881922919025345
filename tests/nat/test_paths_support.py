"""A relay in memory for endpoint tests: two endpoints reach each other over a
virtual path whose datagrams cross trio memory channels (bounded: a full queue
drops, as a relay's does), delivered in batches by one task per direction."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

import trio

from nat.endpoint import Endpoint
from nat.utp.paths import VirtualPath

BATCH = 64


@dataclass
class MemoryRelay:
    """``a_to_b`` is a's path to b, ``b_to_a`` b's path to a."""

    a_to_b: VirtualPath
    b_to_a: VirtualPath
    forwarded: int = 0
    dropped: int = 0


def _queue(channel: trio.MemorySendChannel[bytes], relay: MemoryRelay) -> Callable[[bytes], None]:
    def send(data: bytes) -> None:
        try:
            channel.send_nowait(data)
        except trio.WouldBlock:
            relay.dropped += 1

    return send


async def _deliver(channel: trio.MemoryReceiveChannel[bytes], to: Endpoint, path: VirtualPath, relay: MemoryRelay) -> None:
    async for first in channel:
        batch = [first]
        while len(batch) < BATCH:
            try:
                batch.append(channel.receive_nowait())
            except trio.WouldBlock:
                break
        relay.forwarded += len(batch)
        to.receive_batch_from_path(batch, path)


@asynccontextmanager
async def memory_relay(a: Endpoint, b: Endpoint, capacity: int = 4096) -> AsyncIterator[MemoryRelay]:
    relay = MemoryRelay(VirtualPath(("relay", "memory", "to-b")), VirtualPath(("relay", "memory", "to-a")))
    send_ab, receive_ab = trio.open_memory_channel[bytes](capacity)
    send_ba, receive_ba = trio.open_memory_channel[bytes](capacity)
    a.add_path(relay.a_to_b, _queue(send_ab, relay))
    b.add_path(relay.b_to_a, _queue(send_ba, relay))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_deliver, receive_ab, b, relay.b_to_a, relay)
        nursery.start_soon(_deliver, receive_ba, a, relay.a_to_b, relay)
        try:
            yield relay
        finally:
            nursery.cancel_scope.cancel()
