"""Services for real (issue 15): `keynode run` nodes as subprocesses, one of them
serving five services on one UDP port. curl and grpcio reach them through another
node's CONNECT port; a node not in a list gets 403 and the target sees nothing; an
unclaimed port is 404; `keynode status` lists the services and each tunnel's;
`keynode reload` revokes and grants access while another tunnel keeps flowing
(sha256-equal); a config failing a policy test is rejected and the running one
stays; SIGHUP reloads too."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import h11
import trio

from proxy.app.cli import ExitCode
from proxy.app.node_dir import keygen
from tests.cli.helpers import run_keynode, run_keynode_async, start_node
from tests.cli.test_cli_run import PATIENT
from tests.grpc_bridge.test_grpc_tunnel import GRPC_OPTIONS, SERVICE, grpc_server
from tests.proxy.test_proxy_support import connect_reading_refusal


class NamedServers:
    """HTTP servers on loopback that answer every request with their name, counting
    accepted connections, and one that answers the sha256 of all it read."""

    def __init__(self) -> None:
        self.ports: dict[str, int] = {}
        self.accepts: dict[str, int] = {}

    async def serve(self, nursery: trio.Nursery, name: str) -> None:
        async def handle(stream: trio.SocketStream) -> None:
            self.accepts[name] += 1
            try:
                await (digest(stream) if name == "sink" else answer_with_name(stream, name))
            except (trio.BrokenResourceError, trio.ClosedResourceError, h11.RemoteProtocolError):
                pass

        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.ports[name], self.accepts[name] = listeners[0].socket.getsockname()[1], 0
        nursery.start_soon(trio.serve_listeners, handle, listeners)


async def answer_with_name(stream: trio.SocketStream, name: str) -> None:
    connection = h11.Connection(h11.SERVER)
    while True:
        event = connection.next_event()
        if event is h11.NEED_DATA:
            connection.receive_data(await stream.receive_some(65536))
        elif isinstance(event, h11.EndOfMessage):
            body = name.encode()
            await stream.send_all(
                connection.send(h11.Response(status_code=200, headers=[("content-length", str(len(body)))]))
                + connection.send(h11.Data(data=body))
                + connection.send(h11.EndOfMessage())
            )
            connection.start_next_cycle()
        elif isinstance(event, h11.ConnectionClosed):
            return


async def digest(stream: trio.SocketStream) -> None:
    hasher = hashlib.sha256()
    while data := await stream.receive_some(65536):
        hasher.update(data)
    await stream.send_all(hasher.hexdigest().encode())


def b_config(servers: NamedServers, rpc_port: int, client_allows: list[str], extra: str = "") -> str:
    allow = json.dumps(client_allows)
    return (
        f'[proxy]\nhost = "127.0.0.1"\n[server]\nport = {servers.ports["default"]}\nservice_port = 22\n'
        f'[services.agent]\ntarget = "127.0.0.1:{servers.ports["agent"]}"\nport = 1314\nallow = "*"\n'
        f'[services.client]\ntarget = "127.0.0.1:{servers.ports["client"]}"\nport = 1315\nallow = {allow}\n'
        f'[services.sink]\ntarget = "127.0.0.1:{servers.ports["sink"]}"\nport = 1400\nallow = "*"\n'
        f'[services.rpc]\ntarget = "127.0.0.1:{rpc_port}"\nport = 50051\nallow = "*"\nkind = "grpc"\n'
        + extra + PATIENT
    )


async def curl(node: Any, target: str) -> tuple[str, str]:
    """curl through ``node``'s CONNECT port: (the CONNECT status, the body)."""
    token = (node.directory / "auth_token").read_text().strip()
    result = await trio.run_process(
        [shutil.which("curl") or "curl", "-sS", "-p", "-x", f"http://user:{token}@{node.info['forward']}",
         "-w", "\n%{http_connect}", f"http://{target}/"],
        capture_stdout=True, capture_stderr=True, check=False,
    )
    body, _, status = result.stdout.decode().rpartition("\n")
    return status, body


async def connect(node: Any, target: str) -> tuple[int, bytes, trio.SocketStream]:
    """A raw CONNECT through ``node``: status, the refusal's body, the stream."""
    host, port = node.info["forward"].rsplit(":", 1)
    token = (node.directory / "auth_token").read_text().strip()
    return await connect_reading_refusal(host, int(port), target, token)


async def status_of(node: Any) -> Any:
    result = await run_keynode_async("status", "--dir", str(node.directory), "--json")
    assert result.returncode == 0, result.stderr.decode()
    return json.loads(result.stdout)


async def until(check: Callable[[], Any]) -> None:
    """Until ``check`` (awaitable) is true: the node's state, polled."""
    while not await check():
        await trio.sleep(0.05)


def grpc_echo(forward: str, token: str, target: str, payload: bytes) -> bytes:
    options = [*GRPC_OPTIONS, ("grpc.http_proxy", f"http://user:{token}@{forward}")]
    with grpc.insecure_channel(target, options=options) as channel:
        return channel.unary_unary(f"/{SERVICE}/Echo")(payload, timeout=20)  # type: ignore[no-any-return]


async def test_services_through_real_nodes_status_reload_and_sighup(tmp_path: Path) -> None:
    dirs = {name: tmp_path / name for name in "abc"}
    ids = {name: str(keygen(directory, force=False).node_id) for name, directory in dirs.items()}
    with trio.fail_after(150):
        async with trio.open_nursery() as nursery, grpc_server() as rpc:
            servers = NamedServers()
            for name in ("default", "agent", "client", "sink"):
                await servers.serve(nursery, name)
            config_b = dirs["b"] / "config.toml"
            config_b.write_text(b_config(servers, rpc.port, [ids["a"]]))
            node_b = await start_node(dirs["b"])
            peers = f'[proxy]\nhost = "127.0.0.1"\n[peers]\n"{ids["b"]}" = "{node_b.info["proxy"]}"\n{PATIENT}'
            for name in "ac":
                (dirs[name] / "config.toml").write_text(peers)
            node_a, node_c = await start_node(dirs["a"]), await start_node(dirs["c"])
            b = ids["b"]
            try:
                # An allowed node reaches each service; the default by its service_port.
                for port, name in ((1314, "agent"), (1315, "client"), (22, "default")):
                    assert await curl(node_a, f"{b}:{port}") == ("200", name)
                token_a = (dirs["a"] / "auth_token").read_text().strip()
                payload = os.urandom(100_000)
                for target in (f"{b}:50051", f"rpc.{b}:443"):  # by port, by name
                    echoed = await trio.to_thread.run_sync(grpc_echo, node_a.info["forward"], token_a, target, payload)
                    assert echoed == payload
                assert await curl(node_a, f"agent.{b}:80") == ("200", "agent")
                assert await curl(node_a, f"{b}:9999") == ("404", "")
                # Not in the list: 403 naming the service and the NodeId; the target sees nothing.
                accepts = servers.accepts["client"]
                status, body, stream = await connect(node_c, f"{b}:1315")
                await stream.aclose()
                assert status == 403 and b"'client'" in body and ids["c"].encode() in body
                assert (await curl(node_c, f"{b}:1315"))[0] == "403"
                assert servers.accepts["client"] == accepts

                # status: the services, and per tunnel the service it reached
                held_status, _, held = await connect(node_a, f"{b}:1315")  # A's tunnel, to be revoked
                assert held_status == 200
                await held.send_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                assert (await held.receive_some(65536)).endswith(b"client")
                status_b = await status_of(node_b)
                assert [(s["name"], s["port"], s["kind"], s["allow"]) for s in status_b["services"]] == [
                    ("server", 22, "tcp", "*"), ("agent", 1314, "tcp", "*"), ("client", 1315, "tcp", 1),
                    ("sink", 1400, "tcp", "*"), ("rpc", 50051, "grpc", "*"),
                ]
                assert {(row["node_id"], row["service"]) for row in status_b["connections"]} >= {(ids["a"], "client")}
                assert {row["service"] for row in (await status_of(node_a))["connections"]} >= {"port 1315"}
                assert f"connection established: reverse {ids['a']} at " in node_b.log
                assert "(service client)" in node_b.log
                text = await run_keynode_async("status", "--dir", str(dirs["b"]))
                assert "SERVICE" in text.stdout.decode() and "rpc" in text.stdout.decode()

                # reload: A loses 'client', C gains it; C's tunnel to 'sink' keeps flowing.
                sink_status, _, flowing = await connect(node_c, f"{b}:1400")
                assert sink_status == 200
                data = os.urandom(3 << 20)
                await flowing.send_all(data[: 1 << 20])
                config_b.write_text(b_config(servers, rpc.port, [ids["c"]]))
                reloaded = await run_keynode_async("reload", "--dir", str(dirs["b"]), "--json")
                assert reloaded.returncode == 0, reloaded.stderr.decode()
                assert json.loads(reloaded.stdout)["revoked"] == 1
                try:
                    assert await held.receive_some(65536) == b""
                except trio.BrokenResourceError:
                    pass  # a reset: the tunnel died midway
                await held.aclose()
                await until(lambda: trio.to_thread.run_sync(lambda: "revoked" in node_b.log))
                await flowing.send_all(data[1 << 20 :])
                await flowing.send_eof()
                answer = b""
                while chunk := await flowing.receive_some(65536):
                    answer += chunk
                assert answer.decode() == hashlib.sha256(data).hexdigest()
                assert await curl(node_c, f"{b}:1315") == ("200", "client")
                assert (await curl(node_a, f"{b}:1315"))[0] == "403"

                # A config failing its policy test is rejected whole; the running one stays.
                failing = f'[[policy_tests]]\nnode = "{ids["a"]}"\nservice = "client"\nexpect = "allow"\n'
                config_b.write_text(b_config(servers, rpc.port, [], extra=failing))
                rejected = await run_keynode_async("reload", "--dir", str(dirs["b"]))
                assert rejected.returncode == ExitCode.CONFIG
                assert "policy_tests[0]" in rejected.stderr.decode() and "running config stays" in rejected.stderr.decode()
                # (--control: the CLI reads no config, the node itself rejects it)
                socket_path = str(dirs["b"] / "control.sock")
                rejected = await run_keynode_async("reload", "--control", socket_path, "--json")
                assert rejected.returncode == ExitCode.CONFIG
                assert "expected allow" in json.loads(rejected.stderr)["message"]
                assert await curl(node_c, f"{b}:1315") == ("200", "client")

                # SIGHUP reloads too.
                config_b.write_text(b_config(servers, rpc.port, [ids["a"], ids["c"]]))
                node_b.process.send_signal(signal.SIGHUP)

                async def both_allowed() -> bool:
                    services = (await status_of(node_b))["services"]
                    return any(s["name"] == "client" and s["allow"] == 2 for s in services)

                await until(both_allowed)
                assert await curl(node_a, f"{b}:1315") == ("200", "client")
                # ... and a SIGHUP with a bad config is logged and changes nothing.
                config_b.write_text(b_config(servers, rpc.port, ["vnot-a-node-id"]))
                node_b.process.send_signal(signal.SIGHUP)
                await until(lambda: trio.to_thread.run_sync(lambda: "reload on SIGHUP rejected" in node_b.log))
                assert "services.client.allow[0]" in node_b.log
                assert await curl(node_a, f"{b}:1315") == ("200", "client")
            finally:
                for node in (node_a, node_c, node_b):
                    assert await node.stop() == 0, node.log
            nursery.cancel_scope.cancel()


def test_run_refuses_a_config_whose_policy_test_fails(tmp_path: Path) -> None:
    node_id = str(keygen(tmp_path, force=False).node_id)
    (tmp_path / "config.toml").write_text(
        '[services.client]\ntarget = "127.0.0.1:9"\nport = 1315\nallow = []\n'
        f'[[policy_tests]]\nnode = "{node_id}"\nservice = "client"\nexpect = "allow"\n'
    )
    result = run_keynode("run", "--dir", str(tmp_path), timeout=30)
    assert result.returncode == ExitCode.CONFIG
    assert f"policy_tests[0]: expected allow for {node_id} on service 'client', but the policy says deny" in result.stderr
