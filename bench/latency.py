#!/usr/bin/env python3
"""Latency, stage by stage, two processes (an echo server process and this one).

    .venv/bin/python bench/latency.py [--count 2000] [--connects 100] [--stages ...]

Each stage adds one layer, so the difference between rows is what that layer costs:

- ``udp``: bare UDP 1-byte ping-pong in trio, with the endpoint's drain pattern
  (plain non-blocking recvfrom, ``wait_readable`` only when it would block);
- ``tcp``: trio TCP 1-byte echo (trio SocketStream, TCP_NODELAY);
- ``utp``: our uTP 1-byte echo (UtpStream over nat.open_endpoint);
- ``tls``: 1-byte echo through TLS 1.3 over our uTP;
- ``inproc``: the uTP and TLS-over-uTP echoes with both ends in this process (no
  cross-process wake-ups: the sum of both sides' CPU per round trip, a steadier
  figure on a busy machine);
- ``connect``: uTP connect (SYN -> connected) and the TLS handshake over it,
  timed separately, each connection fresh.

Figures are microseconds: median and p99 (round trips exclude a 50-round warm-up).
"""

from __future__ import annotations

import argparse
import functools
import json
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import trio  # noqa: E402

from nat import open_endpoint  # noqa: E402

WARMUP = 50
STAGES = ("udp", "tcp", "utp", "tls", "connect", "inproc")


def report(obj: dict[str, Any]) -> None:
    print(json.dumps(obj), flush=True)


# ---- the echo server process ------------------------------------------------------


async def udp_echo_server(task_status: trio.TaskStatus[int]) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.setblocking(False)
    task_status.started(sock.getsockname()[1])
    with sock:
        while True:
            try:
                data, addr = sock.recvfrom(2048)
            except BlockingIOError:
                await trio.lowlevel.wait_readable(sock)
                continue
            sock.sendto(data, addr)


async def tcp_echo(stream: trio.SocketStream) -> None:
    while data := await stream.receive_some(65536):
        await stream.send_all(data)


async def serve(offload: bool) -> None:
    from proxy.identity.tls_config import TLSConfig
    from proxy.tls import TLSStream

    tls_config = TLSConfig.generate()
    async with trio.open_nursery() as nursery:
        udp_port = await nursery.start(udp_echo_server)
        listeners = await nursery.start(functools.partial(trio.serve_tcp, tcp_echo, 0, host="127.0.0.1"))
        tcp_port = listeners[0].socket.getsockname()[1]
        async with open_endpoint(offload=offload) as plain, open_endpoint(offload=offload) as tls:

            async def echo_plain(stream: Any) -> None:
                async with stream:
                    while data := await stream.receive_some():
                        await stream.send_all(data)

            async def echo_tls(transport: Any) -> None:
                stream = TLSStream(transport, tls_config, server_side=True)
                async with stream:
                    try:
                        while data := await stream.receive_some():
                            await stream.send_all(data)
                    except trio.BrokenResourceError:
                        pass  # the client aborted (connect rows close at once)

            async def accept_loop(endpoint: Any, handler: Any) -> None:
                while True:
                    stream = await endpoint.accept()
                    nursery.start_soon(handler, stream)

            nursery.start_soon(accept_loop, plain, echo_plain)
            nursery.start_soon(accept_loop, tls, echo_tls)
            report({"udp": udp_port, "tcp": tcp_port, "utp": plain.address[1], "tls": tls.address[1]})
            await trio.to_thread.run_sync(sys.stdin.read, abandon_on_cancel=True)
            nursery.cancel_scope.cancel()


# ---- the measuring side --------------------------------------------------------------


CPU_PER_ROUND: list[float] = []  # client CPU us per round trip of the last stage


def summary(samples: list[float], cpu: bool = False) -> str:
    ordered = sorted(samples)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    text = f"median {statistics.median(ordered):8.1f}  p99 {p99:8.1f}  (n={len(ordered)})"
    if cpu and CPU_PER_ROUND:
        text += f"  client CPU {CPU_PER_ROUND[-1]:.1f} us/round"
    return text


async def udp_round_trips(port: int, count: int) -> list[float]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setblocking(False)
    sock.connect(("127.0.0.1", port))
    samples = []
    cpu_started = 0.0
    with sock:
        for index in range(count + WARMUP):
            if index == WARMUP:
                cpu_started = time.process_time()
            started = time.perf_counter_ns()
            sock.send(b"x")
            while True:
                try:
                    reply = sock.recv(2048)
                    break
                except BlockingIOError:
                    await trio.lowlevel.wait_readable(sock)
            if index >= WARMUP:
                samples.append((time.perf_counter_ns() - started) / 1000)
            assert reply == b"x"
    CPU_PER_ROUND.append((time.process_time() - cpu_started) / count * 1e6)
    return samples


async def stream_round_trips(stream: Any, count: int) -> list[float]:
    samples = []
    cpu_started = 0.0
    for index in range(count + WARMUP):
        if index == WARMUP:
            cpu_started = time.process_time()
        started = time.perf_counter_ns()
        await stream.send_all(b"x")
        reply = await stream.receive_some(1)
        if index >= WARMUP:
            samples.append((time.perf_counter_ns() - started) / 1000)
        assert reply == b"x"
    CPU_PER_ROUND.append((time.process_time() - cpu_started) / count * 1e6)
    return samples


async def measure(ports: dict[str, int], stages: list[str], count: int, connects: int, offload: bool) -> None:
    from proxy.identity.tls_config import TLSConfig
    from proxy.tls import TLSStream

    tls_config = TLSConfig.generate()
    if "udp" in stages:
        print(f"udp  1-byte ping-pong (us)  {summary(await udp_round_trips(ports['udp'], count), cpu=True)}", flush=True)
    if "tcp" in stages:
        stream = await trio.open_tcp_stream("127.0.0.1", ports["tcp"])
        async with stream:
            print(f"tcp  1-byte echo (us)       {summary(await stream_round_trips(stream, count), cpu=True)}", flush=True)
    async with open_endpoint(offload=offload) as endpoint:
        if "utp" in stages:
            stream = await endpoint.connect(("127.0.0.1", ports["utp"]))
            async with stream:
                print(f"utp  1-byte echo (us)       {summary(await stream_round_trips(stream, count), cpu=True)}", flush=True)
        if "tls" in stages:
            transport = await endpoint.connect(("127.0.0.1", ports["tls"]))
            stream = TLSStream(transport, tls_config, server_side=False)
            async with stream:
                await stream.do_handshake()
                print(f"tls  1-byte echo over utp   {summary(await stream_round_trips(stream, count), cpu=True)}", flush=True)
        if "connect" in stages:
            utp_times, tls_times = [], []
            for _ in range(connects):
                started = time.perf_counter_ns()
                transport = await endpoint.connect(("127.0.0.1", ports["tls"]))
                connected = time.perf_counter_ns()
                stream = TLSStream(transport, tls_config, server_side=False)
                await stream.do_handshake()
                done = time.perf_counter_ns()
                utp_times.append((connected - started) / 1000)
                tls_times.append((done - connected) / 1000)
                await stream.aclose()
            print(f"utp  connect (us)           {summary(utp_times)}", flush=True)
            print(f"tls  handshake over utp     {summary(tls_times)}", flush=True)


async def measure_in_process(count: int, offload: bool) -> None:
    from proxy.identity.tls_config import TLSConfig
    from proxy.tls import TLSStream

    tls_config = TLSConfig.generate()
    async with open_endpoint(offload=offload) as client_end, open_endpoint(offload=offload) as server_end:
        for use_tls in (False, True):
            async with trio.open_nursery() as nursery:

                async def echo(use_tls: bool = use_tls) -> None:
                    stream: Any = await server_end.accept()
                    if use_tls:
                        stream = TLSStream(stream, tls_config, server_side=True)
                    async with stream:
                        while data := await stream.receive_some():
                            await stream.send_all(data)

                nursery.start_soon(echo)
                client: Any = await client_end.connect(server_end.address)
                if use_tls:
                    client = TLSStream(client, tls_config, server_side=False)
                    await client.do_handshake()
                samples = await stream_round_trips(client, count)
                name = "tls  echo, one process   " if use_tls else "utp  echo, one process   "
                print(f"{name}  {summary(samples, cpu=True)}", flush=True)
                await client.send_eof()
                await client.receive_some()
                await client.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--count", type=int, default=2000)
    parser.add_argument("--connects", type=int, default=100)
    parser.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES))
    parser.add_argument("--offload", action="store_true", help="endpoints use UDP GSO/GRO")
    args = parser.parse_args()
    if args.serve:
        trio.run(serve, args.offload)
        return
    if args.stages == ["inproc"]:
        trio.run(measure_in_process, args.count, args.offload)
        return
    command = [sys.executable, __file__, "--serve"] + (["--offload"] if args.offload else [])
    server = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None
        line = server.stdout.readline()
        if not line:
            raise RuntimeError("echo server process failed to start")
        ports = json.loads(line)
        trio.run(measure, ports, args.stages, args.count, args.connects, args.offload)
        if "inproc" in args.stages:
            trio.run(measure_in_process, args.count, args.offload)
    finally:
        assert server.stdin is not None
        server.stdin.close()
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


if __name__ == "__main__":
    main()
