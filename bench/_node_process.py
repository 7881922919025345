"""A keynode node in a child process, for the benchmarks that want one process per node,
and the CONNECT client they drive it with.

The parent runs ``python <its script> node [SERVER_PORT]``; the script's ``node``
branch calls ``run_node``. The child prints one JSON line (NodeId, forward and proxy
ports), runs until the parent closes its stdin, then prints the endpoint's and the
uTP core's counters as a second JSON line.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import IO, Any

import trio


async def run_node(server_port: int | None, token: str) -> None:
    from proxy.identity.tls_config import TLSConfig
    from proxy.tunnel.proxy import open_proxy

    tls_config = TLSConfig.generate()
    async with open_proxy(
        tls_config=tls_config,
        auth_token=token,
        proxy_host="127.0.0.1",
        server_host="127.0.0.1" if server_port else None,
        server_port=server_port,
    ) as proxy:
        ports = {"node_id": str(tls_config.node_id), "forward_port": proxy.forward_port, "proxy_port": proxy.proxy_port}
        print(json.dumps(ports), flush=True)
        await trio.to_thread.run_sync(sys.stdin.read, abandon_on_cancel=True)
        endpoint = proxy.endpoint
        counters = {"utp": endpoint.multiplexer.stats.as_dict(), "endpoint": endpoint.stats.as_dict()}
        print(json.dumps(counters), flush=True)


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU time process ``pid`` used so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class NodeProcess:
    """The parent's handle on one node process started from ``script``."""

    def __init__(self, script: str, server_port: int | None, stderr: IO[bytes] | None = None) -> None:
        command = [sys.executable, script, "node"] + ([str(server_port)] if server_port else [])
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr, text=True)
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError("node process failed to start")
        info = json.loads(line)
        self.node_id: str = info["node_id"]
        self.forward_port: int = info["forward_port"]
        self.proxy_port: int = info["proxy_port"]
        self.counters: dict[str, Any] = {}

    def target(self) -> str:
        return f"127.0.0.1:{self.proxy_port}?nodeId={self.node_id}"

    def cpu_seconds(self) -> float:
        return process_cpu_seconds(self.process.pid)

    def close(self) -> None:
        """Close stdin (the node stops) and read its counters; kill it if it hangs."""
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.close()
        try:
            self.process.wait(10)
            line = self.process.stdout.readline()
            if line:
                self.counters = json.loads(line)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        except ValueError:
            pass


class ConnectFailed(Exception):
    """The forward proxy did not answer a CONNECT with 200 (``status`` None: no answer)."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


async def connect_through(forward_port: int, target: str, token: str) -> tuple[trio.SocketStream, bytes]:
    """CONNECT through the forward proxy on loopback; the stream and the tunnel bytes
    that came with the 200."""
    import h11

    stream = await trio.open_tcp_stream("127.0.0.1", forward_port)
    client = h11.Connection(h11.CLIENT)
    auth = "Basic " + base64.b64encode(token.encode()).decode()
    request = h11.Request(method="CONNECT", target=target, headers=[("Host", target), ("Proxy-Authorization", auth)])
    await stream.send_all(client.send(request))
    while True:
        event = client.next_event()
        if event is h11.NEED_DATA:
            data = await stream.receive_some(4096)
            if not data:
                await stream.aclose()
                raise ConnectFailed("the proxy closed without an answer")
            client.receive_data(data)
            continue
        if not isinstance(event, h11.Response):
            await stream.aclose()
            raise ConnectFailed(f"unexpected {event!r}")
        if event.status_code != 200:
            await stream.aclose()
            raise ConnectFailed(f"{event.status_code} {event.reason.decode(errors='replace')}", event.status_code)
        return stream, bytes(client.trailing_data[0])
