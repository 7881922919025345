#!/usr/bin/env python3
"""uTP bulk throughput and 1-byte echo latency over loopback: ours vs libutp.

    .venv/bin/python bench/utp_bulk.py            # the table (well under 2 minutes)
    .venv/bin/python bench/utp_bulk.py --profile  # cProfile of ours->ours, one process
    .venv/bin/python bench/utp_bulk.py --to-libutp 3 --slow-size 8  # only the rows into libutp

Peer roles (JSON lines on stdout; used by this script, and usable from network
namespaces, e.g. by the natlab benches): `--role receive [--bind HOST]`,
`--role echo [--bind HOST]`, `--role send HOST PORT NBYTES [--bind HOST]`;
`--offload` makes them use UDP GSO/GRO; `--congestion NAME` picks the uTP congestion
controller of our peers (default: UtpConfig's, libutp's `ledbat`).

Rows: ours->ours, utp-native->utp-native (libutp under Node, default socket buffers
as the original ran, and with 8 MiB buffers) and both cross pairs; each with sender
and receiver in one process (same-language pairs only) and in two processes. Ours
sending to utp-native runs once per controller: keynode's default (`rate`, what the
proxy uses) and libutp's `ledbat`. Rows with a utp-native receiver on default socket
buffers also print the UDP receive-buffer drops during the row (the system's
RcvbufErrors, /proc/net/snmp). All
at libutp's 1402-byte UDP payload ceiling (1382 payload + 20 header). Receivers
time from the accepted connection to the sender's FIN. Figures are MiB/s (MiB =
2**20 bytes).
"""

from __future__ import annotations

import argparse
import cProfile
import hashlib
import io
import json
import pstats
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import trio  # noqa: E402

from nat import UtpStream, open_endpoint  # noqa: E402
from nat.utp.config import UtpConfig  # noqa: E402
from proxy.tunnel.defaults import DEFAULT_CONGESTION  # noqa: E402

NODE_DIR = ROOT / "tests" / "node"
MIB = 1024 * 1024
CHUNK = b"\x5a" * 65536
RECEIVE_SIZE = 1 << 20
ROW_TIMEOUT = 30.0
LARGE_SOCKBUF = 8 * MIB


# ---- our side, as roles (also run as subprocesses) -----------------------------------


def report(obj: dict[str, Any]) -> None:
    print(json.dumps(obj), flush=True)


async def send_bytes(stream: UtpStream, total: int) -> None:
    left = total
    while left > 0:
        size = min(left, len(CHUNK))
        await stream.send_all(CHUNK if size == len(CHUNK) else CHUNK[:size])
        left -= size
    await stream.send_eof()


async def receive_counting(stream: UtpStream) -> tuple[int, float]:
    started = time.perf_counter()
    count = 0
    while chunk := await stream.receive_some(RECEIVE_SIZE):
        count += len(chunk)
    return count, time.perf_counter() - started


async def role_receive(bind: str, offload: bool) -> None:
    async with open_endpoint(bind, offload=offload) as endpoint:
        report({"event": "listening", "port": endpoint.address[1]})
        stream = await endpoint.accept()
        count, seconds = await receive_counting(stream)
        report({"event": "received", "bytes": count, "seconds": seconds})
        await stream.send_eof()
        with trio.move_on_after(2):
            await stream.aclose()


async def role_send(host: str, port: int, total: int, bind: str, offload: bool, congestion: str | None) -> None:
    config = UtpConfig(congestion=congestion) if congestion is not None else None
    async with open_endpoint(bind, offload=offload, config=config) as endpoint:
        stream = await endpoint.connect((host, port))
        await send_bytes(stream, total)
        with trio.move_on_after(10):
            while await stream.receive_some():
                pass
            await stream.aclose()
        report({"event": "sent"})


async def role_echo(bind: str, offload: bool) -> None:
    """Echo one connection to its EOF, then report sha256 of what passed through."""
    async with open_endpoint(bind, offload=offload) as endpoint:
        report({"event": "listening", "host": endpoint.address[0], "port": endpoint.address[1]})
        stream = await endpoint.accept()
        digest = hashlib.sha256()
        count = 0
        while chunk := await stream.receive_some(RECEIVE_SIZE):
            digest.update(chunk)
            count += len(chunk)
            await stream.send_all(chunk)
        await stream.send_eof()
        report({"event": "echoed", "bytes": count, "sha256": digest.hexdigest()})
        with trio.move_on_after(5):
            await stream.aclose()


async def ours_one_process(total: int, offload: bool = False) -> tuple[int, float]:
    async with open_endpoint(offload=offload) as a, open_endpoint(offload=offload) as b:
        result: list[tuple[int, float]] = []

        async def receiver() -> None:
            stream = await b.accept()
            result.append(await receive_counting(stream))
            await stream.send_eof()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(receiver)
            client = await a.connect(b.address)
            await send_bytes(client, total)
        await client.aclose()
        return result[0]


async def ours_rtt(count: int, address: tuple[str, int] | None = None) -> list[float]:
    """1-byte echo round trips; in-process echo server unless address is given."""
    samples: list[float] = []
    async with open_endpoint() as a, open_endpoint() as b:

        async def echo() -> None:
            stream = await b.accept()
            while chunk := await stream.receive_some():
                await stream.send_all(chunk)

        async with trio.open_nursery() as nursery:
            if address is None:
                nursery.start_soon(echo)
                address = b.address
            client = await a.connect(address)
            for index in range(count + 50):
                started = time.perf_counter()
                await client.send_all(b"x")
                reply = await client.receive_some(1)
                if index >= 50:  # warm-up excluded
                    samples.append((time.perf_counter() - started) * 1e6)
                assert reply == b"x"
            await client.aclose()
            nursery.cancel_scope.cancel()
    return samples


# ---- process plumbing ----------------------------------------------------------------


def node() -> str:
    executable = shutil.which("node")
    if executable is None or not (NODE_DIR / "node_modules" / "utp-native").is_dir():
        sys.exit("Node or tests/node/node_modules/utp-native missing: run `make node`")
    return executable


def spawn(command: list[Any]) -> subprocess.Popen[str]:
    process = subprocess.Popen([str(part) for part in command], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    # Bound every peer: a hung one is killed, which ends its readline() below.
    watchdog = threading.Timer(ROW_TIMEOUT, process.kill)
    watchdog.daemon = True
    watchdog.start()
    return process


def read_event(process: subprocess.Popen[str], deadline: float) -> dict[str, Any]:
    assert process.stdout is not None
    line = process.stdout.readline()
    if not line or time.monotonic() > deadline:
        raise RuntimeError(f"{process.args} exited ({process.wait()}) or timed out")
    event = json.loads(line)
    if event.get("event") == "error":
        raise RuntimeError(f"{process.args}: {event}")
    return event


def python_role(*args: object) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), "--role", *map(str, args)]


def node_script(*args: object) -> list[str]:
    return [node(), str(NODE_DIR / "utp_bulk.js"), *map(str, args)]


def two_processes(receiver: list[str], sender_of_port: Any) -> tuple[int, float]:
    deadline = time.monotonic() + ROW_TIMEOUT
    processes = [spawn(receiver)]
    try:
        listening = read_event(processes[0], deadline)
        processes.append(spawn(sender_of_port(listening["port"])))
        with_alarm = read_event(processes[0], deadline)  # "received"
        return int(with_alarm["bytes"]), float(with_alarm["seconds"])
    finally:
        for process in processes:
            process.kill()
            process.wait()


def node_one_process(total: int, sockbuf: int) -> tuple[int, float]:
    process = spawn(node_script("local", total, sockbuf))
    try:
        event = read_event(process, time.monotonic() + ROW_TIMEOUT)
        return int(event["bytes"]), float(event["seconds"])
    finally:
        process.kill()
        process.wait()


def node_rtt(count: int) -> list[float]:
    process = spawn(node_script("rtt", count + 50))
    try:
        return list(read_event(process, time.monotonic() + ROW_TIMEOUT)["microseconds"])[50:]
    finally:
        process.kill()
        process.wait()


def node_echo_rtt(count: int) -> list[float]:
    process = spawn([node(), str(NODE_DIR / "utp_echo_server.js"), "127.0.0.1", 0])
    try:
        port = read_event(process, time.monotonic() + ROW_TIMEOUT)["port"]
        return trio.run(ours_rtt, count, ("127.0.0.1", port))
    finally:
        process.kill()
        process.wait()


# ---- the table ----------------------------------------------------------------------


def rcvbuf_errors() -> int:
    """The system's UDP receive-buffer drops so far (/proc/net/snmp; -1: unknown)."""
    try:
        lines = [line.split() for line in Path("/proc/net/snmp").read_text().splitlines() if line.startswith("Udp:")]
        return int(lines[1][lines[0].index("RcvbufErrors")])
    except (OSError, IndexError, ValueError):
        return -1


def rate(result: tuple[int, float], expected: int) -> str:
    count, seconds = result
    if count != expected:
        return f"FAILED ({count} of {expected} bytes)"
    return f"{count / MIB / seconds:8.1f}"


def native_to_native(size_native: int, size_slow: int, one: str = "n/a") -> tuple[str, str, str, int]:
    """The original: utp-native to utp-native in two processes, default socket buffers."""
    drops = rcvbuf_errors()
    two = rate(
        two_processes(
            node_script("receive", 0),
            lambda port: node_script("send", "127.0.0.1", port, size_slow, 0),
        ),
        size_slow,
    )
    return f"utp-native -> utp-native ({size_native // MIB}/{size_slow // MIB} MiB)", one, two, rcvbuf_errors() - drops


def ours_to_native(size: int, congestion: str) -> tuple[str, str, str, int]:
    """Ours sending to a utp-native receiver on default socket buffers."""
    drops = rcvbuf_errors()
    two = rate(
        two_processes(
            node_script("receive", 0),
            lambda port: python_role("send", "127.0.0.1", port, size, "--congestion", congestion),
        ),
        size,
    )
    label = f"{congestion}, default" if congestion == DEFAULT_CONGESTION else congestion
    return f"ours ({label}) -> utp-native ({size // MIB} MiB)", "n/a", two, rcvbuf_errors() - drops


def run_table(size_ours: int, size_native: int, size_native_slow: int, rtt_count: int) -> None:
    rows: list[tuple[str, str, str]] = []

    def row(name: str, one: str, two: str, drops: int | None = None) -> None:
        rows.append((name, one, two))
        dropped = f"{drops:>10}" if drops is not None else ""
        print(f"  {name:<44} {one:>12} {two:>12}{dropped}", flush=True)

    print(f"uTP bulk over loopback, MiB/s (1402-byte datagrams); python {sys.version.split()[0]}")
    print(f"  {'sender -> receiver':<44} {'1 process':>12} {'2 processes':>12} {'drops':>9}")
    one = rate(trio.run(ours_one_process, size_ours), size_ours)
    two = rate(
        two_processes(python_role("receive"), lambda port: python_role("send", "127.0.0.1", port, size_ours)),
        size_ours,
    )
    row(f"ours -> ours ({size_ours // MIB} MiB)", one, two)
    one = rate(trio.run(ours_one_process, size_ours, True), size_ours)
    two = rate(
        two_processes(
            python_role("receive", "--offload"),
            lambda port: python_role("send", "127.0.0.1", port, size_ours, "--offload"),
        ),
        size_ours,
    )
    row(f"ours -> ours, UDP GSO/GRO ({size_ours // MIB} MiB)", one, two)
    one = rate(node_one_process(size_native, 0), size_native)
    row(*native_to_native(size_native, size_native_slow, one))
    one = rate(node_one_process(size_native, LARGE_SOCKBUF), size_native)
    two = rate(
        two_processes(
            node_script("receive", LARGE_SOCKBUF),
            lambda port: node_script("send", "127.0.0.1", port, size_native, LARGE_SOCKBUF),
        ),
        size_native,
    )
    row(f"utp-native, 8 MiB sockbufs ({size_native // MIB} MiB)", one, two)
    for congestion in (DEFAULT_CONGESTION, "ledbat"):
        row(*ours_to_native(size_native_slow, congestion))
    two = rate(
        two_processes(
            python_role("receive"),
            lambda port: node_script("send", "127.0.0.1", port, size_native, 0),
        ),
        size_native,
    )
    row(f"utp-native -> ours ({size_native // MIB} MiB)", "n/a", two)

    print(f"\n1-byte echo round trip, microseconds ({rtt_count} samples)")
    print(f"  {'client -> echo server':<44} {'median':>12} {'p99':>12}")
    for name, samples in (
        ("ours -> ours (1 process)", trio.run(ours_rtt, rtt_count)),
        ("utp-native -> utp-native (1 process)", node_rtt(rtt_count)),
        ("ours -> utp-native (2 processes)", node_echo_rtt(rtt_count)),
    ):
        samples.sort()
        p99 = samples[min(len(samples) - 1, int(len(samples) * 0.99))]
        print(f"  {name:<44} {statistics.median(samples):12.0f} {p99:12.0f}", flush=True)


def run_to_libutp(size: int, repeat: int) -> None:
    """Only the rows with a utp-native receiver on default socket buffers (the
    original's 208 KiB), ``repeat`` rounds in turn: original -> original, ours
    with the default controller, ours with ledbat."""
    print(f"to a utp-native receiver, default socket buffers, 2 processes, {size // MIB} MiB, MiB/s")
    print(f"  {'sender -> receiver':<44} {'MiB/s':>12} {'drops':>9}")
    for _ in range(repeat):
        for name, _one, two, drops in (
            native_to_native(size, size),
            ours_to_native(size, DEFAULT_CONGESTION),
            ours_to_native(size, "ledbat"),
        ):
            print(f"  {name:<44} {two:>12} {drops:>9}", flush=True)


def run_profile(total: int, offload: bool) -> None:
    profiler = cProfile.Profile()
    profiler.enable()
    count, seconds = trio.run(ours_one_process, total, offload)
    profiler.disable()
    print(f"ours -> ours, one process, under cProfile: {count / MIB / seconds:.1f} MiB/s")
    out = io.StringIO()
    stats = pstats.Stats(profiler, stream=out)
    stats.sort_stats("tottime").print_stats(25)
    print(out.getvalue())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--role", nargs="+", help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, default=64, help="MiB for fast rows (default 64)")
    parser.add_argument("--slow-size", type=int, default=16, help="MiB for default-buffer libutp rows")
    parser.add_argument("--rtt-count", type=int, default=2000)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument(
        "--to-libutp",
        type=int,
        metavar="ROUNDS",
        help="only the rows sending to utp-native on default buffers, ROUNDS times (--slow-size MiB)",
    )
    parser.add_argument(
        "--offload",
        action="store_true",
        help="--role peers and --profile use UDP GSO/GRO (open_endpoint(offload=True))",
    )
    parser.add_argument("--congestion", help="--role send: our uTP congestion controller (default: UtpConfig's)")
    parser.add_argument(
        "--bind",
        default="127.0.0.1",
        help="address the --role peers bind (e.g. inside a network namespace)",
    )
    args = parser.parse_args()
    if args.role:
        role, *rest = args.role
        if role == "receive":
            trio.run(role_receive, args.bind, args.offload)
        elif role == "echo":
            trio.run(role_echo, args.bind, args.offload)
        elif role == "send":
            trio.run(role_send, rest[0], int(rest[1]), int(rest[2]), args.bind, args.offload, args.congestion)
        else:
            sys.exit(f"unknown role {role}")
        return
    if args.profile:
        run_profile(args.size * MIB, args.offload)
        return
    if args.to_libutp:
        run_to_libutp(args.slow_size * MIB, args.to_libutp)
        return
    started = time.monotonic()
    run_table(args.size * MIB, args.size * MIB, args.slow_size * MIB, args.rtt_count)
    print(f"\n(total {time.monotonic() - started:.0f} s)")


if __name__ == "__main__":
    main()
