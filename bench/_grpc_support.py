"""What the gRPC benchmarks (grpc_stack.py, grpc_web.py, grpc_identity.py) share: the
grpcio channel options, the unmodified grpcio server they call, a child process of the
script that reports one JSON line, and the grpc-web bridge such a child runs.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from concurrent import futures
from typing import Any

from _node_process import process_cpu_seconds

CHUNK = 256 << 10  # streaming message size
OPTIONS = [
    ("grpc.enable_http_proxy", 0),
    ("grpc.max_receive_message_length", 16 << 20),
    ("grpc.max_send_message_length", 16 << 20),
]


def start_server(service: str) -> tuple[Any, int]:
    """A grpcio server in this process offering ``service``: Unary (echo), Upload (client
    streaming, answers the byte count) and Download (server streaming, N messages of
    CHUNK bytes). Returns the server and its port."""
    import grpc

    def unary(request: bytes, context: Any) -> bytes:
        return request

    def upload(requests: Iterator[bytes], context: Any) -> bytes:
        return str(sum(len(chunk) for chunk in requests)).encode()

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
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, handlers),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, port


def serve_bridge(spec_text: str, token: str) -> None:
    """The grpc-web bridge (grpc_bridge.web) toward a direct server (``{"port": N}``) or
    through a node (``{"forward_port": N, "target": "host:port?nodeId=..."}``). Prints
    ``{"port": N}``, runs until stdin closes."""
    import trio

    from grpc_bridge.web import WebBridgeSettings, serve_web_bridge
    from grpc_bridge.web_connect import direct_upstream, tunnel_upstream

    spec = json.loads(spec_text)
    if "forward_port" in spec:
        opener = tunnel_upstream("127.0.0.1", spec["forward_port"], spec["target"], token)
    else:
        opener = direct_upstream("127.0.0.1", spec["port"])

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            settings = WebBridgeSettings("127.0.0.1", 0, (), "bench")
            _, port = await nursery.start(serve_web_bridge, settings, opener)
            print(json.dumps({"port": port}), flush=True)
            await trio.to_thread.run_sync(sys.stdin.read, abandon_on_cancel=True)
            nursery.cancel_scope.cancel()

    trio.run(main)


class Child:
    """A child of ``script`` (``python script *args``): one JSON line, then it runs until
    its stdin closes."""

    def __init__(self, script: str, *args: str) -> None:
        command = [sys.executable, script, *args]
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"{args[0]} process failed to start")
        self.info = json.loads(line)

    def cpu_seconds(self) -> float:
        return process_cpu_seconds(self.process.pid)

    def close(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.close()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]
