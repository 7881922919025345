"""Delay, jitter and reordering for one NFQUEUE queue, as a standalone daemon.

The kernel here has no netem, so the lab queues packets with the iptables
NFQUEUE target (with --queue-bypass: while no daemon is bound, packets pass
untouched) and this process gives each packet its ACCEPT verdict after a delay
drawn from [delay - jitter, delay + jitter]. Packets whose delays cross leave
out of order, which is the reordering. It speaks nfnetlink_queue over a plain
AF_NETLINK socket (standard library only) and runs inside the namespace whose
queue it serves:

    python3 nfqueue_delay.py --queue 7 --delay-ms 20 --jitter-ms 5 --seed 1 --lifetime 300

It prints "ready" once bound and a JSON stats line when it exits (SIGTERM,
SIGINT or the end of its lifetime). Metadata only is copied from the kernel: the
daemon never reads nor alters packet contents.
"""

from __future__ import annotations

import argparse
import errno
import heapq
import json
import random
import select
import signal
import socket
import struct
import sys
import time

NETLINK_NETFILTER = 12
NFNL_SUBSYS_QUEUE = 3
NFQNL_MSG_PACKET = 0
NFQNL_MSG_VERDICT = 1
NFQNL_MSG_CONFIG = 2
NFQA_PACKET_HDR = 1
NFQA_VERDICT_HDR = 2
NFQA_CFG_CMD = 1
NFQA_CFG_PARAMS = 2
NFQA_CFG_QUEUE_MAXLEN = 3
NFQNL_CFG_CMD_BIND = 1
NFQNL_CFG_CMD_UNBIND = 2
NFQNL_COPY_META = 1
NF_ACCEPT = 1
NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4
NLMSG_ERROR = 2
NLMSG_DONE = 3
NLA_TYPE_MASK = 0x3FFF

NLMSG_HEADER = struct.Struct("=IHHII")  # len, type, flags, seq, pid (host order)
NFGEN_HEADER = struct.Struct("!BBH")  # family, version, res_id (big endian)
NLA_HEADER = struct.Struct("=HH")


def _align4(n: int) -> int:
    return (n + 3) & ~3


def _attribute(kind: int, payload: bytes) -> bytes:
    length = NLA_HEADER.size + len(payload)
    return NLA_HEADER.pack(length, kind) + payload + b"\0" * (_align4(length) - length)


def _message(msg_type: int, queue: int, attributes: bytes, seq: int, flags: int) -> bytes:
    body = NFGEN_HEADER.pack(socket.AF_UNSPEC, 0, queue) + attributes
    header = NLMSG_HEADER.pack(NLMSG_HEADER.size + len(body), (NFNL_SUBSYS_QUEUE << 8) | msg_type,
                               NLM_F_REQUEST | flags, seq, 0)
    return header + body


def parse_messages(data: bytes) -> list[tuple[int, bytes]]:
    """Split a netlink datagram into (type, payload) pairs; truncated tails are ignored."""
    out: list[tuple[int, bytes]] = []
    offset = 0
    while offset + NLMSG_HEADER.size <= len(data):
        length, msg_type, _flags, _seq, _pid = NLMSG_HEADER.unpack_from(data, offset)
        if length < NLMSG_HEADER.size or offset + length > len(data):
            break
        out.append((msg_type, data[offset + NLMSG_HEADER.size: offset + length]))
        offset += _align4(length)
    return out


def parse_attributes(data: bytes) -> dict[int, bytes]:
    attributes: dict[int, bytes] = {}
    offset = 0
    while offset + NLA_HEADER.size <= len(data):
        length, kind = NLA_HEADER.unpack_from(data, offset)
        if length < NLA_HEADER.size or offset + length > len(data):
            break
        attributes[kind & NLA_TYPE_MASK] = data[offset + NLA_HEADER.size: offset + length]
        offset += _align4(length)
    return attributes


class DelayQueue:
    def __init__(self, queue: int, delay: float, jitter: float, rng: random.Random,
                 max_len: int) -> None:
        self.queue = queue
        self.delay = delay
        self.jitter = jitter
        self.rng = rng
        self.max_len = max_len
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        for option in (getattr(socket, "SO_RCVBUFFORCE", 33), socket.SO_RCVBUF):
            try:
                self.sock.setsockopt(socket.SOL_SOCKET, option, 16 * 1024 * 1024)
                break
            except OSError:
                continue
        self.sock.bind((0, 0))
        self.seq = 0
        self.pending: list[tuple[float, int, int]] = []  # (due, arrival order, packet id)
        self.arrivals = 0
        self.stats: dict[str, object] = {"packets": 0, "verdicts": 0, "max_pending": 0, "overruns": 0, "errors": 0}

    def _request(self, msg_type: int, attributes: bytes) -> None:
        """Send a config request and wait for its ACK (a netlink error 0)."""
        self.seq += 1
        self.sock.send(_message(msg_type, self.queue, attributes, self.seq, NLM_F_ACK))
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self.sock], [], [], 0.5)
            if not ready:
                continue
            for kind, payload in parse_messages(self.sock.recv(65536)):
                if kind == NLMSG_ERROR:
                    code = -struct.unpack_from("=i", payload)[0]
                    if code:
                        raise OSError(code, f"nfqueue config: {errno.errorcode.get(code, code)}")
                    return
        raise TimeoutError("nfqueue config: no ACK from the kernel")

    def bind(self) -> None:
        self._request(NFQNL_MSG_CONFIG,
                      _attribute(NFQA_CFG_CMD, struct.pack("!BBH", NFQNL_CFG_CMD_BIND, 0, 0)))
        self._request(NFQNL_MSG_CONFIG,
                      _attribute(NFQA_CFG_PARAMS, struct.pack("!IB", 0, NFQNL_COPY_META))
                      + _attribute(NFQA_CFG_QUEUE_MAXLEN, struct.pack("!I", self.max_len)))

    def unbind(self) -> None:
        try:
            self.sock.send(_message(NFQNL_MSG_CONFIG, self.queue,
                                    _attribute(NFQA_CFG_CMD,
                                               struct.pack("!BBH", NFQNL_CFG_CMD_UNBIND, 0, 0)),
                                    self.seq + 1, 0))
        except OSError:
            pass  # closing the socket unbinds as well

    def _receive_all(self, now: float) -> None:
        while True:
            try:
                data = self.sock.recv(262144, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:  # we fell behind: the kernel dropped some
                    self.stats["overruns"] += 1
                    continue
                raise
            for kind, payload in parse_messages(data):
                if kind == NLMSG_ERROR:
                    self.stats["errors"] += 1
                    code = -struct.unpack_from("=i", payload)[0]
                    self.stats["last_error"] = errno.errorcode.get(code, code)
                    continue
                if kind != (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_PACKET:
                    continue
                header = parse_attributes(payload[NFGEN_HEADER.size:]).get(NFQA_PACKET_HDR)
                if header is None or len(header) < 4:
                    continue
                packet_id = struct.unpack_from("!I", header)[0]
                wait = max(0.0, self.delay + self.rng.uniform(-self.jitter, self.jitter))
                self.arrivals += 1
                heapq.heappush(self.pending, (now + wait, self.arrivals, packet_id))
                self.stats["packets"] += 1
            self.stats["max_pending"] = max(self.stats["max_pending"], len(self.pending))

    def _release_due(self, now: float) -> None:
        batch = []
        while self.pending and self.pending[0][0] <= now:
            _, _, packet_id = heapq.heappop(self.pending)
            self.seq += 1
            batch.append(_message(NFQNL_MSG_VERDICT, self.queue,
                                  _attribute(NFQA_VERDICT_HDR,
                                             struct.pack("!II", NF_ACCEPT, packet_id)),
                                  self.seq, 0))
        for message in batch:
            self.sock.send(message)
            self.stats["verdicts"] += 1

    def serve(self, until: float, stopping: list[bool]) -> None:
        while not stopping and time.monotonic() < until:
            now = time.monotonic()
            timeout = min(until - now, 0.5)
            if self.pending:
                timeout = max(0.0, min(timeout, self.pending[0][0] - now))
            ready, _, _ = select.select([self.sock], [], [], timeout)
            now = time.monotonic()
            if ready:
                self._receive_all(now)
            self._release_due(now)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queue", type=int, required=True)
    parser.add_argument("--delay-ms", type=float, default=0.0)
    parser.add_argument("--jitter-ms", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lifetime", type=float, default=600.0)
    parser.add_argument("--max-queue", type=int, default=20000)
    args = parser.parse_args(argv)
    stopping: list[bool] = []

    def stop(_signum: int, _frame: object) -> None:
        stopping.append(True)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    daemon = DelayQueue(args.queue, args.delay_ms / 1000, args.jitter_ms / 1000,
                        random.Random(args.seed), args.max_queue)
    daemon.bind()
    print("ready", flush=True)
    try:
        daemon.serve(time.monotonic() + args.lifetime, stopping)
    finally:
        daemon.unbind()
        print(json.dumps(daemon.stats), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
