"""Data through the tunnel: early bytes, half-close, concurrency, IPv6, bounded memory, hostile input."""

from __future__ import annotations

import datetime
import hashlib
import os
import random

import trio

from nat.errors import NatError
from proxy.errors import KeynodeError
from proxy.identity.certificates import generate_certificate
from proxy.identity.keys import generate_key_pair
from proxy.identity.tls_config import TLSConfig
from proxy.tls import TLSStream
from tests.proxy.test_proxy_support import (
    TOKEN,
    connect_ok,
    digest_after_eof,
    http_connect,
    random_payload,
    raw_peer,
    receive_all,
    running_node,
    target_for,
    tcp_server,
)


async def test_bytes_sent_right_after_connect_are_forwarded() -> None:
    with trio.fail_after(15):
        async with tcp_server() as server, running_node(server.port) as remote, running_node() as local:
            early = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + os.urandom(5000)
            reply = await http_connect(local.proxy, target_for(remote.proxy, remote.node_id), early_data=early)
            assert reply.status == 200
            received = reply.leftover
            while len(received) < len(early):
                chunk = await reply.stream.receive_some(65536)
                assert chunk
                received += chunk
            assert received == early
            await reply.stream.aclose()


async def test_half_close_client_eof_reaches_server_while_reply_flows_back() -> None:
    with trio.fail_after(20):
        async with tcp_server(digest_after_eof) as server, running_node(server.port) as remote, running_node() as local:
            client = await connect_ok(local.proxy, target_for(remote.proxy, remote.node_id))
            payload = random_payload(3_000_000)
            await client.send_all(payload)
            await client.send_eof()
            assert (await receive_all(client)).decode() == hashlib.sha256(payload).hexdigest()
            await client.aclose()


async def test_half_close_server_eof_reaches_client_while_client_keeps_sending() -> None:
    received_by_server: list[bytes] = []
    server_done = trio.Event()

    async def greet_then_listen(stream: trio.SocketStream) -> None:
        await stream.send_all(b"greeting")
        await stream.send_eof()
        received_by_server.append(await receive_all(stream))
        server_done.set()

    with trio.fail_after(20):
        async with (
            tcp_server(greet_then_listen) as server,
            running_node(server.port) as remote,
            running_node() as local,
        ):
            client = await connect_ok(local.proxy, target_for(remote.proxy, remote.node_id))
            assert await receive_all(client) == b"greeting"  # the server's EOF arrived
            payload = random_payload(1_000_000)
            await client.send_all(payload)  # the other direction still works
            await client.send_eof()
            await server_done.wait()
            assert received_by_server == [payload]
            await client.aclose()


async def test_many_concurrent_connects_to_one_remote() -> None:
    count = 20
    with trio.fail_after(30):
        async with tcp_server(digest_after_eof) as server, running_node(server.port) as remote, running_node() as local:
            results: dict[int, bool] = {}

            async def one(index: int) -> None:
                client = await connect_ok(local.proxy, target_for(remote.proxy, remote.node_id))
                payload = random_payload(50_000 + index * 1000)
                await client.send_all(payload)
                await client.send_eof()
                results[index] = (await receive_all(client)).decode() == hashlib.sha256(payload).hexdigest()
                await client.aclose()

            async with trio.open_nursery() as nursery:
                for index in range(count):
                    nursery.start_soon(one, index)
            assert results == {index: True for index in range(count)}
            assert len(server.peers) == count  # each CONNECT had its own server connection
            # Peer state was shared: one peer on each side.
            assert len(local.proxy.peers) <= 1


async def test_ipv6_proxies_and_bracketed_target() -> None:
    with trio.fail_after(15):
        async with tcp_server(host="::1") as server:
            async with running_node(server.port, proxy_host="::1", server_host="::1") as remote:
                async with running_node(proxy_host="::1") as local:
                    client = await connect_ok(local.proxy, target_for(remote.proxy, remote.node_id, host="::1"))
                    await client.send_all(b"over v6")
                    assert await client.receive_some(100) == b"over v6"
                    info = remote.proxy.get_connection_info_by_proxy("::1", local.proxy.proxy_port)
                    assert info is not None and info.remote_node_id == local.node_id
                    await client.aclose()


async def test_dual_stack_proxies_serve_ipv4_and_ipv6_callers() -> None:
    with trio.fail_after(20):
        async with tcp_server() as server, running_node(server.port, proxy_host="::") as remote:
            for family_host in ("127.0.0.1", "::1"):
                async with running_node(proxy_host=family_host) as local:
                    client = await connect_ok(local.proxy, target_for(remote.proxy, remote.node_id, host=family_host))
                    await client.send_all(family_host.encode())
                    assert await client.receive_some(100) == family_host.encode()
                    info = remote.proxy.get_connection_info_by_proxy(family_host, local.proxy.proxy_port)
                    assert info is not None and info.remote_node_id == local.node_id
                    await client.aclose()


def rss_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


async def test_slow_reading_server_256_mib_bounded_memory() -> None:
    size = 256 << 20
    digests: list[str] = []

    async def slow_reader(stream: trio.SocketStream) -> None:
        digest = hashlib.sha256()
        total = 0
        stalled = False
        while data := await stream.receive_some(256 * 1024):
            digest.update(data)
            total += len(data)
            if not stalled and total > 32 << 20:
                stalled = True
                await trio.sleep(1.0)  # stop reading: backpressure must reach the client
            else:
                await trio.sleep(0.002)
        digests.append(digest.hexdigest())
        await stream.send_all(b"done")

    with trio.fail_after(150):
        async with tcp_server(slow_reader) as server, running_node(server.port) as remote, running_node() as local:
            client = await connect_ok(local.proxy, target_for(remote.proxy, remote.node_id))
            baseline = rss_bytes()
            peak = baseline
            expected = hashlib.sha256()
            block = random_payload(1 << 20)
            for index in range(size >> 20):
                chunk = block[index % 7 :] + block[: index % 7]
                expected.update(chunk)
                await client.send_all(chunk)
                if index % 8 == 0:
                    peak = max(peak, rss_bytes())
            await client.send_eof()
            assert await receive_all(client) == b"done"
            peak = max(peak, rss_bytes())
            await client.aclose()
            assert digests == [expected.hexdigest()]
            # Both proxies live in this process: their growth over the whole transfer
            # stays far below what was pushed (bounded buffers, backpressure).
            assert peak - baseline < 96 << 20, (baseline, peak)


def forged_chain_config(victim: TLSConfig) -> TLSConfig:
    """Our key's leaf, then the victim's certificate claiming to have issued it."""
    key = generate_key_pair()
    return TLSConfig(key, (generate_certificate(key), victim.leaf_certificate))


def expired_config() -> TLSConfig:
    key = generate_key_pair()
    past = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=2)
    return TLSConfig(key, (generate_certificate(key, duration=datetime.timedelta(days=1), not_before=past),))


async def test_hostile_input_during_a_live_transfer() -> None:
    size = 48 << 20
    rng = random.Random(4)
    with trio.fail_after(90):
        async with tcp_server(digest_after_eof) as server, running_node(server.port) as remote, running_node() as local:
            expected = hashlib.sha256()
            outcome: list[str] = []
            transferring = trio.Event()

            async def live_transfer() -> None:
                client = await connect_ok(local.proxy, target_for(remote.proxy, remote.node_id))
                block = random_payload(1 << 20)
                for _ in range(size >> 20):
                    expected.update(block)
                    await client.send_all(block)
                    transferring.set()
                await client.send_eof()
                outcome.append((await receive_all(client)).decode())
                await client.aclose()

            async def random_bytes_to_connect_port() -> None:
                for _ in range(20):
                    stream = await trio.open_tcp_stream(local.proxy.forward_host, local.proxy.forward_port)
                    await stream.send_all(bytes(rng.getrandbits(8) for _ in range(rng.randrange(1, 3000))))
                    await stream.send_eof()
                    await receive_all(stream, limit=1 << 16)
                    await stream.aclose()

            async def oversized_headers() -> None:
                stream = await trio.open_tcp_stream(local.proxy.forward_host, local.proxy.forward_port)
                try:
                    await stream.send_all(b"CONNECT a:1 HTTP/1.1\r\nX: " + b"a" * (1 << 20) + b"\r\n\r\n")
                except (trio.BrokenResourceError, OSError):
                    pass  # the proxy answered 400 and closed mid-send
                await receive_all(stream, limit=1 << 16)
                await stream.aclose()

            async def slow_headers() -> None:
                # Slower than conn_connect_time: dropped without an answer.
                stream = await trio.open_tcp_stream(local.proxy.forward_host, local.proxy.forward_port)
                try:
                    for byte in b"CONNECT 127.0.0.1:1?nodeId=x HTTP/1.1\r\n":
                        await stream.send_all(bytes([byte]))
                        await trio.sleep(0.1)
                except (trio.BrokenResourceError, OSError):
                    pass
                assert await receive_all(stream) == b""
                await stream.aclose()

            async def unauthenticated_connects() -> None:
                for _ in range(20):
                    reply = await http_connect(local.proxy, target_for(remote.proxy, remote.node_id), token="nope")
                    assert reply.status == 407
                    await reply.stream.aclose()

            async def forged_certificates() -> None:
                for config in (
                    forged_chain_config(local.tls_config),
                    expired_config(),
                ):
                    async with raw_peer() as attacker:
                        attacker.endpoint.send_message(0, ("127.0.0.1", remote.proxy.proxy_port))
                        stream = await attacker.endpoint.connect(("127.0.0.1", remote.proxy.proxy_port))
                        tls = TLSStream(stream, config, server_side=False)
                        try:
                            await tls.send_all(b"let me in")
                            await receive_all(tls)
                        except (KeynodeError, NatError, trio.BrokenResourceError, trio.ClosedResourceError):
                            pass
                        await trio.aclose_forcefully(tls)

            async def random_datagrams() -> None:
                sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM)
                with sock:
                    for index in range(3000):
                        size_ = rng.choice([1, 4, 19, 20, 21, 100, 1400])
                        data = bytearray(rng.getrandbits(8) for _ in range(size_))
                        if index % 2 and size_ >= 20:
                            data[0] = (rng.randrange(5) << 4) | 1  # looks like uTP
                        target = rng.choice([local.proxy.proxy_port, remote.proxy.proxy_port])
                        await sock.sendto(bytes(data), ("127.0.0.1", target))
                        if index % 100 == 0:
                            await trio.sleep(0.01)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(live_transfer)
                await transferring.wait()  # the attacks come during the transfer
                for attack in (
                    random_bytes_to_connect_port,
                    oversized_headers,
                    slow_headers,
                    unauthenticated_connects,
                    forged_certificates,
                    random_datagrams,
                ):
                    nursery.start_soon(attack)
            assert outcome == [expected.hexdigest()]
            # Forged identities never became connections.
            assert {event.remote_node_id for event in remote.events.established} == {local.node_id}
            # And the proxies still serve.
            client = await connect_ok(local.proxy, target_for(remote.proxy, remote.node_id), token=TOKEN)
            await client.send_all(b"still fine")
            await client.send_eof()
            assert (await receive_all(client)).decode() == hashlib.sha256(b"still fine").hexdigest()
            await client.aclose()


async def test_set_tls_config_applies_to_new_connections() -> None:
    with trio.fail_after(15):
        async with tcp_server() as server, running_node(server.port) as remote, running_node() as local:
            renewed = TLSConfig.generate()
            local.proxy.set_tls_config(renewed)
            client = await connect_ok(local.proxy, target_for(remote.proxy, remote.node_id))
            await client.send_all(b"x")
            assert await client.receive_some(10) == b"x"
            assert remote.events.established[-1].remote_node_id == renewed.node_id
            await client.aclose()


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def test_nothing_left_behind_after_many_tunnels() -> None:
    with trio.fail_after(60):
        async with tcp_server() as server, running_node(server.port) as remote, running_node() as local:

            async def settle() -> None:
                with trio.fail_after(10):
                    while (
                        local.proxy.connection_forward_count
                        or remote.proxy.connection_reverse_count
                        or len(local.proxy.peers)
                        or len(remote.proxy.peers)
                        or local.proxy.endpoint.connection_count
                        or remote.proxy.endpoint.connection_count
                    ):
                        await trio.sleep(0.02)

            async def tunnels(count: int) -> None:
                for index in range(count):
                    client = await connect_ok(local.proxy, target_for(remote.proxy, remote.node_id))
                    await client.send_all(b"n%d" % index)
                    assert await client.receive_some(100) == b"n%d" % index
                    await client.send_eof()
                    assert await receive_all(client) == b""
                    await client.aclose()
                await settle()

            await tunnels(5)  # warm up lazily created resources
            before = open_fds()
            await tunnels(60)
            assert open_fds() <= before
            assert len(local.events.lost) == 65 and len(remote.events.lost) == 65
