#!/usr/bin/env python3
"""What each layer adds to a gRPC unary call, one process per node, side by side.

    .venv/bin/python bench/latency_floors.py [--calls 3000] [--rounds 10]

Every path is client -> node F -> UDP -> node R -> grpcio server and back, except
``direct``. Each row adds something to the row above it, so the differences are
what that thing costs on this machine:

- ``c relay``: two C processes copying TCP <-> UDP (bench/floor_relay.c, built with
  ``cc``): the kernel's and the machine's price for two more processes on the path;
- ``python relay``: the same copy in plain Python, one blocking epoll loop per node;
- ``python uTP``: our sans-IO uTP core (nat/utp) driven by that plain loop, no TLS;
- ``python uTP+TLS``: plus pyOpenSSL TLS 1.3 over it (our contexts, Ed25519);
  the whole protocol stack with the cheapest driver Python allows, none of the
  proxy's features;
- ``trio relay``: bench/tunnel.py's bare relay, a trio process copying TCP <-> UDP;
- ``keynode tunnel``: the real proxies (CONNECT, uTP, TLS, the relay, keep-alive).

CPU columns are user and system microseconds per call in each node process.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import select
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent import futures
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import tunnel  # bench/tunnel.py: the keynode and trio-relay nodes, the service name

# --- plain-Python nodes (no trio) -----------------------------------------------------


def _listen_or_wait(mode: str, port: int, udp: socket.socket) -> tuple[socket.socket | None, tuple[str, int] | None]:
    """Forward: print our TCP port, accept the client. Reverse: print our UDP port."""
    if mode == "reverse":
        print(json.dumps({"udp_port": udp.getsockname()[1]}), flush=True)
        return None, None
    return tunnel.accept_one_client(), ("127.0.0.1", port)


def _connect_server(port: int) -> socket.socket:
    server = socket.create_connection(("127.0.0.1", port))
    server.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return server


def run_python_relay(mode: str, port: int) -> None:
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    tcp, peer = _listen_or_wait(mode, port, udp)
    if tcp is None:
        first, peer = udp.recvfrom(65536)
        tcp = _connect_server(port)
        tcp.sendall(first)
    poller = select.epoll()
    poller.register(tcp.fileno(), select.EPOLLIN)
    poller.register(udp.fileno(), select.EPOLLIN)
    tcp_fd = tcp.fileno()
    while True:
        for fd, _ in poller.poll():
            if fd == tcp_fd:
                data = tcp.recv(65536)
                if not data:
                    return
                udp.sendto(data, peer)
            else:
                tcp.sendall(udp.recv(65536))  # small messages: the socket never fills here


class PlainStackNode:
    """uTP (nat.utp) and optionally TLS (pyOpenSSL, proxy.tls contexts) over one UDP
    socket, driven by a blocking epoll loop: the protocol work with no trio, no
    streams and no proxy around it."""

    def __init__(self, mode: str, port: int, with_tls: bool) -> None:
        from OpenSSL import SSL

        from nat.utp.multiplexer import UtpMultiplexer
        from proxy.identity.tls_config import TLSConfig
        from proxy.tls.stream import _context_for

        self.ssl = SSL
        self.mode, self.port, self.with_tls = mode, port, with_tls
        self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.udp.bind(("127.0.0.1", 0))
        self.udp.setblocking(False)
        self.mux = UtpMultiplexer()
        self.mux.accepting = mode == "reverse"
        self.poller = select.epoll()
        self.poller.register(self.udp.fileno(), select.EPOLLIN)
        self.tls = SSL.Connection(_context_for(TLSConfig.generate(), mode == "reverse"), None) if with_tls else None
        self.conn = None
        self.tcp: socket.socket | None = None
        self.ready = False  # TLS established (or no TLS): TCP bytes may flow
        self.client, peer = _listen_or_wait(mode, port, self.udp)
        if self.tls is not None:
            (self.tls.set_accept_state if mode == "reverse" else self.tls.set_connect_state)()
        if peer is not None:
            self.conn = self.mux.connect(peer, time.monotonic())
            if self.tls is None:
                self._start_relay(self.client)
            self._progress()

    def run(self) -> None:
        udp_fd, mux = self.udp.fileno(), self.mux
        while True:
            deadline = mux.get_timer()
            timeout = -1.0 if deadline is None else max(0.0, deadline - time.monotonic())
            for fd, _ in self.poller.poll(timeout):
                now = time.monotonic()
                if fd == udp_fd:
                    while True:
                        try:
                            data, addr = self.udp.recvfrom(65536)
                        except BlockingIOError:
                            break
                        mux.receive_datagram(data, addr, now)
                elif not self._from_local():
                    return
            now = time.monotonic()
            deadline = mux.get_timer()
            if deadline is not None and deadline <= now:
                mux.handle_timer(now)
            while (event := mux.next_event()) is not None:
                if self.conn is None and type(event).__name__ == "IncomingConnection":
                    self.conn = event.conn
                    if self.tls is None:
                        self._start_relay(_connect_server(self.port))
            if self.conn is not None:
                self._progress()

    def _start_relay(self, tcp: socket.socket) -> None:
        self.tcp, self.ready = tcp, True
        tcp.setblocking(False)
        self.poller.register(tcp.fileno(), select.EPOLLIN)

    def _progress(self) -> None:
        """Tunnel -> TCP, the TLS handshake while it lasts, then flush datagrams."""
        incoming = self.conn.read() if self.conn.readable_bytes else b""
        if self.tls is None:
            if incoming:
                self.tcp.sendall(incoming)
        else:
            if incoming:
                self.tls.bio_write(incoming)
            if not self.ready:
                self._handshake()
            if self.ready:
                while True:
                    try:
                        plaintext = self.tls.recv(65536)
                    except (self.ssl.WantReadError, self.ssl.ZeroReturnError):
                        break
                    self.tcp.sendall(plaintext)
            self._tls_out()
        for data, addr in self.mux.datagrams_to_send(time.monotonic()):
            self.udp.sendto(data, addr)

    def _handshake(self) -> None:
        try:
            self.tls.do_handshake()
        except self.ssl.WantReadError:
            return
        self._start_relay(self.client if self.client is not None else _connect_server(self.port))

    def _tls_out(self) -> None:
        try:
            self.conn.send(self.tls.bio_read(1 << 20))
        except self.ssl.WantReadError:
            pass

    def _from_local(self) -> bool:
        data = self.tcp.recv(65536)
        if not data:
            return False
        if self.tls is None:
            self.conn.send(data)
        else:
            self.tls.sendall(data)
            self._tls_out()
        for datagram, addr in self.mux.datagrams_to_send(time.monotonic()):
            self.udp.sendto(datagram, addr)
        return True


# --- the ladder -------------------------------------------------------------------------


def process_cpu(process: subprocess.Popen[str]) -> tuple[float, float]:
    fields = Path(f"/proc/{process.pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def start_node(command: list[str], mode: str, port: int) -> tuple[subprocess.Popen[str], dict[str, int]]:
    process = subprocess.Popen(command + [mode, str(port)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    line = process.stdout.readline() if process.stdout else ""
    if not line:
        raise RuntimeError(f"{command} {mode} failed to start")
    return process, json.loads(line)


def start_pair(command: list[str], server_port: int) -> tuple[tuple[subprocess.Popen[str], ...], int]:
    """Reverse node first (it prints its UDP port), then the forward node (its TCP
    port). Returns (forward, reverse) and the port a client connects to."""
    reverse, reverse_info = start_node(command, "reverse", server_port)
    forward, forward_info = start_node(command, "forward", reverse_info["udp_port"])
    return (forward, reverse), forward_info["tcp_port"]


def build_c_relay(directory: str) -> str:
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise SystemExit("bench/latency_floors.py needs a C compiler (cc) for the C relay floor")
    binary = os.path.join(directory, "floor_relay")
    subprocess.run([compiler, "-O2", "-o", binary, str(Path(__file__).with_name("floor_relay.c"))], check=True)
    return binary


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] in ("python-relay", "python-utp", "python-stack"):
        kind, mode, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
        if kind == "python-relay":
            run_python_relay(mode, port)
        else:
            PlainStackNode(mode, port, with_tls=kind == "python-stack").run()
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()

    import grpc

    handler = grpc.method_handlers_generic_handler(
        tunnel.SERVICE, {"Echo": grpc.unary_unary_rpc_method_handler(lambda request, context: request)}
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    server.add_generic_rpc_handlers((handler,))
    server_port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    me = [sys.executable, __file__]
    all_processes: list[subprocess.Popen[str]] = []
    with tempfile.TemporaryDirectory() as directory:
        commands = {
            "c relay": [build_c_relay(directory)],
            "python relay": me + ["python-relay"],
            "python uTP": me + ["python-utp"],
            "python uTP+TLS": me + ["python-stack"],
        }
        channels = {"direct": grpc.insecure_channel(f"127.0.0.1:{server_port}")}
        processes: dict[str, tuple[subprocess.Popen[str], ...]] = {"direct": ()}
        forward = reverse = None
        try:
            for name, command in commands.items():
                processes[name], port = start_pair(command, server_port)
                all_processes.extend(processes[name])
                channels[name] = grpc.insecure_channel(f"127.0.0.1:{port}")
            bare_reverse = tunnel.BareNode("reverse", str(server_port))
            bare_forward = tunnel.BareNode("forward", str(bare_reverse.info["udp_port"]))
            all_processes += [bare_forward.process, bare_reverse.process]
            processes["trio relay"] = (bare_forward.process, bare_reverse.process)
            channels["trio relay"] = grpc.insecure_channel(f"127.0.0.1:{bare_forward.info['tcp_port']}")
            forward, reverse = tunnel.Node(None), tunnel.Node(server_port)
            processes["keynode tunnel"] = (forward.process, reverse.process)
            auth = "Proxy-Authorization:Basic " + base64.b64encode(tunnel.TOKEN.encode()).decode()
            channels["keynode tunnel"] = grpc.insecure_channel(
                f"127.0.0.1:{forward.forward_port}",
                options=[("grpc.http_connect_server", reverse.target()), ("grpc.http_connect_headers", auth)],
            )
            echoes = {name: channel.unary_unary(f"/{tunnel.SERVICE}/Echo") for name, channel in channels.items()}
            for echo in echoes.values():
                for _ in range(100):  # warm up: connections, HTTP/2 settings, TLS
                    echo(b"x" * 32, timeout=10)
            times: dict[str, list[float]] = {name: [] for name in echoes}
            cpu: dict[str, list[float]] = {name: [0.0] * 4 for name in echoes}
            # Interleaved rounds: every path sees the same drift of a shared machine.
            for _ in range(args.rounds):
                for name, echo in echoes.items():
                    before = [process_cpu(process) for process in processes[name]]
                    for _ in range(args.calls // args.rounds):
                        start = time.perf_counter()
                        echo(b"x" * 32, timeout=10)
                        times[name].append(time.perf_counter() - start)
                    for index, (process, was) in enumerate(zip(processes[name], before)):
                        now = process_cpu(process)
                        cpu[name][2 * index] += now[0] - was[0]
                        cpu[name][2 * index + 1] += now[1] - was[1]
            for channel in channels.values():
                channel.close()
        finally:
            for process in all_processes:
                process.kill()
                process.wait()
            for node in (forward, reverse):
                if node is not None:
                    node.close()
            server.stop(None).wait(5)
    direct = statistics.median(times["direct"])
    print(f"gRPC unary round trip, {args.calls} calls per path, one process per node (us):")
    print(f"  {'path':16s} {'median':>7s} {'added':>6s} {'p99':>7s}   CPU per call: F user/sys   R user/sys")
    for name, samples in times.items():
        median = statistics.median(samples)
        p99 = sorted(samples)[min(len(samples) - 1, int(len(samples) * 0.99))]
        per_call = [seconds / len(samples) * 1e6 for seconds in cpu[name]]
        columns = f"{per_call[0]:5.0f}/{per_call[1]:<5.0f}  {per_call[2]:5.0f}/{per_call[3]:<5.0f}" if processes[name] else ""
        print(f"  {name:16s} {median * 1e6:7.0f} {(median - direct) * 1e6:6.0f} {p99 * 1e6:7.0f}   {columns}")


if __name__ == "__main__":
    main()
