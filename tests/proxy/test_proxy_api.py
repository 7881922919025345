"""The Proxy's API around its own life: stop before start, what works after stop,
callbacks that are async functions, and the established callback of a reverse
connection closed right after its handshake."""

from __future__ import annotations

from typing import Any

import pytest
import trio
import trio.testing
from trio.testing import MockClock

from proxy.errors import ProxyNotRunning
from proxy.identity.tls_config import TLSConfig
from proxy.tls import TLSStream
from proxy.tunnel.connection import ConnectionEvent, EndReason
from proxy.tunnel.proxy import Proxy
from tests.proxy.test_proxy_support import connect_ok, running_node, target_for, tcp_server


async def test_stop_on_a_proxy_that_never_started_returns_at_once() -> None:
    proxy = Proxy(tls_config=TLSConfig.generate())
    with trio.fail_after(1):
        await proxy.stop()
        await proxy.stop()  # and again
    assert not proxy.running
    with pytest.raises(ProxyNotRunning):
        _ = proxy.forward_port


async def test_addresses_and_close_raise_proxy_not_running_after_stop() -> None:
    async with running_node() as node:
        proxy = node.proxy
        # Running: the bound addresses.
        assert proxy.forward_host == "127.0.0.1" and proxy.forward_port > 0
        assert proxy.proxy_host == "127.0.0.1" and proxy.proxy_port > 0
        await proxy.close_connection_forward("127.0.0.1", 1)  # nothing to close: fine
        await proxy.close_connection_reverse("127.0.0.1", 1)
    for getter in ("forward_host", "forward_port", "proxy_host", "proxy_port"):
        with pytest.raises(ProxyNotRunning):
            getattr(proxy, getter)
    with pytest.raises(ProxyNotRunning):
        await proxy.close_connection_forward("127.0.0.1", 1)
    with pytest.raises(ProxyNotRunning):
        await proxy.close_connection_reverse("127.0.0.1", 1)


async def test_async_callbacks_are_awaited_and_their_failures_contained(caplog: pytest.LogCaptureFixture) -> None:
    seen: list[tuple[str, ConnectionEvent]] = []
    changed = trio.Event()

    async def established(event: ConnectionEvent) -> None:
        await trio.sleep(0)  # really asynchronous
        seen.append(("established", event))
        changed.set()

    async def lost(event: ConnectionEvent) -> None:
        await trio.sleep(0)
        seen.append(("lost", event))
        changed.set()
        raise RuntimeError("a failing callback")

    with trio.fail_after(10):
        async with tcp_server() as server, running_node(server.port) as remote:
            async with running_node() as local:
                local.proxy.connection_established_callback = established
                local.proxy.connection_lost_callback = lost
                client = await connect_ok(local.proxy, target_for(remote.proxy, remote.node_id))
                await client.aclose()
                while len(seen) < 2:
                    await changed.wait()
                    changed = trio.Event()
                # The proxy still works after its callback failed.
                again = await connect_ok(local.proxy, target_for(remote.proxy, remote.node_id))
                await again.aclose()
                while len(seen) < 4:
                    await changed.wait()
                    changed = trio.Event()
    assert [kind for kind, _ in seen] == ["established", "lost", "established", "lost"]
    assert all(event.remote_node_id == remote.node_id for _, event in seen)
    assert "a failing callback" in caplog.text


async def test_a_reverse_connection_closed_right_after_its_handshake_is_established_then_lost(
    monkeypatch: pytest.MonkeyPatch, virtual_clock: MockClock
) -> None:
    """The close lands at the moment the reverse side's handshake completed, with a
    chain that verifies: it is reported established, then lost (closed locally)."""
    original = TLSStream.do_handshake
    hooked: dict[str, Any] = {}

    async def do_handshake_then_close(self: TLSStream) -> None:
        done = self.handshake_done
        await original(self)
        if self.server_side and not done and "close" in hooked:
            close = hooked.pop("close")
            hooked["nursery"].start_soon(close)
            await trio.testing.wait_all_tasks_blocked()  # the close has been asked for

    monkeypatch.setattr(TLSStream, "do_handshake", do_handshake_then_close)
    with trio.fail_after(10):
        async with tcp_server() as server, running_node(server.port) as remote, running_node() as local:
            async with trio.open_nursery() as nursery:
                hooked["nursery"] = nursery
                hooked["close"] = lambda: remote.proxy.close_connection_reverse("127.0.0.1", local.proxy.proxy_port)
                reply = await connect_ok(local.proxy, target_for(remote.proxy, remote.node_id))
                while "close" in hooked or remote.proxy.connection_reverse_count:
                    await trio.sleep(0.01)
            (established,) = remote.events.established
            assert established.remote_node_id == local.node_id
            (lost,) = remote.events.lost
            assert lost.reason == EndReason.CLOSED_LOCALLY
            await reply.aclose()
