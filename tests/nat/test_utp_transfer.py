"""uTP core over the simulated network: data both ways, sha256-equal, many seeds."""

from __future__ import annotations

import hashlib
import random

import pytest

from nat.utp.multiplexer import UtpConfig, UtpMultiplexer
from nat.utp.sim import AppRunner, LinkProfile, SimNetwork, StreamApp

A = ("10.0.0.1", 1000)
B = ("10.0.0.2", 2000)


def run_transfer(
    seed: int,
    profile: LinkProfile,
    size_ab: int,
    size_ba: int,
    *,
    config: UtpConfig | None = None,
    max_time: float = 600.0,
    start_time: float = 0.0,
    rng_a: random.Random | None = None,
) -> tuple[StreamApp, StreamApp, SimNetwork]:
    net = SimNetwork(seed, profile, start_time=start_time)
    largest = [0]

    def record_size(src: tuple, dst: tuple, data: bytes) -> bool:
        largest[0] = max(largest[0], len(data))
        return True

    net.filters.append(record_size)
    a = net.add(A, UtpMultiplexer(config, rng=rng_a or random.Random(seed * 2 + 1)))
    b = net.add(B, UtpMultiplexer(config, rng=random.Random(seed * 2 + 2)))
    data = random.Random(seed)
    payload_ab = data.randbytes(size_ab)
    payload_ba = data.randbytes(size_ba)
    runner = AppRunner([a, b], make_incoming=lambda conn: StreamApp(conn, payload_ba))
    client = runner.add(StreamApp(a.connect(B, net.now), payload_ab))
    net.run(
        lambda: client.done and len(runner.apps) == 2 and all(app.done for app in runner.apps.values()),
        on_step=runner,
        max_time=max_time,
    )
    server = next(app for app in runner.apps.values() if app is not client)
    assert hashlib.sha256(server.received).digest() == hashlib.sha256(payload_ab).digest()
    assert hashlib.sha256(client.received).digest() == hashlib.sha256(payload_ba).digest()
    assert client.conn.error is None and server.conn.error is None
    # libutp's 1402-byte UDP payload ceiling holds, selective ACKs included
    assert largest[0] <= (config or UtpConfig()).mtu_payload + 20
    return client, server, net


def test_clean_network_transfer() -> None:
    client, server, net = run_transfer(0, LinkProfile(delay=0.01), 500_000, 300_000)
    assert client.conn.bytes_sent == 500_000
    assert server.conn.bytes_received == 500_000
    assert client.conn.rtt > 0.0


@pytest.mark.parametrize("seed", range(80))
def test_lossy_network_transfer(seed: int) -> None:
    rng = random.Random(1000 + seed)
    profile = LinkProfile(
        loss=rng.choice([0.0, 0.01, 0.05, 0.1, 0.2]),
        duplicate=rng.choice([0.0, 0.02, 0.1]),
        reorder=rng.choice([0.0, 0.05, 0.2]),
        delay=rng.choice([0.001, 0.02, 0.08]),
        jitter=rng.choice([0.0, 0.005, 0.03]),
        rate=rng.choice([None, None, 3000.0]),
    )
    config = UtpConfig(congestion=rng.choice(["ledbat", "tolerant"]))
    run_transfer(seed, profile, rng.randrange(0, 600_000), rng.randrange(0, 300_000), config=config)


@pytest.mark.parametrize("congestion", ["ledbat", "tolerant"])
def test_twenty_percent_loss_both_ways(congestion: str) -> None:
    profile = LinkProfile(loss=0.2, duplicate=0.05, reorder=0.1, delay=0.02, jitter=0.01)
    run_transfer(77, profile, 1_000_000, 1_000_000, config=UtpConfig(congestion=congestion), max_time=900)


def test_ipv6_peers_use_libutp_ipv6_packet_ceiling() -> None:
    a6 = ("fd00::1", 1000, 0, 0)
    b6 = ("fd00::2", 2000, 0, 0)
    net = SimNetwork(5, LinkProfile(delay=0.01, loss=0.05, reorder=0.1))
    largest = [0]
    net.filters.append(lambda src, dst, data: largest.__setitem__(0, max(largest[0], len(data))) or True)
    a = net.add(a6, UtpMultiplexer(rng=random.Random(1)))
    b = net.add(b6, UtpMultiplexer(rng=random.Random(2)))
    payload = random.Random(3).randbytes(200_000)
    runner = AppRunner([a, b], make_incoming=lambda conn: StreamApp(conn, payload))
    client = runner.add(StreamApp(a.connect(b6, net.now), payload))
    net.run(lambda: client.done and all(app.done for app in runner.apps.values()), on_step=runner)
    assert all(bytes(app.received) == payload for app in runner.apps.values())
    assert largest[0] <= 1232
