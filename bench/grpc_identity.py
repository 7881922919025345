"""What identity injection costs, side by side in one run: grpcio through a plain
TCP relay (a byte splice, what the reverse side does for a "tcp" service) and
through the h2 identity relay (what it does for a "grpc" service), alone and
behind a keynode tunnel.

    .venv/bin/python bench/grpc_identity.py [--calls 2000] [--rounds 5] [--stream-mib 128] [--no-tunnel]

Processes: this one (grpcio client and unmodified grpcio server), one process per
relay (trio, like a node) and, for the tunnel paths, a forward node and one
reverse node per path (bench/_node_process.py):
    direct:        client --> server
    plain / h2:    client --> relay --> server
    tunnel:        client --CONNECT--> F ==uTP+TLS==> R --> server
    tunnel + relay client --CONNECT--> F ==uTP+TLS==> R --> relay --> server
Until the reverse side runs the relay itself (the services seam), the relay is a
hop of its own behind R; the plain-relay path carries the same hop, so
"tunnel + h2" minus "tunnel + plain" is what injection adds to a tunnel call.

Prints per path: unary round trip median/p99, what it adds to the direct call,
CPU per call of the path's processes; upload (client streaming) and download
(server streaming) MiB/s with CPU per MiB. Unary calls are interleaved in rounds
across the paths, so slow phases of a noisy machine fall on all of them alike.
Targets (issue 16): injection adds at most 25% to the tunnel's own added
latency; streaming with injection within 80% of without.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _grpc_support import CHUNK, OPTIONS, percentile, start_server  # noqa: E402  (bench/ is on sys.path)
from _node_process import NodeProcess, process_cpu_seconds, run_node  # noqa: E402

TOKEN = "bench-token"

SERVICE = "keynode.bench.Identity"


# --- the relay process -----------------------------------------------------------------


def serve_relay(kind: str, target_port: int) -> None:
    """Run one relay (``plain`` byte splice or ``h2`` identity relay) until killed;
    prints ``port: N`` once listening."""
    import trio

    from grpc_bridge.h2_identity import relay_with_identity
    from proxy.identity.node_id import NodeId

    class Caller:
        local_node_id = NodeId(b"\x01" * 32)
        peer_node_id = NodeId(b"\x02" * 32)
        peer_certificate_der = b"bench leaf"

    async def copy(source: trio.SocketStream, sink: trio.SocketStream) -> None:
        try:
            while data := await source.receive_some(65536):
                await sink.send_all(data)
            await sink.send_eof()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    async def handle(client: trio.SocketStream) -> None:
        server = await trio.open_tcp_stream("127.0.0.1", target_port)
        async with client, server:
            if kind == "h2":
                await relay_with_identity(client, server, Caller())
            else:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(copy, client, server)
                    nursery.start_soon(copy, server, client)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(partial(trio.serve_tcp, handle, 0, host="127.0.0.1"))
            print(f"port: {listeners[0].socket.getsockname()[1]}", flush=True)

    trio.run(main)


class RelayProcess:
    def __init__(self, kind: str, target_port: int) -> None:
        self.kind = kind
        self.process = subprocess.Popen(
            [sys.executable, __file__, "--serve-relay", kind, "--target", str(target_port)],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line.startswith("port: "):
            raise RuntimeError(f"the {kind} relay did not start")
        self.port = int(line.split(": ")[1])

    def cpu_seconds(self) -> float:
        return process_cpu_seconds(self.process.pid)

    def stop(self) -> None:
        self.process.kill()
        self.process.wait()


# --- measurements ---------------------------------------------------------------------------


def unary_samples(channel: Any, calls: int) -> list[float]:
    call = channel.unary_unary(f"/{SERVICE}/Unary")
    payload = hashlib.sha256(b"x").digest() * 2
    samples = []
    for _ in range(calls):
        start = time.perf_counter()
        call(payload, timeout=30)
        samples.append(time.perf_counter() - start)
    return samples


def upload_rate(channel: Any, total: int) -> float:
    call = channel.stream_unary(f"/{SERVICE}/Upload")
    block = os.urandom(CHUNK)
    start = time.perf_counter()
    answer = call((block for _ in range(total // CHUNK)), timeout=600)
    elapsed = time.perf_counter() - start
    assert int(answer) == total // CHUNK * CHUNK
    return total / elapsed / (1 << 20)


def download_rate(channel: Any, total: int) -> float:
    call = channel.unary_stream(f"/{SERVICE}/Download")
    start = time.perf_counter()
    received = sum(len(message) for message in call(str(total // CHUNK).encode(), timeout=600))
    elapsed = time.perf_counter() - start
    assert received == total // CHUNK * CHUNK
    return total / elapsed / (1 << 20)


@dataclass
class Route:
    label: str
    channel: Any
    processes: list[Any]  # whose CPU counts for this path (relays, nodes)

    def cpu_seconds(self) -> float:
        return sum(process.cpu_seconds() for process in self.processes)


def build_paths(server_port: int, with_tunnel: bool, stack: list[Any]) -> dict[str, Route]:
    import grpc

    relays = {kind: RelayProcess(kind, server_port) for kind in ("plain", "h2")}
    stack += relays.values()
    paths = {"direct": Route("direct", grpc.insecure_channel(f"127.0.0.1:{server_port}", options=OPTIONS), [])}
    for kind, relay in relays.items():
        label = "plain TCP relay" if kind == "plain" else "h2 identity relay"
        paths[kind] = Route(label, grpc.insecure_channel(f"127.0.0.1:{relay.port}", options=OPTIONS), [relay])
    if not with_tunnel:
        return paths
    # The tunnel: F (CONNECT) -> R -> server; and the same with each relay between R and
    # the server (until the reverse side runs the relay itself, an extra hop that the
    # plain-relay path carries too, so their difference is the injection's).
    tunnel_relays = {kind: RelayProcess(kind, server_port) for kind in ("plain", "h2")}
    stack += tunnel_relays.values()
    forward = Node(None)
    stack.append(forward)
    auth = "Proxy-Authorization:Basic " + base64.b64encode(TOKEN.encode()).decode()
    targets = {"tunnel": (server_port, []), **{f"tunnel+{kind}": (r.port, [r]) for kind, r in tunnel_relays.items()}}
    labels = {"tunnel": "tunnel", "tunnel+plain": "tunnel + plain relay", "tunnel+h2": "tunnel + h2 relay"}
    for name, (port, extra) in targets.items():
        reverse = Node(port)
        stack.append(reverse)
        options = [*OPTIONS, ("grpc.http_connect_server", reverse.target()), ("grpc.http_connect_headers", auth)]
        channel = grpc.insecure_channel(f"127.0.0.1:{forward.forward_port}", options=options)
        paths[name] = Route(labels[name], channel, [forward, reverse, *extra])
    return paths


class Node(NodeProcess):
    def __init__(self, server_port: int | None) -> None:
        super().__init__(__file__, server_port)

    def stop(self) -> None:
        self.close()


def main() -> None:
    if len(sys.argv) >= 2 and sys.argv[1] == "node":
        import trio

        trio.run(run_node, int(sys.argv[2]) if len(sys.argv) > 2 else None, TOKEN)
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000, help="unary calls per path")
    parser.add_argument("--rounds", type=int, default=5, help="unary rounds, interleaved across paths")
    parser.add_argument("--stream-mib", type=int, default=128, help="MiB per streaming run")
    parser.add_argument("--no-tunnel", action="store_true", help="only the relays, no keynode nodes")
    parser.add_argument("--serve-relay", choices=["plain", "h2"], help=argparse.SUPPRESS)
    parser.add_argument("--target", type=int, help=argparse.SUPPRESS)
    arguments = parser.parse_args()
    if arguments.serve_relay:
        serve_relay(arguments.serve_relay, arguments.target)
        return

    server, server_port = start_server(SERVICE)
    stack: list[Any] = []
    paths: dict[str, Route] = {}
    try:
        paths = build_paths(server_port, not arguments.no_tunnel, stack)
        for path in paths.values():
            unary_samples(path.channel, 200)  # warm up: connections, windows, code paths
        samples: dict[str, list[float]] = {name: [] for name in paths}
        cpu: dict[str, float] = {name: 0.0 for name in paths}
        per_round = max(1, arguments.calls // arguments.rounds)
        for _ in range(arguments.rounds):
            for name, path in paths.items():
                before = path.cpu_seconds()
                samples[name] += unary_samples(path.channel, per_round)
                cpu[name] += path.cpu_seconds() - before
        calls = per_round * arguments.rounds
        direct = statistics.median(samples["direct"])
        print(f"grpcio unary round trip, {calls} calls per path in {arguments.rounds} interleaved rounds (64-byte message)")
        print(f"  {'path':<22} {'median':>9} {'p99':>9} {'added':>9}   CPU per call (relays, nodes)")
        added = {name: statistics.median(values) - direct for name, values in samples.items()}
        for name, values in samples.items():
            cpu_text = f"{cpu[name] / calls * 1e6:7.0f} µs" if paths[name].processes else "-"
            print(f"  {paths[name].label:<22} {statistics.median(values) * 1e6:7.0f} µs"
                  f" {percentile(values, 0.99) * 1e6:7.0f} µs {added[name] * 1e6:7.0f} µs   {cpu_text}")
        extra = added["h2"] - added["plain"]
        print(f"  injection adds {extra * 1e6:.0f} µs per call (h2 relay - plain relay)")
        if "tunnel" in paths:
            in_tunnel = added["tunnel+h2"] - added["tunnel+plain"]
            print(f"  through the tunnel: injection adds {in_tunnel * 1e6:.0f} µs; the tunnel's own added latency is"
                  f" {added['tunnel'] * 1e6:.0f} µs: {in_tunnel / added['tunnel']:.0%} (target <= 25%)")

        total = arguments.stream_mib << 20
        print(f"grpcio streaming, {arguments.stream_mib} MiB in {CHUNK >> 10} KiB messages")
        print(f"  {'path':<22} {'upload':>12} {'download':>12}   CPU per MiB (up, down)")
        rates: dict[str, tuple[float, float]] = {}
        for name, path in paths.items():
            start_cpu = path.cpu_seconds()
            up = upload_rate(path.channel, total)
            middle_cpu = path.cpu_seconds()
            down = download_rate(path.channel, total)
            end_cpu = path.cpu_seconds()
            rates[name] = (up, down)
            mib = arguments.stream_mib
            cpu_text = f"{(middle_cpu - start_cpu) / mib * 1e3:5.1f} ms, {(end_cpu - middle_cpu) / mib * 1e3:5.1f} ms"
            print(f"  {path.label:<22} {up:7.0f} MiB/s {down:7.0f} MiB/s   {cpu_text if path.processes else '-'}")
        for plain, h2 in (("plain", "h2"), ("tunnel+plain", "tunnel+h2")):
            if h2 in rates:
                up_ratio, down_ratio = (rates[h2][index] / rates[plain][index] for index in (0, 1))
                print(f"  {paths[h2].label} / {paths[plain].label}: upload {up_ratio:.0%}, download {down_ratio:.0%}"
                      " (target >= 80%)")
    finally:
        for path in paths.values():
            path.channel.close()
        for item in reversed(stack):
            item.stop()
        server.stop(grace=None)


if __name__ == "__main__":
    main()
