"""Our uTP and libutp (utp-native under Node) across a veth pair with 1% loss each way.

16 MiB each way on one connection (the far side echoes), sha256 equal, in both
roles: our client against a utp-native echo server, and a utp-native client
against our echo server. Loss is the lab's nftables random drop on each end's
ingress; there is no netem in this kernel.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

import pytest
import trio

from nat import Endpoint, UtpStream, open_endpoint
from tests.natlab import Host, Impairment, open_lab

NODE_PEER = Path(__file__).resolve().parent.parent / "node" / "natlab_utp_tls.js"
TOTAL = 16 * 1024 * 1024
CHUNK = 64 * 1024
TRANSFER_TIMEOUT = 120


@pytest.fixture(scope="module")
def hosts() -> Iterator[tuple[Host, Host]]:
    with open_lab() as lab:
        ours, theirs = lab.add_host_pair("ours", "libutp")
        assert ours.uplink is not None
        ours.uplink.impair(Impairment(loss=0.01))
        yield ours, theirs


@asynccontextmanager
async def endpoint_in(host: Host) -> AsyncIterator[Endpoint]:
    """Our endpoint, its UDP socket created inside the host's namespace."""
    async with AsyncExitStack() as stack:
        with host.enter():
            endpoint = await stack.enter_async_context(open_endpoint(host.address, 0))
        yield endpoint


async def _send_random(stream: UtpStream, total: int, digest: hashlib._Hash) -> None:
    left = total
    while left:
        chunk = os.urandom(min(CHUNK, left))
        digest.update(chunk)
        await stream.send_all(chunk)
        left -= len(chunk)
    await stream.send_eof()


async def _receive_all(stream: UtpStream, digest: hashlib._Hash) -> int:
    received = 0
    while data := await stream.receive_some(CHUNK):
        digest.update(data)
        received += len(data)
    return received


@pytest.mark.netns
@pytest.mark.node
async def test_our_client_to_utp_native_echo_server_through_1pct_loss(
    hosts: tuple[Host, Host],
) -> None:
    ours, theirs = hosts
    server = theirs.spawn(["node", str(NODE_PEER), "echo", theirs.address, "0"])
    listening = await trio.to_thread.run_sync(server.wait_event, "listening", 15.0)
    sent, echoed = hashlib.sha256(), hashlib.sha256()
    async with endpoint_in(ours) as endpoint:
        with trio.fail_after(TRANSFER_TIMEOUT):
            stream = await endpoint.connect((theirs.address, int(listening["port"])))  # type: ignore[call-overload]
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_send_random, stream, TOTAL, sent)
                received = await _receive_all(stream, echoed)
            await stream.aclose()
    theirs.lab.stop_process(server)
    assert received == TOTAL
    assert echoed.hexdigest() == sent.hexdigest()


@pytest.mark.netns
@pytest.mark.node
async def test_utp_native_client_to_our_echo_server_through_1pct_loss(
    hosts: tuple[Host, Host],
) -> None:
    ours, theirs = hosts

    async def echo(stream: UtpStream) -> None:
        while data := await stream.receive_some(CHUNK):
            await stream.send_all(data)
        await stream.send_eof()

    async with endpoint_in(ours) as endpoint:
        client = theirs.spawn(["node", str(NODE_PEER), "client", ours.address,
                               str(endpoint.address[1]), str(TOTAL)])
        with trio.fail_after(TRANSFER_TIMEOUT):
            stream = await endpoint.accept()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(echo, stream)
                done = await trio.to_thread.run_sync(client.wait_event, "done",
                                                     float(TRANSFER_TIMEOUT))
            await stream.aclose()
    theirs.lab.stop_process(client)
    assert done["received_bytes"] == TOTAL
    assert done["received_sha256"] == done["sent_sha256"]
