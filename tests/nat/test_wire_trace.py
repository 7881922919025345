"""Wire-trace regression: seeded simulated transfers must emit the recorded datagrams.

Every datagram any node emits (before the simulated link drops, duplicates or
delays it) is recorded with the fake time, sender and receiver. The traces the
code produced when they were recorded are checked in under
``tests/nat/fixtures/wire_traces/``; a change to the uTP core that alters a
single byte, the order of two datagrams or the moment one leaves fails here and
names the first datagram that differs.

A deliberate change of behaviour regenerates them::

    KEYNODE_REGEN_TRACES=1 .venv/bin/python -m pytest tests/nat/test_wire_trace.py
    # or: .venv/bin/python -m tests.nat.test_wire_trace

Record format (big-endian, gzip-compressed, gzip mtime 0): per datagram the
fake time (float64), sender and receiver node numbers (u8 each), the length
(u16) and the bytes. Payloads repeat a seeded 4093-byte pattern so the traces
compress; the transfer tests check content with random data.
"""

from __future__ import annotations

import gzip
import os
import random
import struct
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from nat.errors import MalformedPacket
from nat.utp.config import UtpConfig
from nat.utp.connection import UtpConnection
from nat.utp.events import IncomingConnection
from nat.utp.multiplexer import UtpMultiplexer
from nat.utp.packet import TYPE_NAMES, decode_packet
from nat.utp.sim import AppRunner, LinkProfile, SimNetwork, StreamApp

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "wire_traces"
REGENERATE = os.environ.get("KEYNODE_REGEN_TRACES") == "1"
_RECORD = struct.Struct(">dBBH")

A = ("10.0.0.1", 1000)
B = ("10.0.0.2", 2000)


def pattern_payload(seed: int, size: int) -> bytes:
    """``size`` bytes repeating a seeded 4093-byte pattern (compressible, not periodic
    at any packet size)."""
    unit = random.Random(seed).randbytes(4093)
    return (unit * (size // len(unit) + 1))[:size]


@dataclass
class Trace:
    """The datagrams of one scenario, in emission order."""

    names: dict[tuple, int] = field(default_factory=dict)
    records: list[tuple[float, int, int, bytes]] = field(default_factory=list)

    def attach(self, net: SimNetwork) -> None:
        def record(src: tuple, dst: tuple, data: bytes) -> bool:
            self.records.append((net.now, self._node(src), self._node(dst), bytes(data)))
            return True

        net.filters.insert(0, record)  # first: it sees what later filters drop

    def _node(self, addr: tuple) -> int:
        return self.names.setdefault(addr, len(self.names))

    def encode(self) -> bytes:
        parts = []
        for at, src, dst, data in self.records:
            parts.append(_RECORD.pack(at, src, dst, len(data)))
            parts.append(data)
        return b"".join(parts)


def decode_trace(raw: bytes) -> list[tuple[float, int, int, bytes]]:
    records = []
    offset = 0
    while offset < len(raw):
        at, src, dst, size = _RECORD.unpack_from(raw, offset)
        offset += _RECORD.size
        records.append((at, src, dst, raw[offset : offset + size]))
        offset += size
    return records


class Ticker:
    """A node that only has a timer: steps the simulation every ``period`` so a
    slow reader keeps reading when nothing else happens."""

    def __init__(self, period: float) -> None:
        self.period = period
        self.next = period

    def datagrams_to_send(self, now: float) -> list[tuple[bytes, tuple]]:
        return []

    def get_timer(self) -> float:
        return self.next

    def handle_timer(self, now: float) -> None:
        self.next = now + self.period

    def receive_datagram(self, data: bytes, addr: tuple, now: float) -> None:
        pass


def _pair(
    net: SimNetwork, config: UtpConfig, a: tuple = A, b: tuple = B, seed: int = 0
) -> tuple[UtpMultiplexer, UtpMultiplexer]:
    return (
        net.add(a, UtpMultiplexer(config, rng=random.Random(seed * 2 + 1))),
        net.add(b, UtpMultiplexer(config, rng=random.Random(seed * 2 + 2))),
    )


def _bulk(
    trace: Trace,
    seed: int,
    profile: LinkProfile,
    congestion: str,
    size_ab: int,
    size_ba: int,
    *,
    a: tuple = A,
    b: tuple = B,
    config: UtpConfig | None = None,
    read_budget: int | None = None,
) -> None:
    net = SimNetwork(seed, profile)
    trace.attach(net)
    config = config or UtpConfig(congestion=congestion)
    mux_a, mux_b = _pair(net, config, a, b, seed)
    if read_budget is not None:
        net.add(("ticker", 0), Ticker(0.01))  # a duck-typed node
    payload_ab = pattern_payload(seed, size_ab)
    payload_ba = pattern_payload(seed + 1, size_ba)
    runner = AppRunner(
        [mux_a, mux_b], make_incoming=lambda conn: StreamApp(conn, payload_ba, read_budget=read_budget)
    )
    client = runner.add(StreamApp(mux_a.connect(b, net.now), payload_ab))
    net.run(
        lambda: client.done and len(runner.apps) == 2 and all(app.done for app in runner.apps.values()),
        on_step=runner,
        max_time=900,
    )
    server = next(app for app in runner.apps.values() if app is not client)
    assert bytes(server.received) == payload_ab and bytes(client.received) == payload_ba
    # the lingering FIN acknowledgements and their expiry belong to the trace too
    net.run(lambda: not mux_a.connections and not mux_b.connections, on_step=runner, max_time=60)


def scenario_clean_both_ways_rate(trace: Trace) -> None:
    _bulk(trace, 1, LinkProfile(delay=0.01), "rate", 300_000, 200_000)


def scenario_loss_jitter_ledbat(trace: Trace) -> None:
    _bulk(trace, 2, LinkProfile(loss=0.03, delay=0.02, jitter=0.004), "ledbat", 250_000, 40_000)


def scenario_heavy_loss_both_ways_tolerant(trace: Trace) -> None:
    profile = LinkProfile(loss=0.12, duplicate=0.02, reorder=0.05, delay=0.03, jitter=0.01)
    _bulk(trace, 7, profile, "tolerant", 150_000, 150_000)


def scenario_duplicate_reorder_tolerant_ipv6(trace: Trace) -> None:
    profile = LinkProfile(duplicate=0.05, reorder=0.2, reorder_delay=0.03, delay=0.01, jitter=0.005, loss=0.01)
    _bulk(trace, 3, profile, "tolerant", 200_000, 100_000, a=("fd00::1", 1000, 0, 0), b=("fd00::2", 2000, 0, 0))


def scenario_bottleneck_slow_reader_rate(trace: Trace) -> None:
    # a rate-limited link with loss, a small receive buffer and a reader that
    # takes 3000 bytes a step: zero windows, probes, window updates
    config = UtpConfig(congestion="rate", recv_buffer_size=16 * 1382, send_buffer_size=64 * 1024)
    profile = LinkProfile(delay=0.015, rate=1500, loss=0.02)
    _bulk(trace, 4, profile, "rate", 300_000, 20_000, config=config, read_budget=700)


class EchoServer:
    """Answers each complete request (4-byte length + body) with ``reply_size`` bytes."""

    def __init__(self, conn: UtpConnection, reply_size: Callable[[int], int]) -> None:
        self.conn = conn
        self.buffer = bytearray()
        self.outgoing = bytearray()
        self.reply_size = reply_size
        self.answered = 0

    def pump(self) -> None:
        conn = self.conn
        while data := conn.read(1 << 16):
            self.buffer += data
        while len(self.buffer) >= 4:
            size = int.from_bytes(self.buffer[:4], "big")
            if len(self.buffer) < 4 + size:
                break
            del self.buffer[: 4 + size]
            self.outgoing += pattern_payload(self.answered, self.reply_size(self.answered))
            self.answered += 1
        if self.outgoing and not conn.is_closed:
            taken = conn.send(self.outgoing)
            del self.outgoing[:taken]
        if conn.at_eof and not conn.eof_sent and not self.outgoing:
            conn.send_eof()


def scenario_request_response_rate(trace: Trace) -> None:
    """Sixty requests of 120 bytes, answers of 120 bytes to 5 KiB, one at a time,
    think time between them, light loss; then a close from the client."""
    net = SimNetwork(5, LinkProfile(delay=0.005, jitter=0.001, loss=0.02))
    trace.attach(net)
    mux_a, mux_b = _pair(net, UtpConfig(congestion="rate"), seed=5)
    sizes = random.Random(55)
    replies = [sizes.choice([120, 120, 700, 1500, 5000]) for _ in range(60)]
    servers: list[EchoServer] = []
    client = mux_a.connect(B, net.now)
    state = {"sent": 0, "received": 0, "next_at": 0.0}

    def step() -> None:
        for mux in (mux_a, mux_b):
            while (event := mux.next_event()) is not None:
                if isinstance(event, IncomingConnection):
                    servers.append(EchoServer(event.conn, lambda index: replies[index]))
        for server in servers:
            server.pump()
        while data := client.read(1 << 16):
            state["received"] += len(data)
        done = sum(replies[: state["sent"]])
        if state["sent"] < len(replies) and state["received"] == done and net.now >= state["next_at"]:
            client.send((120).to_bytes(4, "big") + pattern_payload(100 + state["sent"], 120))
            state["sent"] += 1
            state["next_at"] = net.now + 0.003
        elif state["sent"] == len(replies) and state["received"] == done and not client.eof_sent:
            client.close()

    net.run(lambda: client.is_closed and all(s.conn.is_closed for s in servers), on_step=step, max_time=300)
    assert client.error is None and state["received"] == sum(replies)
    net.run(lambda: not mux_a.connections and not mux_b.connections, on_step=step, max_time=60)


def scenario_lifecycle_ledbat(trace: Trace) -> None:
    """(One connection per node at a time: a multiplexer serves several dirty
    connections in set order, which is not reproducible across processes.)

    Refused connection, lost SYNs, a lost SYN-ACK while the acceptor speaks
    first, keep-alives, abort mid-transfer, a black hole, a path that dies, a
    stalled reader that then closes, stray and malformed datagrams."""
    net = SimNetwork(6, LinkProfile(delay=0.01))
    trace.attach(net)
    config = UtpConfig(congestion="ledbat")
    small = UtpConfig(congestion="ledbat", recv_buffer_size=16 * 1382)
    nodes = [(f"10.0.1.{i}", 4000 + i) for i in range(18)]
    muxes = [
        net.add(addr, UtpMultiplexer(small if i in (13, 14) else config, rng=random.Random(60 + i)))
        for i, addr in enumerate(nodes)
    ]
    muxes[1].accepting = False
    dropped = {"syn": 0, "synack": 0}

    def impair(src: tuple, dst: tuple, data: bytes) -> bool:
        if src == nodes[2] and dst == nodes[3] and data[0] >> 4 == 4 and dropped["syn"] < 2:
            dropped["syn"] += 1  # the first two SYNs from node 2 to node 3 are lost
            return False
        if src == nodes[9] and dst == nodes[8] and data[0] >> 4 == 2 and dropped["synack"] < 1:
            dropped["synack"] += 1  # node 9's SYN-ACK is lost, its early DATA is not
            return False
        if nodes[11] in (src, dst) and net.now > 0.1:
            return False  # the path between 11 and 12 dies mid-transfer
        if nodes[15] in (src, dst) and net.now > 2.0:
            return False  # the path between 15 and 16 dies before a close
        return True

    net.filters.append(impair)
    stalled: list[StreamApp] = []

    def incoming(conn: UtpConnection) -> StreamApp:
        app = StreamApp(conn, pattern_payload(61, 30_000))
        if conn.remote_address == nodes[13]:
            app.paused = True
            stalled.append(app)
        return app

    runner = AppRunner(muxes, make_incoming=incoming)
    net.add(("ticker", 0), Ticker(0.05))  # a duck-typed node
    refused = runner.add(StreamApp(muxes[0].connect(nodes[1], net.now), b"hello"))
    keepalive = runner.add(StreamApp(muxes[2].connect(nodes[3], net.now), pattern_payload(62, 10_000), send_eof=False))
    aborted = runner.add(StreamApp(muxes[4].connect(nodes[5], net.now), pattern_payload(63, 400_000)))
    half = runner.add(StreamApp(muxes[6].connect(nodes[7], net.now), pattern_payload(64, 50_000)))
    early = runner.add(StreamApp(muxes[8].connect(nodes[9], net.now), pattern_payload(65, 5_000)))
    black_hole = runner.add(StreamApp(muxes[10].connect(("10.0.9.9", 9), net.now), b"anyone?"))
    dying = runner.add(StreamApp(muxes[11].connect(nodes[12], net.now), pattern_payload(66, 2_000_000)))
    flooding = runner.add(StreamApp(muxes[13].connect(nodes[14], net.now), pattern_payload(67, 3_000_000)))
    closing = runner.add(StreamApp(muxes[15].connect(nodes[16], net.now), b"bye", send_eof=False))
    state = {"aborted": False, "strays": False, "resumed": False, "closed": False, "closing": False}

    def step() -> None:
        runner()
        if not state["aborted"] and aborted.conn.bytes_sent > 100_000:
            state["aborted"] = True
            aborted.conn.abort()
        if stalled and not state["resumed"] and net.now > 5.0:
            state["resumed"] = True
            stalled[0].paused = False
        if stalled and not state["closed"] and net.now > 5.5:
            state["closed"] = True
            stalled[0].conn.close()  # data still coming: acknowledged, discarded
        if not state["closing"] and net.now > 2.0:
            state["closing"] = True
            closing.conn.close()  # the FIN is never acknowledged: close_timeout
        if not state["strays"] and net.now > 1.0:
            state["strays"] = True
            # packets of connections nobody knows, and junk the core must drop
            net.inject(nodes[6], nodes[7], bytes((0x01, 0, 0x12, 0x34)) + bytes(16))
            net.inject(nodes[6], nodes[7], bytes((0x21, 0, 0x12, 0x34)) + bytes(16))
            net.inject(nodes[6], nodes[7], bytes((0x21, 0, 0x12, 0x34)) + bytes(16), delay=0.5)
            net.inject(nodes[6], nodes[7], bytes((0x31, 0, 0x12, 0x34)) + bytes(16))
            net.inject(nodes[6], nodes[7], bytes((0x01, 1, 0x12, 0x34)) + bytes(16) + b"\x00\x04\xff")
            net.inject(nodes[6], nodes[7], bytes((0x51, 0)) + bytes(18))
            # a SYN nobody follows up: half-open, reaped after syn_recv_timeout
            net.inject(("10.0.8.8", 8), nodes[17], bytes((0x41, 0, 0x43, 0x21)) + bytes(16))

    # seventy idle seconds on the keep-alive connection: two keep-alives each way
    net.run(lambda: net.now > 70.0, on_step=step, max_time=100)
    assert refused.conn.is_closed and aborted.conn.is_closed and dropped == {"syn": 2, "synack": 1}
    assert not keepalive.conn.is_closed and half.done and early.done
    assert black_hole.conn.is_closed and dying.conn.is_closed and flooding.conn.is_closed
    assert closing.conn.is_closed and muxes[17].stats.reaped_half_open == 1
    keepalive.conn.close()
    # (the far ends of the dead paths live on, sending keep-alives: uTP has no idle timeout)
    net.run(lambda: net.now > 100.0, on_step=step, max_time=100)
    assert keepalive.conn.is_closed and not muxes[2].connections


SCENARIOS: dict[str, Callable[[Trace], None]] = {
    "clean_both_ways_rate": scenario_clean_both_ways_rate,
    "loss_jitter_ledbat": scenario_loss_jitter_ledbat,
    "duplicate_reorder_tolerant_ipv6": scenario_duplicate_reorder_tolerant_ipv6,
    "heavy_loss_both_ways_tolerant": scenario_heavy_loss_both_ways_tolerant,
    "bottleneck_slow_reader_rate": scenario_bottleneck_slow_reader_rate,
    "request_response_rate": scenario_request_response_rate,
    "lifecycle_ledbat": scenario_lifecycle_ledbat,
}


def record(name: str) -> bytes:
    trace = Trace()
    SCENARIOS[name](trace)
    return trace.encode()


def fixture_path(name: str) -> Path:
    return FIXTURES / f"{name}.trace.gz"


def write_fixture(name: str, raw: bytes) -> None:
    FIXTURES.mkdir(parents=True, exist_ok=True)
    fixture_path(name).write_bytes(gzip.compress(raw, compresslevel=9, mtime=0))


def describe(record: tuple[float, int, int, bytes]) -> str:
    at, src, dst, data = record
    try:
        packet = decode_packet(data)
        kind = f"{TYPE_NAMES[packet.type]} {packet!r}"
    except MalformedPacket:
        kind = "not uTP"
    head = data[:48].hex()
    more = f"... ({len(data)} bytes)" if len(data) > 48 else f" ({len(data)} bytes)"
    return f"t={at!r} node {src} -> {dst}: {kind}\n    {head}{more}"


def first_difference(expected: bytes, actual: bytes) -> str | None:
    if expected == actual:
        return None
    want = decode_trace(expected)
    got = decode_trace(actual)
    for index, (a, b) in enumerate(zip(want, got, strict=False)):
        if a != b:
            at = next((i for i, (x, y) in enumerate(zip(a[3], b[3], strict=False)) if x != y), None)
            where = "" if at is None else f" (byte {at}: {a[3][at : at + 16].hex()} -> {b[3][at : at + 16].hex()})"
            return f"datagram {index} differs{where}:\n  recorded {describe(a)}\n  now      {describe(b)}"
    if len(want) > len(got):
        return f"{len(want) - len(got)} datagrams missing from {len(got)} on: first {describe(want[len(got)])}"
    return f"{len(got) - len(want)} datagrams more than the {len(want)} recorded: first {describe(got[len(want)])}"


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_wire_trace_is_unchanged(name: str) -> None:
    actual = record(name)
    if REGENERATE:
        write_fixture(name, actual)
        return
    path = fixture_path(name)
    assert path.is_file(), f"{path} is missing: KEYNODE_REGEN_TRACES=1 records it"
    difference = first_difference(gzip.decompress(path.read_bytes()), actual)
    assert difference is None, f"{name}: {difference}"


def test_wire_trace_is_deterministic() -> None:
    assert record("request_response_rate") == record("request_response_rate")


if __name__ == "__main__":
    for scenario in sys.argv[1:] or sorted(SCENARIOS):
        raw = record(scenario)
        write_fixture(scenario, raw)
        print(f"{scenario}: {len(decode_trace(raw))} datagrams, {fixture_path(scenario).stat().st_size} bytes")
