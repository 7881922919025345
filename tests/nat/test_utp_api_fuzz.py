"""Hypothesis stateful test: random API calls on both ends of a connection over a
lossy simulated network. Only typed errors escape (UtpClosed for writing after
EOF/close), received bytes are always a prefix of what the peer wrote, memory
stays bounded, and when both sides finish politely every byte arrives.
"""

from __future__ import annotations

import random

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from nat.errors import UtpClosed
from nat.utp.multiplexer import UtpConfig, UtpMultiplexer
from nat.utp.sim import AppRunner, LinkProfile, SimNetwork, StreamApp

A = ("10.0.0.1", 1000)
B = ("10.0.0.2", 2000)
CONFIG = UtpConfig(recv_buffer_size=64 * 1024, send_buffer_size=64 * 1024)


class _Side:
    def __init__(self, conn) -> None:
        self.conn = conn
        self.written = bytearray()
        self.read = bytearray()
        self.closed_by_us = False


class ConnectionMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.net: SimNetwork | None = None
        self.sides: list[_Side] = []

    @initialize(seed=st.integers(0, 10_000), loss=st.sampled_from([0.0, 0.05, 0.2]))
    def open(self, seed: int, loss: float) -> None:
        self.net = SimNetwork(seed, LinkProfile(delay=0.01, loss=loss, duplicate=0.05, reorder=0.1))
        a = self.net.add(A, UtpMultiplexer(CONFIG, rng=random.Random(seed)))
        b = self.net.add(B, UtpMultiplexer(CONFIG, rng=random.Random(seed + 1)))
        self.runner = AppRunner([a, b], make_incoming=lambda conn: StreamApp(conn, b"", send_eof=False))
        client = a.connect(B, self.net.now)
        self.net.run(lambda: len(self.runner.apps) == 1, on_step=self._events, max_time=60)
        server = next(iter(self.runner.apps.values())).conn
        self.sides = [_Side(client), _Side(server)]

    def _events(self) -> None:
        for mux in self.runner.muxes:
            while (event := mux.next_event()) is not None:
                if event.conn not in self.runner.apps and event.conn.remote_address == A:
                    self.runner.add(StreamApp(event.conn, b"", send_eof=False))

    @rule(side=st.integers(0, 1), data=st.binary(min_size=1, max_size=40_000))
    def send(self, side: int, data: bytes) -> None:
        me = self.sides[side]
        try:
            taken = me.conn.send(data)
        except UtpClosed:
            assert me.conn.eof_sent or me.conn.is_closed
            return
        assert 0 <= taken <= len(data)
        me.written += data[:taken]

    @rule(side=st.integers(0, 1), size=st.integers(1, 100_000))
    def read(self, side: int, size: int) -> None:
        me = self.sides[side]
        data = me.conn.read(size)
        assert len(data) <= size
        me.read += data

    @rule(side=st.integers(0, 1))
    def send_eof(self, side: int) -> None:
        self.sides[side].conn.send_eof()

    @rule(side=st.integers(0, 1), how=st.sampled_from(["close", "abort"]))
    def finish(self, side: int, how: str) -> None:
        me = self.sides[side]
        me.closed_by_us = True
        getattr(me.conn, how)()

    @rule(steps=st.integers(1, 200))
    def run_network(self, steps: int) -> None:
        net = self.net
        for _ in range(steps):
            self._events()
            if not net.step():
                break

    def teardown(self) -> None:
        if self.net is None or any(side.closed_by_us for side in self.sides):
            return
        # both ends finish politely: every byte written arrives, then EOF
        for side in self.sides:
            if not side.conn.is_closed:
                side.conn.send_eof()

        def drained() -> bool:
            for side in self.sides:
                side.read += side.conn.read(1 << 20)
            return all(side.conn.at_eof or side.conn.is_closed for side in self.sides)

        self.net.run(drained, on_step=self._events, max_time=600)
        client, server = self.sides
        if client.conn.error is None and server.conn.error is None:
            assert bytes(server.read) == bytes(client.written)
            assert bytes(client.read) == bytes(server.written)

    @invariant()
    def consistent(self) -> None:
        if self.net is None:
            return
        for me, peer in ((self.sides[0], self.sides[1]), (self.sides[1], self.sides[0])):
            conn = me.conn
            # what we read is exactly what the peer wrote, in order
            assert bytes(peer.written[: len(me.read)]) == bytes(me.read)
            assert conn.receive_buffered <= CONFIG.recv_buffer_size + CONFIG.mtu_payload
            assert conn.send_buffered <= CONFIG.send_buffer_size
            assert conn.error is None or not isinstance(conn.error, UtpClosed)


ConnectionMachine.TestCase.settings = settings(
    max_examples=40,
    stateful_step_count=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
test_connection_api = ConnectionMachine.TestCase
