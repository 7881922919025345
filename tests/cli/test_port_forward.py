"""`keynode forward` against a minimal CONNECT test double (real TCP on loopback)."""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Callable
from urllib.parse import unquote

import h11
import pytest
import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from proxy.app.config import HostPort
from proxy.app.port_forward import (
    ForwardTarget,
    open_tunnel,
    parse_forward_target,
    serve_port_forward,
)
from proxy.errors import PortForwardError
from proxy.identity.node_id import NodeId

TOKEN = "s3cret"
NODE_ID = NodeId.from_public_key(Ed25519PrivateKey.generate().public_key())


async def serve_digest_server(*, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
    """Reads until EOF, then answers with the sha256 of what it read and closes:
    only works if the client's half-close arrives while the reply can still flow."""

    async def handle(stream: trio.SocketStream) -> None:
        digest = hashlib.sha256()
        while data := await stream.receive_some(65536):
            digest.update(data)
        await stream.send_all(digest.hexdigest().encode())
        await stream.aclose()

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    task_status.started(listeners[0].socket.getsockname()[1])
    await trio.serve_listeners(handle, listeners)


async def serve_connect_double(
    server_port: int,
    seen_targets: list[str],
    *,
    status_for: Callable[[h11.Request], int] = lambda request: 200,
    early_bytes: bytes = b"",
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """A CONNECT proxy stand-in: checks auth, records the target, and tunnels to the
    local server (the nodeId is only recorded: no remote node here)."""

    async def handle(client: trio.SocketStream) -> None:
        connection = h11.Connection(h11.SERVER)
        while True:
            event = connection.next_event()
            if event is h11.NEED_DATA:
                connection.receive_data(await client.receive_some(4096))
                continue
            break
        assert isinstance(event, h11.Request)
        seen_targets.append(event.target.decode())
        headers = dict(event.headers)
        status = status_for(event)
        if headers.get(b"proxy-authorization") != b"Basic " + base64.b64encode(TOKEN.encode()):
            status = 407
        if status != 200:
            await client.send_all(connection.send(h11.Response(status_code=status, headers=[("Content-Length", "0")])))
            await client.aclose()
            return
        await client.send_all(connection.send(h11.Response(status_code=200, headers=[])) + early_bytes)
        upstream = await trio.open_tcp_stream("127.0.0.1", server_port)
        leftover, _ = connection.trailing_data

        async def up() -> None:
            if leftover:
                await upstream.send_all(leftover)
            while data := await client.receive_some(65536):
                await upstream.send_all(data)
            await upstream.send_eof()

        async def down() -> None:
            while data := await upstream.receive_some(65536):
                await client.send_all(data)
            await client.send_eof()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(up)
            nursery.start_soon(down)
        await upstream.aclose()
        await client.aclose()

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    task_status.started(listeners[0].socket.getsockname()[1])
    await trio.serve_listeners(handle, listeners)


async def digest_through(port: int, payload: bytes) -> str:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(payload)
        await stream.send_eof()
        reply = b""
        while data := await stream.receive_some(65536):
            reply += data
    return reply.decode()


def test_parse_forward_target() -> None:
    target = parse_forward_target(f"{NODE_ID}@[::1]:4000")
    assert target == ForwardTarget(NODE_ID, "::1", 4000)
    assert target.connect_target() == f"[::1]:4000?nodeId={NODE_ID}"
    for bad in ["", f"{NODE_ID}", f"{NODE_ID}@host", "vabc@1.2.3.4:5", f"{NODE_ID}@:5"]:
        with pytest.raises(ValueError):
            parse_forward_target(bad)


async def test_forward_carries_bytes_with_half_close() -> None:
    targets: list[str] = []
    ends: list[tuple[str, int, int, str | None]] = []
    payload = bytes(range(256)) * 8192  # 2 MiB
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            server_port = await nursery.start(serve_digest_server)
            proxy_port = await nursery.start(serve_connect_double, server_port, targets)
            bound = await nursery.start(
                lambda task_status: serve_port_forward(
                    HostPort("127.0.0.1", 0),
                    HostPort("127.0.0.1", proxy_port),
                    TOKEN,
                    ForwardTarget(NODE_ID, "198.18.0.7", 4000),
                    on_tunnel_end=lambda *args: ends.append(args),
                    task_status=task_status,
                )
            )
            port = bound[0].port
            results = [None] * 5

            async def one(index: int) -> None:
                results[index] = await digest_through(port, payload[: index * 100_000 + 1])

            async with trio.open_nursery() as clients:
                for index in range(5):
                    clients.start_soon(one, index)
            with trio.fail_after(5):
                while len(ends) < 5:
                    await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
    assert results == [hashlib.sha256(payload[: i * 100_000 + 1]).hexdigest() for i in range(5)]
    assert targets == [f"198.18.0.7:4000?nodeId={NODE_ID}"] * 5
    assert unquote(targets[0].partition("nodeId=")[2]) == str(NODE_ID)
    assert sorted(sent for _, sent, _, _ in ends) == [i * 100_000 + 1 for i in range(5)]
    assert all(received == 64 and error is None for _, _, received, error in ends)


async def test_bytes_right_after_the_200_are_kept() -> None:
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            server_port = await nursery.start(serve_digest_server)
            proxy_port = await nursery.start(
                lambda task_status: serve_connect_double(
                    server_port, [], early_bytes=b"early:", task_status=task_status
                )
            )
            tunnel, leftover = await open_tunnel(
                HostPort("127.0.0.1", proxy_port), TOKEN, f"x:1?nodeId={NODE_ID}"
            )
            async with tunnel:
                await tunnel.send_eof()
                reply = leftover
                while data := await tunnel.receive_some(1024):
                    reply += data
            nursery.cancel_scope.cancel()
    assert reply == b"early:" + hashlib.sha256(b"").hexdigest().encode()


@pytest.mark.parametrize(("token", "status"), [("wrong", 407), (TOKEN, 502)])
async def test_refused_tunnel_closes_only_its_client(token: str, status: int) -> None:
    ends: list[tuple[str, int, int, str | None]] = []
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            server_port = await nursery.start(serve_digest_server)
            proxy_port = await nursery.start(
                lambda task_status: serve_connect_double(
                    server_port, [], status_for=lambda request: 502, task_status=task_status
                )
            )
            with pytest.raises(PortForwardError, match=str(status)):
                await open_tunnel(HostPort("127.0.0.1", proxy_port), token, f"x:1?nodeId={NODE_ID}")
            bound = await nursery.start(
                lambda task_status: serve_port_forward(
                    HostPort("127.0.0.1", 0),
                    HostPort("127.0.0.1", proxy_port),
                    token,
                    ForwardTarget(NODE_ID, "127.0.0.1", 9),
                    on_tunnel_end=lambda *args: ends.append(args),
                    task_status=task_status,
                )
            )
            for _ in range(2):  # the listener survives a failed tunnel
                assert await digest_through(bound[0].port, b"") == ""
            nursery.cancel_scope.cancel()
    assert len(ends) == 2 and all(str(status) in (error or "") for *_, error in ends)


async def test_unreachable_proxy_is_a_typed_error() -> None:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    await listeners[0].aclose()  # nothing listens there now
    with trio.fail_after(10), pytest.raises(PortForwardError, match="cannot reach"):
        await open_tunnel(HostPort("127.0.0.1", port), TOKEN, "x:1")


async def test_garbage_answer_is_a_typed_error() -> None:
    async def garbage(stream: trio.SocketStream) -> None:
        await stream.send_all(b"\x00\xffnot http at all\r\n\r\n")
        await stream.aclose()

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(trio.serve_tcp, garbage, 0)
            port = listeners[0].socket.getsockname()[1]
            with pytest.raises(PortForwardError, match="invalid HTTP|without answering"):
                await open_tunnel(HostPort("127.0.0.1", port), TOKEN, "x:1")
            nursery.cancel_scope.cancel()


async def test_taken_listen_port_is_a_typed_error() -> None:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    async with listeners[0]:
        with trio.fail_after(10), pytest.raises(PortForwardError, match=f"cannot listen on 127.0.0.1:{port}"):
            await serve_port_forward(
                HostPort("127.0.0.1", port), HostPort("127.0.0.1", 1), TOKEN, ForwardTarget(NODE_ID, "h", 1)
            )
