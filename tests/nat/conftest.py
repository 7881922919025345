"""Fixtures for nat tests: endpoints on loopback and real libutp peers under Node.

Node and tests/node/node_modules (utp-native) are prerequisites installed by
`make test`; when missing, tests that need them fail loudly (never skip).
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

NODE_DIR = Path(__file__).resolve().parents[1] / "node"
PEER_START_TIMEOUT = 15.0


def node_executable() -> str:
    node = shutil.which("node")
    if node is None:
        pytest.fail("Node is not installed: run `make test` (it installs nodejs)", pytrace=False)
    if not (NODE_DIR / "node_modules" / "utp-native" / "index.js").is_file():
        pytest.fail(
            f"utp-native is missing from {NODE_DIR}/node_modules: run `make node`",
            pytrace=False,
        )
    return node


class NodePeer:
    """A running Node script that reports JSON lines on stdout."""

    def __init__(self, process: trio.Process, script: str) -> None:
        self.process = process
        self.script = script
        self._buffer = bytearray()

    async def read_event(self) -> dict[str, Any]:
        """The next JSON line; AssertionError if the peer reports an error or exits."""
        assert self.process.stdout is not None
        while b"\n" not in self._buffer:
            chunk = await self.process.stdout.receive_some(65536)
            if not chunk:
                code = await self.process.wait()
                raise AssertionError(f"{self.script} exited ({code}) before reporting")
            self._buffer += chunk
        line, _, rest = bytes(self._buffer).partition(b"\n")
        self._buffer = bytearray(rest)
        event = json.loads(line)
        if event.get("event") == "error":
            raise AssertionError(f"{self.script} failed: {event.get('message')}")
        return event


@asynccontextmanager
async def node_peer(script: str, *args: object) -> AsyncIterator[NodePeer]:
    """Run tests/node/<script>; killed on exit whatever happened."""
    node = node_executable()
    command = [node, str(NODE_DIR / script), *map(str, args)]
    process = await trio.lowlevel.open_process(
        command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, cwd=NODE_DIR
    )
    try:
        yield NodePeer(process, script)
    finally:
        with trio.CancelScope(shield=True):
            if process.returncode is None:
                process.kill()
            with trio.move_on_after(5):
                await process.wait()
            if process.stdout is not None:
                await process.stdout.aclose()


@asynccontextmanager
async def utp_native_echo_server() -> AsyncIterator[tuple[str, int]]:
    """A libutp echo server on 127.0.0.1; yields its (host, port)."""
    async with node_peer("utp_echo_server.js", "127.0.0.1", 0) as peer:
        with trio.fail_after(PEER_START_TIMEOUT):
            event = await peer.read_event()
        assert event["event"] == "listening", event
        yield ("127.0.0.1", int(event["port"]))


async def connect_pair(client_endpoint: Any, server_endpoint: Any) -> tuple[Any, Any]:
    """(client stream, server stream) of one new connection between two endpoints."""
    accepted: list[Any] = []

    async def accept_one() -> None:
        accepted.append(await server_endpoint.accept())

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(accept_one)
            client = await client_endpoint.connect(server_endpoint.address)
    return client, accepted[0]


async def wait_until(predicate: Any, timeout: float = 5.0) -> None:
    """Poll a condition that depends on datagrams in flight (bounded)."""
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.005)
