"""Keynode nodes inside lab namespaces, and the test's ends of their tunnels.

One node per lab host: a real `keynode run` process started in the host's
namespace (identity from `proxy.app.cli.keygen`, a TOML config written here, JSON
logs), driven through its control socket (a Unix socket: reachable from the test
process whatever namespace the node's network lives in). Behind a reverse side
runs a small server process in the same namespace: the demo's unmodified grpcio
echo server, or an exchange server for bulk data.

The test process plays the CONNECT client: `open_connect` makes its TCP socket
inside the forward node's namespace (the forward port listens on that
namespace's loopback), and `grpc_channel_through` bridges one tunnel to a grpcio
channel in the test's own namespace (grpcio makes its sockets in its own threads,
so it cannot be moved into a namespace itself).

Run as a module inside a namespace, this file is those server processes:

    python -m tests.natlab.proxies grpc-echo
    python -m tests.natlab.proxies exchange BYTES
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import signal
import socket
import sys
import threading
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

if TYPE_CHECKING:
    from .nat_rules import NatKind
    from .processes import LabProcess
    from .topology import Host, Lab

REPO = Path(__file__).resolve().parents[2]
# Processes in a namespace inherit our cwd; the path makes the imports independent of it.
PYTHON = ["env", f"PYTHONPATH={REPO}", "PYTHONUNBUFFERED=1", sys.executable]
ECHO_SERVICE = "keynode.demo.Echo"  # grpc_bridge/demo_server.py
CHUNK = 64 * 1024
START_TIMEOUT = 20.0


def _same_bytes(data: bytes) -> bytes:
    return data


# --- nodes --------------------------------------------------------------------------


@dataclass
class KeynodeNode:
    """A running `keynode run` in a lab host."""

    name: str
    host: Host
    directory: Path
    node_id: str
    token: str
    proxy_port: int
    process: LabProcess
    info: dict[str, str] = field(default_factory=dict)
    # Where other nodes are told to reach this one (the rendezvous' view).
    public: tuple[str, int] | None = None

    @property
    def forward_port(self) -> int:
        return int(self.info["forward"].rsplit(":", 1)[1])

    @property
    def control_socket(self) -> Path:
        return self.directory / "control.sock"

    async def control(self, method: str, target: str, body: Any = None, *, timeout: float = 30.0) -> Any:
        from proxy.app.control import control_request

        return await control_request(self.control_socket, method, target, body, timeout=timeout)

    async def status(self) -> dict[str, Any]:
        status: dict[str, Any] = await self.control("GET", "/v1/status")
        return status

    async def open_reverse(self, host: str, port: int) -> None:
        await self.control("POST", "/v1/reverse", {"host": host, "port": port})

    async def close_reverse(self, host: str, port: int) -> None:
        await self.control("POST", "/v1/close", {"direction": "reverse", "host": host, "port": port})

    async def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM to the keynode process alone (a graceful stop), wait; returns the exit
        status. Signalling the whole process group (LabProcess.stop) delivers a second
        SIGTERM through the `timeout` wrapper, and `keynode run` can die of that one."""
        pid = int((await self.status())["pid"])
        os.kill(pid, signal.SIGTERM)
        with trio.fail_after(timeout):
            while (status := self.process.returncode) is None:
                await trio.sleep(0.05)
        return status

    def log_records(self) -> list[dict[str, Any]]:
        """The node's JSON log lines (read once it has stopped: the log file is shared)."""
        if self.process.returncode is None:
            raise RuntimeError("log_records() needs the node stopped first")
        records = []
        for line in self.process.stderr_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue  # not a log record (e.g. a traceback line)
            if isinstance(record, dict):
                records.append(record)
        return records

    def lost_events(self) -> list[dict[str, Any]]:
        """`connection lost` records: direction, remote, reason, error, and `at` (UNIX time)."""
        events = []
        for record in self.log_records():
            if record.get("event") == "lost":
                moment = datetime.datetime.fromisoformat(str(record["time"]))
                events.append({**record, "at": moment.timestamp()})
        return events


def start_node(
    host: Host,
    directory: Path,
    *,
    name: str,
    proxy_port: int,
    public_ip: str,
    server_port: int | None = None,
    timeouts: Mapping[str, float] | None = None,
    congestion: str | None = None,
    extra_config: Sequence[str] = (),
) -> KeynodeNode:
    """Create an identity in `directory` and start `keynode run` in `host` (not yet
    waited for: call `wait_ready` so several nodes start in parallel). `public_ip`:
    the address others are told (with the proxy port, which the cone NATs keep).
    `extra_config`: further TOML lines appended to the config (e.g. a `[relay]` section)."""
    from proxy.app.node_dir import keygen

    tls_config = keygen(directory, force=False)
    lines = ['[proxy]', 'host = "0.0.0.0"', f"port = {proxy_port}",
             '[forward]', 'host = "127.0.0.1"', "port = 0",
             '[log]', 'format = "json"', 'level = "info"']
    if congestion is not None:  # otherwise the product's default controller
        lines += ['[transport]', f'congestion = "{congestion}"']
    if server_port is not None:
        lines += ['[server]', 'host = "127.0.0.1"', f"port = {server_port}"]
    if timeouts:
        lines += ['[timeouts]'] + [f"{key} = {float(value)!r}" for key, value in timeouts.items()]
    lines += list(extra_config)
    (directory / "config.toml").write_text("\n".join(lines) + "\n")
    process = host.spawn([*PYTHON, "-m", "proxy.app.cli", "run", "--dir", str(directory)])
    token = (directory / "auth_token").read_text().strip()
    return KeynodeNode(name, host, directory, str(tls_config.node_id), token, proxy_port, process,
                       public=(public_ip, proxy_port))


def wait_ready(node: KeynodeNode, timeout: float = START_TIMEOUT) -> KeynodeNode:
    """Read the node's start-up lines (`forward: ...`, `proxy: ...`) up to `ready`."""

    def collect(line: str) -> bool:
        key, sep, value = line.strip().partition(": ")
        if sep:
            node.info[key] = value
        return line.strip() == "ready"

    node.process.wait_for(collect, "ready", timeout)
    if node.info.get("node_id") != node.node_id:
        raise AssertionError(f"{node.name} runs as {node.info.get('node_id')}, not {node.node_id}")
    return node


def add_node_host(lab: Lab, role: str, kind: NatKind | None) -> tuple[Host, str]:
    """A host for one node, public (kind None) or alone behind a new router of
    `kind`; returns it and the public IP a rendezvous would see for it."""
    if kind is None:
        host = lab.add_public_host(f"{role}-public")
        return host, host.address
    site = lab.add_site(f"{role}-{kind.value}", kind)
    return site.add_host("node"), site.public_address


def start_pair(
    directory: Path,
    forward: tuple[Host, str],
    reverse: tuple[Host, str],
    *,
    ports: tuple[int, int],
    server: tuple[str, ...] = ("grpc-echo",),
    name: str = "",
    **options: Any,
) -> tuple[KeynodeNode, KeynodeNode, LabProcess]:
    """A forward node and a reverse node with `server` (this module's server
    processes) behind it; `forward`/`reverse` are (host, public IP), `options` go to
    `start_node`. Returns both nodes, started and ready, and the server process."""
    reverse_host, reverse_ip = reverse
    server_process, server_port = start_server(reverse_host, *server)
    prefix = f"{name} " if name else ""
    forward_node = start_node(forward[0], directory / f"{name}f", name=f"{prefix}forward",
                              proxy_port=ports[0], public_ip=forward[1], **options)
    reverse_node = start_node(reverse_host, directory / f"{name}r", name=f"{prefix}reverse",
                              proxy_port=ports[1], public_ip=reverse_ip, server_port=server_port, **options)
    return wait_ready(forward_node), wait_ready(reverse_node), server_process


def start_server(host: Host, *argv: str) -> tuple[LabProcess, int]:
    """One of this module's server processes in `host`; returns it and its TCP port."""
    process = host.spawn([*PYTHON, "-m", "tests.natlab.proxies", *argv])
    listening = process.wait_event("listening", START_TIMEOUT)
    return process, int(listening["port"])  # type: ignore[call-overload]


# --- the CONNECT client ------------------------------------------------------------------


@dataclass
class ConnectAnswer:
    status: int
    elapsed: float  # seconds from sending CONNECT to its answer
    stream: trio.SocketStream | None = None  # the tunnel, when 200
    leftover: bytes = b""  # tunnel bytes that came with the answer
    answered_at: float = 0.0  # trio.current_time() when the answer had arrived


def forward_port_socket(node: KeynodeNode) -> tuple[trio.socket.SocketType, trio.SocketStream]:
    """An unconnected TCP socket made inside `node`'s namespace, and its stream."""
    with node.host.enter():  # only the socket's creation happens in the namespace
        sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    return sock, trio.SocketStream(sock)


async def send_connect(node: KeynodeNode, sock: trio.socket.SocketType, stream: trio.SocketStream,
                       target: str, host: str) -> tuple[float, bytes, float]:
    """Connect `sock` to `node`'s forward port, send `CONNECT target` (with `node`'s
    token) and read up to the end of the answer's head. Returns when the CONNECT was
    sent, what was read (head, blank line and any bytes after) and when it had arrived."""
    from proxy.app.port_forward import proxy_authorization

    await sock.connect(("127.0.0.1", node.forward_port))
    started = trio.current_time()
    await stream.send_all(f"CONNECT {target} HTTP/1.1\r\nHost: {host}\r\n".encode()
                          + b"Proxy-Authorization: " + proxy_authorization(node.token)
                          + b"\r\n\r\n")
    answer = b""
    while b"\r\n\r\n" not in answer:
        data = await stream.receive_some(CHUNK)
        if not data:
            raise ConnectionError(f"{node.name}: CONNECT closed without an answer: {answer!r}")
        answer += data
    return started, answer, trio.current_time()


async def open_connect(node: KeynodeNode, target_node_id: str, host: str, port: int,
                       *, timeout: float = 30.0) -> ConnectAnswer:
    """CONNECT through `node`'s forward port from inside its namespace."""
    from proxy.app.port_forward import ForwardTarget
    from proxy.identity.node_id import NodeId

    target = ForwardTarget(NodeId.decode(target_node_id), host, port).connect_target()
    sock, stream = forward_port_socket(node)
    try:
        with trio.fail_after(timeout):
            started, answer, answered_at = await send_connect(node, sock, stream, target, f"{host}:{port}")
            elapsed = answered_at - started
    except BaseException:
        await stream.aclose()
        raise
    head, _, leftover = answer.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    if status != 200:
        await stream.aclose()
        return ConnectAnswer(status, elapsed, answered_at=answered_at)
    return ConnectAnswer(status, elapsed, stream, leftover, answered_at)


async def rendezvous_connect(forward: KeynodeNode, reverse: KeynodeNode, *, head_start: float = 0.2,
                             timeout: float = 30.0) -> tuple[ConnectAnswer, str]:
    """Play the signalling layer of the original system: tell the reverse node the
    forward node's public address (`open_connection_reverse` via its control socket)
    `head_start` seconds before the forward node CONNECTs to the reverse node's
    public address (negative: after). Returns the CONNECT answer and what
    open_connection_reverse answered: "heard" (its punch was answered) or the error."""
    from proxy.errors import ControlRequestFailed

    assert forward.public is not None and reverse.public is not None
    outcome = ["?"]

    async def open_reverse() -> None:
        await trio.sleep(max(0.0, -head_start))
        try:
            await reverse.open_reverse(*forward.public)  # type: ignore[misc]
            outcome[0] = "heard"
        except ControlRequestFailed as error:
            outcome[0] = error.error

    with trio.fail_after(timeout):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(open_reverse)
            await trio.sleep(max(0.0, head_start))
            answer = await open_connect(forward, reverse.node_id, *reverse.public)
    return answer, outcome[0]


@asynccontextmanager
async def grpc_channel_through(tunnel: trio.SocketStream, leftover: bytes = b"") -> AsyncIterator[Any]:
    """A grpcio channel whose one TCP connection is bridged onto `tunnel`.

    Yields `call(payload, timeout) -> reply` (a coroutine function) for the echo
    server's Unary method. The bridge accepts one connection: a channel that has to
    reconnect finds nobody and its call fails, as it would without the tunnel."""
    import grpc

    from proxy.app.port_forward import pipe_both_ways

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]

    async def bridge() -> None:
        async with listeners[0]:
            client = await listeners[0].accept()
        async with client:
            if leftover:
                await client.send_all(leftover)
            await pipe_both_ways(client, tunnel)

    channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.enable_http_proxy", 0)])
    unary = channel.unary_unary(f"/{ECHO_SERVICE}/Unary", request_serializer=_same_bytes,
                                response_deserializer=_same_bytes)

    async def call(payload: bytes, timeout: float) -> bytes:
        reply: bytes = await trio.to_thread.run_sync(lambda: unary(payload, timeout=timeout))
        return reply

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(bridge)
            try:
                yield call
            finally:
                nursery.cancel_scope.cancel()
    finally:
        channel.close()
        await tunnel.aclose()


# --- the bulk client -------------------------------------------------------------------


async def exchange(stream: trio.SocketStream, leftover: bytes, total: int) -> tuple[str, str, int]:
    """Send `total` random bytes then EOF while receiving until EOF; returns
    (sha256 sent, sha256 received, bytes received)."""
    sent, received = hashlib.sha256(), hashlib.sha256()
    count = [len(leftover)]
    received.update(leftover)

    async def send() -> None:
        left = total
        while left:
            chunk = os.urandom(min(CHUNK, left))
            sent.update(chunk)
            await stream.send_all(chunk)
            left -= len(chunk)
        await stream.send_eof()

    async def receive() -> None:
        while data := await stream.receive_some(CHUNK):
            received.update(data)
            count[0] += len(data)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(send)
        nursery.start_soon(receive)
    return sent.hexdigest(), received.hexdigest(), count[0]


# --- server processes (this module run inside a namespace) ----------------------------------


def _report(**fields: object) -> None:
    print(json.dumps(fields), flush=True)


def _wait_for_stop_signal() -> None:
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    while not stop.wait(1.0):
        pass


def serve_grpc_echo() -> None:
    """The demo's unmodified grpcio echo server (grpc_bridge/demo_server.py) on
    127.0.0.1 until SIGTERM."""
    from grpc_bridge.demo_server import build_server

    server, port = build_server("127.0.0.1", 0)
    server.start()
    _report(event="listening", port=port)
    _wait_for_stop_signal()
    server.stop(0).wait(5)


def serve_exchange(total: int) -> None:
    """On each TCP connection, once its first byte arrives: send `total` random bytes
    then EOF, read until EOF; report both digests. A connection that never receives
    data (a reverse side's spare connection) never gets any."""
    listener = socket.create_server(("127.0.0.1", 0))
    _report(event="listening", port=listener.getsockname()[1])

    def handle(conn: socket.socket) -> None:
        sent, received = hashlib.sha256(), hashlib.sha256()
        count = 0
        with conn:
            first = conn.recv(CHUNK)
            if not first:
                return
            received.update(first)
            count += len(first)

            def send() -> None:
                left = total
                while left:
                    chunk = os.urandom(min(CHUNK, left))
                    sent.update(chunk)
                    conn.sendall(chunk)
                    left -= len(chunk)
                conn.shutdown(socket.SHUT_WR)

            sender = threading.Thread(target=send)
            sender.start()
            while data := conn.recv(CHUNK):
                received.update(data)
                count += len(data)
            sender.join()
        _report(event="exchanged", sent_sha256=sent.hexdigest(), received_sha256=received.hexdigest(),
                received_bytes=count)

    while True:
        conn, _ = listener.accept()
        threading.Thread(target=handle, args=(conn,), daemon=True).start()


def main(argv: list[str]) -> None:
    if argv[:1] == ["grpc-echo"]:
        serve_grpc_echo()
    elif argv[:1] == ["exchange"] and len(argv) == 2:
        serve_exchange(int(argv[1]))
    else:
        raise SystemExit("usage: python -m tests.natlab.proxies grpc-echo | exchange BYTES")


if __name__ == "__main__":
    main(sys.argv[1:])
