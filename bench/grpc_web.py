"""grpc-web through the in-process bridge against native gRPC, unary latency side by
side in one run (interleaved rounds), and CPU per call of every process involved.

Paths (each a separate process: grpcio server, bridge, nodes; the clients run here):
  native          grpcio client -> grpcio server (loopback)
  web             grpc-web over HTTP/1.1 keep-alive -> bridge -> grpcio server
  native+tunnel   grpcio client -> CONNECT -> local node -> tunnel -> remote node -> server
  web+tunnel      grpc-web -> bridge -> CONNECT -> local node -> tunnel -> remote node -> server
The grpc-web client is a minimal blocking-socket one (a prebuilt request, the answer read
to its last chunk), so what it adds is the bridge, not client code.

    .venv/bin/python bench/grpc_web.py [--calls N] [--rounds R] [--size BYTES] [--no-tunnel]
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import socket
import statistics
import struct
import sys
import time
from collections.abc import Callable
from concurrent import futures
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _grpc_support import Child, serve_bridge  # noqa: E402  (bench/ is on sys.path)
from _node_process import NodeProcess, run_node  # noqa: E402

SCRIPT = str(Path(__file__).resolve())
TOKEN = "bench-token"
METHOD = "/keynode.bench.Echo/Echo"
STREAM_METHOD = "/keynode.bench.Echo/Stream"


def serve_grpc() -> None:
    import grpc

    def stream(request: bytes, context: Any) -> Any:
        count, size = struct.unpack(">II", request)
        message = bytes(size)
        for _ in range(count):
            yield message

    handler = grpc.method_handlers_generic_handler(
        "keynode.bench.Echo",
        {
            "Echo": grpc.unary_unary_rpc_method_handler(lambda request, context: request),
            "Stream": grpc.unary_stream_rpc_method_handler(stream),
        },
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print(json.dumps({"port": port}), flush=True)
    sys.stdin.read()
    server.stop(None).wait()


class WebClient:
    """grpc-web unary calls on one keep-alive HTTP/1.1 connection."""

    def __init__(self, port: int, payload: bytes) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        body = struct.pack(">BI", 0, len(payload)) + payload
        self.request = (
            f"POST {METHOD} HTTP/1.1\r\nhost: bench\r\ncontent-type: application/grpc-web+proto\r\n"
            f"x-grpc-web: 1\r\ncontent-length: {len(body)}\r\n\r\n"
        ).encode() + body
        self.payload = payload

    def call(self) -> None:
        self.sock.sendall(self.request)
        answer = b""
        while not answer.endswith(b"\r\n0\r\n\r\n"):
            data = self.sock.recv(65536)
            if not data:
                raise RuntimeError("the bridge closed the connection")
            answer += data
        if b"grpc-status:0" not in answer or self.payload not in answer:
            raise RuntimeError(f"bad answer: {answer[:300]!r}")

    def download(self, count: int, size: int) -> int:
        """One server-streaming call of count messages of size bytes; bytes received."""
        body = struct.pack(">BI", 0, 8) + struct.pack(">II", count, size)
        head = (
            f"POST {STREAM_METHOD} HTTP/1.1\r\nhost: bench\r\ncontent-type: application/grpc-web+proto\r\n"
            f"x-grpc-web: 1\r\ncontent-length: {len(body)}\r\n\r\n"
        ).encode()
        self.sock.sendall(head + body)
        received = 0
        tail = b""
        while not tail.endswith(b"\r\n0\r\n\r\n"):
            data = self.sock.recv(1 << 20)
            if not data:
                raise RuntimeError("the bridge closed the connection")
            received += len(data)
            tail = (tail + data)[-64:]
        if b"grpc-status:0" not in tail:
            raise RuntimeError(f"bad end of stream: {tail!r}")
        return received

    def close(self) -> None:
        self.sock.close()


def native_caller(target: str, payload: bytes, options: list[tuple[str, Any]]) -> tuple[Callable[[], None], Callable[[], None]]:
    import grpc

    channel = grpc.insecure_channel(target, options=options)
    stub = channel.unary_unary(METHOD)

    def call() -> None:
        if stub(payload, timeout=10) != payload:
            raise RuntimeError("echo mismatch")

    return call, channel.close


def native_download(target: str, options: list[tuple[str, Any]], count: int, size: int) -> Callable[[], int]:
    import grpc

    channel = grpc.insecure_channel(target, options=options)
    stub = channel.unary_stream(STREAM_METHOD)

    def download() -> int:
        return sum(len(message) for message in stub(struct.pack(">II", count, size), timeout=120))

    return download


def streaming_rate(download: Callable[[], int], rounds: int) -> float:
    """MiB/s of the best of ``rounds`` downloads (wall clock)."""
    best = 0.0
    for _ in range(rounds):
        start = time.perf_counter()
        size = download()
        best = max(best, size / (time.perf_counter() - start) / (1 << 20))
    return best


def measure(call: Callable[[], None], calls: int, processes: dict[str, Any]) -> dict[str, Any]:
    cpu_before = {name: process.cpu_seconds() for name, process in processes.items()}
    client_before = time.process_time()
    latencies = []
    for _ in range(calls):
        start = time.perf_counter()
        call()
        latencies.append(time.perf_counter() - start)
    cpu = {name: (process.cpu_seconds() - cpu_before[name]) / calls for name, process in processes.items()}
    cpu["client"] = (time.process_time() - client_before) / calls
    return {"latencies": latencies, "cpu": cpu}


def summary(results: list[dict[str, Any]]) -> dict[str, Any]:
    latencies = sorted(value for result in results for value in result["latencies"])
    cpu: dict[str, float] = {}
    for result in results:
        for name, value in result["cpu"].items():
            cpu[name] = cpu.get(name, 0.0) + value / len(results)
    return {
        "median_ms": statistics.median(latencies) * 1000,
        "p99_ms": latencies[int(len(latencies) * 0.99) - 1] * 1000,
        "cpu_us": {name: round(value * 1e6) for name, value in cpu.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=500, help="calls per path per round")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--size", type=int, default=100, help="request and answer payload bytes")
    parser.add_argument("--no-tunnel", action="store_true", help="only the loopback paths")
    parser.add_argument("--stream-mib", type=int, default=32, help="MiB per server-streaming download")
    args = parser.parse_args()
    payload = os.urandom(args.size)

    children: list[Any] = []
    try:
        server = Child(SCRIPT, "server")
        children.append(server)
        bridge = Child(SCRIPT, "bridge", json.dumps({"port": server.info["port"]}))
        children.append(bridge)
        paths: dict[str, tuple[Callable[[], None], dict[str, Any]]] = {}
        closers: list[Callable[[], None]] = []
        native, close = native_caller(f"127.0.0.1:{server.info['port']}", payload, [])
        closers.append(close)
        paths["native"] = (native, {"server": server})
        web = WebClient(bridge.info["port"], payload)
        closers.append(web.close)
        paths["web"] = (web.call, {"server": server, "bridge": bridge})
        if not args.no_tunnel:
            remote = NodeProcess(SCRIPT, server.info["port"])
            children.append(remote)
            local = NodeProcess(SCRIPT, None)
            children.append(local)
            auth = base64.b64encode(TOKEN.encode()).decode()
            options = [
                ("grpc.http_connect_server", remote.target()),
                ("grpc.http_connect_headers", f"Proxy-Authorization:Basic {auth}"),
            ]
            tunnelled, close = native_caller(f"127.0.0.1:{local.forward_port}", payload, options)
            closers.append(close)
            nodes = {"server": server, "local node": local, "remote node": remote}
            paths["native+tunnel"] = (tunnelled, nodes)
            tunnel_bridge = Child(SCRIPT, "bridge", json.dumps({"forward_port": local.forward_port, "target": remote.target()}))
            children.append(tunnel_bridge)
            web_tunnel = WebClient(tunnel_bridge.info["port"], payload)
            closers.append(web_tunnel.close)
            paths["web+tunnel"] = (web_tunnel.call, {**nodes, "bridge": tunnel_bridge})

        for call, _ in paths.values():  # warm up: connections, tunnels, caches
            for _ in range(200):
                call()
        results: dict[str, list[dict[str, Any]]] = {name: [] for name in paths}
        for _ in range(args.rounds):
            for name, (call, processes) in paths.items():
                results[name].append(measure(call, args.calls, processes))
        streams: dict[str, float] = {}
        count, size = args.stream_mib * 16, 65536
        streams["native"] = streaming_rate(native_download(f"127.0.0.1:{server.info['port']}", [], count, size), 3)
        streams["web"] = streaming_rate(lambda: web.download(count, size), 3)
        if not args.no_tunnel:
            streams["native+tunnel"] = streaming_rate(native_download(f"127.0.0.1:{local.forward_port}", options, count, size), 3)
            streams["web+tunnel"] = streaming_rate(lambda: web_tunnel.download(count, size), 3)
        for close in closers:
            close()
    finally:
        for child in children:
            child.close()

    print(f"unary, {args.size}-byte payload, {args.calls} calls x {args.rounds} rounds per path (interleaved)")
    print(f"{'path':<15}{'median ms':>10}{'p99 ms':>9}   CPU per call, µs (user + sys)")
    table = {name: summary(rounds) for name, rounds in results.items()}
    for name, row in table.items():
        cpu = ", ".join(f"{who} {value}" for who, value in row["cpu_us"].items())
        print(f"{name:<15}{row['median_ms']:>10.3f}{row['p99_ms']:>9.3f}   {cpu}")
    print(f"server streaming, {args.stream_mib} MiB in 64 KiB messages, best of 3: "
          + ", ".join(f"{name} {rate:.0f} MiB/s" for name, rate in streams.items()))
    added = table["web"]["median_ms"] - table["native"]["median_ms"]
    print(f"grpc-web adds {added:.3f} ms to the native median on loopback (target: at most 1 ms)")
    if "web+tunnel" in table:
        added = table["web+tunnel"]["median_ms"] - table["native+tunnel"]["median_ms"]
        print(f"through the tunnel, grpc-web adds {added:.3f} ms to native gRPC through the tunnel")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "server":
        serve_grpc()
    elif len(sys.argv) > 1 and sys.argv[1] == "bridge":
        serve_bridge(sys.argv[2], TOKEN)
    elif len(sys.argv) > 1 and sys.argv[1] == "node":
        import trio

        trio.run(run_node, int(sys.argv[2]) if len(sys.argv) > 2 else None, TOKEN)
    else:
        main()
