"""The TCP relay (proxy.relay), one process per role: the relay hop alone, a uTP +
TLS tunnel relayed against the same tunnel direct, the relay's CPU per GiB and its
memory per idle relayed pair.

Rows (printed side by side in one run):
- relay hop: RelayLink -> relay -> RelayLink, datagrams of --datagram bytes (and of
  16 KiB), MiB/s of datagram payload at the receiver, relay CPU s per GiB forwarded,
  the relay's drops (queue_full: the receiving link fell behind the sender);
- tunnel direct / relayed: uTP + TLS 1.3 (TLSStream over UtpStream, as the tunnel),
  --mib MiB one way, MiB/s at the receiver; relayed: both endpoints send only over
  the relay (nat virtual paths, proxy.relay.paths), relay CPU s per GiB;
- idle pairs: relay RSS growth per pair of registered links that exchanged one
  datagram each way (--pairs pairs).

Relay limits are raised for the bulk rows (the defaults hold a NodeId to 8 MiB/s).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import trio

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from nat.endpoint import open_endpoint  # noqa: E402
from proxy.identity.node_id import NodeId  # noqa: E402
from proxy.identity.tls_config import TLSConfig  # noqa: E402
from proxy.relay.limits import RelayLimits  # noqa: E402
from proxy.relay.link import RelayLink  # noqa: E402
from proxy.relay.paths import RelayPaths  # noqa: E402
from proxy.relay.serve import serve_relay  # noqa: E402
from proxy.tls import TLSStream  # noqa: E402

ROW_TIMEOUT = 300.0
CHUNK = 256 * 1024
BULK_LIMITS = RelayLimits(rate=1 << 34, burst=64 << 20, queue_bytes=8 << 20, queue_frames=8192)


def report(obj: dict[str, Any]) -> None:
    print(json.dumps(obj), flush=True)


def rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def cpu_seconds() -> tuple[float, float]:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime, usage.ru_stime


# ---- roles (each its own process) -----------------------------------------------------


async def role_relay(bulk: bool) -> None:
    config = TLSConfig.generate()
    async with trio.open_nursery() as nursery:
        server = await nursery.start(lambda task_status: serve_relay(
            config, host="127.0.0.1", limits=BULK_LIMITS if bulk else RelayLimits(), task_status=task_status))
        report({"event": "ready", "address": f"{config.node_id}@127.0.0.1:{server.port}"})
        while True:
            line = await trio.to_thread.run_sync(sys.stdin.readline)
            if not line or line.strip() == "quit":
                break
            stats = server.core.stats
            report({"event": "stats", "cpu": cpu_seconds(), "rss_kib": rss_kib(), "clients": server.core.client_count,
                    "bytes_forwarded": stats.bytes_forwarded, "frames_forwarded": stats.frames_forwarded,
                    "drops": dict(stats.drops)})
        nursery.cancel_scope.cancel()


async def linked(nursery: trio.Nursery, relay: str, config: TLSConfig, **options: Any) -> RelayLink:
    link = RelayLink(config, relay, **options)
    await nursery.start(link.run)
    with trio.fail_after(30):
        await link.wait_registered()
    return link


async def role_hop_receiver(relay: str, total: int) -> None:
    config = TLSConfig.generate()
    received = [0, 0.0, 0.0]  # bytes, first, last
    done = trio.Event()

    def on_batch(batch: list[tuple[NodeId, bytes]]) -> None:
        now = time.perf_counter()
        if not received[0]:
            received[1] = now
        received[0] += sum(len(datagram) for _, datagram in batch)
        received[2] = now
        if received[0] >= total:
            done.set()

    async with trio.open_nursery() as nursery:
        await linked(nursery, relay, config, on_receive_batch=on_batch)
        report({"event": "ready", "node_id": str(config.node_id)})
        with trio.move_on_after(ROW_TIMEOUT):
            while not done.is_set():
                last = received[0]
                with trio.move_on_after(2.0):
                    await done.wait()
                if received[0] == last and last:
                    break  # nothing more is coming (the rest was dropped)
        report({"event": "received", "bytes": received[0], "seconds": received[2] - received[1]})
        nursery.cancel_scope.cancel()


async def role_hop_sender(relay: str, destination: str, total: int, size: int) -> None:
    config = TLSConfig.generate()
    target = NodeId.decode(destination)
    datagram = os.urandom(size)
    async with trio.open_nursery() as nursery:
        link = await linked(nursery, relay, config, queue_bytes=8 << 20)
        sent = 0
        while sent < total:
            if link.output_pending > 2 << 20:
                await trio.sleep(0)
                continue
            for _ in range(64):
                if link.send(target, datagram):
                    sent += size
            await trio.sleep(0)
        while link.output_pending:
            await trio.sleep(0.01)
        report({"event": "sent", "bytes": sent, "drops": dict(link.drops)})
        await trio.sleep_forever()


async def role_tunnel_receiver(relay: str | None) -> None:
    config = TLSConfig.generate()
    async with open_endpoint("127.0.0.1") as endpoint, trio.open_nursery() as nursery:
        if relay:
            RelayPaths(endpoint, await linked(nursery, relay, config))
        report({"event": "ready", "node_id": str(config.node_id), "port": endpoint.address[1]})
        utp = await endpoint.accept()
        tls = TLSStream(utp, config, server_side=True, alpn=(b"keynode/1",))
        await tls.do_handshake()
        started = time.perf_counter()
        size = 0
        while chunk := await tls.receive_some(CHUNK):
            size += len(chunk)
        seconds = time.perf_counter() - started
        await tls.aclose()
        report({"event": "received", "bytes": size, "seconds": seconds,
                "socket_datagrams_sent": endpoint.stats.datagrams_sent})
        nursery.cancel_scope.cancel()


async def role_tunnel_sender(relay: str | None, destination: str, port: int, total: int) -> None:
    config = TLSConfig.generate()
    data = os.urandom(CHUNK)
    async with open_endpoint("127.0.0.1") as endpoint, trio.open_nursery() as nursery:
        if relay:
            paths = RelayPaths(endpoint, await linked(nursery, relay, config))
            utp = await endpoint.connect(paths.path_to(NodeId.decode(destination)))
        else:
            utp = await endpoint.connect(("127.0.0.1", port))
        tls = TLSStream(utp, config, server_side=False, alpn=(b"keynode/1",))
        await tls.do_handshake()
        for _ in range(total // CHUNK):
            await tls.send_all(data)
        await tls.send_eof()
        while await tls.receive_some(CHUNK):
            pass
        report({"event": "sent"})
        nursery.cancel_scope.cancel()


async def role_idle_pairs(relay: str, pairs: int) -> None:
    async with trio.open_nursery() as nursery:
        received: list[int] = [0]
        links = []
        for _ in range(2 * pairs):
            config = TLSConfig.generate()
            links.append((config, await linked(
                nursery, relay, config, on_receive=lambda source, data: received.__setitem__(0, received[0] + 1))))
        for (a_config, a), (b_config, b) in zip(links[::2], links[1::2], strict=True):
            a.send(b_config.node_id, b"hello")
            b.send(a_config.node_id, b"hello")
        with trio.fail_after(60):
            while received[0] < 2 * pairs:
                await trio.sleep(0.01)
        report({"event": "ready"})
        await trio.to_thread.run_sync(sys.stdin.readline)
        nursery.cancel_scope.cancel()


# ---- the runner -----------------------------------------------------------------------


class Process:
    def __init__(self, *args: object) -> None:
        command = [sys.executable, str(Path(__file__).resolve()), "--role", *map(str, args)]
        self.popen = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT)
        watchdog = threading.Timer(ROW_TIMEOUT, self.popen.kill)
        watchdog.daemon = True
        watchdog.start()

    def event(self) -> dict[str, Any]:
        assert self.popen.stdout is not None
        line = self.popen.stdout.readline()
        if not line:
            raise RuntimeError(f"{self.popen.args} exited ({self.popen.wait()})")
        return json.loads(line)  # type: ignore[no-any-return]

    def ask(self, line: str = "stats") -> dict[str, Any]:
        assert self.popen.stdin is not None
        self.popen.stdin.write(line + "\n")
        self.popen.stdin.flush()
        return self.event()

    def stop(self) -> None:
        self.popen.kill()
        self.popen.wait()


def per_gib(before: dict[str, Any], after: dict[str, Any]) -> tuple[float, float]:
    """Relay (user, system) CPU seconds per GiB of datagrams forwarded between two stats."""
    gib = (after["bytes_forwarded"] - before["bytes_forwarded"]) / (1 << 30)
    if not gib:
        return float("nan"), float("nan")
    return (after["cpu"][0] - before["cpu"][0]) / gib, (after["cpu"][1] - before["cpu"][1]) / gib


def cpu_text(user_system: tuple[float, float]) -> str:
    user, system = user_system
    return f"relay CPU {user + system:.2f} s/GiB (user {user:.2f}, sys {system:.2f})"


def run_hop(total: int, size: int) -> dict[str, Any]:
    relay = Process("relay", "bulk")
    processes = [relay]
    try:
        address = relay.event()["address"]
        receiver = Process("hop-receiver", address, total)
        processes.append(receiver)
        destination = receiver.event()["node_id"]
        before = relay.ask()
        processes.append(Process("hop-sender", address, destination, total, size))
        result = receiver.event()
        after = relay.ask()
        return {"mib_s": result["bytes"] / result["seconds"] / (1 << 20), "received": result["bytes"],
                "cpu_per_gib": per_gib(before, after), "drops": after["drops"]}
    finally:
        for process in processes:
            process.stop()


def run_tunnel(total: int, relayed: bool) -> dict[str, Any]:
    processes = []
    try:
        address = ""
        if relayed:
            relay = Process("relay", "bulk")
            processes.append(relay)
            address = relay.event()["address"]
        receiver = Process("tunnel-receiver", address or "-")
        processes.append(receiver)
        ready = receiver.event()
        before = relay.ask() if relayed else None
        processes.append(Process("tunnel-sender", address or "-", ready["node_id"], ready["port"], total))
        result = receiver.event()
        row = {"mib_s": result["bytes"] / result["seconds"] / (1 << 20), "received": result["bytes"],
               "socket_datagrams_sent": result["socket_datagrams_sent"]}
        if relayed and before is not None:
            after = relay.ask()
            row["cpu_per_gib"] = per_gib(before, after)
            row["drops"] = after["drops"]
        return row
    finally:
        for process in processes:
            process.stop()


def run_idle(pairs: int) -> dict[str, Any]:
    relay = Process("relay", "default")
    processes = [relay]
    try:
        address = relay.event()["address"]
        warm = Process("idle-pairs", address, 1)  # imports, first TLS contexts: not per pair
        processes.append(warm)
        warm.event()
        before = relay.ask()
        clients = Process("idle-pairs", address, pairs)
        processes.append(clients)
        clients.event()
        after = relay.ask()
        return {"pairs": pairs, "kib_per_pair": (after["rss_kib"] - before["rss_kib"]) / pairs,
                "clients": after["clients"]}
    finally:
        for process in processes:
            process.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mib", type=int, default=128, help="MiB per bulk row (default 128)")
    parser.add_argument("--datagram", type=int, default=1400, help="datagram size of the hop row (default 1400)")
    parser.add_argument("--pairs", type=int, default=100, help="idle relayed pairs (default 100)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of the bulk rows, interleaved (default 2)")
    parser.add_argument("--role", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role:
        role, *rest = args.role
        relay = None if rest and rest[0] == "-" else (rest[0] if rest else None)
        runs = {
            "relay": lambda: role_relay(rest[0] == "bulk"),
            "hop-receiver": lambda: role_hop_receiver(rest[0], int(rest[1])),
            "hop-sender": lambda: role_hop_sender(rest[0], rest[1], int(rest[2]), int(rest[3])),
            "tunnel-receiver": lambda: role_tunnel_receiver(relay),
            "tunnel-sender": lambda: role_tunnel_sender(relay, rest[1], int(rest[2]), int(rest[3])),
            "idle-pairs": lambda: role_idle_pairs(rest[0], int(rest[1])),
        }
        trio.run(runs[role])
        return
    total = args.mib << 20
    print(f"relay bench: {args.mib} MiB per bulk row, {args.rounds} rounds interleaved; one process per role")
    for round_number in range(1, args.rounds + 1):
        hop = run_hop(total, args.datagram)
        big_hop = run_hop(total, 16384)
        direct = run_tunnel(total, relayed=False)
        relayed = run_tunnel(total, relayed=True)
        print(f"round {round_number}:")
        print(f"  relay hop ({args.datagram} B datagrams)  {hop['mib_s']:7.1f} MiB/s  "
              f"{cpu_text(hop['cpu_per_gib'])}  received {hop['received'] >> 20} MiB  relay drops {hop['drops']}")
        print(f"  relay hop (16384 B datagrams) {big_hop['mib_s']:7.1f} MiB/s  "
              f"{cpu_text(big_hop['cpu_per_gib'])}  received {big_hop['received'] >> 20} MiB  relay drops {big_hop['drops']}")
        print(f"  tunnel direct (uTP+TLS)       {direct['mib_s']:7.1f} MiB/s")
        print(f"  tunnel relayed (uTP+TLS)      {relayed['mib_s']:7.1f} MiB/s  "
              f"{cpu_text(relayed['cpu_per_gib'])}  ({relayed['mib_s'] / direct['mib_s']:.0%} of direct; "
              f"UDP datagrams from the nodes' sockets: {relayed['socket_datagrams_sent']}; relay drops {relayed['drops']})")
    idle = run_idle(args.pairs)
    print(f"idle relayed pairs: {idle['pairs']} pairs ({idle['clients']} links registered): "
          f"relay RSS +{idle['kib_per_pair']:.1f} KiB per pair")


if __name__ == "__main__":
    main()
