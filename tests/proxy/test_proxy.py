"""The Proxy: every scenario of the original Proxy test suite, by name, on real UDP/TCP/TLS."""

from __future__ import annotations

import hashlib
from functools import partial
from typing import Any

import pytest
import trio
from trio.testing import MockClock

from nat.errors import NatError
from proxy.errors import (
    ConnectionKeepAliveTimeout,
    ConnectionStartError,
    ConnectionStartTimeout,
    ConnectionVerifyError,
    ProxyNotRunning,
)
from proxy.identity.tls_config import TLSConfig
from proxy.tls import TLSStream
from proxy.tunnel.address_book import AddressBook
from proxy.tunnel.connection import Direction, EndReason
from tests.proxy.test_proxy_support import (
    TOKEN,
    VIRTUAL_TOLERANCE,
    Node,
    connect_ok,
    connection_ended,
    digest_after_eof,
    echo_round,
    http_connect,
    random_payload,
    raw_peer,
    receive_all,
    running_node,
    stdlib_tls_context,
    target_for,
    tcp_server,
    tls_server_handler,
    udp_relay,
    virtual,
)


async def test_proxy_readiness() -> None:
    with trio.fail_after(10):
        async with running_node() as node:
            proxy = node.proxy
            assert proxy.running
            assert proxy.forward_host == "127.0.0.1" and proxy.forward_port > 0
            assert proxy.proxy_host == "127.0.0.1" and proxy.proxy_port > 0
            assert proxy.connection_forward_count == 0 and proxy.connection_reverse_count == 0
            forward_port = proxy.forward_port
            await proxy.stop()
            assert not proxy.running
            await proxy.stop()  # idempotent
            with pytest.raises(ProxyNotRunning):
                await proxy.open_connection_forward(node.node_id, "127.0.0.1", 1)
            with pytest.raises(ProxyNotRunning):  # no bound address any more
                _ = proxy.forward_port
        # The CONNECT port is closed once stopped.
        with pytest.raises(OSError):
            await trio.open_tcp_stream("127.0.0.1", forward_port)


async def test_http_connect_bad_request_failures() -> None:
    with trio.fail_after(10):
        async with running_node() as node:
            proxy, node_id = node.proxy, node.node_id
            # 400: missing nodeId, invalid nodeId, wildcard host, unknown NodeId target.
            for target in (
                f"127.0.0.1:{proxy.proxy_port}",
                f"127.0.0.1:{proxy.proxy_port}?nodeId=vnotanodeid",
                f"0.0.0.0:{proxy.proxy_port}?nodeId={node_id}",
                f"[::]:{proxy.proxy_port}?nodeId={node_id}",
                f"{node_id}:443",
            ):
                reply = await http_connect(proxy, target)
                assert reply.status == 400, target
            # 405: any other method.
            reply = await http_connect(proxy, target_for(proxy, node_id), method="GET")
            assert reply.status == 405
            # 407: missing or wrong token, with the Basic challenge.
            for token in (None, "wrong"):
                reply = await http_connect(proxy, target_for(proxy, node_id), token=token)
                assert reply.status == 407
                assert reply.headers[b"proxy-authenticate"].startswith(b"Basic")
            assert proxy.connection_forward_count == 0


async def test_connection_to_port_0_fails() -> None:
    with trio.fail_after(10):
        async with running_node() as node:
            with pytest.raises(ConnectionStartError):
                await node.proxy.open_connection_forward(node.node_id, "127.0.0.1", 0)
            reply = await http_connect(node.proxy, f"127.0.0.1:0?nodeId={node.node_id}")
            assert reply.status == 400


async def test_connection_start_timeout_due_to_hanging_remote(virtual_clock: MockClock) -> None:
    # A UDP socket that never answers anything: only timers are pending (virtual time).
    with trio.fail_after(10):
        hanging = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM)
        with hanging:
            await hanging.bind(("127.0.0.1", 0))
            port = hanging.getsockname()[1]
            async with running_node(conn_connect_time=0.5) as node:
                start = trio.current_time()
                with pytest.raises(ConnectionStartTimeout):
                    await node.proxy.open_connection_forward(node.node_id, "127.0.0.1", port)
                assert trio.current_time() - start == virtual(0.5)  # after conn_connect_time, to the tick
                start = trio.current_time()
                reply = await http_connect(node.proxy, f"127.0.0.1:{port}?nodeId={node.node_id}")
                assert reply.status == 504
                assert trio.current_time() - start == virtual(0.5)
                assert node.proxy.connection_forward_count == 0


async def test_connection_reset_due_to_ending_remote() -> None:
    async def end_at_once(peer: Any, stream: Any) -> None:
        await trio.aclose_forcefully(stream)

    with trio.fail_after(10):
        async with raw_peer(end_at_once) as remote, running_node() as node:
            with pytest.raises(ConnectionStartError) as info:
                await node.proxy.open_connection_forward(node.node_id, "127.0.0.1", remote.port)
            assert not isinstance(info.value, ConnectionStartTimeout)
            reply = await http_connect(node.proxy, f"127.0.0.1:{remote.port}?nodeId={node.node_id}")
            assert reply.status == 502
            assert node.proxy.connection_forward_count == 0


async def test_open_connection_and_http_connect_fail_due_to_missing_certificates() -> None:
    # The remote's TLS server has no certificate at all: the handshake cannot succeed.
    async def certificate_less_tls(peer: Any, stream: Any) -> None:
        tls = trio.SSLStream(stream, stdlib_tls_context(server_side=True), server_side=True)
        try:
            await tls.do_handshake()
        except (trio.BrokenResourceError, trio.ClosedResourceError, NatError) as error:
            peer.errors.append(error)
        finally:
            await trio.aclose_forcefully(stream)

    with trio.fail_after(10):
        async with raw_peer(certificate_less_tls) as remote, running_node() as node:
            with pytest.raises(ConnectionStartError) as info:
                await node.proxy.open_connection_forward(node.node_id, "127.0.0.1", remote.port)
            assert info.value.http_status == 502
            reply = await http_connect(node.proxy, f"127.0.0.1:{remote.port}?nodeId={node.node_id}")
            assert reply.status == 502
            assert node.proxy.connection_forward_count == 0


async def test_open_connection_and_http_connect_fail_due_to_invalid_node_id() -> None:
    with trio.fail_after(10):
        async with tcp_server() as server, running_node(server.port) as remote, running_node() as local:
            stranger = TLSConfig.generate().node_id
            with pytest.raises(ConnectionVerifyError):
                await local.proxy.open_connection_forward(stranger, "127.0.0.1", remote.proxy.proxy_port)
            reply = await http_connect(local.proxy, target_for(remote.proxy, stranger))
            assert reply.status == 526
            assert local.proxy.connection_forward_count == 0
            assert local.events.established == []


async def end_and_check(local: Node, remote: Node, client: trio.SocketStream, ender: str) -> None:
    """End a live tunnel from one side; every side ends, with the right reason, counts back to 0."""
    with trio.fail_after(5):
        while remote.proxy.connection_reverse_count != 1:
            await trio.sleep(0.01)
    if ender == "forward":
        await local.proxy.close_connection_forward("127.0.0.1", remote.proxy.proxy_port)
        local_reason = EndReason.CLOSED_LOCALLY
    elif ender == "reverse":
        await remote.proxy.close_connection_reverse("127.0.0.1", local.proxy.proxy_port)
        local_reason = EndReason.CLOSED_BY_PEER
    else:
        await client.send_eof()
        local_reason = EndReason.CLOSED_LOCALLY
    assert await connection_ended(client)
    # Half-close is carried end to end: the tunnel's EOF reached the client;
    # the client closing its side is what ends the forward connection.
    await client.aclose()
    (lost,) = await local.events.wait_lost(1)
    (remote_lost,) = await remote.events.wait_lost(1)
    assert lost.reason in (local_reason, EndReason.RESET)
    if ender == "client":
        assert lost.reason == EndReason.CLOSED_LOCALLY
        assert remote_lost.reason == EndReason.CLOSED_BY_PEER
    assert lost.remote_node_id == remote.node_id
    assert remote_lost.remote_node_id == local.node_id
    assert local.proxy.connection_forward_count == 0
    assert remote.proxy.connection_reverse_count == 0


@pytest.mark.parametrize("ender", ["forward", "reverse", "client"])
async def test_open_connection_success(ender: str) -> None:
    """Open, CONNECT through it, then one side ends it: every side ends and counts return to 0."""
    with trio.fail_after(15):
        async with tcp_server() as server, running_node(server.port) as remote, running_node() as local:
            node_id = await local.proxy.open_connection_forward(remote.node_id, "127.0.0.1", remote.proxy.proxy_port)
            assert node_id == remote.node_id
            assert local.proxy.connection_forward_count == 1
            client = await connect_ok(local.proxy, target_for(remote.proxy, remote.node_id))
            assert local.proxy.connection_forward_count == 1  # the CONNECT used the opened connection
            await echo_round(client, b"hello through the tunnel")
            with trio.fail_after(5):
                while remote.proxy.connection_reverse_count != 1:
                    await trio.sleep(0.01)
            await end_and_check(local, remote, client, ender)


@pytest.mark.parametrize("ender", ["forward", "reverse", "client"])
@pytest.mark.parametrize("form", ["query", "node_id"])
async def test_http_connect_success(form: str, ender: str) -> None:
    with trio.fail_after(15):
        async with tcp_server() as server, running_node(server.port) as remote:
            book = AddressBook({remote.node_id: ("127.0.0.1", remote.proxy.proxy_port)})
            async with running_node(address_book=book) as local:
                target = target_for(remote.proxy, remote.node_id) if form == "query" else f"{remote.node_id}:443"
                client = await connect_ok(local.proxy, target)
                await echo_round(client, random_payload(300_000))
                info = local.proxy.get_connection_info_by_client(*client.socket.getsockname()[:2])
                assert info is not None and info.remote_node_id == remote.node_id
                assert info.direction == Direction.FORWARD
                assert info.remote_port == remote.proxy.proxy_port
                assert info.remote_certificates[0].subject == remote.tls_config.leaf_certificate.subject
                by_proxy = remote.proxy.get_connection_info_by_proxy("127.0.0.1", local.proxy.proxy_port)
                assert by_proxy is not None and by_proxy.remote_node_id == local.node_id
                by_reverse = remote.proxy.get_connection_info_by_reverse(*server.peers[0])
                assert by_reverse is not None and by_reverse.remote_node_id == local.node_id
                await end_and_check(local, remote, client, ender)


async def test_http_connect_success_by_opening_connection_first() -> None:
    with trio.fail_after(15):
        async with tcp_server() as server, running_node(server.port) as remote, running_node() as local:
            await local.proxy.open_connection_forward(remote.node_id, "127.0.0.1", remote.proxy.proxy_port)
            await local.proxy.open_connection_forward(remote.node_id, "127.0.0.1", remote.proxy.proxy_port)
            assert local.proxy.connection_forward_count == 1  # reused while idle
            assert len(local.events.established) == 1
            client = await connect_ok(local.proxy, target_for(remote.proxy, remote.node_id))
            await echo_round(client, b"x" * 1000)
            # A second CONNECT to the same remote gets its own connection.
            second = await connect_ok(local.proxy, target_for(remote.proxy, remote.node_id))
            assert local.proxy.connection_forward_count == 2
            await echo_round(second, b"y" * 1000)
            await echo_round(client, b"z" * 1000)
            await client.aclose()
            await second.aclose()


async def test_open_connection_and_http_connect_keep_alive_timeout(virtual_clock: MockClock) -> None:
    """The remote answers TLS and then falls silent: the connection ends with 524's reason,
    keep_alive_timeout after the remote was last heard (virtual time)."""
    config = TLSConfig.generate()
    with trio.fail_after(15):
        async with raw_peer(partial(tls_server_handler, tls_config=config)) as silent:
            async with running_node(conn_keep_alive_timeout_time=0.6) as local:
                node_id = await local.proxy.open_connection_forward(config.node_id, "127.0.0.1", silent.port)
                assert node_id == config.node_id
                client = await connect_ok(local.proxy, f"127.0.0.1:{silent.port}?nodeId={node_id}")
                await echo_round(client, b"alive")
                peer = local.proxy.peers.get(("127.0.0.1", silent.port))
                assert peer is not None
                silent.responsive = False
                silent_at = trio.current_time()
                assert await connection_ended(client)
                lost = await local.events.wait_lost(1)
                assert lost[0].reason == EndReason.KEEP_ALIVE_TIMEOUT
                assert isinstance(lost[0].error, ConnectionKeepAliveTimeout)
                assert local.proxy.connection_forward_count == 0
                # Heard until it fell silent (pings every keep-alive interval, 0.2 s), then
                # dead exactly conn_keep_alive_timeout_time later, and the connection with it.
                assert peer.last_heard is not None
                assert silent_at - peer.last_heard <= 0.2 + VIRTUAL_TOLERANCE
                assert local.events.lost_at[0] - peer.last_heard == virtual(0.6)
                await client.aclose()


async def test_http_connect_keep_alive_timeout_while_starting_is_524(virtual_clock: MockClock) -> None:
    """The peer is heard, then falls silent while TLS hangs: the CONNECT gets 524 when the
    keep-alive times out, long before the connect timeout (virtual time)."""

    async def never_handshake(peer: Any, stream: Any) -> None:
        await trio.sleep_forever()

    with trio.fail_after(15):
        async with raw_peer(never_handshake) as remote:
            async with running_node(conn_keep_alive_timeout_time=0.4, conn_connect_time=5.0) as local:
                peers: list[Any] = []

                async def go_silent() -> None:
                    await remote.accepted.wait()
                    peers.append(local.proxy.peers.get(("127.0.0.1", remote.port)))
                    remote.responsive = False

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(go_silent)
                    reply = await http_connect(local.proxy, f"127.0.0.1:{remote.port}?nodeId={local.node_id}")
                assert reply.status == 524
                (peer,) = peers
                assert trio.current_time() - peer.last_heard == virtual(0.4)
                await reply.stream.aclose()


async def test_stopping_the_proxy_with_open_forward_connections(virtual_clock: MockClock) -> None:
    with trio.fail_after(15):
        async with tcp_server() as server, running_node(server.port) as remote, running_node() as local:
            clients = [await connect_ok(local.proxy, target_for(remote.proxy, remote.node_id)) for _ in range(3)]
            # An idle one too, over another path to the remote: toward an address with a
            # live connection open_connection_forward is the original's no-op.
            async with udp_relay(("127.0.0.1", remote.proxy.proxy_port)) as relay:
                await local.proxy.open_connection_forward(remote.node_id, "127.0.0.1", relay.port)
                assert local.proxy.connection_forward_count == 4
                start = trio.current_time()
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(local.proxy.stop)
                    while local.proxy.running:  # until the stop has begun
                        await trio.sleep(0)
                    # While stopping, a new CONNECT is refused with 503 (or the port is closed).
                    try:
                        reply = await http_connect(local.proxy, target_for(remote.proxy, remote.node_id))
                        assert reply.status == 503
                    except (OSError, trio.BrokenResourceError):
                        pass
                # Virtual time: the live connections closed gracefully within conn_end_time.
                assert trio.current_time() - start <= local.proxy.conn_end_time + VIRTUAL_TOLERANCE
                assert local.proxy.connection_forward_count == 0
                for client in clients:
                    assert await connection_ended(client)
                    await client.aclose()
                with pytest.raises(ProxyNotRunning):
                    await local.proxy.open_connection_forward(remote.node_id, "127.0.0.1", remote.proxy.proxy_port)


async def test_stopping_the_proxy_with_open_reverse_connections() -> None:
    with trio.fail_after(15):
        async with tcp_server() as server, running_node(server.port) as remote, running_node() as local:
            clients = [await connect_ok(local.proxy, target_for(remote.proxy, remote.node_id)) for _ in range(3)]
            for client in clients:
                await echo_round(client, b"ping")
            assert remote.proxy.connection_reverse_count == 3
            target = target_for(remote.proxy, remote.node_id)
            await remote.proxy.stop()
            assert remote.proxy.connection_reverse_count == 0
            for client in clients:
                assert await connection_ended(client)
                await client.aclose()
            # Incoming uTP connections are refused now (RESET): a new CONNECT gets 502.
            reply = await http_connect(local.proxy, target)
            assert reply.status == 502


async def test_open_connection_to_multiple_servers() -> None:
    with trio.fail_after(20):
        async with tcp_server() as server, running_node(server.port) as b, running_node(server.port) as c:
            async with running_node() as a:
                for remote in (b, c):
                    node_id = await a.proxy.open_connection_forward(
                        remote.node_id, "127.0.0.1", remote.proxy.proxy_port
                    )
                    assert node_id == remote.node_id
                assert a.proxy.connection_forward_count == 2
                for remote in (b, c):
                    info = a.proxy.get_connection_info_by_proxy("127.0.0.1", remote.proxy.proxy_port)
                    assert info is not None and info.remote_node_id == remote.node_id
                    client = await connect_ok(a.proxy, target_for(remote.proxy, remote.node_id))
                    await echo_round(client, remote.node_id.encode().encode())
                    await client.aclose()


async def test_open_connection_from_multiple_clients() -> None:
    with trio.fail_after(20):
        async with tcp_server() as server, running_node(server.port) as a:
            async with running_node() as b, running_node() as c:
                clients = []
                for local in (b, c):
                    clients.append(await connect_ok(local.proxy, target_for(a.proxy, a.node_id)))
                for client in clients:
                    await echo_round(client, b"from a client")
                assert a.proxy.connection_reverse_count == 2
                seen = {a.proxy.get_connection_info_by_reverse(*peer).remote_node_id for peer in server.peers}
                assert seen == {b.node_id, c.node_id}
                for client in clients:
                    await client.aclose()


async def test_open_connection_timeout_due_to_lack_of_ready_signal(virtual_clock: MockClock) -> None:
    # The remote completes TLS but never sends or answers a message.
    config = TLSConfig.generate()
    with trio.fail_after(10):
        async with raw_peer(partial(tls_server_handler, tls_config=config), responsive=False) as remote:
            async with running_node(conn_connect_time=0.6) as local:
                start = trio.current_time()
                with pytest.raises(ConnectionStartTimeout):
                    await local.proxy.open_connection_forward(config.node_id, "127.0.0.1", remote.port)
                assert trio.current_time() - start == virtual(0.6)  # after conn_connect_time, to the tick
                start = trio.current_time()
                reply = await http_connect(local.proxy, f"127.0.0.1:{remote.port}?nodeId={config.node_id}")
                assert reply.status == 504
                assert trio.current_time() - start == virtual(0.6)


async def test_closed_connection_due_to_ending_server() -> None:
    async def reply_then_end(stream: trio.SocketStream) -> None:
        await stream.send_all(b"bye")
        # returning closes the server's side

    with trio.fail_after(15):
        async with tcp_server(reply_then_end) as server, running_node(server.port) as remote, running_node() as local:
            client = await connect_ok(local.proxy, target_for(remote.proxy, remote.node_id))
            assert await receive_all(client) == b"bye"
            await client.aclose()
            (remote_lost,) = await remote.events.wait_lost(1)
            assert remote_lost.reason == EndReason.CLOSED_LOCALLY
            (local_lost,) = await local.events.wait_lost(1)
            assert local_lost.reason in (EndReason.CLOSED_BY_PEER, EndReason.CLOSED_LOCALLY)
            assert remote.proxy.connection_reverse_count == 0
            assert local.proxy.connection_forward_count == 0


async def test_connect_timeout_due_to_hanging_client(virtual_clock: MockClock) -> None:
    """A uTP client that starts TLS and hangs is dropped after conn_connect_time (virtual time)."""
    with trio.fail_after(10):
        async with tcp_server() as server, running_node(server.port, conn_connect_time=0.5) as remote:
            async with raw_peer() as client_peer:
                start = trio.current_time()
                stream = await client_peer.endpoint.connect(("127.0.0.1", remote.proxy.proxy_port))
                # The first bytes of a ClientHello (a TLS handshake record header), then nothing.
                await stream.send_all(b"\x16\x03\x01\x02\x00")
                assert await connection_ended(stream)
                assert trio.current_time() - start == virtual(0.5)
                await trio.aclose_forcefully(stream)
            with trio.fail_after(3):
                while remote.proxy.connection_reverse_count:
                    await trio.sleep(0.01)
            assert remote.events.established == []
            assert server.peers == []  # no server connection for an unverified caller


async def test_a_uTP_client_that_never_speaks_gets_nothing_more(virtual_clock: MockClock) -> None:
    """A client that sends nothing after its SYN may be a spoofed address: after the
    SYN-ACK it gets nothing, no PING, no RESET when the start gives up (deviation from
    the original, DESIGN.md: nothing works for a stranger). Its half-open uTP
    connection is the transport's to drop."""
    with trio.fail_after(10):
        async with tcp_server() as server, running_node(server.port, conn_connect_time=0.5) as remote:
            async with raw_peer() as client_peer:
                stats = client_peer.endpoint.stats
                stream = await client_peer.endpoint.connect(("127.0.0.1", remote.proxy.proxy_port))
                assert stats.datagrams_received == 1  # the SYN-ACK
                with trio.fail_after(3):
                    while not remote.proxy.connection_reverse_count:
                        await trio.sleep(0.01)
                    while remote.proxy.connection_reverse_count:
                        await trio.sleep(0.01)
                await trio.sleep(1.0)  # well past the start's end
                assert stats.datagrams_received == 1  # nothing since: no PING, no RESET
                assert remote.events.established == [] and server.peers == []
                await trio.aclose_forcefully(stream)


async def test_connect_fails_due_to_missing_client_certificates() -> None:
    with trio.fail_after(10):
        async with tcp_server() as server, running_node(server.port) as remote:
            async with raw_peer() as client_peer:
                stream = await client_peer.endpoint.connect(("127.0.0.1", remote.proxy.proxy_port))
                tls = trio.SSLStream(stream, stdlib_tls_context(server_side=False), server_hostname="x")
                # TLS 1.3: the client learns of the rejection on its first read.
                with pytest.raises((trio.BrokenResourceError, trio.ClosedResourceError)):
                    await tls.do_handshake()
                    await tls.receive_some(10)
                await trio.aclose_forcefully(tls)
            with trio.fail_after(3):
                while remote.proxy.connection_reverse_count:
                    await trio.sleep(0.01)
            assert remote.events.established == []


async def test_connect_success() -> None:
    """A bare uTP+TLS client (not a proxy) that punches reaches the server through the reverse proxy."""
    with trio.fail_after(10):
        async with tcp_server(digest_after_eof) as server, running_node(server.port) as remote:
            async with raw_peer() as client_peer:
                config = TLSConfig.generate()
                client_peer.endpoint.send_message(0, ("127.0.0.1", remote.proxy.proxy_port))  # PING
                stream = await client_peer.endpoint.connect(("127.0.0.1", remote.proxy.proxy_port))
                tls = TLSStream(stream, config, server_side=False)
                payload = random_payload(200_000)
                await tls.send_all(payload)
                await tls.send_eof()
                assert (await receive_all(tls)).decode() == hashlib.sha256(payload).hexdigest()
                await tls.aclose()
            assert [event.remote_node_id for event in remote.events.established] == [config.node_id]


async def test_connection_established_callback() -> None:
    with trio.fail_after(15):
        async with tcp_server() as server, running_node(server.port) as remote, running_node() as local:
            client = await connect_ok(local.proxy, target_for(remote.proxy, remote.node_id))
            await echo_round(client, b"hi")
            (forward_event,) = local.events.established
            assert forward_event.direction == Direction.FORWARD
            assert forward_event.remote_node_id == remote.node_id
            assert (forward_event.remote_host, forward_event.remote_port) == ("127.0.0.1", remote.proxy.proxy_port)
            (reverse_event,) = remote.events.established
            assert reverse_event.direction == Direction.REVERSE
            assert reverse_event.remote_node_id == local.node_id
            assert (reverse_event.remote_host, reverse_event.remote_port) == ("127.0.0.1", local.proxy.proxy_port)
            await client.aclose()


async def test_connections_lists_established_tunnels_with_counters() -> None:
    with trio.fail_after(15):
        async with tcp_server() as server, running_node(server.port) as remote, running_node() as local:
            assert local.proxy.connections() == [] and remote.proxy.connections() == []
            client = await connect_ok(local.proxy, target_for(remote.proxy, remote.node_id))
            await echo_round(client, b"x" * 50_000)
            (forward,) = local.proxy.connections()
            assert forward.info.direction == Direction.FORWARD
            assert forward.info.remote_node_id == remote.node_id
            assert forward.bytes_sent > 50_000 and forward.bytes_received > 50_000
            assert forward.rtt is not None and forward.rtt > 0
            assert forward.established_at <= trio.current_time()
            (reverse,) = remote.proxy.connections()
            assert reverse.info.direction == Direction.REVERSE
            assert reverse.info.remote_node_id == local.node_id
            assert reverse.bytes_received > 50_000
            await client.aclose()
            with trio.fail_after(5):
                while local.proxy.connections() or remote.proxy.connections():
                    await trio.sleep(0.01)


async def test_open_connection_reverse_then_incoming() -> None:
    with trio.fail_after(15):
        async with tcp_server() as server, running_node(server.port) as remote, running_node() as local:
            await remote.proxy.open_connection_reverse("127.0.0.1", local.proxy.proxy_port)
            assert remote.proxy.connection_reverse_count == 1
            assert len(server.peers) == 1  # the server connection exists ahead of the caller
            client = await connect_ok(local.proxy, target_for(remote.proxy, remote.node_id))
            await echo_round(client, b"prepared")
            assert remote.proxy.connection_reverse_count == 1 and len(server.peers) == 1
            await client.aclose()


async def test_token_forms_accepted() -> None:
    with trio.fail_after(15):
        async with tcp_server() as server, running_node(server.port) as remote, running_node() as local:
            for credentials in (TOKEN, TOKEN + ":", "grpc:" + TOKEN):
                client = await connect_ok(local.proxy, target_for(remote.proxy, remote.node_id), token=credentials)
                await echo_round(client, b"auth ok")
                await client.aclose()


async def test_faulty_address_book_is_500() -> None:
    class BrokenBook(dict):  # type: ignore[type-arg]
        def __contains__(self, key: object) -> bool:
            raise RuntimeError("address book backend is down")

    with trio.fail_after(10):
        async with running_node(address_book=BrokenBook()) as local:
            reply = await http_connect(local.proxy, f"{local.node_id}:443")
            assert reply.status == 500

