"""Live uTP connections moved between a direct path and a relayed virtual path
(nat/utp/paths.py, migration.py) on the simulated network: every byte arrives,
in order, sha256-equal, with no RESET and no new connection, under loss,
duplication and reordering; the time each move took (simulated) is printed.

A move's time: from the first side's move until every packet that was in flight
at that moment is acknowledged (what the old path still held was recovered).
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nat.utp.config import UtpConfig
from nat.utp.multiplexer import UtpMultiplexer
from nat.utp.paths import Path
from nat.utp.sim import AppRunner, LinkProfile, RelayedNode, SimNetwork, SimRelay, StreamApp
from nat.utp.states import UtpState

A = ("10.0.0.1", 1000)
B = ("10.0.0.2", 2000)
R = ("10.0.0.9", 9000)


@dataclass
class Move:
    """Move both sides to the relay (``relay``) or to the direct path once the
    receiver holds ``at`` of the payload; the second side ``lag`` seconds after
    the first (``b_first``: the receiver's side moves first)."""

    at: float
    relay: bool
    lag: float = 0.0
    b_first: bool = False
    started: float | None = None
    in_flight_until: int = 0
    took: float | None = None
    second_done: bool = False


@dataclass
class World:
    net: SimNetwork
    relay: SimRelay
    a: RelayedNode
    b: RelayedNode
    runner: AppRunner
    client: StreamApp
    payload: bytes
    moves: list[Move] = field(default_factory=list)

    @property
    def server(self) -> StreamApp | None:
        return next((app for app in self.runner.apps.values() if app is not self.client), None)


def make_nodes(
    seed: int, profile: LinkProfile, config: UtpConfig | None = None
) -> tuple[SimNetwork, SimRelay, RelayedNode, RelayedNode]:
    """A and B, directly connected and both served by the relay R."""
    net = SimNetwork(seed, profile)
    relay = net.add(R, SimRelay(R))
    relay.serve(A)
    relay.serve(B)
    a = net.add(A, RelayedNode(UtpMultiplexer(config, rng=random.Random(seed * 2 + 1)), relay))
    b = net.add(B, RelayedNode(UtpMultiplexer(config, rng=random.Random(seed * 2 + 2)), relay))
    return net, relay, a, b


def make_world(seed: int, profile: LinkProfile, size: int, back: int = 0, config: UtpConfig | None = None) -> World:
    net, relay, a, b = make_nodes(seed, profile, config)
    data = random.Random(seed)
    payload = data.randbytes(size)
    reply = data.randbytes(back)
    runner = AppRunner([a.mux, b.mux], make_incoming=lambda conn: StreamApp(conn, reply))
    client = runner.add(StreamApp(a.mux.connect(B, net.now), payload))
    world = World(net, relay, a, b, runner, client, payload)
    world.reply = reply  # type: ignore[attr-defined]
    return world


def paths(world: World, relay: bool) -> tuple[Path, Path]:
    if relay:
        return world.a.relay_path(B), world.b.relay_path(A)
    return B, A


def run_moves(world: World, max_time: float = 600.0) -> None:
    net, client = world.net, world.client

    def step() -> None:
        world.runner()
        server = world.server
        if server is None:
            return
        got = len(server.received) / max(1, len(world.payload))
        for move in world.moves:
            a_conn, b_conn = client.conn, server.conn
            path_a, path_b = paths(world, move.relay)
            first = (world.b.mux, b_conn, path_b) if move.b_first else (world.a.mux, a_conn, path_a)
            second = (world.a.mux, a_conn, path_a) if move.b_first else (world.b.mux, b_conn, path_b)
            if move.started is None:
                if got < move.at or any(m.started is not None and not m.second_done for m in world.moves):
                    return
                if a_conn.is_closed or b_conn.is_closed:
                    return
                move.started = net.now
                move.in_flight_until = a_conn.next_seq
                first[0].move_connection(first[1], first[2], net.now)
            if not move.second_done and net.now >= move.started + move.lag:
                if not second[1].is_closed:
                    second[0].move_connection(second[1], second[2], net.now)
                move.second_done = True
            if move.took is None and (a_conn.is_closed or a_conn.oldest_unacked_seq >= move.in_flight_until):
                move.took = net.now - move.started

    net.run(
        lambda: client.done and world.server is not None and world.server.done,
        on_step=step,
        max_time=max_time,
    )


def check(world: World) -> None:
    server = world.server
    assert server is not None
    assert hashlib.sha256(server.received).digest() == hashlib.sha256(world.payload).digest()
    assert hashlib.sha256(world.client.received).digest() == hashlib.sha256(world.reply).digest()  # type: ignore[attr-defined]
    assert world.client.conn.error is None and server.conn.error is None
    for mux in (world.a.mux, world.b.mux):
        stats = mux.stats
        assert stats.resets_sent == stats.resets_received == 0
        assert stats.connections_opened + stats.connections_accepted == 1
        assert stats.unknown_connection == 0
    # (a move whose second side was due after the transfer ended moved one side)
    started = sum(move.started is not None for move in world.moves)
    complete = sum(move.second_done for move in world.moves)
    for mux in (world.a.mux, world.b.mux):
        assert complete <= mux.stats.path_moves <= started
    assert world.client.conn.path_moves == world.a.mux.stats.path_moves


def report(name: str, world: World) -> None:
    times = ", ".join(
        f"{'relay' if m.relay else 'direct'} {m.took * 1000:.1f} ms" if m.took is not None else "?" for m in world.moves
    )
    print(f"{name}: {len(world.payload) >> 20} MiB, moves (simulated time to recover what was in flight): {times}")


def test_sixteen_mib_moved_three_times_each_way() -> None:
    world = make_world(1, LinkProfile(delay=0.005, jitter=0.002), 16 << 20, back=256 << 10)
    world.moves = [Move(at=(i + 1) / 8, relay=i % 2 == 0, lag=0.003 * i) for i in range(6)]
    run_moves(world)
    check(world)
    assert world.relay.forwarded > 0
    assert all(m.took is not None for m in world.moves)  # all six happened, each recovered
    report("clean link", world)


@pytest.mark.parametrize("seed", range(12))
def test_moves_under_loss_duplication_and_reordering(seed: int) -> None:
    rng = random.Random(500 + seed)
    profile = LinkProfile(
        loss=rng.choice([0.01, 0.03, 0.08]),
        duplicate=rng.choice([0.0, 0.02, 0.1]),
        reorder=rng.choice([0.05, 0.2]),
        delay=rng.choice([0.002, 0.02]),
        jitter=rng.choice([0.0, 0.01]),
    )
    config = UtpConfig(congestion=rng.choice(["ledbat", "tolerant", "rate"]))
    world = make_world(seed, profile, rng.randrange(1 << 20, 3 << 20), back=rng.randrange(0, 200_000), config=config)
    world.moves = [
        Move(at=(i + 1) / 9, relay=i % 2 == 0, lag=rng.choice([0.0, 0.01, 0.05]), b_first=rng.random() < 0.5)
        for i in range(6)
    ]
    run_moves(world)
    check(world)
    assert sum(move.second_done for move in world.moves) >= 2  # (later ones may find the transfer done)


def test_direct_path_cut_then_moved_to_the_relay() -> None:
    """The direct path dies mid-stream (everything on it lost); the caller
    notices a second later and moves both sides to the relay."""
    world = make_world(2, LinkProfile(delay=0.005), 4 << 20)
    cut = {"on": False}

    def direct_dropped(src: tuple, dst: tuple, data: bytes) -> bool:
        return not (cut["on"] and {src, dst} == {A, B})

    world.net.filters.append(direct_dropped)
    net = world.net

    def step() -> None:
        world.runner()
        server = world.server
        if server is None:
            return
        if not cut["on"] and len(server.received) > len(world.payload) // 3:
            cut["on"] = True
            world.cut_at = net.now  # type: ignore[attr-defined]
        if cut["on"] and not world.moves and net.now >= world.cut_at + 1.0:  # type: ignore[attr-defined]
            move = Move(at=0.0, relay=True, started=net.now, second_done=True)
            world.moves.append(move)
            world.a.mux.move_connection(world.client.conn, world.a.relay_path(B), net.now)
            world.b.mux.move_connection(server.conn, world.b.relay_path(A), net.now)

    net.run(lambda: world.client.done and world.server is not None and world.server.done, on_step=step)
    world.reply = b""  # type: ignore[attr-defined]
    check(world)
    assert net.dropped > 0


def test_nat_rebinding_moves_only_when_the_caller_says() -> None:
    """The receiver's NAT mapping changes: its packets come from a new address.
    Until the caller moves the sender's side they are dropped and counted
    (path_mismatch), never answered with a RESET; after the move the transfer
    completes. The rebinding side does not move (its view of the peer is
    unchanged)."""
    world = make_world(3, LinkProfile(delay=0.005), 2 << 20)
    net = world.net
    b_new = ("10.0.0.2", 2999)
    state = {"rebound": None, "moved": False}

    def step() -> None:
        world.runner()
        server = world.server
        if server is None:
            return
        if state["rebound"] is None and len(server.received) > len(world.payload) // 2:
            net.rebind(B, b_new)
            state["rebound"] = net.now
        elif state["rebound"] is not None and not state["moved"] and net.now >= state["rebound"] + 0.5:
            assert world.a.mux.stats.path_mismatch > 0  # b's packets from its new address
            assert world.client.conn.remote_address == B  # nothing moved it
            world.a.mux.move_connection(world.client.conn, b_new, net.now)
            state["moved"] = True

    net.run(lambda: world.client.done and world.server is not None and world.server.done, on_step=step)
    world.reply = b""  # type: ignore[attr-defined]
    server = world.server
    assert server is not None
    assert hashlib.sha256(server.received).digest() == hashlib.sha256(world.payload).digest()
    assert world.client.conn.error is None and server.conn.error is None
    for mux in (world.a.mux, world.b.mux):
        assert mux.stats.resets_sent == mux.stats.resets_received == 0
    assert world.client.conn.remote_address == b_new


def test_connect_and_accept_over_a_virtual_path() -> None:
    """A connection opened over the relay: the SYN arrives over the virtual path
    and the accepted connection is bound to it; then it upgrades to direct."""
    net, relay, a, b = make_nodes(4, LinkProfile(delay=0.003))
    payload = random.Random(9).randbytes(1 << 20)
    runner = AppRunner([a.mux, b.mux], make_incoming=lambda conn: StreamApp(conn, b""))
    client = runner.add(StreamApp(a.mux.connect(a.relay_path(B), net.now), payload))
    net.run(lambda: len(runner.apps) == 2, on_step=runner)
    server = next(app for app in runner.apps.values() if app is not client)
    assert server.conn.remote_address == b.relay_path(A)
    net.run(lambda: len(server.received) > len(payload) // 2, on_step=runner)
    assert relay.forwarded > 0
    a.mux.move_connection(client.conn, B, net.now)
    b.mux.move_connection(server.conn, A, net.now)
    net.run(lambda: client.done and server.done, on_step=runner)
    assert server.received == payload
    assert a.mux.stats.resets_sent == b.mux.stats.resets_sent == 0


def test_a_move_while_the_syn_is_lost_resends_it_over_the_new_path() -> None:
    """No direct path at all: the initiator's SYN is lost; the caller moves the
    connecting side to the relay and the handshake completes there."""
    net, relay, a, b = make_nodes(5, LinkProfile(delay=0.003))
    net.filters.append(lambda src, dst, data: {src, dst} != {A, B})
    runner = AppRunner([a.mux, b.mux], make_incoming=lambda conn: StreamApp(conn, b"pong"))
    client = runner.add(StreamApp(a.mux.connect(B, net.now), b"ping"))
    net.run(lambda: net.dropped > 0, on_step=runner)
    a.mux.move_connection(client.conn, a.relay_path(B), net.now)
    moved_at = net.now
    net.run(lambda: client.conn.state is UtpState.CONNECTED, on_step=runner)
    # the SYN went again at the move, not after the SYN timeout (initial_rto)
    assert net.now - moved_at < UtpConfig().initial_rto / 2
    net.run(lambda: client.done and len(runner.apps) == 2 and all(app.done for app in runner.apps.values()),
            on_step=runner)  # fmt: skip
    server = next(app for app in runner.apps.values() if app is not client)
    assert server.received == b"ping" and client.received == b"pong"


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 10_000),
    moves=st.lists(
        st.tuples(st.booleans(), st.sampled_from([0.0, 0.005, 0.05, 0.3]), st.booleans()), min_size=1, max_size=8
    ),
)
def test_any_sequence_of_moves_keeps_every_byte(seed: int, moves: list[tuple[bool, float, bool]]) -> None:
    """Hypothesis picks the moves: relay or direct (a move to the current path
    included), the second side's lag, which side goes first."""
    world = make_world(seed, LinkProfile(delay=0.004, loss=0.02, reorder=0.1, duplicate=0.02), 512 << 10, back=64 << 10)
    world.moves = [
        Move(at=(i + 1) / (len(moves) + 2), relay=relay, lag=lag, b_first=b_first)
        for i, (relay, lag, b_first) in enumerate(moves)
    ]
    run_moves(world)
    server = world.server
    assert server is not None
    assert server.received == world.payload
    assert world.client.received == world.reply  # type: ignore[attr-defined]
    for mux in (world.a.mux, world.b.mux):
        assert mux.stats.resets_sent == mux.stats.resets_received == 0
        assert mux.stats.unknown_connection == 0
