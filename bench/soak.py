"""Soak: many sequential tunnels between one pair of nodes, each node in its own process.

    .venv/bin/python bench/soak.py [--tunnels 500] [--rounds 200] [--mib 8] [--seconds S]

Processes: this one (the TCP server behind node B and the client) and two keynode
nodes: A (forward side, the CONNECT port) and B (reverse side, server = the TCP
server here). One tunnel at a time, each a fresh CONNECT through A (uTP + TLS
from A to B, then B dials the server):
- ``--rounds`` request/response rounds of 64 bytes (the server answers each
  request reversed);
- then ``--mib`` MiB of random bytes, answered with their sha256, checked;
- then the client closes and the server closes on EOF (``--server-closes-first``:
  the server closes right after its answer and the client on EOF).

Prints progress, every failure (HTTP status or what broke, and the lines each node
logged meanwhile), RSS and open fds of both nodes at start and end (from
/proc/<pid>/status and /proc/<pid>/fd), each node's uTP counters (RESETs,
unknown connection ids, dropped SYNs, retransmissions) and a final summary line.
Stops after ``--tunnels`` tunnels or ``--seconds`` seconds, whichever comes first.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import trio

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TOKEN = "soak-token"

from _node_process import ConnectFailed, NodeProcess, run_node  # noqa: E402  (bench/ is on sys.path)
from _node_process import connect_through as connect_to  # noqa: E402

ROUND_SIZE = 64


# --- a node process ------------------------------------------------------------------


def node_main(server_port: int | None) -> None:
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s.%(msecs)03d %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    trio.run(run_node, server_port, TOKEN)


class Node(NodeProcess):
    """A keynode node in a child process; its log goes to a file we read on failures."""

    def __init__(self, name: str, server_port: int | None, log_dir: Path) -> None:
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        self._log = open(self.log_path, "wb")
        super().__init__(__file__, server_port, stderr=self._log)

    def log_offset(self) -> int:
        return self.log_path.stat().st_size

    def log_since(self, offset: int) -> list[str]:
        with open(self.log_path, "rb") as log:
            log.seek(offset)
            return log.read().decode(errors="replace").splitlines()

    def resources(self) -> tuple[float, int]:
        """(RSS in MiB, open fds) of the node process."""
        rss_kib = 0
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                rss_kib = int(line.split()[1])
        return rss_kib / 1024, len(os.listdir(f"/proc/{self.process.pid}/fd"))

    def close(self) -> None:
        super().close()
        self._log.close()


# --- the server behind node B ---------------------------------------------------------------


class Reader:
    """Exact-size reads from a trio stream."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.buffer = bytearray()

    async def exactly(self, size: int) -> bytes:
        while len(self.buffer) < size:
            data = await self.stream.receive_some(1 << 16)
            if not data:
                raise EOFError(f"EOF after {len(self.buffer)} of {size} bytes")
            self.buffer += data
        out = bytes(self.buffer[:size])
        del self.buffer[:size]
        return out

    async def digest(self, size: int) -> bytes:
        digest = hashlib.sha256()
        while size:
            if not self.buffer:
                data = await self.stream.receive_some(1 << 18)
                if not data:
                    raise EOFError(f"EOF with {size} bytes missing")
                self.buffer += data
            take = min(size, len(self.buffer))
            digest.update(memoryview(self.buffer)[:take])
            del self.buffer[:take]
            size -= take
        return digest.digest()


async def serve(stream: trio.SocketStream, wait_for_eof: bool = True) -> None:
    """rounds (4 bytes), each round 64 bytes answered reversed; size (8 bytes), the
    bytes, answered with their sha256; then (wait for EOF and) close."""
    reader = Reader(stream)
    try:
        rounds = int.from_bytes(await reader.exactly(4), "big")
        for _ in range(rounds):
            await stream.send_all((await reader.exactly(ROUND_SIZE))[::-1])
        size = int.from_bytes(await reader.exactly(8), "big")
        await stream.send_all(await reader.digest(size))
        while wait_for_eof and await stream.receive_some(1 << 16):
            pass
    except (EOFError, trio.BrokenResourceError, trio.ClosedResourceError):
        pass  # the client's side of the story is the one that counts
    finally:
        await stream.aclose()


# --- the client -------------------------------------------------------------------------------


class TunnelFailed(Exception):
    def __init__(self, stage: str, detail: str, status: int | None = None) -> None:
        super().__init__(f"{stage}: {detail}")
        self.stage, self.detail, self.status = stage, detail, status


async def connect_through(forward_port: int, target: str) -> tuple[trio.SocketStream, bytes]:
    try:
        return await connect_to(forward_port, target, TOKEN)
    except ConnectFailed as error:
        raise TunnelFailed("connect", str(error), error.status) from None


async def one_tunnel(forward_port: int, target: str, rounds: int, payload: bytes, expected: bytes, wait_for_eof: bool) -> None:
    stream, early = await connect_through(forward_port, target)
    async with stream:
        reader = Reader(stream)
        reader.buffer += early
        stage = "rounds"
        try:
            await stream.send_all(rounds.to_bytes(4, "big"))
            for index in range(rounds):
                request = index.to_bytes(4, "big") * (ROUND_SIZE // 4)
                await stream.send_all(request)
                if await reader.exactly(ROUND_SIZE) != request[::-1]:
                    raise TunnelFailed(stage, f"round {index}: wrong answer")
            stage = "bulk"
            await stream.send_all(len(payload).to_bytes(8, "big"))
            await stream.send_all(payload)
            if await reader.exactly(32) != expected:
                raise TunnelFailed(stage, "sha256 mismatch")
            if wait_for_eof and (reader.buffer or await stream.receive_some(1 << 16)):
                raise TunnelFailed("close", "bytes after the answer")
        except (EOFError, OSError, trio.BrokenResourceError, trio.ClosedResourceError) as error:
            raise TunnelFailed(stage, f"{type(error).__name__}: {error}") from error


def resources_line(nodes: list[Node]) -> str:
    parts = []
    for node in nodes:
        rss, fds = node.resources()
        parts.append(f"{node.name} RSS {rss:.1f} MiB fds {fds}")
    return ", ".join(parts)


async def soak(args: argparse.Namespace) -> int:
    log_dir = Path(tempfile.mkdtemp(prefix="keynode-soak-"))
    failures: list[tuple[int, TunnelFailed]] = []
    async with trio.open_nursery() as nursery:
        handler = partial(serve, wait_for_eof=not args.server_closes_first)
        listeners = await nursery.start(partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
        server_port = listeners[0].socket.getsockname()[1]
        forward = await trio.to_thread.run_sync(Node, "A", None, log_dir)
        reverse = await trio.to_thread.run_sync(Node, "B", server_port, log_dir)
        nodes = [forward, reverse]
        target = reverse.target()
        size = args.mib << 20
        block = os.urandom(size)
        print(
            f"soak: up to {args.tunnels} tunnels, {args.rounds} rounds + {args.mib} MiB each"
            + (f", at most {args.seconds:.0f} s" if args.seconds else "")
            + f"; node logs in {log_dir}",
            flush=True,
        )
        start_resources = resources_line(nodes)
        print(f"start: {start_resources}", flush=True)
        started = time.monotonic()
        last_progress = started
        done = 0
        try:
            for index in range(args.tunnels):
                if args.seconds and time.monotonic() - started >= args.seconds:
                    break
                # Each tunnel sends different bytes: the tunnel's number, then the block.
                payload = index.to_bytes(8, "big") + block[8:]
                expected = hashlib.sha256(payload).digest()
                offsets = [node.log_offset() for node in nodes]
                try:
                    with trio.fail_after(args.tunnel_timeout):
                        await one_tunnel(forward.forward_port, target, args.rounds, payload, expected, args.server_closes_first)
                except Exception as error:  # every failure is counted and reported, none ends the soak
                    if isinstance(error, TunnelFailed):
                        failure = error
                    elif isinstance(error, trio.TooSlowError):
                        failure = TunnelFailed("tunnel", f"not done within {args.tunnel_timeout:g} s")
                    else:
                        failure = TunnelFailed("tunnel", f"{type(error).__name__}: {error}")
                    failures.append((index, failure))
                    await trio.sleep(0.5)  # let the nodes finish logging
                    status = f"HTTP {failure.status}" if failure.status else "no HTTP status"
                    print(f"FAIL tunnel {index}: {failure} ({status})", flush=True)
                    for node, offset in zip(nodes, offsets):
                        lines = node.log_since(offset)
                        print(f"  node {node.name} logged {len(lines)} line(s)" + (":" if lines else ""), flush=True)
                        for line in lines[-20:]:
                            print(f"    {line}", flush=True)
                done += 1
                now = time.monotonic()
                if now - last_progress >= args.progress:
                    last_progress = now
                    rate = done / (now - started)
                    print(f"{done} tunnels, {len(failures)} failed, {rate:.2f}/s, {resources_line(nodes)}", flush=True)
        except KeyboardInterrupt:
            print("interrupted", flush=True)
        elapsed = time.monotonic() - started
        end_resources = resources_line(nodes)
        await trio.to_thread.run_sync(forward.close)
        await trio.to_thread.run_sync(reverse.close)
        nursery.cancel_scope.cancel()
    print(f"start: {start_resources}")
    print(f"end:   {end_resources}")
    for node in nodes:
        utp = node.counters.get("utp", {})
        endpoint = node.counters.get("endpoint", {})
        keys = (
            "connections_opened",
            "connections_accepted",
            "resets_sent",
            "resets_received",
            "resets_suppressed",
            "resets_ignored",
            "unknown_connection",
            "syn_dropped",
            "syn_rate_limited",
            "duplicate_syn",
            "invalid_ack",
            "retransmits",
            "timeouts",
        )
        shown = " ".join(f"{key}={utp[key]}" for key in keys if key in utp)
        print(f"node {node.name} uTP: {shown} send_dropped={endpoint.get('send_dropped', '?')} "
              f"handler_errors={endpoint.get('handler_errors', '?')}")
    statuses: dict[str, int] = {}
    for _, failure in failures:
        key = str(failure.status) if failure.status else failure.stage
        statuses[key] = statuses.get(key, 0) + 1
    by_kind = ", ".join(f"{key}: {count}" for key, count in sorted(statuses.items())) or "none"
    print(
        f"soak: {done} tunnels in {elapsed:.0f} s ({done / elapsed if elapsed else 0:.2f}/s), "
        f"{len(failures)} failed ({by_kind}); {end_resources}"
    )
    return 1 if failures else 0


def main() -> None:
    if len(sys.argv) >= 2 and sys.argv[1] == "node":
        node_main(int(sys.argv[2]) if len(sys.argv) > 2 else None)
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tunnels", type=int, default=500, help="sequential tunnels (default 500)")
    parser.add_argument("--rounds", type=int, default=200, help="request/response rounds per tunnel (default 200)")
    parser.add_argument("--mib", type=int, default=8, help="MiB sent and sha256-checked per tunnel (default 8)")
    parser.add_argument("--seconds", type=float, default=0, help="stop after this long (default: no limit)")
    parser.add_argument("--server-closes-first", action="store_true", help="the server closes after its answer")
    parser.add_argument("--tunnel-timeout", type=float, default=60, help="bound on one tunnel (default 60 s)")
    parser.add_argument("--progress", type=float, default=10, help="seconds between progress lines (default 10)")
    args = parser.parse_args()
    sys.exit(trio.run(soak, args))


if __name__ == "__main__":
    main()
