"""gRPC as `keynode run` serves it (issue 16), with real nodes as subprocesses:

    grpc-web client (Node, or Chromium) -> node A's [grpc_web] listener -> A's own
    CONNECT port -> uTP + TLS -> node B's service "rpc" of kind "grpc" -> unmodified grpcio

The grpcio server reads the caller from ``context.invocation_metadata()`` on every
call and must see node A's NodeId (B verified it and injected it): the browser's
and the Node clients' calls are A's calls. A also prints the bridge's bound address
and `keynode status` shows it; a bad `[grpc_web]` is a precise config error, a taken
listen address a clear start failure."""

from __future__ import annotations

import json
import threading
from collections.abc import AsyncIterator, Callable
from concurrent import futures
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
import trio

from grpc_bridge.h2_identity import parse_peer_header
from proxy.app.cli import ExitCode
from proxy.app.node_dir import keygen
from tests.browser.browser_support import page_server, run_page
from tests.cli.helpers import RunningNode, run_keynode, run_keynode_async, start_node
from tests.cli.test_cli_run import PATIENT
from tests.grpc_bridge.test_web_node_clients import ALL_CASES, assert_all_ok
from tests.grpc_bridge.test_web_support import (
    GRPC_OPTIONS,
    SERVICE,
    empty_call,
    run_node_client,
    streaming_output_call,
    unary_call,
)

pytestmark = pytest.mark.node
RPC_PORT = 50051


@dataclass
class CallerRecord:
    """The x-keynode-* metadata of every call the server took (grpcio's threads write it)."""

    calls: list[dict[str, str]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def recording(self, handler: Callable[[Any, grpc.ServicerContext], Any]) -> Callable[[Any, grpc.ServicerContext], Any]:
        def handle(request: Any, context: grpc.ServicerContext) -> Any:
            seen = {key: str(value) for key, value in context.invocation_metadata() if key.startswith("x-keynode-")}
            with self.lock:
                self.calls.append(seen)
            return handler(request, context)

        return handle


@asynccontextmanager
async def recording_test_service() -> AsyncIterator[tuple[int, CallerRecord]]:
    """grpc.testing.TestService (the grpc-web interop cases) on an unmodified grpcio
    server whose handlers note the caller metadata of each call."""
    record = CallerRecord()
    handler = grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "EmptyCall": grpc.unary_unary_rpc_method_handler(record.recording(empty_call)),
            "UnaryCall": grpc.unary_unary_rpc_method_handler(record.recording(unary_call)),
            "StreamingOutputCall": grpc.unary_stream_rpc_method_handler(record.recording(streaming_output_call)),
        },
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16), options=GRPC_OPTIONS)
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await trio.to_thread.run_sync(server.start)
    try:
        yield port, record
    finally:
        await trio.to_thread.run_sync(server.stop(grace=None).wait, 5)


@dataclass
class Pair:
    a: RunningNode
    b: RunningNode
    ids: dict[str, str]
    record: CallerRecord

    @property
    def bridge_url(self) -> str:
        return f"http://{self.a.info['grpc_web']}"

    def assert_every_call_from_a(self, at_least: int) -> None:
        calls = list(self.record.calls)
        assert len(calls) >= at_least
        for seen in calls:
            assert set(seen) == {"x-keynode-node-id", "x-keynode-peer"}, seen
            assert seen["x-keynode-node-id"] == self.ids["a"]
            peer = parse_peer_header(seen["x-keynode-peer"])
            assert (peer["by"], peer["nodeid"]) == (self.ids["b"], self.ids["a"])


@asynccontextmanager
async def grpc_web_pair(tmp_path: Path, allow_origins: list[str]) -> AsyncIterator[Pair]:
    dirs = {name: tmp_path / name for name in "ab"}
    ids = {name: str(keygen(directory, force=False).node_id) for name, directory in dirs.items()}
    async with recording_test_service() as (port, record):
        (dirs["b"] / "config.toml").write_text(
            f'[proxy]\nhost = "127.0.0.1"\n[services.rpc]\ntarget = "127.0.0.1:{port}"\nport = {RPC_PORT}\n'
            f'allow = ["{ids["a"]}"]\nkind = "grpc"\n'
            f'[grpc_web]\nlisten = "127.0.0.1:0"\ntarget = "rpc"\n{PATIENT}'  # a local service: direct
        )
        node_b = await start_node(dirs["b"])
        try:
            origins = ", ".join(f'"{origin}"' for origin in allow_origins)
            (dirs["a"] / "config.toml").write_text(
                f'[proxy]\nhost = "127.0.0.1"\n[peers]\n"{ids["b"]}" = "{node_b.info["proxy"]}"\n'
                f'[grpc_web]\nlisten = "127.0.0.1:0"\ntarget = "{ids["b"]}:{RPC_PORT}"\nallow_origins = [{origins}]\n'
                + PATIENT
            )
            node_a = await start_node(dirs["a"])
            try:
                yield Pair(node_a, node_b, ids, record)
            finally:
                assert await node_a.stop() == 0
        finally:
            assert await node_b.stop() == 0


async def test_node_clients_through_a_real_node_pair_reach_the_server_as_node_a(tmp_path: Path) -> None:
    with trio.fail_after(240):
        async with grpc_web_pair(tmp_path, []) as pair:
            host, _, port = pair.a.info["grpc_web"].rpartition(":")
            assert host == "127.0.0.1" and int(port) > 0
            status = await run_keynode_async("status", "--dir", str(pair.a.directory), "--json")
            assert status.returncode == 0, status.stderr.decode()
            assert f'"grpc_web": "{pair.a.info["grpc_web"]}"' in status.stdout.decode()
            text = await run_keynode_async("status", "--dir", str(pair.a.directory))
            assert f"grpc_web: {pair.a.info['grpc_web']}" in text.stdout.decode()
            for client in ("connect-http1", "grpcweb-text", "grpcweb-binary"):
                assert_all_ok(await run_node_client("grpcweb_node_client.js", client, pair.bridge_url))
            # unimplemented_method/service never reach a handler; every other case is one call at least.
            pair.assert_every_call_from_a(at_least=3 * (len(ALL_CASES) - 2))
            assert "(service rpc)" in pair.b.log
            # [grpc_web] is bound: a reload names it as needing a restart, the bridge stays.
            config = pair.a.directory / "config.toml"
            config.write_text(config.read_text().replace("allow_origins = []", 'allow_origins = ["http://x.example"]'))
            reload = await run_keynode_async("reload", "--dir", str(pair.a.directory), "--json")
            assert reload.returncode == 0, reload.stderr.decode()
            assert json.loads(reload.stdout)["restart_needed"] == ["[grpc_web]"]
            assert_all_ok(await run_node_client("grpcweb_node_client.js", "connect-http1", pair.bridge_url))
            # B's own bridge targets its local service by name: straight to the server, no
            # tunnel, so no caller is vouched for and nothing is injected.
            pair.assert_every_call_from_a(at_least=4 * (len(ALL_CASES) - 2))
            before = len(pair.record.calls)
            assert_all_ok(await run_node_client("grpcweb_node_client.js", "connect-http1", f"http://{pair.b.info['grpc_web']}"))
            assert len(pair.record.calls) > before and all(seen == {} for seen in pair.record.calls[before:])


async def test_chromium_through_a_real_node_pair_reaches_the_server_as_node_a(tmp_path: Path) -> None:
    with trio.fail_after(300):
        async with page_server() as page, grpc_web_pair(tmp_path, [page.origin]) as pair:
            plan = [{"label": client, "client": client, "baseUrl": pair.bridge_url}
                    for client in ("connect-web", "grpcweb-text", "grpcweb-binary")]
            report = await run_page(page, plan)
            assert "fatal" not in report, report["fatal"]
            for client in ("connect-web", "grpcweb-text", "grpcweb-binary"):
                failures = {case: text for case, text in report[client].items() if text != "ok"}
                assert sorted(report[client]) == sorted(ALL_CASES) and not failures, (client, failures)
            pair.assert_every_call_from_a(at_least=3 * (len(ALL_CASES) - 2))


def test_grpc_web_config_errors_and_a_taken_listen_address(tmp_path: Path) -> None:
    node_id = str(keygen(tmp_path, force=False).node_id)
    config = tmp_path / "config.toml"
    cases = {
        '[grpc_web]\nlisten = "127.0.0.1:0"\ntarget = "nowhere"\n':
            "grpc_web.target: 'nowhere' is not 'host:port'",
        '[grpc_web]\ntarget = "127.0.0.1:1"\n': "grpc_web.listen: missing",
        '[grpc_web]\nlisten = "127.0.0.1:0"\ntarget = "127.0.0.1:1"\nallow_origins = ["ftp://x"]\n':
            "grpc_web.allow_origins[0]",
        '[grpc_web]\nlisten = "127.0.0.1:0"\ntarget = "127.0.0.1:1"\nport = 1\n': "grpc_web.port: unknown key",
        '[server]\nport = 1\nkind = "http"\n': "server.kind: 'http' is not one of tcp, grpc",
    }
    for text, expected in cases.items():
        config.write_text('[proxy]\nhost = "127.0.0.1"\n' + text)
        result = run_keynode("run", "--dir", str(tmp_path))
        assert result.returncode == ExitCode.CONFIG, (text, result.stdout, result.stderr)
        assert expected in result.stderr, (text, result.stderr)
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config.write_text(f'[proxy]\nhost = "127.0.0.1"\n[grpc_web]\nlisten = "127.0.0.1:{port}"\n'
                          f'target = "{node_id}:443"\n')
        result = run_keynode("run", "--dir", str(tmp_path))
    assert result.returncode != 0 and "ready" not in result.stdout
    assert f"cannot bind [grpc_web] listen 127.0.0.1:{port}" in result.stderr, result.stderr


def test_server_kind_and_a_local_service_as_grpc_web_target() -> None:
    from proxy.app.config import config_from_mapping

    data = {
        "server": {"port": 50051, "kind": "grpc"},
        "services": {"agent": {"target": "127.0.0.1:50052", "port": 1314, "allow": "*", "kind": "grpc"}},
        "grpc_web": {"listen": "127.0.0.1:0", "target": "agent"},
    }
    config = config_from_mapping(data, "t.toml", base_dir=Path("/"), read_auth=False)
    assert config.policy.default.kind == "grpc" and config.policy.named("agent").kind == "grpc"
    assert (config.grpc_web.target.host, config.grpc_web.target.port, config.grpc_web.target.node_id) == (
        "127.0.0.1", 50052, None)
    data["grpc_web"]["target"] = "server"
    assert config_from_mapping(data, "t.toml", base_dir=Path("/"), read_auth=False).grpc_web.target.port == 50051
    default = config_from_mapping({"server": {"port": 1}}, "t.toml", base_dir=Path("/"), read_auth=False)
    assert default.policy.default.kind == "tcp" and default.grpc_web is None
