"""The control socket: real Unix socket, h11 on both ends, a recording handler."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

import h11
import pytest
import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.app.control import _dispatch, control_request, format_status, serve_control, stream_events
from proxy.errors import (
    ConnectionNotFound,
    ConnectionStartTimeout,
    ControlError,
    ControlRequestFailed,
    ControlUnreachable,
)
from proxy.identity.node_id import NodeId

NODE_ID = NodeId.from_public_key(Ed25519PrivateKey.generate().public_key())

STATUS = {
    "node_id": str(NODE_ID),
    "forward": "127.0.0.1:1080",
    "proxy": "0.0.0.0:4000",
    "server": "127.0.0.1:50051",
    "control_socket": "/x/control.sock",
    "uptime": 3725,
    "connections": [
        {"direction": "forward", "node_id": str(NODE_ID), "remote": "198.18.0.2:4000",
         "local": "127.0.0.1:5555", "age": 75, "bytes_sent": 3 * 1024 * 1024,
         "bytes_received": 10, "rtt": 0.0123},
        {"direction": "reverse", "state": "prepared", "node_id": None, "remote": "[::1]:4001", "local": None,
         "age": 1, "bytes_sent": 0, "bytes_received": 0, "rtt": None},
    ],
}


class RecordingHandler:
    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    async def status(self) -> dict[str, Any]:
        return STATUS

    async def open_forward(self, node_id: NodeId, host: str, port: int) -> dict[str, Any]:
        self.calls.append(("forward", node_id, host, port))
        if port == 9:
            raise ConnectionStartTimeout("no answer from the peer within 2.0 s")
        return {"node_id": str(node_id)}

    async def open_reverse(self, host: str, port: int) -> dict[str, Any]:
        self.calls.append(("reverse", host, port))
        return {}

    async def close(self, direction: str, host: str, port: int) -> dict[str, Any]:
        self.calls.append(("close", direction, host, port))
        raise ConnectionNotFound(f"no {direction} connection to {host}:{port}")

    async def lookup(self, host: str, port: int) -> dict[str, Any]:
        raise RuntimeError("a bug in the handler")

    async def reload_identity(self) -> dict[str, Any]:
        self.calls.append(("reload",))
        return {"node_id": str(NODE_ID)}


@pytest.fixture
def socket_path(tmp_path: Path) -> Path:
    directory = tmp_path / "n"
    directory.mkdir(mode=0o700)
    return directory / "control.sock"


async def test_requests_round_trip(socket_path: Path) -> None:
    handler = RecordingHandler()
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(serve_control, socket_path, handler)
            assert stat.S_IMODE(os.stat(socket_path).st_mode) == 0o600
            assert await control_request(socket_path, "GET", "/v1/status") == STATUS
            answer = await control_request(
                socket_path, "POST", "/v1/forward", {"node_id": str(NODE_ID), "host": "::1", "port": 4000}
            )
            assert answer == {"node_id": str(NODE_ID)}
            await control_request(socket_path, "POST", "/v1/reverse", {"host": "127.0.0.1", "port": "4001"})
            with pytest.raises(ControlRequestFailed) as info:
                await control_request(
                    socket_path, "POST", "/v1/forward", {"node_id": str(NODE_ID), "host": "h", "port": 9}
                )
            assert (info.value.status, info.value.error) == (504, "ConnectionStartTimeout")
            with pytest.raises(ControlRequestFailed) as info:
                await control_request(
                    socket_path, "POST", "/v1/close", {"direction": "forward", "host": "h", "port": 1}
                )
            assert info.value.status == 404 and "no forward connection" in info.value.message
            with pytest.raises(ControlRequestFailed) as info:
                await control_request(socket_path, "GET", "/v1/lookup?host=127.0.0.1&port=5")
            assert info.value.status == 500  # the handler's bug, reported, server still up
            assert await control_request(socket_path, "POST", "/v1/reload-identity", {}) == {"node_id": str(NODE_ID)}
            assert await control_request(socket_path, "GET", "/v1/status") == STATUS
            # A handler without an event stream: a 500 for that request, the server stays.
            with pytest.raises(ControlRequestFailed) as info:
                async for _ in stream_events(socket_path):
                    pass
            assert info.value.status == 500
            assert await control_request(socket_path, "GET", "/v1/status") == STATUS
            nursery.cancel_scope.cancel()
    assert handler.calls == [
        ("forward", NODE_ID, "::1", 4000),
        ("reverse", "127.0.0.1", 4001),
        ("forward", NODE_ID, "h", 9),
        ("close", "forward", "h", 1),
        ("reload",),
    ]
    assert not socket_path.exists()  # removed on exit


@pytest.mark.parametrize(
    ("method", "target", "body", "status"),
    [
        ("GET", "/v1/nothing", None, 404),
        ("DELETE", "/v1/status", None, 405),
        ("POST", "/v1/forward", {"node_id": "vbad", "host": "h", "port": 1}, 400),
        ("POST", "/v1/forward", {"node_id": 5, "host": "h", "port": 1}, 400),
        ("POST", "/v1/forward", {"node_id": str(NODE_ID), "host": "h h", "port": 1}, 400),
        ("POST", "/v1/reverse", {"host": "h", "port": 70000}, 400),
        ("POST", "/v1/reverse", {"host": "h", "port": True}, 400),
        ("POST", "/v1/reverse", [1, 2], 400),
        ("POST", "/v1/close", {"direction": "sideways", "host": "h", "port": 1}, 400),
    ],
)
async def test_bad_requests_get_4xx(socket_path: Path, method: str, target: str, body: Any, status: int) -> None:
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(serve_control, socket_path, RecordingHandler())
            with pytest.raises(ControlRequestFailed) as info:
                await control_request(socket_path, method, target, body)
            assert info.value.status == status
            nursery.cancel_scope.cancel()


async def test_garbage_and_silence_harm_nothing(socket_path: Path) -> None:
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            await nursery.start(serve_control, socket_path, RecordingHandler())
            silent = await trio.open_unix_socket(str(socket_path))  # says nothing, ever
            garbage = await trio.open_unix_socket(str(socket_path))
            await garbage.send_all(b"\x00\x01\x02 not http\r\n\r\n")
            answer = b""
            while data := await garbage.receive_some(4096):
                answer += data
            assert answer.startswith(b"HTTP/1.1 400")
            huge = await trio.open_unix_socket(str(socket_path))
            await huge.send_all(b"GET /v1/status HTTP/1.1\r\nX: " + b"a" * 100_000)
            answer = await huge.receive_some(4096)
            assert answer.startswith(b"HTTP/1.1 400")
            assert await control_request(socket_path, "GET", "/v1/status") == STATUS
            for stream in (silent, garbage, huge):
                await stream.aclose()
            nursery.cancel_scope.cancel()


async def test_clients_leaving_early_harm_nothing(socket_path: Path) -> None:
    """A client gone before its answer (a liveness probe, a killed `keynode status`)
    ends only its own connection: writing the answer must not take the node down."""
    requests = [
        b"",  # connects and leaves (what `keynode run` does to see whether a node is live)
        b"\x00\x01\x02 not http\r\n\r\n",  # garbage: the 400 finds no reader
        b"GET /v1/status HTTP/1.1\r\nHost: x\r\n\r\n",  # a request: the answer finds no reader
        b"GET /v1/status HTTP/1.1\r\nHost: x\r\n",  # half a request, then gone
    ]
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            await nursery.start(serve_control, socket_path, RecordingHandler())
            for request in requests:
                for _ in range(3):
                    client = await trio.open_unix_socket(str(socket_path))
                    await client.send_all(request)
                    await client.aclose()
                await trio.sleep(0.05)  # let the server write into the closed connections
                assert await control_request(socket_path, "GET", "/v1/status") == STATUS
            nursery.cancel_scope.cancel()


async def test_unreachable_and_stale_socket(socket_path: Path) -> None:
    with pytest.raises(ControlUnreachable, match="keynode run"):
        await control_request(socket_path, "GET", "/v1/status")
    # A socket file left by a dead process is replaced; a live one is not taken over.
    stale = trio.socket.socket(trio.socket.AF_UNIX)
    await stale.bind(str(socket_path))
    stale.close()
    with pytest.raises(ControlUnreachable):
        await control_request(socket_path, "GET", "/v1/status")
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(serve_control, socket_path, RecordingHandler())
            with pytest.raises(ControlError, match="already listens"):
                await nursery.start(serve_control, socket_path, RecordingHandler())
            assert await control_request(socket_path, "GET", "/v1/status") == STATUS
            nursery.cancel_scope.cancel()
    regular = socket_path.parent / "file"
    regular.write_text("x")
    with pytest.raises(ControlError, match="not a socket"):
        await serve_control(regular, RecordingHandler())


def test_format_status_table() -> None:
    text = format_status(STATUS)
    assert str(NODE_ID) in text and "127.0.0.1:1080" in text and "1h02m" in text
    lines = text.splitlines()
    header = next(line for line in lines if line.startswith("DIRECTION"))
    assert header.split() == [
        "DIRECTION", "STATE", "NODEID", "REMOTE", "PATH", "LOCAL", "AGE", "SENT", "RECEIVED", "RTT", "SERVICE",
        "MOVES",
    ]
    forward = next(line for line in lines if line.startswith("forward "))
    assert "3.0 MiB" in forward and "12.3 ms" in forward and "1m15s" in forward
    reverse = next(line for line in lines if line.startswith("reverse "))
    assert "[::1]:4001" in reverse and "prepared" in reverse and reverse.rstrip().endswith("-")
    assert "no connections" in format_status({**STATUS, "connections": []})


def test_format_status_shows_each_tunnels_path_and_its_moves() -> None:
    relay = "v" + "r" * 52
    moved = {
        "direction": "forward", "state": "established", "node_id": str(NODE_ID), "remote": "198.51.100.7:4000",
        "path": "direct", "via": None, "local": "127.0.0.1:50000", "age": 10, "bytes_sent": 1, "bytes_received": 2,
        "rtt": 0.01, "service": None,
        "moves": {"count": 2, "recent": [
            {"at": 1_700_000_000.0, "from": "direct", "to": "relay", "reason": "direct path silent",
             "address": None, "via": relay},
            {"at": 1_700_000_030.0, "from": "relay", "to": "direct",
             "reason": "direct path proven by authenticated ping/pong", "address": "198.51.100.7:4000", "via": None},
        ]},
    }
    relayed = {**moved, "direction": "reverse", "path": "relay", "via": relay, "moves": {"count": 0, "recent": []}}
    text = format_status({**STATUS, "connections": [moved, relayed]})
    lines = text.splitlines()
    forward = next(line for line in lines if line.startswith("forward "))
    reverse = next(line for line in lines if line.startswith("reverse "))
    assert " direct " in forward and forward.rstrip().endswith(" 2")
    assert f"relay via {relay[:12]}..." in reverse and reverse.rstrip().endswith(" 0")
    moves = lines[lines.index("path moves:") + 1:]
    assert len(moves) == 2
    assert f"forward {NODE_ID}: direct -> relay relay {relay} (direct path silent)" in moves[0]
    assert "relay -> direct 198.51.100.7:4000 (direct path proven by authenticated ping/pong)" in moves[1]


# --- hostile requests: any method, path and JSON body gets a JSON answer, never a crash ----

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3),
    max_leaves=10,
)
bodies = st.dictionaries(
    st.sampled_from(["node_id", "host", "port", "direction", "x"]),
    json_values | st.just(str(NODE_ID)) | st.integers(0, 70000) | st.sampled_from(["forward", "reverse", "::1"]),
    max_size=5,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    method=st.sampled_from(["GET", "POST", "PUT"]),
    path=st.sampled_from(
        ["/v1/status", "/v1/forward", "/v1/reverse", "/v1/close", "/v1/lookup", "/v1/reload-identity", "/x"]
    ),
    query=st.text(alphabet="abcdefhopstr=&:.%0123456789", max_size=30),
    body=bodies | json_values,
)
def test_dispatch_never_raises(method: str, path: str, query: str, body: object) -> None:
    import json

    request = h11.Request(method=method, target=f"{path}?{query}", headers=[("Host", "k")])
    status, document = trio.run(_dispatch, RecordingHandler(), request, json.dumps(body).encode())
    assert status in (200, 400, 404, 405, 500, 504)
    json.dumps(document)  # always serialisable
    if status != 200:
        assert set(document) == {"error", "message"}
