"""Microbenchmark of the sans-IO uTP core alone: two multiplexers in one process
pumping datagrams through memory (no loss), one-way bulk transfer; with
``--lossy`` also every congestion controller over a simulated lab link (the
shape of bench/lossy_path.py in seconds, no root). ``--pingpong`` instead
times the small request/response path (120 bytes each way, ACKs
piggybacked: a gRPC unary call through the tunnel), per controller.

Prints MiB/s and datagrams/s (wall clock, and CPU time of this process, which
is steadier on a shared machine) with both ends' work included (this is the budget
left for the trio driver and TLS). ``--profile`` runs it under cProfile.

    .venv/bin/python bench/utp_core.py [--mib 64] [--batch 64] [--profile] [--lossy]
    .venv/bin/python bench/utp_core.py --pingpong [--rounds 5000] [--repeat 5] [--profile]
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import random
import time
from dataclasses import dataclass

from nat.utp.config import UtpConfig
from nat.utp.connection import UtpConnection
from nat.utp.events import IncomingConnection
from nat.utp.multiplexer import UtpMultiplexer

A = ("127.0.0.1", 1)
B = ("127.0.0.1", 2)


def connected_pair(config: UtpConfig | None = None) -> tuple[UtpMultiplexer, UtpMultiplexer, UtpConnection, UtpConnection]:
    """Two multiplexers in memory and one connection between them (a to b)."""
    a = UtpMultiplexer(config, rng=random.Random(1))
    b = UtpMultiplexer(config, rng=random.Random(2))
    clock = time.perf_counter
    conn = a.connect(B, clock())
    for data, _addr in a.datagrams_to_send(clock()):
        b.receive_datagram(data, A, clock())
    event = b.next_event()
    assert isinstance(event, IncomingConnection)
    server = event.conn
    for data, _addr in b.datagrams_to_send(clock()):
        a.receive_datagram(data, B, clock())
    return a, b, conn, server


def run(total: int, batch: int) -> tuple[float, float, int, int]:
    a, b, conn, server = connected_pair()
    clock = time.perf_counter
    chunk = bytes(range(256)) * 64  # 16 KiB, like a TLS record
    sent = received = 0
    packets = 0
    queue: list = []
    start = clock()
    cpu_start = time.process_time()
    while received < total:
        now = clock()
        while sent < total:
            taken = conn.send(chunk)
            sent += taken
            if taken < len(chunk):
                break
        queue.extend(a.datagrams_to_send(now))
        # the receiver handles one socket batch, reads, and answers (its ACKs)
        delivered = queue[:batch]
        del queue[:batch]
        packets += len(delivered)
        for data, _addr in delivered:
            b.receive_datagram(data, A, now)
        while True:
            data = server.read(1 << 20)
            if not data:
                break
            received += len(data)
        back = b.datagrams_to_send(now)
        packets += len(back)
        for data, _addr in back:
            a.receive_datagram(data, B, now)
        timer = a.get_timer()
        if timer is not None and timer <= now:
            a.handle_timer(now)
        timer = b.get_timer()
        if timer is not None and timer <= now:
            b.handle_timer(now)
        while a.next_event() is not None:
            pass
        while b.next_event() is not None:
            pass
    elapsed = clock() - start
    cpu = time.process_time() - cpu_start
    return elapsed, cpu, packets, a.stats.retransmits + b.stats.retransmits


def pingpong(congestion: str, rounds: int, size: int = 120, profiler: cProfile.Profile | None = None) -> float:
    """CPU seconds per round trip: A sends ``size`` bytes, B reads them and
    sends them back, A reads them (both ends, ACKs piggybacked on the DATA)."""
    a, b, conn, server = connected_pair(UtpConfig(congestion=congestion))
    clock = time.perf_counter
    while a.next_event() is not None:
        pass
    while b.next_event() is not None:
        pass
    msg = b"x" * size

    def round_trip() -> None:
        now = clock()
        conn.send(msg)
        for data, _addr in a.datagrams_to_send(now):
            b.receive_datagram(data, A, now)
        while b.next_event() is not None:
            pass
        reply = server.read(65536)
        server.send(reply)
        for data, _addr in b.datagrams_to_send(now):
            a.receive_datagram(data, B, now)
        while a.next_event() is not None:
            pass
        if conn.read(65536) != msg:
            raise AssertionError("echo mismatch")

    for _ in range(1000):
        round_trip()
    if profiler is not None:
        profiler.enable()
    cpu_start = time.process_time()
    for _ in range(rounds):
        round_trip()
    cpu = time.process_time() - cpu_start
    if profiler is not None:
        profiler.disable()
    return cpu / rounds


@dataclass
class LinkResult:
    goodput_mbit: float
    peak_queue: float  # seconds
    timeouts: int
    fast_retransmits: int
    retransmits: int
    queue_drops: int


def simulated_link(
    congestion: str, loss: float, *, rate: float = 8700, rtt: float = 0.04, queue: float = 0.05, seconds: float = 8.0
) -> LinkResult:
    """One-way bulk over a simulated lab link for ``seconds`` (fake clock).

    Defaults model bench/lossy_path.py: 8700 datagrams/s (100 Mbit/s of
    1430-byte frames), 40 ms RTT, random ``loss`` each way, and a tail-drop
    queue of ``queue`` seconds like its tbf (a burst past it is dropped).
    """
    from nat.utp.multiplexer import UtpConfig
    from nat.utp.sim import AppRunner, LinkProfile, SimNetwork, StreamApp

    net = SimNetwork(1, LinkProfile(delay=rtt / 2, rate=rate, loss=loss))
    drops = [0]

    def tail_drop(src: tuple, dst: tuple, data: bytes) -> bool:
        if net._link_free_at.get((src, dst), 0.0) - net.now > queue:
            drops[0] += 1
            return False
        return True

    net.filters.append(tail_drop)
    config = UtpConfig(congestion=congestion)
    a = net.add(A, UtpMultiplexer(config, rng=random.Random(1)))
    b = net.add(B, UtpMultiplexer(config, rng=random.Random(2)))
    runner = AppRunner([a, b], make_incoming=lambda conn: StreamApp(conn, b""))
    client = runner.add(StreamApp(a.connect(B, net.now), bytes(int(rate * 1400 * seconds))))
    peak = [0.0]

    def step() -> None:
        runner()
        peak[0] = max(peak[0], net._link_free_at.get((A, B), 0.0) - net.now)

    net.run(lambda: net.now >= seconds, on_step=step, max_time=seconds + 1)
    received = sum(len(app.received) for app in runner.apps.values() if app is not client)
    stats = a.stats
    return LinkResult(
        received * 8 / seconds / 1e6, peak[0], stats.timeouts, stats.fast_retransmits, stats.retransmits, drops[0]
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mib", type=int, default=64)
    parser.add_argument("--batch", type=int, default=64, help="datagrams per receive batch")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument(
        "--pingpong", action="store_true", help="only: small request/response round trips, per controller"
    )
    parser.add_argument("--rounds", type=int, default=5000, help="round trips per --pingpong run")
    parser.add_argument("--repeat", type=int, default=5, help="--pingpong runs per controller (the best is shown)")
    parser.add_argument(
        "--lossy", action="store_true", help="also: simulated bottleneck with random loss, per controller"
    )
    args = parser.parse_args()
    if args.pingpong:
        from nat.utp.congestion import CONTROLLERS

        names = sorted(CONTROLLERS)
        best = {}
        for _ in range(args.repeat):  # the best of several, interleaved (a shared, noisy machine)
            for name in names:
                cost = pingpong(name, args.rounds)
                best[name] = min(best.get(name, cost), cost)
        print(
            f"uTP core ping-pong, 120 bytes each way, CPU per round trip (both ends, "
            f"best of {args.repeat} x {args.rounds}): " + ", ".join(f"{name} {best[name] * 1e6:.1f} us" for name in names)
        )
        if args.profile:
            profiler = cProfile.Profile()
            pingpong("rate", args.rounds, profiler=profiler)
            pstats.Stats(profiler).sort_stats("tottime").print_stats(25)
        return
    total = args.mib << 20
    if args.profile:
        profiler = cProfile.Profile()
        profiler.enable()
    elapsed, cpu, packets, retransmits = run(total, args.batch)
    if args.profile:
        profiler.disable()
        pstats.Stats(profiler).sort_stats("tottime").print_stats(18)
    print(
        f"uTP core, one process, both ends, batch {args.batch}: {args.mib} MiB, "
        f"wall {elapsed:.2f} s = {args.mib / elapsed:.1f} MiB/s ({packets / elapsed:,.0f} datagrams/s); "
        f"CPU {cpu:.2f} s = {args.mib / cpu:.1f} MiB/s ({packets / cpu:,.0f} datagrams/s, "
        f"{cpu / packets * 1e6:.1f} us each); {packets} datagrams, {retransmits} retransmits"
    )
    if args.lossy:
        from nat.utp.congestion import CONTROLLERS

        print(
            "simulated lab link: 100 Mbit/s (8700 datagrams/s), 40 ms RTT, 50 ms tail-drop queue, "
            "random loss each way, 8 s each (fake clock):"
        )
        for loss in (0.0, 0.01, 0.03):
            for congestion in sorted(CONTROLLERS):
                r = simulated_link(congestion, loss)
                print(
                    f"  loss {loss:3.0%}  {congestion:<9} goodput {r.goodput_mbit:5.1f} Mbit/s, "
                    f"peak queue {r.peak_queue * 1000:3.0f} ms, RTOs {r.timeouts}, "
                    f"fast retransmits {r.fast_retransmits}, retransmits {r.retransmits}, "
                    f"queue drops {r.queue_drops}"
                )

if __name__ == "__main__":
    main()
