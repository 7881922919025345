"""`make demo`'s out-of-process echo server reads the caller from request metadata:
through the identity relay it names the caller; called directly, nobody."""

from __future__ import annotations

import grpc
import trio

from grpc_bridge import demo_server
from tests.grpc_bridge.test_identity_injection_support import TEST_CALLER, fixed_caller, relay_listener


async def test_demo_server_reads_the_caller_from_metadata_out_of_process() -> None:
    with trio.fail_after(60):
        server = await trio.to_thread.run_sync(demo_server.spawn)
        try:
            assert server.process.stdout is not None
            async with relay_listener(server.port, fixed_caller, splicer=True) as listener:
                options = [("grpc.enable_http_proxy", 0)]
                for port, expected in ((listener.port, TEST_CALLER.peer_node_id.encode()), (server.port, "")):

                    def who_am_i(port: int = port) -> bytes:
                        with grpc.insecure_channel(f"127.0.0.1:{port}", options=options) as channel:
                            call = channel.unary_unary(f"/{demo_server.SERVICE}/WhoAmI")
                            forged = (("x-keynode-node-id", "vforged"),)
                            return call(b"", metadata=forged if port == listener.port else (), timeout=20)

                    assert await trio.to_thread.run_sync(who_am_i) == expected.encode()
                    line = await trio.to_thread.run_sync(server.process.stdout.readline)
                    assert line.strip() == f"caller: {expected or '(none)'}"
        finally:
            status = await trio.to_thread.run_sync(server.stop)
        assert status == 0
