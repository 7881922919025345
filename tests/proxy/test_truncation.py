"""A tunnel that dies ends the local TCP connection with a reset, never a clean FIN.

A clean FIN toward a local client or server says "that was everything". After a peer
dies mid-transfer (its path goes dark: a SIGKILLed node sends nothing more), or a
node stops before the far side ended cleanly, a FIN would make a truncated download
or upload look complete. Only a clean end from the far side (close_notify + uTP FIN)
may become a FIN; every other end is a TCP reset (SO_LINGER 0), which a raw TCP peer
sees as ECONNRESET. Both directions, both sides, and the half-closed case (one
direction ended cleanly, then the tunnel dies: the other one is still reset).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Awaitable, Callable

import trio

from tests.proxy.test_proxy_support import connect_ok, running_node, target_for, tcp_server, udp_relay

MiB = 1 << 20
DYING = dict(conn_keep_alive_interval_time=0.1, conn_keep_alive_timeout_time=0.6)


def _how_it_broke(error: trio.BrokenResourceError) -> str:
    # After an RST the first call fails with ECONNRESET, later sends with EPIPE.
    assert isinstance(error.__cause__, ConnectionResetError | BrokenPipeError), repr(error.__cause__)
    return "reset"


async def read_until_end(stream: trio.abc.ReceiveStream, counted: list[int], started: trio.Event) -> str:
    """Read to the end; say how it ended: 'eof' (clean FIN) or 'reset'."""
    try:
        while data := await stream.receive_some(1 << 16):
            counted[0] += len(data)
            if counted[0] >= MiB:
                started.set()
    except trio.BrokenResourceError as error:
        return _how_it_broke(error)
    return "eof"


async def send_until_end(stream: trio.abc.SendStream) -> str:
    """Send until the other end goes away; only a reset can stop it."""
    chunk = b"x" * (1 << 16)
    try:
        while True:
            await stream.send_all(chunk)
    except trio.BrokenResourceError as error:
        return _how_it_broke(error)


async def endless_sender(stream: trio.SocketStream) -> None:
    await send_until_end(stream)


async def recorded(endings: list[str], changed: trio.Event, work: Awaitable[str]) -> None:
    endings.append(await work)
    changed.set()


async def wait_for(endings: list[str], changed: trio.Event, count: int) -> None:
    while len(endings) < count:
        await changed.wait()


async def test_a_download_whose_peer_dies_ends_the_client_with_a_reset() -> None:
    async with tcp_server(endless_sender) as server, running_node(server.port, **DYING) as remote:
        async with running_node(**DYING) as local, udp_relay(("127.0.0.1", remote.proxy.proxy_port)) as relay:
            client = await connect_ok(local.proxy, f"127.0.0.1:{relay.port}?nodeId={remote.node_id}")
            counted, started = [0], trio.Event()
            async with trio.open_nursery() as nursery:

                async def kill_path_after_first_mib() -> None:
                    await started.wait()
                    relay.drop = True  # the remote went dark, as a SIGKILLed node does

                nursery.start_soon(kill_path_after_first_mib)
                with trio.fail_after(10):
                    ending = await read_until_end(client, counted, started)
            assert ending == "reset", f"a dead tunnel looked like a complete download of {counted[0]} bytes"


async def test_an_upload_whose_client_side_dies_ends_the_server_connection_with_a_reset() -> None:
    server_endings: list[str] = []
    uploaded, started, changed = [0], trio.Event(), trio.Event()

    async def record_ending(stream: trio.SocketStream) -> None:
        await recorded(server_endings, changed, read_until_end(stream, uploaded, started))

    async with tcp_server(record_ending) as server, running_node(server.port, **DYING) as remote:
        async with running_node(**DYING) as local, udp_relay(("127.0.0.1", remote.proxy.proxy_port)) as relay:
            client = await connect_ok(local.proxy, f"127.0.0.1:{relay.port}?nodeId={remote.node_id}")
            client_endings: list[str] = []
            with trio.fail_after(10):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(recorded, client_endings, changed, send_until_end(client))
                    await started.wait()
                    relay.drop = True  # the client's node went dark mid-upload
                    await wait_for(server_endings, changed, 1)
            assert server_endings == ["reset"], f"the server took a partial upload of {uploaded[0]} bytes as complete"
            assert client_endings == ["reset"], "the uploading client was not told its upload was cut"


async def test_stopping_the_local_node_mid_download_resets_the_client_and_the_remote_server() -> None:
    server_endings: list[str] = []
    changed = trio.Event()

    async def send_and_record(stream: trio.SocketStream) -> None:
        await recorded(server_endings, changed, send_until_end(stream))

    async with tcp_server(send_and_record) as server, running_node(server.port) as remote:
        counted, started = [0], trio.Event()
        endings: list[str] = []
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                async with running_node() as local:
                    client = await connect_ok(local.proxy, target_for(remote.proxy, remote.node_id))
                    nursery.start_soon(recorded, endings, changed, read_until_end(client, counted, started))
                    await started.wait()
                # leaving running_node stopped the local proxy mid-transfer
            await wait_for(server_endings, changed, 1)
        assert endings == ["reset"], f"a stopped node passed {counted[0]} bytes off as complete"
        # The far side was not told "that was all" either: its server connection is reset.
        assert server_endings == ["reset"]


async def test_stopping_the_remote_node_mid_upload_resets_its_server_and_the_client() -> None:
    server_endings: list[str] = []
    uploaded, started, changed = [0], trio.Event(), trio.Event()

    async def record_ending(stream: trio.SocketStream) -> None:
        await recorded(server_endings, changed, read_until_end(stream, uploaded, started))

    async with tcp_server(record_ending) as server, running_node() as local:
        client_endings: list[str] = []
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                async with running_node(server.port) as remote:
                    client = await connect_ok(local.proxy, target_for(remote.proxy, remote.node_id))
                    nursery.start_soon(recorded, client_endings, changed, send_until_end(client))
                    await started.wait()
                # leaving running_node stopped the remote proxy mid-upload
                await wait_for(server_endings, changed, 1)
                await wait_for(client_endings, changed, 1)
        assert server_endings == ["reset"], f"the server took a partial upload of {uploaded[0]} bytes as complete"
        assert client_endings == ["reset"]


async def half_closed_then_dark(
    client_side: Callable[[trio.SocketStream], Awaitable[str]],
    server_side: Callable[[trio.SocketStream], Awaitable[str]],
    started: trio.Event,
) -> tuple[list[str], list[str]]:
    """One direction ends cleanly, then (once ``started``) the path goes dark."""
    server_endings: list[str] = []
    client_endings: list[str] = []
    changed = trio.Event()

    async def serve(stream: trio.SocketStream) -> None:
        await recorded(server_endings, changed, server_side(stream))

    async with tcp_server(serve) as server, running_node(server.port, **DYING) as remote:
        async with running_node(**DYING) as local, udp_relay(("127.0.0.1", remote.proxy.proxy_port)) as relay:
            client = await connect_ok(local.proxy, f"127.0.0.1:{relay.port}?nodeId={remote.node_id}")
            with trio.fail_after(10):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(recorded, client_endings, changed, client_side(client))
                    await started.wait()
                    relay.drop = True
                    await wait_for(server_endings, changed, 1)
                    await wait_for(client_endings, changed, 1)
    return client_endings, server_endings


async def test_after_the_server_ended_cleanly_a_dying_tunnel_still_resets_the_upload() -> None:
    uploaded, started = [0], trio.Event()

    async def server_side(stream: trio.SocketStream) -> str:
        await stream.send_all(b"reply")
        await stream.send_eof()  # the download is complete: this one is a clean FIN
        return await read_until_end(stream, uploaded, started)

    async def client_side(stream: trio.SocketStream) -> str:
        reply = b""
        while data := await stream.receive_some(1 << 16):
            reply += data
        assert reply == b"reply"  # ended by a clean FIN
        return await send_until_end(stream)

    client_endings, server_endings = await half_closed_then_dark(client_side, server_side, started)
    assert server_endings == ["reset"], f"the server took a partial upload of {uploaded[0]} bytes as complete"
    assert client_endings == ["reset"]


async def test_after_the_client_ended_cleanly_a_dying_tunnel_still_resets_the_download() -> None:
    downloaded, started = [0], trio.Event()

    async def server_side(stream: trio.SocketStream) -> str:
        request = b""
        while data := await stream.receive_some(1 << 16):
            request += data
        assert request == b"request"  # ended by a clean FIN
        return await send_until_end(stream)

    async def client_side(stream: trio.SocketStream) -> str:
        await stream.send_all(b"request")
        await stream.send_eof()  # the upload is complete: this one is a clean FIN
        return await read_until_end(stream, downloaded, started)

    client_endings, server_endings = await half_closed_then_dark(client_side, server_side, started)
    assert client_endings == ["reset"], f"a dead tunnel looked like a complete download of {downloaded[0]} bytes"
    assert server_endings == ["reset"]


async def test_a_clean_end_from_the_far_side_is_still_a_fin() -> None:
    payload = b"y" * (3 * MiB)

    async def send_then_close(stream: trio.SocketStream) -> None:
        await stream.send_all(payload)

    async with tcp_server(send_then_close) as server, running_node(server.port) as remote:
        async with running_node() as local:
            client = await connect_ok(local.proxy, target_for(remote.proxy, remote.node_id))
            counted, started = [0], trio.Event()
            with trio.fail_after(10):
                assert await read_until_end(client, counted, started) == "eof"
            assert counted[0] == len(payload)


async def test_a_client_that_closes_right_after_its_last_send_gets_every_byte_across_a_slow_path() -> None:
    # The server half-closes at once, so the forward side's splice ends as soon as
    # the client's EOF is handed to uTP, with up to a megabyte still in uTP's send
    # buffer on a path carrying 1,000 datagrams/s (about 1.4 MB/s). The goodbye
    # lets it cross while the peer keeps acknowledging (conn_end_time, 0.2 s here,
    # runs from the latest acknowledgement): bounding the whole goodbye by
    # conn_end_time reset the tunnel and cut the server's copy short.
    payload = os.urandom(3 * MiB)
    received: dict[str, object] = {}
    server_done = trio.Event()

    async def half_closing_digest_server(stream: trio.SocketStream) -> None:
        await stream.send_eof()
        digest, count = hashlib.sha256(), 0
        try:
            while data := await stream.receive_some(1 << 16):
                digest.update(data)
                count += len(data)
            received.update(ending="eof", count=count, sha256=digest.digest())
        except trio.BrokenResourceError as error:
            received.update(ending=_how_it_broke(error), count=count)
        server_done.set()

    async with tcp_server(half_closing_digest_server) as server, running_node(server.port) as remote:
        async with udp_relay(("127.0.0.1", remote.proxy.proxy_port)) as relay:
            async with running_node(conn_end_time=0.2) as local:
                client = await connect_ok(local.proxy, f"127.0.0.1:{relay.port}?nodeId={remote.node_id}")
                relay.rate = 1000.0
                with trio.fail_after(60):
                    await client.send_all(payload)
                    await client.send_eof()
                    assert await client.receive_some(1 << 16) == b""  # the server's clean end
                    await server_done.wait()
                await client.aclose()
    assert received["ending"] == "eof" and received["count"] == len(payload)
    assert received["sha256"] == hashlib.sha256(payload).digest()
    assert relay.resets == 0
