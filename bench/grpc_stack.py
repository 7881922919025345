"""The gRPC stack as `keynode run` wires it, side by side in one run: unary latency,
streaming MiB/s and CPU per call for
  (a) the plain tunnel: the server a "tcp" service (byte splice),
  (b) the tunnel with identity injection: the same server as a "grpc" service (the
      reverse side runs grpc_bridge's h2 identity relay, `service_splicers()`),
  (c) grpc-web through the bridge and the tunnel: a grpc-web client -> the bridge ->
      CONNECT to the local node -> the "grpc" service of (b),
next to the native calls without keynode (direct) and grpc-web without the tunnel.

    .venv/bin/python bench/grpc_stack.py [--calls 2000] [--rounds 5] [--stream-mib 64]

Processes: this one (grpcio client, grpc-web client, unmodified grpcio server); one
local node (F, the CONNECT side, shared by every tunnel path); one remote node per
service kind (R-tcp, R-grpc); one bridge process per upstream (direct, tunnel). CPU
per call counts those keynode processes (nodes, bridge), not the client or the
server. Unary calls are interleaved in rounds across the paths.

The grpc-web client is a minimal blocking-socket one over HTTP/1.1 keep-alive (a
prebuilt request, the answer read to its last chunk), so what it adds is the bridge.
Targets (issue 16): injection adds at most 25% to the tunnel's own added latency;
streaming with injection within 80% of the plain tunnel; grpc-web unary within 1 ms
of native (here: (c) against (b), the same tunnel and service).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import socket
import statistics
import struct
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _grpc_support import CHUNK, OPTIONS, Child, percentile, serve_bridge, start_server  # noqa: E402  (bench/ is on sys.path)

SCRIPT = str(Path(__file__).resolve())
TOKEN = "bench-token"
SERVICE = "keynode.bench.Stack"


# --- child processes ----------------------------------------------------------------------


def serve_node(server_port: int | None, kind: str) -> None:
    """A node as `keynode run` makes it: the app's splicers; the server (if any) the
    default service of ``kind``. Prints its ports, runs until stdin closes."""
    import trio

    from proxy.app.grpc_app import service_splicers
    from proxy.identity.tls_config import TLSConfig
    from proxy.tunnel.proxy import open_proxy
    from proxy.tunnel.services import Service, ServicePolicy

    async def main() -> None:
        tls_config = TLSConfig.generate()
        policy = None
        if server_port is not None:
            policy = ServicePolicy(default=Service("server", ("127.0.0.1", server_port), None, kind=kind))
        async with open_proxy(
            tls_config=tls_config, auth_token=TOKEN, proxy_host="127.0.0.1", policy=policy, splicers=service_splicers()
        ) as proxy:
            info = {"node_id": str(tls_config.node_id), "forward_port": proxy.forward_port, "proxy_port": proxy.proxy_port}
            print(json.dumps(info), flush=True)
            await trio.to_thread.run_sync(sys.stdin.read, abandon_on_cancel=True)

    trio.run(main)


# --- clients -------------------------------------------------------------------------------


class NativeClient:
    def __init__(self, target: str, options: list[tuple[str, Any]]) -> None:
        import grpc

        self.channel = grpc.insecure_channel(target, options=[*OPTIONS, *options])
        self.unary_stub = self.channel.unary_unary(f"/{SERVICE}/Unary")
        self.payload = hashlib.sha256(b"x").digest() * 2

    def unary(self) -> None:
        if self.unary_stub(self.payload, timeout=30) != self.payload:
            raise RuntimeError("echo mismatch")

    def upload(self, total: int) -> None:
        block = os.urandom(CHUNK)
        answer = self.channel.stream_unary(f"/{SERVICE}/Upload")((block for _ in range(total // CHUNK)), timeout=600)
        assert int(answer) == total // CHUNK * CHUNK

    def download(self, total: int) -> None:
        call = self.channel.unary_stream(f"/{SERVICE}/Download")
        received = sum(len(message) for message in call(str(total // CHUNK).encode(), timeout=600))
        assert received == total // CHUNK * CHUNK

    def close(self) -> None:
        self.channel.close()


class WebClient:
    """grpc-web (binary) over one keep-alive HTTP/1.1 connection: unary calls and
    server-streaming downloads, the answer read to its last chunk."""

    END = b"\r\n0\r\n\r\n"

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.payload = hashlib.sha256(b"x").digest() * 2
        self.unary_request = self.request("Unary", self.payload)

    @staticmethod
    def request(method: str, message: bytes) -> bytes:
        body = struct.pack(">BI", 0, len(message)) + message
        head = (f"POST /{SERVICE}/{method} HTTP/1.1\r\nhost: bench\r\ncontent-type: application/grpc-web+proto\r\n"
                f"x-grpc-web: 1\r\ncontent-length: {len(body)}\r\n\r\n")
        return head.encode() + body

    def answer(self) -> tuple[int, bytes]:
        """Bytes read for one answer, and its last 64 KiB (the trailers are there)."""
        tail = bytearray()
        total = 0
        while not tail.endswith(self.END):
            data = self.sock.recv(1 << 20)
            if not data:
                raise RuntimeError("the bridge closed the connection")
            total += len(data)
            tail += data
            del tail[: max(0, len(tail) - 65536)]
        if b"grpc-status:0" not in tail:
            raise RuntimeError(f"bad answer: {bytes(tail[-300:])!r}")
        return total, bytes(tail)

    def unary(self) -> None:
        self.sock.sendall(self.unary_request)
        _, tail = self.answer()
        if self.payload not in tail:
            raise RuntimeError("echo mismatch")

    def download(self, total: int) -> None:
        self.sock.sendall(self.request("Download", str(total // CHUNK).encode()))
        received, _ = self.answer()
        assert received >= total // CHUNK * CHUNK

    def close(self) -> None:
        self.sock.close()


# --- the run -------------------------------------------------------------------------------


@dataclass
class Route:
    label: str
    client: Any
    processes: list[Child]
    samples: list[float] = field(default_factory=list)
    cpu: float = 0.0

    def cpu_seconds(self) -> float:
        return sum(process.cpu_seconds() for process in self.processes)


def median(values: list[float]) -> float:
    return statistics.median(values)


def timed(action: Callable[[], None]) -> float:
    start = time.perf_counter()
    action()
    return time.perf_counter() - start


def build(server_port: int, children: list[Child]) -> dict[str, Route]:
    def child(*args: str) -> Child:
        children.append(Child(SCRIPT, *args))
        return children[-1]

    forward = child("node")
    remote = {kind: child("node", str(server_port), kind) for kind in ("tcp", "grpc")}
    web_direct = child("bridge", json.dumps({"port": server_port}))
    grpc_target = f"127.0.0.1:{remote['grpc'].info['proxy_port']}?nodeId={remote['grpc'].info['node_id']}"
    web_tunnel = child("bridge", json.dumps({"forward_port": forward.info["forward_port"], "target": grpc_target}))
    auth = "Proxy-Authorization:Basic " + base64.b64encode(TOKEN.encode()).decode()

    def through(node: Child) -> NativeClient:
        target = f"127.0.0.1:{node.info['proxy_port']}?nodeId={node.info['node_id']}"
        options = [("grpc.http_connect_server", target), ("grpc.http_connect_headers", auth)]
        return NativeClient(f"127.0.0.1:{forward.info['forward_port']}", options)

    return {
        "direct": Route("native, direct", NativeClient(f"127.0.0.1:{server_port}", []), []),
        "a": Route("(a) tunnel", through(remote["tcp"]), [forward, remote["tcp"]]),
        "b": Route("(b) tunnel+identity", through(remote["grpc"]), [forward, remote["grpc"]]),
        "web": Route("grpc-web, direct", WebClient(web_direct.info["port"]), [web_direct]),
        "c": Route("(c) grpc-web+tunnel", WebClient(web_tunnel.info["port"]), [web_tunnel, forward, remote["grpc"]]),
    }


def verdict(ok: bool) -> str:
    return "met" if ok else "NOT met"


def report(paths: dict[str, Route], calls: int, rounds: int) -> None:
    print(f"unary round trip (64-byte message), {calls} calls per path in {rounds} interleaved rounds")
    print(f"  {'path':<22} {'median':>9} {'p99':>9} {'added':>9}   CPU per call (keynode processes)")
    base = median(paths["direct"].samples)
    added = {name: median(path.samples) - base for name, path in paths.items()}
    for name, path in paths.items():
        cpu = f"{path.cpu / calls * 1e6:6.0f} µs" if path.processes else "     -"
        print(f"  {path.label:<22} {median(path.samples) * 1e6:7.0f} µs {percentile(path.samples, 0.99) * 1e6:7.0f} µs"
              f" {added[name] * 1e6:7.0f} µs   {cpu}")
    injection = added["b"] - added["a"]
    share = injection / added["a"] if added["a"] > 0 else float("inf")
    print(f"  injection adds {injection * 1e6:.0f} µs to the tunnel's own {added['a'] * 1e6:.0f} µs: {share:.0%}"
          f"   target <= 25%: {verdict(share <= 0.25)}")
    web_over = median(paths["c"].samples) - median(paths["b"].samples)
    print(f"  grpc-web through the tunnel adds {web_over * 1e3:.3f} ms to native through the same tunnel"
          f"   target <= 1 ms: {verdict(web_over <= 1e-3)}")
    web_direct = median(paths["web"].samples) - base
    print(f"  grpc-web without the tunnel adds {web_direct * 1e3:.3f} ms to native direct"
          f"   target <= 1 ms: {verdict(web_direct <= 1e-3)}")


def stream(paths: dict[str, Route], mib: int) -> None:
    total = mib << 20
    print(f"streaming, {mib} MiB in {CHUNK >> 10} KiB messages (grpc-web: server streaming only)")
    print(f"  {'path':<22} {'upload':>12} {'download':>12}   keynode CPU per MiB (up, down)")
    rates: dict[str, tuple[float | None, float]] = {}
    for name, path in paths.items():
        up = None
        up_cpu = "-"
        if hasattr(path.client, "upload"):
            before = path.cpu_seconds()
            up = mib / timed(partial(path.client.upload, total))
            up_cpu = f"{(path.cpu_seconds() - before) / mib * 1e3:.1f} ms"
        before = path.cpu_seconds()
        down = mib / timed(partial(path.client.download, total))
        down_cpu = f"{(path.cpu_seconds() - before) / mib * 1e3:.1f} ms"
        rates[name] = (up, down)
        up_text = "         -" if up is None else f"{up:7.0f} MiB/s"
        cpu = f"{up_cpu}, {down_cpu}" if path.processes else "-"
        print(f"  {path.label:<22} {up_text:>12} {down:7.0f} MiB/s   {cpu}")
    up_a, down_a = rates["a"]
    up_b, down_b = rates["b"]
    assert up_a is not None and up_b is not None
    up_ratio, down_ratio = up_b / up_a, down_b / down_a
    print(f"  (b) / (a): upload {up_ratio:.0%}, download {down_ratio:.0%}"
          f"   target >= 80%: {verdict(min(up_ratio, down_ratio) >= 0.8)}")
    print(f"  (c) / (b) download: {rates['c'][1] / down_b:.0%}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000, help="unary calls per path")
    parser.add_argument("--rounds", type=int, default=5, help="unary rounds, interleaved across paths")
    parser.add_argument("--stream-mib", type=int, default=64, help="MiB per streaming run")
    arguments = parser.parse_args()
    server, server_port = start_server(SERVICE)
    children: list[Child] = []
    paths: dict[str, Route] = {}
    try:
        paths = build(server_port, children)
        for path in paths.values():  # warm up: connections, tunnels, windows, code paths
            for _ in range(200):
                path.client.unary()
        per_round = max(1, arguments.calls // arguments.rounds)
        for _ in range(arguments.rounds):
            for path in paths.values():
                before = path.cpu_seconds()
                path.samples += [timed(path.client.unary) for _ in range(per_round)]
                path.cpu += path.cpu_seconds() - before
        report(paths, per_round * arguments.rounds, arguments.rounds)
        stream(paths, arguments.stream_mib)
    finally:
        for path in paths.values():
            path.client.close()
        for child in reversed(children):
            child.close()
        server.stop(grace=None)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "node":
        serve_node(int(sys.argv[2]) if len(sys.argv) > 2 else None, sys.argv[3] if len(sys.argv) > 3 else "tcp")
    elif len(sys.argv) > 1 and sys.argv[1] == "bridge":
        serve_bridge(sys.argv[2], TOKEN)
    else:
        main()
