"""Rendezvous figures: connecting by NodeId through a relay node, and what a relay node costs.

    .venv/bin/python bench/rendezvous.py [--rounds 8] [--identities 3000]
                                         [--rates 1000 4000 8000 16000 24000] [--seconds 3]
                                         [--parts connect refresh messages]

Every node is a `keynode run` process on loopback (no NAT: loopback behaves as a
pair of full-cone NATs that keep ports, the easy case). Prints, side by side:

- connect: CONNECT-to-200 from a fresh node A to node B by NodeId alone (A and B
  know only the relay node R: A asks R, R introduces A to B, both punch), against
  a fresh node A' that has B in `[peers]` (straight to B's address). Each round
  starts new A and A' (so every sample is a first contact: no cached address, no
  live connection), waits until A is registered with R, CONNECTs through both in
  alternating order, then once more through each after its first connection ended.
- refresh: R's CPU (user + system, from /proc) per registration refresh: many
  identities, each on its own loopback source address, send one REGISTER each (as
  a node refreshes it: its LAN address and its signed address record, whose
  signature R checks), paced under R's rate limits; CPU divided by the REGISTERED
  answers. Also without the record, and R's idle CPU for the same time.
- messages: authenticated PINGs per second R answers with PONGs (each opened,
  rate-checked and answered with a new box) at increasing offered rates spread over
  the registered identities, with what R refused (should be 0: every identity stays
  under R's limits) and R's CPU per answered message. On this machine the sender
  (one Python process) shares the 2 CPUs with R; the CPU per message says what
  one core of R would sustain alone.
"""

from __future__ import annotations

import argparse
import os
import selectors
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import trio

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _node_process import ConnectFailed, connect_through  # noqa: E402  (bench/ is on sys.path)

from proxy.app.demo import Node  # noqa: E402
from proxy.app.node_dir import keygen  # noqa: E402
from proxy.identity.node_id import NodeId  # noqa: E402
from proxy.rendezvous.addresses import sign_record  # noqa: E402
from proxy.rendezvous.keys import KeyRing  # noqa: E402
from proxy.rendezvous.messages import PONG, REGISTERED, Ping, Register  # noqa: E402
from proxy.rendezvous.wire import seal  # noqa: E402

PER_IDENTITY_RATE = 8.0  # messages/s one identity sends: under R's 10/s per NodeId and per source
NEW_SENDERS_RATE = 400.0  # new identities/s: under R's limit on shared keys built (500/s overall)
REFRESH_ROUNDS = 3
REFRESH_RATE = 500.0  # registrations/s while measuring their cost (R keeps up: no backlog)
QUIET = 0.3
UNSENT = -1  # key of `answers` counting messages our socket refused to send (EAGAIN)
MAX_DRAIN = 5.0
CONNECT_TIMEOUT = 15.0


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process used so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start_node(directory: Path, name: str, config: str) -> Node:
    keygen(directory, force=False)
    (directory / "config.toml").write_text('[proxy]\nhost = "127.0.0.1"\nport = 0\n[log]\nlevel = "warning"\n'
                                           + config)
    node = Node(name, directory)
    node.start()
    return node


def wait_registered(node: Node, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not node.status().get("observed_addresses"):
        if time.monotonic() > deadline:
            raise RuntimeError(f"node {node.name} got no observed address from the relay node")
        time.sleep(0.01)


def wait_no_forward(node: Node, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while node.status()["connection_forward_count"]:
        if time.monotonic() > deadline:
            raise RuntimeError(f"node {node.name}: its forward connection did not end")
        time.sleep(0.01)


class TcpSink:
    """A local TCP server that accepts and reads until EOF (the reverse side's server)."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._drain, args=(conn,), daemon=True).start()

    @staticmethod
    def _drain(conn: socket.socket) -> None:
        with conn:
            while conn.recv(65536):
                pass


def time_connect(node: Node, target: str) -> float:
    token = (node.directory / "auth_token").read_text().strip()
    forward_port = int(node.info["forward"].rsplit(":", 1)[1])

    async def connect() -> float:
        started = time.perf_counter()
        with trio.fail_after(CONNECT_TIMEOUT):
            stream, _ = await connect_through(forward_port, target, token)
        elapsed = time.perf_counter() - started
        await stream.aclose()
        return elapsed

    return trio.run(connect)


def summary(samples: list[float]) -> str:
    if not samples:
        return "no samples"
    ordered = sorted(samples)
    return (f"median {statistics.median(ordered) * 1000:7.1f} ms  min {ordered[0] * 1000:7.1f}  "
            f"max {ordered[-1] * 1000:7.1f}  (n={len(ordered)})")


def bench_connect(workdir: Path, relay: Node, rounds: int) -> None:
    sink = TcpSink()
    relay_entry = f'"{relay.info["node_id"]}@{relay.info["proxy"]}"'
    relay_section = f"[relay]\nservers = [{relay_entry}]\n"
    node_b = start_node(workdir / "b", "B", f'[server]\nhost = "127.0.0.1"\nport = {sink.port}\n{relay_section}')
    try:
        wait_registered(node_b)
        b_id, b_proxy = node_b.info["node_id"], node_b.info["proxy"]
        target = f"{b_id}:{sink.port}"
        first: dict[str, list[float]] = {"relay": [], "peers": []}
        again: dict[str, list[float]] = {"relay": [], "peers": []}
        failures: list[str] = []
        for index in range(rounds):
            by_relay = start_node(workdir / f"a{index}", "A", relay_section)
            by_peers = start_node(workdir / f"p{index}", "A'", f'[peers]\n"{b_id}" = "{b_proxy}"\n')
            try:
                wait_registered(by_relay)
                order = [("relay", by_relay), ("peers", by_peers)]
                if index % 2:
                    order.reverse()
                for samples in (first, again):
                    for kind, node in order:
                        try:
                            samples[kind].append(time_connect(node, target))
                        except (ConnectFailed, trio.TooSlowError, OSError) as error:
                            failures.append(f"round {index} {kind}: {error}")
                        wait_no_forward(node)
            finally:
                by_relay.stop()
                by_peers.stop()
        print(f"CONNECT-to-200, A -> B on loopback, {rounds} rounds of fresh A nodes:")
        print(f"  first contact, by NodeId via relay node : {summary(first['relay'])}")
        print(f"  first contact, [peers] entry            : {summary(first['peers'])}")
        print(f"  again (same A, its connection ended)    : via relay {summary(again['relay'])}")
        print(f"                                            [peers]   {summary(again['peers'])}")
        for failure in failures:
            print(f"  FAILED {failure}")
    finally:
        node_b.stop()


class Identities:
    """Many node identities, each with a UDP socket on its own loopback address
    (127.1.x.y), so that R's per-NodeId and per-source limits see distinct senders."""

    def __init__(self, count: int, relay: tuple[str, int], relay_id: bytes) -> None:
        self.relay, self.relay_id = relay, relay_id
        self.keyrings = [KeyRing(os.urandom(32)) for _ in range(count)]
        self.sockets = []
        self.selector = selectors.DefaultSelector()
        for index in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.bind((f"127.1.{index // 250}.{index % 250 + 1}", 0))
            sock.setblocking(False)
            self.sockets.append(sock)
            self.selector.register(sock, selectors.EVENT_READ)
        self.records = [
            sign_record(keyring.signing_key, 1, f"utp:{sock.getsockname()[0]}:{sock.getsockname()[1]}").to_bytes()
            for keyring, sock in zip(self.keyrings, self.sockets, strict=True)
        ]

    def message(self, index: int, kind: str) -> bytes:
        txid = os.urandom(12)
        body: Any
        if kind == "ping":
            body = Ping(txid)
        elif kind == "register":
            body = Register(txid, (self.sockets[index].getsockname(),), self.records[index])
        else:
            body = Register(txid, (self.sockets[index].getsockname(),))
        return seal(self.keyrings[index], self.relay_id, body.message_type, body.encode(), int(time.time() * 1000))

    def run(self, kind: str, rate: float, count: int) -> tuple[int, dict[int, int], float]:
        """Send `count` messages at `rate`/s round-robin over the identities; count
        answers by type until R has been quiet for QUIET s after the last send.
        Returns (sent, answers by type, seconds spent sending)."""
        answers: dict[int, int] = {}
        sent, started = 0, time.perf_counter()
        last_sent: float | None = None
        last_answer = started
        while True:
            now = time.perf_counter()
            due = min(count, int((now - started) * rate) + 1)
            while sent < due:
                index = sent % len(self.sockets)
                try:
                    self.sockets[index].sendto(self.message(index, kind), self.relay)
                except BlockingIOError:
                    answers[UNSENT] = answers.get(UNSENT, 0) + 1  # our socket's buffer was full
                sent += 1
            if sent >= count and last_sent is None:
                last_sent = last_answer = now
            # Done once R has been quiet for QUIET s after the last send (a backlog drains).
            if last_sent is not None and (now - last_answer > QUIET or now - last_sent > MAX_DRAIN):
                return sent, answers, last_sent - started
            for key, _ in self.selector.select(timeout=0.001):
                last_answer = now
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                while True:
                    try:
                        data = sock.recv(2048)
                    except BlockingIOError:
                        break
                    if len(data) > 4:
                        answers[data[3]] = answers.get(data[3], 0) + 1

    def close(self) -> None:
        self.selector.close()
        for sock in self.sockets:
            sock.close()


def kernel_drops(port: int) -> int:
    """Datagrams the kernel dropped at the UDP socket bound to `port` (its receive
    buffer was full): /proc/net/udp's last column."""
    for line in Path("/proc/net/udp").read_text().splitlines()[1:]:
        fields = line.split()
        if int(fields[1].rsplit(":", 1)[1], 16) == port:
            return int(fields[-1])
    return 0


def refused_by_relay(relay: Node) -> int:
    """Messages R refused: rate-limited, pings from unregistered senders, or dropped
    by the wire checks (malformed, unauthenticated, stale, replayed, overloaded)."""
    counters = relay.status()["rendezvous"]
    relay_counters = counters["relay"]
    return int(relay_counters["rate_limited"] + relay_counters["pings_ignored"] + sum(counters["dropped"].values()))


def bench_relay(relay: Node, identities_count: int, rates: list[float], seconds: float,
                parts: list[str]) -> None:
    host, port = relay.info["proxy"].rsplit(":", 1)
    relay_pid = int(relay.status()["pid"])
    identities = Identities(identities_count, (host, int(port)), bytes(NodeId.decode(relay.info["node_id"])))
    count = len(identities.sockets)
    try:
        # Register every identity (R answers PINGs of registered nodes only), paced
        # under R's limit on new senders (each costs a shared key, ~94 us, once).
        sent, answers, _ = identities.run("register", NEW_SENDERS_RATE, count)
        if answers.get(REGISTERED, 0) != sent:
            print(f"  warning: {answers.get(REGISTERED, 0)} of {sent} registrations answered")
        if "refresh" in parts:
            rate = REFRESH_RATE  # each identity once a round
            seconds_per_round = count / rate
            idle_before = cpu_seconds(relay_pid)
            time.sleep(seconds_per_round * REFRESH_ROUNDS)
            idle = (cpu_seconds(relay_pid) - idle_before) / REFRESH_ROUNDS  # per round
            print(f"relay node CPU per registration refresh ({count} identities, {rate:.0f}/s, "
                  f"{REFRESH_ROUNDS} rounds; R idle: {idle * 1000:.0f} ms CPU per {seconds_per_round:.1f} s):")
            for kind, label in (("register", "with signed record"), ("register-bare", "without record")):
                spent, done, total = 0.0, 0, 0
                for _ in range(REFRESH_ROUNDS):
                    time.sleep(1.0)  # past the rate limiter's burst from the previous round
                    before = cpu_seconds(relay_pid)
                    sent, answers, elapsed = identities.run(kind, rate, count)
                    spent += cpu_seconds(relay_pid) - before - idle * elapsed / seconds_per_round
                    done += answers.get(REGISTERED, 0)
                    total += sent
                per = spent / done * 1e6 if done else float("nan")
                print(f"  {label:<18}: {per:6.0f} us CPU per refresh (idle subtracted)  {done}/{total} answered")
        if "messages" in parts:
            print(f"authenticated PINGs answered by the relay node ({count} identities, {seconds:.0f} s a step):")
            print("  (not sent: our socket refused (EAGAIN); R CPU: R's CPU seconds per second of sending; "
                  "one core: the rate R's CPU per message allows)")
            print(f"  {'offered/s':>9}  {'answered/s':>10}  {'answered':>8}  {'R refused':>9}  "
                  f"{'R buffer drops':>14}  {'not sent':>8}  {'R CPU':>6}  {'us/message':>10}  {'one core/s':>12}")
            for rate in rates:
                if rate > count * PER_IDENTITY_RATE:
                    print(f"  {rate:9.0f}  skipped: needs more than {count} identities at "
                          f"{PER_IDENTITY_RATE:.0f}/s each (--identities)")
                    continue
                time.sleep(1.0)
                refused, drops = refused_by_relay(relay), kernel_drops(int(port))
                before = cpu_seconds(relay_pid)
                sent, answers, elapsed = identities.run("ping", rate, int(rate * seconds))
                spent = cpu_seconds(relay_pid) - before  # including the drain of any backlog
                done = answers.get(PONG, 0)
                refused, drops = refused_by_relay(relay) - refused, kernel_drops(int(port)) - drops
                per = spent / done * 1e6 if done else float("nan")
                print(f"  {sent / elapsed:9.0f}  {done / elapsed:10.0f}  {done / sent:8.1%}  {refused:9d}  "
                      f"{drops:14d}  {answers.get(UNSENT, 0):8d}  {spent / elapsed:6.0%}  {per:10.1f}  "
                      f"{1e6 / per:12.0f}")
    finally:
        identities.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=8, help="connect rounds (fresh nodes each)")
    parser.add_argument("--identities", type=int, default=3000, help="senders for refresh and messages")
    parser.add_argument("--rates", type=float, nargs="+", default=[1000, 4000, 8000, 16000, 24000],
                        help="offered PINGs per second, one step each")
    parser.add_argument("--seconds", type=float, default=3.0, help="seconds per messages step")
    parser.add_argument("--parts", nargs="+", default=["connect", "refresh", "messages"],
                        choices=["connect", "refresh", "messages"])
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="keynode-bench-rendezvous-"))
    os.chmod(workdir, 0o700)
    relay = start_node(workdir / "relay", "R", "[relay]\nserve = true\n")
    try:
        if "connect" in args.parts:
            bench_connect(workdir, relay, args.rounds)
        if "refresh" in args.parts or "messages" in args.parts:
            bench_relay(relay, args.identities, args.rates, args.seconds, args.parts)
    finally:
        relay.stop()


if __name__ == "__main__":
    main()
