"""Tunnel figures, each node in its own process.

    .venv/bin/python bench/tunnel.py [--size-mib 256] [--calls 2000] [--connects 200]
                                     [--parts bulk grpc connect]

Processes: this one (TCP sink, grpcio server, the clients) and three keynode nodes:
F (forward side, the CONNECT port), R1 (reverse side, server = the TCP sink),
R2 (reverse side, server = the grpcio server). Prints, side by side:
- bulk MiB/s: client -> F -> uTP+TLS -> R1 -> sink, against the same bytes over
  direct TCP to the sink;
- gRPC unary round trip (small message) median and p99, through F/R2 and direct;
- CONNECT-to-200 median and p99 (each a fresh uTP connection + TLS handshake).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent import futures
from pathlib import Path
from typing import Any

import trio

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TOKEN = "bench-token"
SERVICE = "keynode.bench.Echo"


# --- a node process ------------------------------------------------------------------


async def run_node(server_port: int | None) -> None:
    from proxy.proxy import open_proxy
    from proxy.tls_config import TLSConfig

    tls_config = TLSConfig.generate()
    async with open_proxy(
        tls_config=tls_config,
        auth_token=TOKEN,
        proxy_host="127.0.0.1",
        server_host="127.0.0.1" if server_port else None,
        server_port=server_port,
    ) as proxy:
        print(
            json.dumps(
                {"node_id": str(tls_config.node_id), "forward_port": proxy.forward_port, "proxy_port": proxy.proxy_port}
            ),
            flush=True,
        )
        # Run until the parent closes our stdin.
        await trio.to_thread.run_sync(sys.stdin.read, abandon_on_cancel=True)


class Node:
    def __init__(self, server_port: int | None) -> None:
        command = [sys.executable, __file__, "node"] + ([str(server_port)] if server_port else [])
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError("node process failed to start")
        info = json.loads(line)
        self.node_id: str = info["node_id"]
        self.forward_port: int = info["forward_port"]
        self.proxy_port: int = info["proxy_port"]

    def cpu_seconds(self) -> float:
        """User + system CPU time the node process used so far (Linux /proc)."""
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def target(self) -> str:
        return f"127.0.0.1:{self.proxy_port}?nodeId={self.node_id}"

    def close(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.close()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


# --- bulk and CONNECT timing (trio, in this process) ------------------------------------


async def sink(stream: trio.SocketStream) -> None:
    """Count bytes to EOF, answer with the count (so the sender knows all arrived)."""
    total = 0
    while data := await stream.receive_some(1 << 18):
        total += len(data)
    await stream.send_all(total.to_bytes(8, "big"))


async def connect_through(forward_port: int, target: str) -> trio.SocketStream:
    import h11

    stream = await trio.open_tcp_stream("127.0.0.1", forward_port)
    client = h11.Connection(h11.CLIENT)
    auth = "Basic " + base64.b64encode(TOKEN.encode()).decode()
    await stream.send_all(
        client.send(h11.Request(method="CONNECT", target=target, headers=[("Host", target), ("Proxy-Authorization", auth)]))
    )
    while True:
        event = client.next_event()
        if event is h11.NEED_DATA:
            client.receive_data(await stream.receive_some(4096))
            continue
        if not isinstance(event, h11.Response) or event.status_code != 200:
            raise RuntimeError(f"CONNECT failed: {event}")
        return stream


async def push(stream: trio.SocketStream, size: int) -> float:
    block = os.urandom(1 << 20)
    start = time.perf_counter()
    for _ in range(size >> 20):
        await stream.send_all(block)
    await stream.send_eof()
    reply = b""
    while len(reply) < 8:
        chunk = await stream.receive_some(8)
        if not chunk:
            raise RuntimeError("sink closed early")
        reply += chunk
    elapsed = time.perf_counter() - start
    if int.from_bytes(reply, "big") != size:
        raise RuntimeError("sink got a different byte count")
    await stream.aclose()
    return size / elapsed / 2**20


async def bulk_and_connect(args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {}
    size = args.size_mib << 20
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(trio.serve_tcp, sink, 0)
        sink_port = listeners[0].socket.getsockname()[1]
        forward = await trio.to_thread.run_sync(Node, None)
        reverse = await trio.to_thread.run_sync(Node, sink_port)
        try:
            if "bulk" in args.parts:
                results["direct_mibs"] = await push(await trio.open_tcp_stream("127.0.0.1", sink_port), size)
                results["tunnel_mibs"] = await push(await connect_through(forward.forward_port, reverse.target()), size)
            times = []
            cpu_before = forward.cpu_seconds(), reverse.cpu_seconds(), time.process_time()
            for _ in range(args.connects if "connect" in args.parts else 0):
                start = time.perf_counter()
                stream = await connect_through(forward.forward_port, reverse.target())
                times.append(time.perf_counter() - start)
                await stream.aclose()
            if times:
                results["connect_ms"] = summary(times)
                cpu_after = forward.cpu_seconds(), reverse.cpu_seconds(), time.process_time()
                # CPU per tunnel (start and teardown) of each node and of this client.
                results["connect_cpu_ms"] = [
                    (after - before) / len(times) * 1000 for before, after in zip(cpu_before, cpu_after)
                ]
        finally:
            await trio.to_thread.run_sync(forward.close)
            await trio.to_thread.run_sync(reverse.close)
        nursery.cancel_scope.cancel()
    return results


# --- gRPC (threads, outside trio) ---------------------------------------------------------------


def grpc_round_trips(calls: int) -> dict[str, Any]:
    import grpc

    handler = grpc.method_handlers_generic_handler(
        SERVICE, {"Echo": grpc.unary_unary_rpc_method_handler(lambda request, context: request)}
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    forward, reverse = Node(None), Node(port)
    results: dict[str, Any] = {}
    try:
        auth = "Proxy-Authorization:Basic " + base64.b64encode(TOKEN.encode()).decode()
        channels = {
            "direct": grpc.insecure_channel(f"127.0.0.1:{port}"),
            "tunnel": grpc.insecure_channel(
                f"127.0.0.1:{forward.forward_port}",
                options=[("grpc.http_connect_server", reverse.target()), ("grpc.http_connect_headers", auth)],
            ),
        }
        for name, channel in channels.items():
            echo = channel.unary_unary(f"/{SERVICE}/Echo")
            for _ in range(50):  # warm up: connection, HTTP/2 settings
                echo(b"x" * 32, timeout=10)
            times = []
            cpu_before = forward.cpu_seconds(), reverse.cpu_seconds()
            for _ in range(calls):
                start = time.perf_counter()
                echo(b"x" * 32, timeout=10)
                times.append(time.perf_counter() - start)
            results[f"grpc_{name}_ms"] = summary(times)
            if name == "tunnel":
                cpu_after = forward.cpu_seconds(), reverse.cpu_seconds()
                results["grpc_cpu_us"] = [(a - b) / calls * 1e6 for b, a in zip(cpu_before, cpu_after)]
            channel.close()
    finally:
        forward.close()
        reverse.close()
        server.stop(None).wait(5)
    return results


def summary(seconds: list[float]) -> dict[str, float]:
    ordered = sorted(seconds)
    return {
        "median": statistics.median(ordered) * 1000,
        "p99": ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1000,
        "n": len(ordered),
    }


def main() -> None:
    if len(sys.argv) >= 2 and sys.argv[1] == "node":
        trio.run(run_node, int(sys.argv[2]) if len(sys.argv) > 2 else None)
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--connects", type=int, default=200)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.add_argument("--parts", nargs="+", choices=("bulk", "grpc", "connect"), default=["bulk", "grpc", "connect"])
    args = parser.parse_args()
    results: dict[str, Any] = {}
    if "bulk" in args.parts or "connect" in args.parts:
        results.update(trio.run(bulk_and_connect, args))
    if "grpc" in args.parts:
        results.update(grpc_round_trips(args.calls))
    if args.json:
        print(json.dumps(results))
        return
    if "bulk" in args.parts:
        print(f"bulk {args.size_mib} MiB, one process per node:")
        print(f"  direct TCP            {results['direct_mibs']:9.1f} MiB/s")
        print(f"  through the tunnel    {results['tunnel_mibs']:9.1f} MiB/s   (target >= 30)")
    if "grpc" in args.parts:
        direct, tunnel = results["grpc_direct_ms"], results["grpc_tunnel_ms"]
        print(f"gRPC unary round trip, {args.calls} calls (ms):")
        print(f"  direct                median {direct['median']:.3f}  p99 {direct['p99']:.3f}")
        print(f"  through the tunnel    median {tunnel['median']:.3f}  p99 {tunnel['p99']:.3f}")
        print(f"  added                 median {(tunnel['median'] - direct['median']) * 1000:.0f} us   (target <= 300 us)")
        cpu = results["grpc_cpu_us"]
        print(f"  CPU per call (us): forward node {cpu[0]:.0f}  reverse node {cpu[1]:.0f}")
    if "connect" in args.parts:
        connect = results["connect_ms"]
        print(
            f"CONNECT-to-200, {args.connects} tunnels (ms): median {connect['median']:.2f}"
            f"  p99 {connect['p99']:.2f}   (target median < 10)"
        )
        cpu = results["connect_cpu_ms"]
        print(f"  CPU per tunnel (ms): forward node {cpu[0]:.2f}  reverse node {cpu[1]:.2f}  client {cpu[2]:.2f}")


if __name__ == "__main__":
    main()
