"""An unmodified grpcio server's life in a trio test, shared by the gRPC tests: started
on a free loopback port, stopped without grace on exit (grpcio is threaded: its start
and wait run in a worker thread so the trio loop keeps running)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import grpc
import trio


@asynccontextmanager
async def serving_on_loopback(server: grpc.Server, *handlers: grpc.GenericRpcHandler) -> AsyncIterator[int]:
    """``server`` with ``handlers`` on 127.0.0.1, started; yields its port."""
    server.add_generic_rpc_handlers(handlers)
    port = server.add_insecure_port("127.0.0.1:0")
    await trio.to_thread.run_sync(server.start)
    try:
        yield port
    finally:
        stopped = server.stop(grace=None)
        await trio.to_thread.run_sync(stopped.wait, 5)
