"""Tunnel paths side by side on loopback: direct against relayed (proxy/tunnel/paths.py).

One process holds everything: a rendezvous relay node (UDP), a relay node over
TCP + mutual TLS (serve_relay), node C (the caller) and node D, which serves an
unmodified grpcio echo server (service port 50051) and a TCP sink that answers the
sha256 of what it read (service port 1314). Both nodes link to the relay node.
"Relayed" is made by D ignoring keyed messages (as behind a NAT that lets none of
C's punches in): C's CONNECT by NodeId then finds no direct path within the punch
window and starts over the relay. All roles share this process's CPU, so both
columns are lower than with one process per node (bench/relay.py, bench/tunnel.py);
they compare with each other.

Printed, in one run:
- tunnel bulk MiB/s (C -> D, sha256 checked) direct | relayed, interleaved rounds;
- gRPC unary median / p99 direct | relayed;
- CONNECT-to-200 by NodeId: direct (the punch succeeds); punching impossible with a
  1 s punch window (the design chosen: wait for a punch, then the relay) and with
  no window (relayed at once, then upgrade);
- path open to direct upgrade: a relayed tunnel carrying a transfer, D answering
  punches again at its 200; the time until C's half moved, and until both had;
  the bytes of each transfer across the move, sha256-equal (0 lost).

    .venv/bin/python bench/paths.py [--mib 64] [--rounds 3] [--calls 500] [--fallbacks 5]
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from proxy.app.demo import start_echo_server, time_unary_calls  # noqa: E402
from proxy.app.demo_paths import _connect, link_to_relay_node  # noqa: E402
from proxy.identity.tls_config import TLSConfig  # noqa: E402
from proxy.relay.limits import RelayLimits  # noqa: E402
from proxy.relay.serve import serve_relay  # noqa: E402
from proxy.rendezvous.addresses import RelayAddress  # noqa: E402
from proxy.tunnel.proxy import open_proxy  # noqa: E402
from proxy.tunnel.services import Service, ServicePolicy  # noqa: E402

GRPC_PORT, SINK_PORT = 50051, 1314
CHUNK = 256 * 1024
TOKEN = "demo"  # demo_paths._connect's


async def _sink(stream: trio.SocketStream) -> None:
    digest = hashlib.sha256()
    async with stream:
        try:
            while data := await stream.receive_some(CHUNK):
                digest.update(data)
            await stream.send_all(digest.hexdigest().encode())
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass


class World:
    def __init__(self, c: Any, d: Any, keyed: Any) -> None:
        self.c, self.d, self._keyed = c, d, keyed

    def block_punching(self) -> None:
        self.d.endpoint.on_keyed_message = None

    def allow_punching(self) -> None:
        self.d.endpoint.on_keyed_message = self._keyed

    def punch_window(self, seconds: float) -> None:
        self.c.paths.timers = dataclasses.replace(self.c.paths.timers, punch_window=seconds)

    async def forget_paths(self) -> None:
        """End every tunnel and forget confirmed paths, so the next CONNECT starts afresh."""
        for proxy in (self.c, self.d):
            for connection in proxy._registry.all():
                connection.close()
        while self.c.connections() or self.d.connections():
            await trio.sleep(0.01)
        for proxy in (self.c, self.d):
            proxy.rendezvous.core.node.sessions.clear()

    async def start_afresh_on(self, wanted: str) -> None:
        """Forget paths, then let punches in ("direct") or not ("relay")."""
        await self.forget_paths()
        if wanted == "relay":
            self.block_punching()
        else:
            self.allow_punching()


async def bulk(world: World, size: int) -> tuple[float, str, bool]:
    """One tunnel to D's sink: MiB/s, its path at the end, sha256 equal."""
    data = os.urandom(size)
    stream, _ = await _connect(world.c, f"{world.d.tls_config.node_id}:{SINK_PORT}")
    started = time.perf_counter()
    for start in range(0, size, CHUNK):
        await stream.send_all(data[start:start + CHUNK])
    await stream.send_eof()
    answer = b""
    while chunk := await stream.receive_some(128):
        answer += chunk
    seconds = time.perf_counter() - started
    path = next((status.info.path for status in world.c.connections()), "?")
    await stream.aclose()
    return size / seconds / (1 << 20), path, answer.decode() == hashlib.sha256(data).hexdigest()


async def connect_time(world: World) -> tuple[float, str]:
    stream, took = await _connect(world.c, f"{world.d.tls_config.node_id}:{SINK_PORT}")
    path = next((status.info.path for status in world.c.connections()), "?")
    await stream.aclose()
    return took, path


def unary(world: World, calls: int) -> tuple[list[float], bool]:
    import grpc

    channel = grpc.insecure_channel(
        f"{world.d.tls_config.node_id}:{GRPC_PORT}",
        options=[("grpc.http_proxy", f"http://{TOKEN}@{world.c.forward_host}:{world.c.forward_port}")])
    with channel:
        return time_unary_calls(channel, calls)


async def upgrade(world: World, size: int) -> tuple[float, float, bool, int]:
    """A relayed tunnel carrying ``size`` bytes; D answers punches again at its 200:
    seconds until C's half moved, until both had, sha256 equal, bytes across."""
    world.block_punching()
    data = os.urandom(size)
    stream, _ = await _connect(world.c, f"{world.d.tls_config.node_id}:{SINK_PORT}")
    opened = time.perf_counter()
    world.allow_punching()
    moved: dict[str, float] = {}

    async def watch() -> None:
        while len(moved) < 2:
            for name, proxy in (("c", world.c), ("d", world.d)):
                if name not in moved and any(status.move_count for status in proxy.connections()):
                    moved[name] = time.perf_counter() - opened
            await trio.sleep(0.002)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch)
        for start in range(0, size, CHUNK):
            await stream.send_all(data[start:start + CHUNK])
        with trio.move_on_after(30):
            while len(moved) < 2:
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    await stream.send_eof()
    answer = b""
    while chunk := await stream.receive_some(128):
        answer += chunk
    await stream.aclose()
    equal = answer.decode() == hashlib.sha256(data).hexdigest()
    return moved.get("c", float("nan")), max(moved.values(), default=float("nan")), equal, size


async def run(args: argparse.Namespace) -> None:
    relay_tls = TLSConfig.generate()
    limits = RelayLimits(rate=1 << 30, burst=64 << 20, queue_bytes=8 << 20, queue_frames=8192)
    common: dict[str, Any] = {"auth_token": TOKEN, "proxy_host": "127.0.0.1", "punch_window": 1.0}
    grpc_server = start_echo_server()
    grpc_port = grpc_server.port
    try:
        async with trio.open_nursery() as nursery:
            server = await nursery.start(
                lambda task_status: serve_relay(relay_tls, host="127.0.0.1", limits=limits, task_status=task_status))
            sink = (await nursery.start(trio.serve_tcp, _sink, 0))[0].socket.getsockname()
            policy = ServicePolicy(services=(Service("grpc", ("127.0.0.1", grpc_port), GRPC_PORT),
                                             Service("sink", ("127.0.0.1", sink[1]), SINK_PORT)))
            async with open_proxy(tls_config=TLSConfig.generate(), relay_serve=True, **common) as rendezvous:
                relays = (RelayAddress(rendezvous.tls_config.node_id, "127.0.0.1", rendezvous.proxy_port),)
                async with open_proxy(tls_config=TLSConfig.generate(), relay_servers=relays, **common) as c, \
                        open_proxy(tls_config=TLSConfig.generate(), relay_servers=relays, policy=policy,
                                   **common) as d:
                    for proxy in (c, d):
                        await link_to_relay_node(nursery, proxy, f"{relay_tls.node_id}@127.0.0.1:{server.port}")
                    await measure(World(c, d, d.endpoint.on_keyed_message), args)
            nursery.cancel_scope.cancel()
    finally:
        grpc_server.stop()


def ms(samples: list[float]) -> str:
    ordered = sorted(samples)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    return f"{statistics.median(samples) * 1000:.2f} / {p99 * 1000:.2f} ms"


async def measure(world: World, args: argparse.Namespace) -> None:
    size = args.mib << 20
    rates: dict[str, list[float]] = {"direct": [], "relay": []}
    intact = True
    for _ in range(args.rounds):
        for wanted in ("direct", "relay"):
            await world.start_afresh_on(wanted)
            rate, path, equal = await bulk(world, size)
            intact &= equal
            rates[path if path in rates else wanted].append(rate)
    print(f"tunnel bulk C -> D, {args.mib} MiB x {args.rounds} (MiB/s, sha256 {'equal' if intact else 'DIFFERENT'})")
    for path, values in rates.items():
        if values:
            print(f"  {path:<8} " + "  ".join(f"{value:.1f}" for value in values)
                  + f"   median {statistics.median(values):.1f}")

    latencies: dict[str, list[float]] = {}
    for wanted in ("direct", "relay"):
        await world.start_afresh_on(wanted)
        samples, ok = await trio.to_thread.run_sync(unary, world, args.calls)
        intact &= ok
        path = next((status.info.path for status in world.c.connections()), "?")
        latencies[f"{wanted} (path {path})"] = samples
    print(f"gRPC unary through the tunnel, {args.calls} calls (median / p99)")
    for name, samples in latencies.items():
        print(f"  {name:<22} {ms(samples)}")

    print(f"CONNECT by NodeId to 200, {args.fallbacks} rounds (s)")
    for label, block, window in (("direct (punch succeeds)", False, 1.0),
                                 ("punch impossible, 1 s window (chosen)", True, 1.0),
                                 ("punch impossible, relayed at once", True, 0.0)):
        times, paths = [], set()
        for _ in range(args.fallbacks):
            await world.start_afresh_on("relay" if block else "direct")
            world.punch_window(window)
            took, path = await connect_time(world)
            times.append(took)
            paths.add(path)
        print(f"  {label:<40} median {statistics.median(times):.3f}  max {max(times):.3f}  path {'/'.join(paths)}")
    world.punch_window(1.0)

    print(f"path open (relayed 200) to direct upgrade, D answering punches from then on, {args.rounds} rounds")
    lost_free = True
    for _ in range(args.rounds):
        await world.forget_paths()
        c_moved, both_moved, equal, across = await upgrade(world, size)
        lost_free &= equal
        print(f"  C moved after {c_moved:.3f} s, both after {both_moved:.3f} s; {across >> 20} MiB across the move, "
              f"sha256 {'equal' if equal else 'DIFFERENT'}")
    world.allow_punching()
    print(f"bytes lost across moves: {'0' if lost_free and intact else 'SOME (sha256 differed)'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mib", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--calls", type=int, default=500)
    parser.add_argument("--fallbacks", type=int, default=5)
    trio.run(run, parser.parse_args())


if __name__ == "__main__":
    main()
