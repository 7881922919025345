"""trio's own stream conformance suite run against TLSStream, plus misuse checks."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from proxy.errors import TLSBusyError
from proxy.tls import TLSStream
from tests.proxy.test_tls_support import handshake_both, make_tls_config, memory_tls_pair

CLIENT_CONFIG = make_tls_config(2)
SERVER_CONFIG = make_tls_config(1)


async def memory_maker() -> tuple[TLSStream, TLSStream]:
    client, server = memory_tls_pair(CLIENT_CONFIG, SERVER_CONFIG)
    await handshake_both(client, server)
    return client, server


async def lockstep_maker() -> tuple[TLSStream, TLSStream]:
    """Clogged: a lockstep transport has no buffer, so send_all blocks until the
    other side reads."""
    client, server = memory_tls_pair(
        CLIENT_CONFIG, SERVER_CONFIG, pair_maker=trio.testing.lockstep_stream_pair
    )
    await handshake_both(client, server)
    return client, server


async def unhandshaken_memory_maker() -> tuple[TLSStream, TLSStream]:
    """The handshake runs lazily inside the suite's first operations."""
    return memory_tls_pair(CLIENT_CONFIG, SERVER_CONFIG)


async def test_check_half_closeable_stream_memory() -> None:
    with trio.fail_after(60):
        await trio.testing.check_half_closeable_stream(memory_maker, lockstep_maker)


async def test_check_half_closeable_stream_tcp() -> None:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]

    async def tcp_maker() -> tuple[TLSStream, TLSStream]:
        client_transport = await trio.open_tcp_stream("127.0.0.1", port)
        server_transport = await listeners[0].accept()
        client = TLSStream(client_transport, CLIENT_CONFIG, server_side=False)
        server = TLSStream(server_transport, SERVER_CONFIG, server_side=True)
        await handshake_both(client, server)
        return client, server

    try:
        with trio.fail_after(60):
            await trio.testing.check_half_closeable_stream(tcp_maker, None)
    finally:
        for listener in listeners:
            await listener.aclose()


async def test_two_receivers_at_once_is_busy() -> None:
    with trio.fail_after(10):
        client, server = await memory_maker()
        with pytest.RaisesGroup(TLSBusyError):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(server.receive_some, 10)
                await trio.testing.wait_all_tasks_blocked()
                nursery.start_soon(server.receive_some, 10)
        # The busy error tells of misuse; it does not break the stream.
        await client.send_all(b"still fine")
        assert await server.receive_some() == b"still fine"


async def test_two_senders_at_once_is_busy() -> None:
    with trio.fail_after(10):
        client, server = await lockstep_maker()
        with pytest.RaisesGroup(TLSBusyError):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(client.send_all, b"x" * 1000)
                await trio.testing.wait_all_tasks_blocked()
                nursery.start_soon(client.send_all, b"y")
        assert issubclass(TLSBusyError, trio.BusyResourceError)


async def test_send_eof_while_sending_is_busy() -> None:
    with trio.fail_after(10):
        client, server = await lockstep_maker()
        with pytest.RaisesGroup(TLSBusyError):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(client.send_all, b"x" * 1000)
                await trio.testing.wait_all_tasks_blocked()
                nursery.start_soon(client.send_eof)
