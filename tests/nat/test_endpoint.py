"""The UDP endpoint: demultiplexing, out-of-band messages, IPv6, closing."""

from __future__ import annotations

import contextlib
import hashlib
import random
import socket

import pytest
import trio
import trio.testing

from nat import PING, PONG, EndpointClosed, UtpConnectionRefused, open_endpoint
from nat.message import encode_message

from .conftest import connect_pair, wait_until


def raw_socket(family: int = socket.AF_INET) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0) if family == socket.AF_INET else ("::1", 0))
    return sock


def test_public_api_imports() -> None:
    from nat import PING, PONG, Endpoint, UtpStream, open_endpoint  # noqa: F401


async def test_messages_reach_every_subscriber_with_sender_address() -> None:
    async with open_endpoint() as a, open_endpoint() as b:
        with b.subscribe_messages() as first, b.subscribe_messages() as second:
            a.send_message(PING, b.address)
            a.send_message(PONG, b.address)
            a.send_message(7, b.address)  # unknown value: still a message
            with trio.fail_after(5):
                for channel in (first, second):
                    assert await channel.receive() == (PING, a.address)
                    assert await channel.receive() == (PONG, a.address)
                    assert await channel.receive() == (7, a.address)
        assert b.stats.messages_received == 3
        assert a.stats.messages_sent == 3


async def test_junk_is_counted_and_ignored() -> None:
    junk = [
        b"",
        b"\x00",
        b"\x00\x00\x00",
        b"\x00\x00\x00\x00\x00",  # reserved message space: not a 4-byte message
        b"\x01\x00\x00\x00",  # 4 bytes not starting with 0
        b"\x41" * 19,  # uTP-looking but shorter than a header
        b"\x52" + bytes(30),  # version 2
        b"\x61" + bytes(30),  # type 6
        b"GET / HTTP/1.1\r\n\r\n",
    ]
    async with open_endpoint() as endpoint:
        with endpoint.subscribe_messages() as messages, raw_socket() as sender:
            for data in junk:
                sender.sendto(data, endpoint.address)
            sender.sendto(encode_message(PING), endpoint.address)
            with trio.fail_after(5):
                assert await messages.receive() == (PING, sender.getsockname())
            await wait_until(lambda: endpoint.stats.datagrams_received == len(junk) + 1)
            assert endpoint.stats.junk_dropped == len(junk)
            assert endpoint.stats.messages_received == 1
            with pytest.raises(trio.WouldBlock):
                messages.receive_nowait()


async def test_slow_subscriber_drops_and_counts() -> None:
    async with open_endpoint() as a, open_endpoint() as b:
        with b.subscribe_messages(buffer_size=2) as slow:
            for _ in range(6):
                a.send_message(PING, b.address)
            await wait_until(lambda: b.stats.messages_received == 6)
            assert b.stats.messages_dropped == 4
            assert slow.receive_nowait() == (PING, a.address)
            assert slow.receive_nowait() == (PING, a.address)


async def test_send_message_is_best_effort() -> None:
    async with open_endpoint() as endpoint:
        endpoint.send_message(PING, ("::1", 9))  # wrong family: counted, not raised
        assert endpoint.stats.send_errors == 1
        with pytest.raises(ValueError):
            endpoint.send_message(b"\x01" + bytes(19), ("127.0.0.1", 9))  # looks like uTP
        with pytest.raises(ValueError):
            endpoint.send_message(1 << 24, ("127.0.0.1", 9))


async def test_ipv6_loopback_messages_and_transfer() -> None:
    async with open_endpoint("::1") as a, open_endpoint("::1") as b:
        assert a.address[0] == "::1"
        with b.subscribe_messages() as messages:
            a.send_message(PING, b.address)
            with trio.fail_after(5):
                assert await messages.receive() == (PING, a.address)
        client, server = await connect_pair(a, b)
        assert server.remote_address == a.address
        assert client.remote_address == b.address
        data = random.Random(6).randbytes(300_000)
        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_send_and_eof, client, data)
                assert await _receive_all(server) == data
        await client.aclose()
        await server.aclose()


async def test_dual_stack_serves_ipv4_peers() -> None:
    async with open_endpoint("::", dual_stack=True) as server_endpoint:
        port = server_endpoint.address[1]
        async with open_endpoint("127.0.0.1") as v4, open_endpoint("::1") as v6:
            with server_endpoint.subscribe_messages() as messages:
                v4.send_message(PING, ("127.0.0.1", port))
                v6.send_message(PONG, ("::1", port))
                with trio.fail_after(5):
                    received = {await messages.receive(), await messages.receive()}
                assert received == {(PING, v4.address), (PONG, v6.address)}
            server_endpoint.send_message(PONG, v4.address)  # plain IPv4 address works
            for client_endpoint in (v4, v6):
                async with trio.open_nursery() as nursery:
                    accepted: list = []

                    async def accept_one(into: list) -> None:
                        into.append(await server_endpoint.accept())

                    nursery.start_soon(accept_one, accepted)
                    host = "127.0.0.1" if client_endpoint is v4 else "::1"
                    with trio.fail_after(10):
                        client = await client_endpoint.connect((host, port))
                        await client.send_all(b"hello")
                await client.send_eof()
                with trio.fail_after(10):
                    assert await _receive_all(accepted[0]) == b"hello"
                assert accepted[0].remote_address == client_endpoint.address
                await client.aclose()
                await accepted[0].aclose()


async def test_refused_when_not_accepting() -> None:
    async with open_endpoint() as a, open_endpoint() as b:
        b.accepting = False
        assert not b.accepting
        with trio.fail_after(10), pytest.raises(UtpConnectionRefused):
            await a.connect(b.address)


async def _send_and_eof(stream, data: bytes) -> None:  # type: ignore[no-untyped-def]
    await stream.send_all(data)
    await stream.send_eof()


async def _receive_all(stream) -> bytes:  # type: ignore[no-untyped-def]
    received = bytearray()
    while chunk := await stream.receive_some():
        received += chunk
    return bytes(received)


def _hostile_datagrams(rng: random.Random, live_ids: list[int]) -> list[bytes]:
    """Random junk, messages, and uTP-shaped packets of every type: half of them
    carry the live connection's ids (from another address, they must not touch it)."""
    datagrams = []
    for _ in range(200):
        choice = rng.randrange(4)
        if choice == 0:
            datagrams.append(rng.randbytes(rng.randrange(0, 1500)))
        elif choice == 1:
            datagrams.append(b"\x00" + rng.randbytes(3))  # messages
        else:
            connection_id = rng.choice(live_ids) if rng.random() < 0.5 else rng.randrange(65536)
            header = bytes([rng.randrange(5) << 4 | 1, rng.choice([0, 1, 2, 7])])
            body = connection_id.to_bytes(2, "big") + rng.randbytes(16)
            datagrams.append(header + body + rng.randbytes(rng.randrange(0, 1400)))
    return datagrams


async def test_hostile_datagrams_during_transfer_change_nothing() -> None:
    rng = random.Random(20261122)
    data = rng.randbytes(4 * 1024 * 1024)
    async with open_endpoint() as a, open_endpoint() as b:
        client, server = await connect_pair(a, b)
        live_ids = [client.connection.recv_id, client.connection.send_id]
        attack_done = trio.Event()

        async def attack() -> None:
            with raw_socket() as attacker:
                attacker.setblocking(False)
                for _round in range(20):
                    for datagram in _hostile_datagrams(rng, live_ids):
                        for target in (a.address, b.address):
                            try:
                                attacker.sendto(datagram, target)
                            except BlockingIOError:
                                pass
                    await trio.sleep(0.01)
            attack_done.set()

        async def send_back() -> None:
            await _send_and_eof(server, data[::-1])

        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(attack)
                nursery.start_soon(_send_and_eof, client, data)
                nursery.start_soon(send_back)
                got_at_server = await _receive_all(server)
                got_at_client = await _receive_all(client)
                await attack_done.wait()
        assert hashlib.sha256(got_at_server).digest() == hashlib.sha256(data).digest()
        assert hashlib.sha256(got_at_client).digest() == hashlib.sha256(data[::-1]).digest()
        assert a.stats.junk_dropped > 0 and b.stats.junk_dropped > 0
        await client.aclose()
        await server.aclose()


async def test_closing_the_endpoint_ends_everything() -> None:
    tasks_before = trio.lowlevel.current_statistics().tasks_living
    outcomes: dict[str, type[BaseException]] = {}

    async def expect(name: str, fn) -> None:  # type: ignore[no-untyped-def]
        try:
            await fn()
        except (trio.BrokenResourceError, trio.EndOfChannel, EndpointClosed) as exc:
            outcomes[name] = type(exc)

    async with open_endpoint() as peer:
        with contextlib.ExitStack() as subscriptions:
            async with trio.open_nursery() as waiters:
                async with open_endpoint() as endpoint:
                    client, server = await connect_pair(peer, endpoint)
                    # Entered here, left after the endpoint: it outlives it.
                    messages = subscriptions.enter_context(endpoint.subscribe_messages())
                    waiters.start_soon(expect, "receive", server.receive_some)
                    waiters.start_soon(expect, "accept", endpoint.accept)
                    waiters.start_soon(expect, "messages", messages.receive)
                    await trio.testing.wait_all_tasks_blocked()
                # Leaving the endpoint woke every waiter with an error.
        assert outcomes == {
            "receive": trio.BrokenResourceError,
            "accept": EndpointClosed,
            "messages": trio.EndOfChannel,
        }
        # The peer saw our RESET.
        with trio.fail_after(5), pytest.raises(trio.BrokenResourceError):
            while await client.receive_some():
                pass
        await client.aclose()
        with pytest.raises(EndpointClosed):
            await endpoint.connect(peer.address)
    assert trio.lowlevel.current_statistics().tasks_living == tasks_before


async def test_connect_to_a_silent_address_times_out() -> None:
    from nat import UtpTimeout
    from nat.utp.config import UtpConfig

    quick = UtpConfig(initial_rto=0.1, min_rto=0.1, syn_retries=2)
    with raw_socket() as silent:  # bound, never answers
        async with open_endpoint(config=quick) as endpoint:
            with trio.fail_after(10), pytest.raises(UtpTimeout):
                await endpoint.connect(silent.getsockname())
            assert endpoint.connection_count == 0


async def test_connect_validates_the_address() -> None:
    async with open_endpoint() as endpoint:
        with pytest.raises(ValueError):
            await endpoint.connect(("127.0.0.1", 0))
        with pytest.raises(ValueError):
            await endpoint.connect(("127.0.0.1", 70000))
        with pytest.raises(ValueError):
            await endpoint.connect(("::1", 9))  # IPv6 peer, IPv4 socket
        with pytest.raises(ValueError):
            endpoint.send_message(PING, ("localhost", 9))  # would block on DNS
    async with open_endpoint("::1") as v6_only:
        with pytest.raises(ValueError):
            await v6_only.connect(("127.0.0.1", 9))


class _SometimesFullSocket(socket.socket):
    """A UDP socket whose send buffer reports full (EAGAIN) every few sends.

    Loopback never fills a UDP send buffer, so this is how the endpoint's
    backlog path (wait_writable, then resend in order) gets exercised.
    """

    refusals = 0
    calls = 0

    def sendto(self, data, *args):  # type: ignore[no-untyped-def, override]
        self.calls += 1
        if self.calls % 7 == 0:
            self.refusals += 1
            raise BlockingIOError(11, "pretend the send buffer is full")
        return super().sendto(data, *args)


async def test_send_backlog_when_the_socket_would_block(monkeypatch: pytest.MonkeyPatch) -> None:
    import nat.endpoint

    real_bind = nat.endpoint.bind_udp_socket
    flaky: list[_SometimesFullSocket] = []

    async def bind_flaky(*args):  # type: ignore[no-untyped-def]
        sock = await real_bind(*args)
        wrapped = _SometimesFullSocket(sock.family, sock.type, sock.proto, sock.detach())
        flaky.append(wrapped)
        return wrapped

    monkeypatch.setattr(nat.endpoint, "bind_udp_socket", bind_flaky)
    data = random.Random(8).randbytes(2 * 1024 * 1024)
    async with open_endpoint() as a, open_endpoint() as b:
        client, server = await connect_pair(a, b)
        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_send_and_eof, client, data)
                nursery.start_soon(_send_and_eof, server, data[::-1])
                assert await _receive_all(server) == data
                assert await _receive_all(client) == data[::-1]
        await client.aclose()
        await server.aclose()
    assert all(sock.refusals > 0 for sock in flaky)
    assert a.stats.send_dropped == 0 and b.stats.send_dropped == 0


class _NoSegmentationSocket(socket.socket):
    """A socket on a path without UDP GSO: the kernel answers EIO."""

    def sendmsg(self, *args):  # type: ignore[no-untyped-def, override]
        raise OSError(5, "pretend this device cannot segment")


async def test_offload_falls_back_when_the_kernel_refuses(monkeypatch: pytest.MonkeyPatch) -> None:
    import nat.endpoint

    real_bind = nat.endpoint.bind_udp_socket

    async def bind_without_gso(*args):  # type: ignore[no-untyped-def]
        sock = await real_bind(*args)
        return _NoSegmentationSocket(sock.family, sock.type, sock.proto, sock.detach())

    monkeypatch.setattr(nat.endpoint, "bind_udp_socket", bind_without_gso)
    data = random.Random(10).randbytes(1024 * 1024)
    async with open_endpoint(offload=True) as a, open_endpoint(offload=True) as b:
        client, server = await connect_pair(a, b)
        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_send_and_eof, client, data)
                assert await _receive_all(server) == data
        await client.aclose()
        await server.aclose()
    assert a.stats.offload_failures == 1
    assert a.stats.segmented_sends == 0
