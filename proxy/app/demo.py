"""`keynode demo`: a relay node, two nodes that know only it, an unmodified grpcio
server, figures, PASS/FAIL.

    grpcio client --CONNECT <B's NodeId>--> node A ==uTP+TLS==> node B --TCP--> grpcio echo server
                                              |                  |
                                              +-- relay node R --+  (introduces A to B)

All three are `keynode run` subprocesses with fresh identities in a temporary
directory, on loopback. R has `[relay] serve = true`; A and B are configured only
with `[relay] servers` naming R (B also with its `[server]`): no `[peers]`, no
address of one given to the other. Each learns its own public address from R
(printed as observed), B registers with R, and A finds B by its NodeId alone: R
introduces them and they connect directly (the tunnel's path is printed).
Then (demo_paths.py, in this process) a tunnel between two more nodes that cannot
punch at first starts over a relay node and moves to direct mid-stream.

The echo server is plain grpcio in a process of its own (`grpc_bridge/demo_server.py`:
a generic handler with bytes serializers, no generated code, nothing of keynode). B
serves it as its `[server]` of kind "grpc", so B's reverse side re-originates HTTP/2
toward it and adds the caller's verified NodeId to every request: the server reads
`x-keynode-node-id` from `context.invocation_metadata()`, prints it, and answers it
to WhoAmI. The client reaches it through node A's CONNECT port with grpcio's own
`grpc.http_proxy`, naming node B by its NodeId.
"""

from __future__ import annotations

import hashlib
import os
import queue
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SERVICE = "keynode.demo.Echo"
STREAM_CHUNK = 256 * 1024
START_TIMEOUT = 20.0
OBSERVE_TIMEOUT = 10.0  # for a node's first answer from its relay node
CALL_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0


def _identity(data: bytes) -> bytes:
    return data


# --- the echo server (unmodified grpcio, out of process) ------------------------------


def start_echo_server() -> Any:
    """grpc_bridge/demo_server.py in a child process (a DemoServerProcess): Unary (echo),
    Upload (client stream -> sha256) and WhoAmI (the x-keynode-node-id it was sent)."""
    from grpc_bridge.demo_server import spawn

    env = dict(os.environ)
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[2]) + os.pathsep + env.get("PYTHONPATH", "")
    try:
        return spawn("127.0.0.1", env=env, stderr=subprocess.DEVNULL)
    except OSError as error:
        raise DemoError(f"the echo server did not start: {error}") from None


def server_said_caller(server: Any) -> str:
    """The `caller: <NodeId>` line the server process printed for the last WhoAmI."""
    line = server.process.stdout.readline().strip()
    key, _, value = line.partition(": ")
    return value if key == "caller" else f"(the server said {line!r})"


# --- the two nodes ---------------------------------------------------------------------


@dataclass
class Node:
    name: str
    directory: Path
    process: subprocess.Popen[str] | None = None
    info: dict[str, str] = field(default_factory=dict)
    log_path: Path | None = None

    def start(self) -> None:
        self.log_path = self.directory / "node.log"
        log_file = open(self.log_path, "w")  # noqa: SIM115 (the child owns it while it runs)
        env = dict(os.environ)
        root = str(Path(__file__).resolve().parents[1])
        env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
        env["PYTHONUNBUFFERED"] = "1"
        self.process = subprocess.Popen(
            [sys.executable, "-m", "proxy.app.cli", "run", "--dir", str(self.directory)],
            stdout=subprocess.PIPE, stderr=log_file, text=True, env=env,
        )
        log_file.close()
        lines: queue.Queue[str | None] = queue.Queue()

        def read() -> None:
            assert self.process is not None and self.process.stdout is not None
            for line in self.process.stdout:
                lines.put(line.rstrip("\n"))
            lines.put(None)

        threading.Thread(target=read, daemon=True).start()
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            try:
                line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise DemoError(f"node {self.name} did not start within {START_TIMEOUT} s") from None
            if line is None:
                raise DemoError(f"node {self.name} exited while starting:\n{self.log_tail()}")
            if line == "ready":
                return
            key, _, value = line.partition(": ")
            self.info[key] = value

    def stop(self) -> int | None:
        """SIGTERM, wait; returns the exit status (None if it had to be killed)."""
        if self.process is None or self.process.poll() is not None:
            return None if self.process is None else self.process.returncode
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            return None

    def status(self) -> dict[str, Any]:
        """The node's `keynode status --json` document, from its control socket."""
        import trio

        from proxy.app.control import control_request

        socket_path = self.directory / "control.sock"
        answer: dict[str, Any] = trio.run(lambda: control_request(socket_path, "GET", "/v1/status", timeout=5))
        return answer

    def wait_for_observed_address(self) -> dict[str, Any]:
        """Poll the status until a relay node has told this node its public address."""
        deadline = time.monotonic() + OBSERVE_TIMEOUT
        while not (status := self.status()).get("observed_addresses"):
            if time.monotonic() > deadline:
                raise DemoError(f"node {self.name} learnt no observed address within {OBSERVE_TIMEOUT} s")
            time.sleep(0.05)
        return status

    def log_tail(self, lines: int = 15) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


class DemoError(Exception):
    """The demo could not run to the end."""


def write_config(node: Node, text: str) -> None:
    (node.directory / "config.toml").write_text(text)


# --- measurements ----------------------------------------------------------------------


def time_unary_calls(channel: Any, calls: int) -> tuple[list[float], bool]:
    unary = channel.unary_unary(f"/{SERVICE}/Unary", request_serializer=_identity,
                                response_deserializer=_identity)
    for _ in range(10):  # warm up: connection, HTTP/2 windows
        unary(b"warm-up", timeout=CALL_TIMEOUT)
    samples, intact = [], True
    for index in range(calls):
        payload = index.to_bytes(4, "big") * 16
        start = time.perf_counter()
        answer = unary(payload, timeout=CALL_TIMEOUT)
        samples.append(time.perf_counter() - start)
        intact = intact and answer == payload
    return samples, intact


def stream_upload(channel: Any, total: int, label: str) -> tuple[float, bool]:
    upload = channel.stream_unary(f"/{SERVICE}/Upload", request_serializer=_identity,
                                  response_deserializer=_identity)
    block = hashlib.sha256(label.encode()).digest() * (STREAM_CHUNK // 32)
    expected = hashlib.sha256()
    chunks = total // STREAM_CHUNK
    for _ in range(chunks):
        expected.update(block)
    progress = Progress(label, total)

    def chunks_with_progress() -> Iterator[bytes]:
        for index in range(chunks):
            yield block
            progress.update((index + 1) * STREAM_CHUNK)

    start = time.perf_counter()
    answer = upload(chunks_with_progress(), timeout=CALL_TIMEOUT * 2)
    elapsed = time.perf_counter() - start
    progress.done()
    return total / elapsed / (1024 * 1024), answer == expected.hexdigest().encode()


class Progress:
    """A progress bar on a terminal; a few milestones otherwise."""

    WIDTH = 30

    def __init__(self, label: str, total: int) -> None:
        self.label, self.total = label, total
        self.tty = sys.stdout.isatty()
        self.next_milestone = 0.25

    def update(self, done: int) -> None:
        fraction = done / self.total
        if self.tty:
            filled = int(fraction * self.WIDTH)
            bar = "#" * filled + "." * (self.WIDTH - filled)
            sys.stdout.write(f"\r  {self.label:<8} [{bar}] {done / 2**20:5.0f}/{self.total / 2**20:.0f} MiB")
            sys.stdout.flush()
        elif fraction >= self.next_milestone:
            print(f"  {self.label:<8} {fraction:4.0%} of {self.total / 2**20:.0f} MiB", flush=True)
            self.next_milestone += 0.25

    def done(self) -> None:
        if self.tty:
            sys.stdout.write("\r" + " " * (self.WIDTH + 40) + "\r")
            sys.stdout.flush()


def percentile(samples: list[float], fraction: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f} ms"


# --- the demo ------------------------------------------------------------------------


def run_demo(*, calls: int = 500, stream_mib: int = 64, keep: bool = False) -> bool:
    """Runs the whole demo, prints figures and PASS/FAIL; True on PASS."""
    import grpc

    started = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="keynode-demo-"))
    os.chmod(workdir, 0o700)
    nodes: list[Node] = []
    resources: dict[str, Any] = {}
    checks: list[tuple[str, bool]] = []
    error_text: str | None = None
    try:
        _run(workdir, nodes, resources, checks, calls, stream_mib * 1024 * 1024)
    except DemoError as error:
        error_text = str(error)
    except grpc.RpcError as error:
        error_text = f"a call failed: {error.code()} {error.details()}"
    finally:
        for node in reversed(nodes):  # the client side first
            checks.append((f"node {node.name} stopped cleanly on SIGTERM", node.stop() == 0))
        if "server" in resources:
            checks.append(("the echo server stopped cleanly on SIGTERM", resources["server"].stop() == 0))
    failed = [name for name, ok in checks if not ok]
    if error_text is not None:
        failed.insert(0, error_text)
    elapsed = time.monotonic() - started
    if failed:
        print(f"FAIL ({elapsed:.1f} s): " + "; ".join(failed))
        for node in nodes:
            print(f"--- node {node.name} log (last lines) ---\n{node.log_tail()}")
    else:
        print(f"PASS ({elapsed:.1f} s)")
    if keep:
        print(f"kept {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    return not failed


def _run(
    workdir: Path,
    nodes: list[Node],
    resources: dict[str, Any],
    checks: list[tuple[str, bool]],
    calls: int,
    stream_bytes: int,
) -> None:
    import grpc

    from proxy.app.node_dir import keygen

    relay = Node("R", workdir / "relay")
    node_a, node_b = Node("A", workdir / "a"), Node("B", workdir / "b")
    identities = {node.name: keygen(node.directory, force=False) for node in (relay, node_a, node_b)}

    server = resources["server"] = start_echo_server()
    server_port = server.port
    # conn_connect_time 5 s (default 2): room for a busy machine, no effect on the figures.
    timeouts = "[timeouts]\nconn_connect_time = 5.0\n"
    write_config(relay, f'[proxy]\nhost = "127.0.0.1"\nport = 0\n{timeouts}[relay]\nserve = true\n')
    nodes.append(relay)
    relay.start()
    relay_id, relay_proxy = relay.info["node_id"], relay.info["proxy"]
    # A and B know the relay node and nothing of each other: no [peers].
    relay_section = f'[relay]\nservers = ["{relay_id}@{relay_proxy}"]\n'
    write_config(node_b, f'[proxy]\nhost = "127.0.0.1"\nport = 0\n[server]\nhost = "127.0.0.1"\n'
                         f'port = {server_port}\nkind = "grpc"\n{timeouts}{relay_section}')
    nodes.append(node_b)
    node_b.start()
    b_proxy = node_b.info["proxy"]
    b_id = node_b.info["node_id"]
    write_config(node_a, f'[proxy]\nhost = "127.0.0.1"\nport = 0\n{timeouts}{relay_section}')
    nodes.append(node_a)
    node_a.start()
    a_id = node_a.info["node_id"]
    token = (node_a.directory / "auth_token").read_text().strip()
    observed = {node.name: node.wait_for_observed_address() for node in (node_a, node_b)}

    print("keynode demo: a relay node, two nodes that know only it, an unmodified grpcio echo server behind B")
    print(f"  relay R {relay_id}  UDP {relay_proxy}  ([relay] serve = true)")
    print(f"  node A  {a_id}  CONNECT {node_a.info['forward']}  UDP {node_a.info['proxy']}")
    print(f"  node B  {b_id}  UDP {b_proxy}  server 127.0.0.1:{server_port} (kind grpc, pid {server.process.pid})")
    seen = {name: [entry["address"] for entry in status["observed_addresses"]] for name, status in observed.items()}
    for name in ("A", "B"):
        print(f"  node {name} observed address (as R saw it): {', '.join(seen[name])}"
              f"  mapping: {observed[name]['nat_mapping']} (telling needs two relay nodes)")
    checks.append(("node NodeIds are the generated ones",
                   a_id == str(identities["A"].node_id) and b_id == str(identities["B"].node_id)
                   and relay_id == str(identities["R"].node_id)))
    checks.append(("each node's observed address is its UDP socket",
                   seen["A"] == [node_a.info["proxy"]] and seen["B"] == [b_proxy]))
    print(f"  A connects to B by NodeId alone: CONNECT {b_id}:{server_port}")

    tunnel = grpc.insecure_channel(
        f"{b_id}:{server_port}",
        options=[("grpc.http_proxy", f"http://{token}@{node_a.info['forward']}"),
                 ("grpc.max_receive_message_length", 8 * 1024 * 1024)],
    )
    direct = grpc.insecure_channel(f"127.0.0.1:{server_port}", options=[("grpc.enable_http_proxy", 0)])
    with tunnel, direct:
        who_am_i = tunnel.unary_unary(f"/{SERVICE}/WhoAmI", request_serializer=_identity,
                                      response_deserializer=_identity)
        try:
            caller = who_am_i(b"", timeout=CALL_TIMEOUT).decode()
        except grpc.RpcError as error:
            raise DemoError(f"the first call through the tunnel failed: {error.code()} {error.details()}") from None
        print(f"  caller NodeId as the server saw it: {caller}")
        printed = server_said_caller(server)
        print(f"  the server process read x-keynode-node-id from its metadata: {printed}")
        checks.append(("the server saw node A's NodeId", caller == a_id and printed == a_id))
        rows = [row for row in node_a.status()["connections"] if row["node_id"] == b_id]
        for row in rows:
            print(f"  tunnel A -> B: path {row.get('path')}, remote {row['remote']}")
        checks.append(("the tunnel A -> B is direct to B's UDP socket",
                       len(rows) == 1 and rows[0].get("path") == "direct" and rows[0]["remote"] == b_proxy))

        tunnel_samples, tunnel_intact = time_unary_calls(tunnel, calls)
        direct_samples, direct_intact = time_unary_calls(direct, calls)
        checks.append(("every unary reply equals its request", tunnel_intact and direct_intact))
        prefix = f"  {calls} unary round trips   "
        print(f"{prefix}tunnel: median {ms(statistics.median(tunnel_samples))}"
              f"  p99 {ms(percentile(tunnel_samples, 0.99))}")
        print(f"{' ' * len(prefix)}direct: median {ms(statistics.median(direct_samples))}"
              f"  p99 {ms(percentile(direct_samples, 0.99))}")

        mib = stream_bytes // (1024 * 1024)
        tunnel_rate, tunnel_ok = stream_upload(tunnel, stream_bytes, "tunnel")
        direct_rate, direct_ok = stream_upload(direct, stream_bytes, "direct")
        checks.append((f"the {mib} MiB stream arrived intact (sha256)", tunnel_ok and direct_ok))
        print(f"  {mib} MiB stream   tunnel: {tunnel_rate:.1f} MiB/s   direct: {direct_rate:.1f} MiB/s")

    log_b = node_b.log_tail(200)
    checks.append(("node B logged the connection", "connection established" in log_b and a_id in log_b))
    for name, process in (("R", relay.process), ("A", node_a.process), ("B", node_b.process)):
        checks.append((f"node {name} still running", process is not None and process.poll() is None))

    import trio

    from proxy.app.demo_paths import relay_fallback

    trio.run(relay_fallback, checks)  # a tunnel that starts relayed and moves to direct
