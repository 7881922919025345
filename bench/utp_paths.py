"""uTP bulk over a direct UDP path against the same over a virtual path (a relay
in memory, in-process: nat/utp/paths.py, Endpoint.add_path/receive_from_path),
side by side in one run, interleaved; then a transfer moved between the two
paths several times (UtpStream.move_to) with the time each move took.

Both endpoints run in this one process, so each row's CPU is both ends' (and
the relay's). The in-memory relay costs what a relay link costs the nodes
(a queue and a hand-over per datagram), not a relay node's forwarding.

    .venv/bin/python bench/utp_paths.py [--mib 64] [--rounds 3] [--moves 6]
"""

from __future__ import annotations

import argparse
import hashlib
import random
import statistics
import sys
import time
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nat.endpoint import Endpoint, open_endpoint  # noqa: E402
from nat.stream import UtpStream  # noqa: E402
from nat.utp.config import UtpConfig  # noqa: E402
from proxy.tunnel.defaults import DEFAULT_CONGESTION  # noqa: E402
from tests.nat.test_paths_support import MemoryRelay, memory_relay  # noqa: E402


async def transfer(
    a: Endpoint, b: Endpoint, relay: MemoryRelay, payload: bytes, relayed: bool, moves: int, close: bool = True
) -> tuple[float, float, list[tuple[str, float]]]:
    """(wall seconds, CPU seconds, [(path moved to, seconds until what was in flight was acknowledged)])."""
    client = await a.connect(relay.a_to_b if relayed else b.address)
    server = await b.accept()
    received = bytearray()
    took: list[tuple[str, float]] = []
    pending: list[tuple[str, float, int]] = []
    size = len(payload)

    async def read(stream: UtpStream) -> None:
        done_moves = 0
        while len(received) < size:
            received.extend(await stream.receive_some(1 << 20))
            if done_moves < moves and len(received) >= (done_moves + 1) * size // (moves + 2):
                to_relay = client.path != relay.a_to_b
                pending.append(("relay" if to_relay else "direct", time.perf_counter(), client.connection.next_seq))
                client.move_to(relay.a_to_b if to_relay else b.address)
                server.move_to(relay.b_to_a if to_relay else a.address)
                done_moves += 1
            for entry in list(pending):
                if client.connection.oldest_unacked_seq >= entry[2]:
                    took.append((entry[0], time.perf_counter() - entry[1]))
                    pending.remove(entry)

    start, cpu = time.perf_counter(), time.process_time()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(read, server)
        await client.send_all(payload)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    if hashlib.sha256(received).digest() != hashlib.sha256(payload).digest():
        raise SystemExit("the bytes that arrived differ from those sent")
    if close:
        await client.aclose()
        await server.aclose()
    return wall, cpu, took


async def main(mib: int, rounds: int, moves: int) -> None:
    payload = random.Random(1).randbytes(mib << 20)
    rows: dict[str, list[tuple[float, float]]] = {"direct": [], "relayed (memory)": []}
    move_times: list[tuple[str, float]] = []
    config = UtpConfig(congestion=DEFAULT_CONGESTION)  # the tunnel's controller
    async with (
        open_endpoint(config=config) as a,
        open_endpoint(config=config) as b,
        memory_relay(a, b) as relay,
    ):
        for _ in range(rounds):
            for name, relayed in (("direct", False), ("relayed (memory)", True)):
                wall, cpu, _ = await transfer(a, b, relay, payload, relayed, 0)
                rows[name].append((wall, cpu))
        # (closing a transfer may reset it: aclose after our FIN was acknowledged)
        before = a.multiplexer.stats.resets_received + b.multiplexer.stats.resets_received
        wall, cpu, move_times = await transfer(a, b, relay, payload, False, moves, close=False)
        resets = a.multiplexer.stats.resets_received + b.multiplexer.stats.resets_received - before
    print(
        f"uTP bulk ({DEFAULT_CONGESTION}), one process, both ends, {mib} MiB per transfer,"
        f" median of {rounds} (interleaved):"
    )
    for name, samples in rows.items():
        wall_median = statistics.median(w for w, _ in samples)
        cpu_median = statistics.median(c for _, c in samples)
        print(f"  {name:18} {mib / wall_median:7.1f} MiB/s wall, {mib / cpu_median:7.1f} MiB/s per CPU second")
    direct = statistics.median(mib / w for w, _ in rows["direct"])
    relayed = statistics.median(mib / w for w, _ in rows["relayed (memory)"])
    print(f"  relayed / direct: {relayed / direct:.0%}")
    print(
        f"  moved {moves} times mid-transfer: {mib / wall:.1f} MiB/s, sha256-equal, {resets} RESETs; each move: "
        + ", ".join(f"{name} {seconds * 1000:.1f} ms" for name, seconds in move_times)
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mib", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--moves", type=int, default=6)
    args = parser.parse_args()
    trio.run(main, args.mib, args.rounds, args.moves)
