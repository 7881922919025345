"""What identity injection costs: grpcio through a plain TCP relay (a byte splice,
what the tunnel's reverse side does for a "tcp" service) against grpcio through the
h2 identity relay (what it does for a "grpc" service), side by side in one run.

    .venv/bin/python bench/grpc_identity.py [--calls 2000] [--rounds 5] [--stream-mib 256]

Processes: this one (grpcio client and unmodified grpcio server) and one relay
process per kind, each a trio process like a node's reverse side:
    client --TCP--> relay process --TCP--> server
Prints per path: unary round trip median/p99 and what the relay adds to the
direct call, CPU per call in the relay process, client-streaming upload and
server-streaming download MiB/s with the relay's CPU per MiB. Unary calls are
interleaved in rounds across the paths, so slow phases of a noisy machine fall
on all of them alike.

The issue's targets read against these: the injection's extra latency (h2 minus
plain) against the tunnel's own added latency (bench/tunnel.py,
bench/latency_floors.py: 430-460 µs on the 2-vCPU VM), and streaming through the
h2 relay against the plain relay.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent import futures
from functools import partial
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SERVICE = "keynode.bench.Identity"
CHUNK = 256 << 10
OPTIONS = [
    ("grpc.enable_http_proxy", 0),
    ("grpc.max_receive_message_length", 16 << 20),
    ("grpc.max_send_message_length", 16 << 20),
]


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
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        self.process.kill()
        self.process.wait()


# --- the grpcio server ------------------------------------------------------------------


def start_server() -> tuple[Any, int]:
    import grpc

    def unary(request: bytes, context: Any) -> bytes:
        return request

    def upload(requests: Iterator[bytes], context: Any) -> bytes:
        total = 0
        for chunk in requests:
            total += len(chunk)
        return str(total).encode()

    def download(request: bytes, context: Any) -> Iterator[bytes]:
        block = b"\xab" * CHUNK
        for _ in range(int(request)):
            yield block

    handlers = {
        "Unary": grpc.unary_unary_rpc_method_handler(unary),
        "Upload": grpc.stream_unary_rpc_method_handler(upload),
        "Download": grpc.unary_stream_rpc_method_handler(download),
    }
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8), options=OPTIONS)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, port


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


def percentile(samples: list[float], fraction: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000, help="unary calls per path")
    parser.add_argument("--rounds", type=int, default=5, help="unary rounds, interleaved across paths")
    parser.add_argument("--stream-mib", type=int, default=256, help="MiB per streaming run")
    parser.add_argument("--serve-relay", choices=["plain", "h2"], help=argparse.SUPPRESS)
    parser.add_argument("--target", type=int, help=argparse.SUPPRESS)
    arguments = parser.parse_args()
    if arguments.serve_relay:
        serve_relay(arguments.serve_relay, arguments.target)
        return

    import grpc

    server, server_port = start_server()
    relays = {kind: RelayProcess(kind, server_port) for kind in ("plain", "h2")}
    ports = {"direct": server_port, **{kind: relay.port for kind, relay in relays.items()}}
    channels = {path: grpc.insecure_channel(f"127.0.0.1:{port}", options=OPTIONS) for path, port in ports.items()}
    try:
        for channel in channels.values():
            unary_samples(channel, 200)  # warm up: connections, windows, code paths
        samples: dict[str, list[float]] = {path: [] for path in channels}
        cpu: dict[str, float] = {kind: 0.0 for kind in relays}
        per_round = max(1, arguments.calls // arguments.rounds)
        for _ in range(arguments.rounds):
            for path, channel in channels.items():
                before = relays[path].cpu_seconds() if path in relays else 0.0
                samples[path] += unary_samples(channel, per_round)
                if path in relays:
                    cpu[path] += relays[path].cpu_seconds() - before
        calls = per_round * arguments.rounds
        direct = statistics.median(samples["direct"])
        print(f"grpcio unary round trip, {calls} calls per path in {arguments.rounds} interleaved rounds (64-byte message)")
        print(f"  {'path':<22} {'median':>9} {'p99':>9} {'added':>9}   relay CPU per call")
        added: dict[str, float] = {}
        for path, values in samples.items():
            median = statistics.median(values)
            added[path] = median - direct
            cpu_text = f"{cpu[path] / calls * 1e6:7.0f} µs" if path in cpu else "-"
            label = {"direct": "direct", "plain": "plain TCP relay", "h2": "h2 identity relay"}[path]
            print(f"  {label:<22} {median * 1e6:7.0f} µs {percentile(values, 0.99) * 1e6:7.0f} µs"
                  f" {added[path] * 1e6:7.0f} µs   {cpu_text}")
        extra = added["h2"] - added["plain"]
        print(f"  injection adds {extra * 1e6:.0f} µs per call over the plain relay"
              f" ({extra / 445e-6:.0%} of the tunnel's own ~445 µs; target <= 25%)")

        total = arguments.stream_mib << 20
        print(f"grpcio streaming, {arguments.stream_mib} MiB in {CHUNK >> 10} KiB messages")
        print(f"  {'path':<22} {'upload':>12} {'download':>12}   relay CPU per MiB (up, down)")
        rates: dict[str, tuple[float, float]] = {}
        for path, channel in channels.items():
            relay = relays.get(path)
            start_cpu = relay.cpu_seconds() if relay else 0.0
            up = upload_rate(channel, total)
            middle_cpu = relay.cpu_seconds() if relay else 0.0
            down = download_rate(channel, total)
            end_cpu = relay.cpu_seconds() if relay else 0.0
            rates[path] = (up, down)
            cpu_text = "-"
            if relay:
                mib = arguments.stream_mib
                cpu_text = f"{(middle_cpu - start_cpu) / mib * 1e3:5.1f} ms, {(end_cpu - middle_cpu) / mib * 1e3:5.1f} ms"
            label = {"direct": "direct", "plain": "plain TCP relay", "h2": "h2 identity relay"}[path]
            print(f"  {label:<22} {up:7.0f} MiB/s {down:7.0f} MiB/s   {cpu_text}")
        ratio_up = rates["h2"][0] / rates["plain"][0]
        ratio_down = rates["h2"][1] / rates["plain"][1]
        print(f"  h2 relay / plain relay: upload {ratio_up:.0%}, download {ratio_down:.0%} (target >= 80%)")
    finally:
        for channel in channels.values():
            channel.close()
        for relay in relays.values():
            relay.stop()
        server.stop(grace=None)


if __name__ == "__main__":
    main()
