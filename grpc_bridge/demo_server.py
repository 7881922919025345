"""`keynode demo`'s echo server, out of process: an unmodified grpcio server that
learns who is calling from the request metadata keynode injects.

    python -m grpc_bridge.demo_server [--host 127.0.0.1] [--port 0]

prints ``port: <bound port>`` then ``ready``, then ``caller: <NodeId>`` for each
WhoAmI call; SIGTERM or SIGINT stops it (exit status 0). Service
``keynode.demo.Echo`` (bytes in, bytes out, no generated code):

- ``Unary``: the request, back;
- ``Upload`` (client streaming): the SHA-256 hex of everything sent;
- ``WhoAmI``: the caller's NodeId from the ``x-keynode-node-id`` metadata, empty
  when the call did not come through a keynode service of kind ``"grpc"``.

Nothing here knows keynode: any gRPC server in any language reads the caller the
same way (``x-keynode-node-id``, and ``x-keynode-peer`` for this node, the caller
and the SHA-256 of the caller's certificate).
"""

from __future__ import annotations

import argparse
import hashlib
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass
from typing import Any

import grpc

SERVICE = "keynode.demo.Echo"
NODE_ID_METADATA = "x-keynode-node-id"
MAX_MESSAGE = 8 << 20


def caller_node_id(context: grpc.ServicerContext) -> str:
    """The verified caller keynode put in the metadata ("" if none came)."""
    for key, value in context.invocation_metadata():
        if key == NODE_ID_METADATA:
            return str(value)
    return ""


def build_server(host: str, port: int) -> tuple[grpc.Server, int]:
    def unary(request: bytes, context: grpc.ServicerContext) -> bytes:
        return request

    def upload(requests: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
        digest = hashlib.sha256()
        for chunk in requests:
            digest.update(chunk)
        return digest.hexdigest().encode()

    def who_am_i(request: bytes, context: grpc.ServicerContext) -> bytes:
        caller = caller_node_id(context)
        print(f"caller: {caller or '(none)'}", flush=True)
        return caller.encode()

    handlers = {
        "Unary": grpc.unary_unary_rpc_method_handler(unary),
        "Upload": grpc.stream_unary_rpc_method_handler(upload),
        "WhoAmI": grpc.unary_unary_rpc_method_handler(who_am_i),
    }
    options = [("grpc.so_reuseport", 0), ("grpc.max_receive_message_length", MAX_MESSAGE)]
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8), options=options)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"the demo server could not bind {host}:{port}")
    return server, bound


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m grpc_bridge.demo_server", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    arguments = parser.parse_args(argv)
    try:
        server, port = build_server(arguments.host, arguments.port)
    except OSError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    stop = threading.Event()
    for number in (signal.SIGTERM, signal.SIGINT):
        signal.signal(number, lambda *_: stop.set())
    server.start()
    print(f"port: {port}", flush=True)
    print("ready", flush=True)
    stop.wait()
    server.stop(grace=1).wait(5)
    return 0


@dataclass
class DemoServerProcess:
    """A running ``python -m grpc_bridge.demo_server`` (for the demo and tests)."""

    process: subprocess.Popen[str]
    port: int

    def stop(self, timeout: float = 10) -> int | None:
        """SIGTERM, wait; the exit status (None if it had to be killed)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
                return None
        return self.process.returncode


def spawn(host: str = "127.0.0.1", **popen: Any) -> DemoServerProcess:
    """Start the server in a child process; returns once it reported its port.
    Further stdout lines (``caller: ...``) stay readable on ``process.stdout``."""
    process = subprocess.Popen(
        [sys.executable, "-m", "grpc_bridge.demo_server", "--host", host],
        stdout=subprocess.PIPE,
        text=True,
        **popen,
    )
    assert process.stdout is not None
    port = None
    for line in process.stdout:
        key, _, value = line.strip().partition(": ")
        if key == "port":
            port = int(value)
        elif line.strip() == "ready" and port is not None:
            return DemoServerProcess(process, port)
    process.wait()
    raise OSError(f"the demo server exited while starting (status {process.returncode})")


if __name__ == "__main__":
    sys.exit(main())
