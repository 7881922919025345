"""The keyed-message family on the endpoint's socket (shared decision 1).

``00 00 00 tt`` (tt >= 2) and longer than 4 bytes: handed unopened to
``Endpoint.on_keyed_message``; the 4-byte ping/pong unchanged; every other
datagram starting with 0x00 (STUN, ``00 00 00 00``+more, ``00 00 00 01``+more) is
junk. Real UDP on loopback.
"""

from __future__ import annotations

import socket
from typing import Any

import trio
from hypothesis import given
from hypothesis import strategies as st

from nat import PING, PONG, open_endpoint
from nat.message import classify_datagram, is_keyed_message

from .conftest import connect_pair, wait_until

STUN_BINDING = bytes.fromhex("000100002112a442") + bytes(12)


@given(st.binary(min_size=0, max_size=64))
def test_classification_of_datagrams_starting_with_zero(tail: bytes) -> None:
    data = b"\x00" + tail
    kind = classify_datagram(data)
    if len(data) == 4:
        assert kind == "message"
    elif len(data) > 4 and data[1:3] == b"\x00\x00" and data[3] >= 2:
        assert kind == "keyed"
        assert is_keyed_message(data)
    else:
        assert kind == "junk"


def test_stun_and_longer_ping_pong_are_junk() -> None:
    assert classify_datagram(STUN_BINDING) == "junk"
    assert classify_datagram(b"\x00\x00\x00\x00extra") == "junk"  # a PING to an original peer
    assert classify_datagram(b"\x00\x00\x00\x01extra") == "junk"  # a PONG to an original peer
    assert classify_datagram(b"\x00\x00\x00\x02") == "message"  # 4 bytes: the original format
    assert classify_datagram(b"\x00\x00\x00\x02\x01") == "keyed"


async def test_keyed_messages_reach_the_handler_and_ping_pong_is_unchanged() -> None:
    async with open_endpoint() as endpoint:
        received: list[tuple[bytes, Any]] = []
        endpoint.on_keyed_message = lambda data, address: received.append((data, address))
        raw = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        raw.bind(("127.0.0.1", 0))
        raw.setblocking(False)
        with raw, endpoint.subscribe_messages() as messages:
            keyed = b"\x00\x00\x00\x07\x01" + b"k" * 100
            raw.sendto(keyed, endpoint.address)
            raw.sendto(STUN_BINDING, endpoint.address)
            raw.sendto(b"\x00\x00\x00\x00tail", endpoint.address)
            raw.sendto(PING.to_bytes(4, "big"), endpoint.address)
            with trio.fail_after(5):
                message, address = await messages.receive()
            assert message == PING
            await wait_until(lambda: len(received) == 1 and endpoint.stats.junk_dropped == 2)
            assert received == [(keyed, raw.getsockname())]
            assert endpoint.stats.keyed_received == 1
            # a keyed answer goes out with send_message(bytes, address)
            endpoint.send_message(b"\x00\x00\x00\x03\x01answer", raw.getsockname())
            endpoint.send_message(PONG, raw.getsockname())
            await wait_until(lambda: _readable(raw))
            assert raw.recv(100) == b"\x00\x00\x00\x03\x01answer"
            await wait_until(lambda: _readable(raw))
            assert raw.recv(100) == b"\x00\x00\x00\x01"


async def test_without_a_handler_keyed_messages_are_counted_and_dropped() -> None:
    async with open_endpoint() as endpoint:
        raw = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        with raw:
            raw.sendto(b"\x00\x00\x00\x09\x01xyz", endpoint.address)
            await wait_until(lambda: endpoint.stats.keyed_unhandled == 1)
            assert endpoint.stats.keyed_received == 1
            assert endpoint.stats.handler_errors == 0


async def test_a_failing_handler_is_contained_and_a_transfer_carries_on() -> None:
    async with open_endpoint() as a, open_endpoint() as b:
        calls = [0]

        def failing(data: bytes, address: Any) -> None:
            calls[0] += 1
            raise RuntimeError("handler defect")

        b.on_keyed_message = failing
        client, server = await connect_pair(a, b)
        raw = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        with raw:
            for index in range(50):
                raw.sendto(b"\x00\x00\x00\x05\x01" + bytes([index]) * 40, b.address)
            payload = bytes(range(256)) * 512
            async with trio.open_nursery() as nursery:
                nursery.start_soon(client.send_all, payload)
                got = bytearray()
                with trio.fail_after(10):
                    while len(got) < len(payload):
                        got += await server.receive_some()
            assert bytes(got) == payload
            await wait_until(lambda: calls[0] == 50)
            assert b.stats.handler_errors == 50
        await client.aclose()
        await server.aclose()


def _readable(sock: socket.socket) -> bool:
    try:
        sock.recv(1, socket.MSG_PEEK)
    except BlockingIOError:
        return False
    return True
