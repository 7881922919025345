"""A defect met while the endpoint handles one datagram is contained (issue item 12).

It is counted (EndpointStats.handler_errors), logged without flooding the log,
and the datagram dropped; the endpoint and every connection on it carry on (uTP
resends what was dropped). Faults are injected by wrapping the multiplexer's
receive_datagram (and the endpoint's message delivery) for one datagram.
"""

from __future__ import annotations

import hashlib
import logging
import random
from typing import Any

import pytest
import trio

from nat import PING, open_endpoint
from nat.endpoint import Endpoint
from nat.udp import ErrorReport
from nat.utp.multiplexer import UtpMultiplexer
from nat.utp.packet import ST_DATA

from .conftest import connect_pair, wait_until


class InjectedFault(Exception):
    pass


async def _send_and_eof(stream: Any, data: bytes) -> None:
    view = memoryview(data)
    for offset in range(0, len(data), 65536):
        await stream.send_all(view[offset : offset + 65536])
    await stream.send_eof()


async def _receive_all(stream: Any) -> bytes:
    chunks = []
    while chunk := await stream.receive_some():
        chunks.append(chunk)
    return b"".join(chunks)


async def test_an_exception_handling_one_datagram_is_contained(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    data = random.Random(12).randbytes(4 * 1024 * 1024)
    faulty_mux: list[UtpMultiplexer] = []
    data_packets = [0]
    original = UtpMultiplexer.receive_datagram

    def receive_datagram(self: UtpMultiplexer, datagram: bytes, addr: Any, now: float) -> None:
        if faulty_mux and self is faulty_mux[0] and datagram[0] >> 4 == ST_DATA:
            data_packets[0] += 1
            if data_packets[0] == 500:  # one specific DATA packet, mid-transfer
                raise InjectedFault("injected fault in the multiplexer")
        original(self, datagram, addr, now)

    # (bound when the endpoint is made: patched first)
    monkeypatch.setattr(UtpMultiplexer, "receive_datagram", receive_datagram)
    caplog.set_level(logging.ERROR, logger="nat.udp")
    async with open_endpoint() as a, open_endpoint() as b:
        faulty_mux.append(b.multiplexer)
        client, server = await connect_pair(a, b)
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_send_and_eof, client, data)
                got = await _receive_all(server)
            await _send_and_eof(server, hashlib.sha256(got).digest())
            answer = await _receive_all(client)
        await client.aclose()
        await server.aclose()
        assert data_packets[0] > 500
        assert got == data and answer == hashlib.sha256(data).digest()
        assert b.stats.handler_errors == 1 and a.stats.handler_errors == 0
        assert not b.closed
    records = [r for r in caplog.records if r.name == "nat.udp"]
    assert len(records) == 1, [r.getMessage() for r in records]
    assert records[0].exc_info is not None and records[0].exc_info[0] is InjectedFault
    assert "uTP datagram" in records[0].getMessage()


async def test_an_exception_delivering_one_message_is_contained(monkeypatch: pytest.MonkeyPatch) -> None:
    original = Endpoint._deliver_message
    calls = [0]

    def deliver(self: Endpoint, data: bytes, addr: Any) -> None:
        calls[0] += 1
        if calls[0] == 1:
            raise InjectedFault("injected fault delivering a message")
        original(self, data, addr)

    monkeypatch.setattr(Endpoint, "_deliver_message", deliver)
    async with open_endpoint() as a, open_endpoint() as b:
        with b.subscribe_messages() as messages:
            a.send_message(PING, b.address)
            await wait_until(lambda: b.stats.handler_errors == 1)
            a.send_message(PING, b.address)
            with trio.fail_after(5):
                assert await messages.receive() == (PING, a.address)
        # and uTP on the same endpoint still works
        client, server = await connect_pair(a, b)
        await client.send_all(b"after")
        with trio.fail_after(5):
            assert await server.receive_some() == b"after"
        await client.aclose()
        await server.aclose()


def test_the_error_log_is_rate_limited(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger="nat.udp")
    report = ErrorReport(first=3, interval=60.0)
    for second in range(200):  # 200 errors over 200 s, one a second
        report.report(InjectedFault(f"fault {second}"), "handling a uTP datagram", float(second))
    messages = [r.getMessage() for r in caplog.records if r.name == "nat.udp"]
    # the first three in full (the third at 2 s), then one line a minute, at
    # 62 s, 122 s and 182 s, each counting the 60 errors since the last line
    assert len(messages) == 6 and report.count == 200
    assert [r.exc_info is not None for r in caplog.records] == [True] * 3 + [False] * 3
    assert messages[3].startswith("60 more") and "fault 62" in messages[3]
    assert messages[4].startswith("60 more") and messages[5].startswith("60 more")
