"""Interoperability with libutp (utp-native 2.5.3 under Node), 16 MiB each way."""

from __future__ import annotations

import hashlib
import os

import pytest
import trio

from nat import UtpStream, open_endpoint

from .conftest import node_peer, utp_native_echo_server

pytestmark = pytest.mark.node

SIZE = 16 * 1024 * 1024
TIMEOUT = 120


@pytest.mark.parametrize("offload", [False, True], ids=["plain", "offload"])
async def test_our_client_to_utp_native_echo_server(offload: bool) -> None:
    # offload: our runs of datagrams leave as UDP GSO sends; libutp must still
    # see ordinary datagrams.
    data = os.urandom(SIZE)
    async with utp_native_echo_server() as address, open_endpoint(offload=offload) as endpoint:
        with trio.fail_after(TIMEOUT):
            stream = await endpoint.connect(address)
            echoed = hashlib.sha256()
            received = 0

            async def send() -> None:
                view = memoryview(data)
                for offset in range(0, SIZE, 65536):
                    await stream.send_all(view[offset : offset + 65536])
                await stream.send_eof()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(send)
                while chunk := await stream.receive_some():
                    echoed.update(chunk)
                    received += len(chunk)
            await stream.aclose()
    assert received == SIZE
    assert echoed.hexdigest() == hashlib.sha256(data).hexdigest()


async def test_utp_native_client_to_our_echo_server() -> None:
    server_received = hashlib.sha256()
    server_count = 0

    async def echo(stream: UtpStream) -> None:
        nonlocal server_count
        while chunk := await stream.receive_some():
            server_received.update(chunk)
            server_count += len(chunk)
            await stream.send_all(chunk)
        await stream.send_eof()

    async with open_endpoint() as endpoint:
        host, port = endpoint.address
        async with trio.open_nursery() as nursery:

            async def serve_one() -> None:
                stream = await endpoint.accept()
                await echo(stream)
                await stream.aclose()

            nursery.start_soon(serve_one)
            with trio.fail_after(TIMEOUT):
                async with node_peer("utp_client.js", host, port, SIZE) as client:
                    report = await client.read_event()
    assert report["event"] == "done", report
    assert report["sent_bytes"] == SIZE == server_count
    assert report["received_bytes"] == SIZE
    assert report["received_sha256"] == report["sent_sha256"] == server_received.hexdigest()
