"""Connection events: the EventHub's bounds, the runner's event documents, the
control socket's `GET /v1/events` stream, and `keynode events` against real nodes."""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest
import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from proxy.app.cli import ExitCode
from proxy.app.control import serve_control, stream_events
from proxy.app.events import EventHub, Subscription, format_event
from proxy.app.runner import ConnectionLog
from proxy.errors import ControlRequestFailed, ControlUnreachable, EventHubClosed, TooManySubscribers
from proxy.identity.node_id import NodeId
from proxy.tunnel.records import ConnectionEvent, Direction, EndReason, PathMove
from tests.cli.helpers import KEYNODE, REPO_ROOT, keynode_env, read_line, run_keynode_async, start_node
from tests.cli.test_cli_run import make_node, serve_digest_server


def new_node_id() -> NodeId:
    return NodeId.from_public_key(Ed25519PrivateKey.generate().public_key())


async def take(subscription: Subscription, count: int) -> list[dict[str, Any]]:
    return [await subscription.__anext__() for _ in range(count)]


# --- the hub ---------------------------------------------------------------------------


async def test_every_subscriber_gets_every_event_in_order() -> None:
    hub = EventHub()
    with hub.subscribe({"event": "subscribed"}) as first, hub.subscribe() as second:
        for number in range(3):
            hub.publish({"event": "e", "n": number})
        assert [e.get("n") for e in await take(first, 4)] == [None, 0, 1, 2]
        assert [e["n"] for e in await take(second, 3)] == [0, 1, 2]
    assert hub.subscriber_count == 0


async def test_a_slow_subscriber_loses_the_newest_events_counted_and_alone() -> None:
    hub = EventHub(buffer_size=4)
    with hub.subscribe() as fast, hub.subscribe() as slow:
        fast_seen = []
        for number in range(10):
            hub.publish({"event": "e", "n": number})
            fast_seen += await take(fast, 1)
        assert [e["n"] for e in fast_seen] == list(range(10))
        # The slow one keeps the oldest four; the next thing it reads says six are gone.
        assert [e["n"] for e in await take(slow, 4)] == [0, 1, 2, 3]
        hub.publish({"event": "e", "n": 10})
        assert await take(slow, 2) == [{"event": "dropped", "count": 6}, {"event": "e", "n": 10}]
        assert await take(fast, 1) == [{"event": "e", "n": 10}]


async def test_publishing_never_blocks_or_raises() -> None:
    hub = EventHub(buffer_size=2)
    stalled = hub.subscribe()
    gone = hub.subscribe()
    gone._receive.close()  # a reader that vanished without unsubscribing
    with trio.fail_after(5):  # synchronous: this only bounds a bug
        for number in range(10_000):
            hub.publish({"event": "e", "n": number})
    assert hub.subscriber_count == 1  # the vanished one was dropped from the hub
    assert stalled.dropped == 9_998
    hub.close()
    hub.publish({"event": "after close"})
    assert [e["n"] for e in await take(stalled, 2)] == [0, 1]
    with pytest.raises(StopAsyncIteration):
        await stalled.__anext__()  # the hub ended it after the queued events
    with pytest.raises(EventHubClosed):
        hub.subscribe()


async def test_the_seventeenth_subscriber_is_refused_until_one_leaves() -> None:
    hub = EventHub()
    subscriptions = [hub.subscribe() for _ in range(16)]
    with pytest.raises(TooManySubscribers) as info:
        hub.subscribe()
    assert info.value.http_status == 503
    subscriptions.pop().close()
    hub.subscribe().close()
    for subscription in subscriptions:
        subscription.close()
    with trio.fail_after(5):
        await hub.wait_idle()


# --- the runner's documents ------------------------------------------------------------


async def test_connection_log_publishes_established_lost_and_path_changed() -> None:
    hub = EventHub()
    subscription = hub.subscribe()
    log = ConnectionLog(hub)
    peer, relay = new_node_id(), new_node_id()
    log.established(ConnectionEvent(peer, "198.51.100.7", 4000, Direction.FORWARD, service="agent"))
    # As Proxy._path_changed builds it: the tunnel's path after the move, and the move.
    move = PathMove(at=1_800_000_000.5, from_path="direct", to_path="relay", reason="direct path silent",
                    via=str(relay))
    log.path_changed(ConnectionEvent(peer, "198.51.100.7", 4000, Direction.FORWARD, service="agent",
                                     path="relay", via=relay, move=move))
    log.lost(ConnectionEvent(peer, "198.51.100.7", 4000, Direction.FORWARD, reason=EndReason.RESET,
                             error=ConnectionResetError("gone"), service="agent", path="relay", via=relay))
    established, moved, lost = await take(subscription, 3)
    assert established.pop("at") > 0
    assert established == {"event": "established", "direction": "forward", "node_id": str(peer),
                           "remote": "198.51.100.7:4000", "service": "agent", "path": "direct", "via": None}
    assert moved == {"event": "path_changed", "at": 1_800_000_000.5, "direction": "forward",
                     "node_id": str(peer), "remote": "198.51.100.7:4000", "from": "direct", "to": "relay",
                     "reason": "direct path silent", "address": None, "path": "relay", "via": str(relay)}
    assert lost.pop("at") > 0 and lost.pop("duration") >= 0
    assert lost == {"event": "lost", "direction": "forward", "node_id": str(peer), "remote": "198.51.100.7:4000",
                    "reason": "reset", "service": "agent", "error": "gone"}
    assert format_event(moved) == (f"2027-01-15T08:00:00Z path_changed forward {peer}: direct -> relay "
                                   f"relay {relay} (direct path silent)")
    assert format_event({**established, "at": 1_800_000_000}) == (
        f"2027-01-15T08:00:00Z established forward {peer} at 198.51.100.7:4000 (service agent)")
    assert format_event({**lost, "at": 1_800_000_000}).endswith(f"lost forward {peer} at 198.51.100.7:4000: reset (gone)")


# --- the control socket ----------------------------------------------------------------


class HubHandler:
    """Only what GET /v1/events needs of a node."""

    def __init__(self, hub: EventHub) -> None:
        self.hub = hub

    def subscribe_events(self) -> Subscription:
        return self.hub.subscribe({"event": "subscribed", "at": 1.0, "node_id": "vtest"})


async def test_stream_refusal_and_a_client_leaving(tmp_path: Path) -> None:
    socket_path = tmp_path / "control.sock"
    hub = EventHub(max_subscribers=1)
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            await nursery.start(serve_control, socket_path, HubHandler(hub))
            # A raw client: chunked ndjson, the subscribed line at once.
            raw = await trio.open_unix_socket(str(socket_path))
            await raw.send_all(b"GET /v1/events HTTP/1.1\r\nHost: k\r\n\r\n")
            head = b""
            while b'"subscribed"' not in head:
                head += await raw.receive_some(4096)
            assert b"200" in head.split(b"\r\n")[0] and b"application/x-ndjson" in head
            assert b"Transfer-Encoding: chunked" in head and b"Content-Length" not in head
            # The one slot is taken: the next client is refused with the error document.
            with pytest.raises(ControlRequestFailed) as info:
                async for _ in stream_events(socket_path):
                    pass
            assert (info.value.status, info.value.error) == (503, "TooManySubscribers")
            # The raw client leaves mid-stream while nothing is published: its slot frees.
            await raw.aclose()
            await hub.wait_idle()
            events = stream_events(socket_path)
            assert (await events.__anext__())["event"] == "subscribed"
            hub.publish({"event": "e", "n": 1})
            assert await events.__anext__() == {"event": "e", "n": 1}
            hub.close()  # as a stopping node does: the body ends cleanly, the iterator too
            with pytest.raises(StopAsyncIteration):
                await events.__anext__()
            nursery.cancel_scope.cancel()
    with pytest.raises(ControlUnreachable):
        async for _ in stream_events(socket_path):
            pass


# --- real nodes --------------------------------------------------------------------------


async def next_event(events: Any, kind: str) -> dict[str, Any]:
    """The next event of `kind` (others, e.g. from an earlier tunnel, are skipped)."""
    async for event in events:
        if event["event"] == kind:
            return dict(event)
    raise AssertionError(f"the stream ended before a {kind} event")


async def test_two_nodes_stream_their_tunnels(tmp_path: Path) -> None:
    with trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            server_port = await nursery.start(serve_digest_server)
            dir_a, dir_b = tmp_path / "a", tmp_path / "b"
            id_b = make_node(dir_b, f'[proxy]\nhost = "127.0.0.1"\n[server]\nhost = "127.0.0.1"\nport = {server_port}\n')
            node_b = await start_node(dir_b)
            b_proxy = node_b.info["proxy"]
            id_a = make_node(dir_a, f'[proxy]\nhost = "127.0.0.1"\n[peers]\n"{id_b}" = "{b_proxy}"\n')
            node_a = await start_node(dir_a)

            events_a = stream_events(dir_a / "control.sock")
            events_b = stream_events(dir_b / "control.sock")
            assert (await next_event(events_a, "subscribed"))["node_id"] == id_a
            assert (await next_event(events_b, "subscribed"))["node_id"] == id_b
            # A subscriber that goes away mid-stream ends only its own subscription.
            leaving = stream_events(dir_a / "control.sock")
            assert (await leaving.__anext__())["event"] == "subscribed"
            await leaving.aclose()
            # `keynode events --json` as a user runs it.
            cli_log = tmp_path / "events.log"
            with open(cli_log, "wb") as stderr:
                follower = await trio.lowlevel.open_process(
                    [*KEYNODE, "events", "--dir", str(dir_a), "--json"], stdout=subprocess.PIPE, stderr=stderr,
                    cwd=REPO_ROOT, env=keynode_env(),
                )
            assert follower.stdout is not None
            buffer = bytearray()
            subscribed = json.loads(await read_line(follower.stdout, buffer) or "null")
            assert subscribed["event"] == "subscribed" and subscribed["node_id"] == id_a

            opened = await run_keynode_async("open-forward", id_b, "--dir", str(dir_a))
            assert opened.returncode == 0, opened.stderr.decode()
            on_a = await next_event(events_a, "established")
            assert (on_a["direction"], on_a["node_id"], on_a["remote"], on_a["path"]) == (
                "forward", id_b, b_proxy, "direct")
            on_b = await next_event(events_b, "established")
            assert (on_b["direction"], on_b["node_id"]) == ("reverse", id_a)
            printed = json.loads(await read_line(follower.stdout, buffer) or "null")
            assert (printed["event"], printed["node_id"]) == ("established", id_b)

            closed = await run_keynode_async("close", "forward", b_proxy, "--dir", str(dir_a))
            assert closed.returncode == 0, closed.stderr.decode()
            lost_a = await next_event(events_a, "lost")
            assert (lost_a["node_id"], lost_a["reason"]) == (id_b, "closed_locally")
            assert lost_a["duration"] >= 0
            lost_b = await next_event(events_b, "lost")
            assert lost_b["node_id"] == id_a and lost_b["reason"] in ("closed_by_peer", "reset", "closed_locally")

            status = await run_keynode_async("status", "--dir", str(dir_a), "--json")
            assert status.returncode == 0 and json.loads(status.stdout)["node_id"] == id_a

            # Stopping the node ends every stream cleanly: the iterators end, the CLI exits 0.
            assert await node_a.stop() == 0
            assert [event async for event in events_a] == []  # ended, not dropped (that would raise)
            assert await follower.wait() == ExitCode.OK, cli_log.read_text()
            gone = await run_keynode_async("events", "--dir", str(dir_a))
            assert gone.returncode == ExitCode.CONTROL_UNREACHABLE and "no keynode answers" in gone.stderr.decode()
            await events_b.aclose()
            # Ctrl-C is how a user stops following: 130, nothing on stderr.
            interrupted_log = tmp_path / "interrupted.log"
            with open(interrupted_log, "wb") as stderr:
                follower = await trio.lowlevel.open_process(
                    [*KEYNODE, "events", "--dir", str(dir_b)], stdout=subprocess.PIPE, stderr=stderr,
                    cwd=REPO_ROOT, env=keynode_env(),
                )
            assert follower.stdout is not None
            assert f"subscribed to {id_b}" in (await read_line(follower.stdout, bytearray()) or "")
            follower.send_signal(signal.SIGINT)
            assert await follower.wait() == ExitCode.INTERRUPTED
            assert interrupted_log.read_text() == ""
            assert await node_b.stop() == 0
            nursery.cancel_scope.cancel()
