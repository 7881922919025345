"""Endpoint virtual paths over real sockets: connect and accept over a relayed
path, what a path without a sender does, junk and failing senders contained,
bad move targets refused with typed errors."""

from __future__ import annotations

import pytest

from nat.endpoint import open_endpoint
from nat.errors import UnknownPath, UtpClosed
from nat.utp.paths import VirtualPath
from tests.nat.test_paths_support import memory_relay


async def test_connect_over_a_relay_accepts_a_connection_bound_to_it_then_upgrades() -> None:
    async with open_endpoint() as a, open_endpoint() as b, memory_relay(a, b) as relay:
        client = await a.connect(relay.a_to_b)
        server = await b.accept()
        assert client.path == relay.a_to_b and server.path == relay.b_to_a
        await client.send_all(b"over the relay")
        assert await server.receive_some() == b"over the relay"
        assert a.stats.datagrams_sent == 0 and b.stats.datagrams_sent == 0  # nothing on the sockets
        client.move_to(b.address)
        server.move_to(a.address)
        await server.send_all(b"direct now")
        assert await client.receive_some() == b"direct now"
        assert a.stats.datagrams_sent > 0 and b.stats.datagrams_sent > 0
        for endpoint in (a, b):
            assert endpoint.multiplexer.stats.resets_sent == 0
        await client.aclose()
        await server.aclose()


async def test_a_removed_path_sends_nothing_until_the_connection_moves() -> None:
    async with open_endpoint() as a, open_endpoint() as b, memory_relay(a, b) as relay:
        client = await a.connect(b.address)
        server = await b.accept()
        client.move_to(relay.a_to_b)
        server.move_to(relay.b_to_a)
        a.remove_path(relay.a_to_b)
        assert relay.a_to_b not in a.paths
        with pytest.raises(UnknownPath):
            client.move_to(relay.a_to_b)
        await client.send_all(b"lost for now")
        assert a.stats.path_unrouted > 0
        client.move_to(b.address)  # the caller moves it back: the bytes go again
        server.move_to(a.address)
        assert await server.receive_some() == b"lost for now"
        # what arrives over a path that has no sender is not taken either
        a.receive_from_path(b"\x41" * 40, relay.a_to_b)
        assert a.stats.path_unrouted >= 2


async def test_junk_and_failing_senders_are_counted_not_raised() -> None:
    async with open_endpoint() as a, open_endpoint() as b, memory_relay(a, b) as relay:
        a.receive_from_path(b"\x00\x00\x00\x10 not uTP", relay.a_to_b)
        a.receive_from_path(b"", relay.a_to_b)
        assert a.stats.path_junk == 2
        failing = VirtualPath(("relay", "broken"))

        def broken(data: bytes) -> None:
            raise RuntimeError("the relay link fell over")

        a.add_path(failing, broken)
        client = await a.connect(b.address)
        server = await b.accept()
        client.move_to(failing)
        await client.send_all(b"x")
        assert a.stats.path_send_errors > 0
        client.move_to(b.address)
        assert await server.receive_some() == b"x"


async def test_bad_move_targets_and_paths() -> None:
    async with open_endpoint() as a, open_endpoint() as b:
        client = await a.connect(b.address)
        server = await b.accept()
        with pytest.raises(UnknownPath):
            client.move_to(VirtualPath(("nowhere",)))
        with pytest.raises(UnknownPath):
            await a.connect(VirtualPath(("nowhere",)))
        with pytest.raises(ValueError):
            client.move_to(("localhost", 5))
        with pytest.raises(ValueError):
            client.move_to(("::1", 5))  # an IPv4 socket
        with pytest.raises(ValueError):
            client.move_to(("127.0.0.1", 0))
        with pytest.raises(TypeError):
            a.add_path(("127.0.0.1", 5), lambda data: None)  # type: ignore[arg-type]
        client.move_to(b.address)  # where it is: nothing happens
        assert client.path_moves == 0
        client.abort_quietly()
        assert server.path == a.address
        with pytest.raises(UtpClosed):
            client.move_to(b.address)
