"""The client side of a relay connection (sans-IO): what a node keeps per relay link.

Bytes from the relay go in (``receive_bytes``), frames for the node come out (RECV,
PEER_GONE, SERVER_INFO, HEALTH, RESTARTING); PINGs are answered and PONGs timed here.
``send`` queues a SEND frame (bounded: a datagram past ``queue_bytes`` is dropped and
counted, as UDP would; uTP resends). ``take_output`` hands the bytes to write.
"""

from __future__ import annotations

import os
from collections import Counter

from proxy.identity.node_id import NODE_ID_SIZE, NodeId
from proxy.relay.errors import MalformedFrame, RelayProtocolError, UnknownFrameType
from proxy.relay.frames import (
    KEYED,
    MAX_BATCHED,
    MAX_DATAGRAM,
    PING,
    PING_SIZE,
    RECV,
    RECV_BATCH,
    SEND,
    SEND_BATCH,
    FrameDecoder,
    Ping,
    Pong,
    Recv,
    RecvBatch,
    ServerInfo,
    encode_frame,
    frame_bytes,
    pack_header,
    pack_length,
    parse_frame,
    split_batch,
)
from proxy.relay.frames import Frame as Frame

BATCH_BODY = 64 * 1024  # bytes of one SEND_BATCH body at most
NODE_ID_CACHE = 1024  # NodeId objects kept for sources seen, to skip building one per datagram
NOT_CONNECTED = "not_connected"
QUEUE_FULL = "queue_full"
OVERSIZED = "oversized"
MALFORMED = "malformed"


class RelayClientSession:
    """One connection's worth of client state (a reconnect starts a new session)."""

    def __init__(self, now: float, *, queue_bytes: int = 4 * 1024 * 1024, keepalive: float = 15.0,
                 timeout: float = 45.0, drops: Counter[str] | None = None) -> None:
        self.queue_bytes = queue_bytes
        self.keepalive = keepalive
        self.timeout = timeout
        self.server_info: ServerInfo | None = None
        self.drops: Counter[str] = Counter() if drops is None else drops
        self.frames_sent = 0
        self.frames_received = 0
        self.rtt: float | None = None
        self.last_heard = now
        self._decoder = FrameDecoder()
        self._output: list[bytes] = []  # control frames
        self._pending: list[tuple[bytes, bytes]] = []  # (destination, datagram) to send
        self._output_bytes = 0
        self._ping_payload: bytes | None = None
        self._ping_sent = now
        self._node_ids: dict[bytes, NodeId] = {}

    @property
    def registered(self) -> bool:
        return self.server_info is not None

    @property
    def output_pending(self) -> int:
        return self._output_bytes

    def send(self, destination: NodeId | bytes, datagram: bytes | bytearray | memoryview) -> bool:
        """Queue SEND(destination, datagram); False if dropped (counted in drops)."""
        size = len(datagram)
        if size > MAX_DATAGRAM:
            self.drops[OVERSIZED] += 1
            return False
        if self._output_bytes + size > self.queue_bytes:
            self.drops[QUEUE_FULL] += 1
            return False
        self._pending.append((bytes(destination), bytes(datagram)))
        self._output_bytes += size + 39
        self.frames_sent += 1
        return True

    def send_keyed(self, message: bytes) -> None:
        """Queue a KEYED frame (a rendezvous message for the relay node)."""
        self._queue_frame(frame_bytes(KEYED, message))

    def take_output(self) -> bytes:
        """Every queued frame as bytes to write: control frames first, then the
        datagrams in order, runs for one peer as SEND_BATCH frames."""
        output = self._output
        pending = self._pending
        if pending:
            self._batch_into(output, pending)
            pending.clear()
        data = b"".join(output)
        output.clear()
        self._output_bytes = 0
        return data

    @staticmethod
    def _batch_into(output: list[bytes], pending: list[tuple[bytes, bytes]]) -> None:
        append = output.append
        count = len(pending)
        index = 0
        while index < count:
            destination, first = pending[index]
            end = index + 1
            body = NODE_ID_SIZE + 2 + len(first)
            if len(first) <= MAX_BATCHED:
                while end < count:
                    peer, datagram = pending[end]
                    if peer != destination or len(datagram) > MAX_BATCHED or body + 2 + len(datagram) > BATCH_BODY:
                        break
                    body += 2 + len(datagram)
                    end += 1
            if end == index + 1:
                append(pack_header(SEND, NODE_ID_SIZE + len(first)))
                append(destination)
                append(first)
            else:
                append(pack_header(SEND_BATCH, body))
                append(destination)
                for position in range(index, end):
                    datagram = pending[position][1]
                    append(pack_length(len(datagram)))
                    append(datagram)
            index = end

    def _queue_frame(self, data: bytes) -> None:
        self._output.append(data)
        self._output_bytes += len(data)

    def receive_bytes(self, data: bytes | bytearray, now: float) -> list[Frame]:
        """The frames for the node in ``data``; RelayProtocolError for a frame a relay
        must not send, FrameTooLarge / MalformedFrame for bad bytes."""
        self.last_heard = now
        decoder = self._decoder
        decoder.feed(data)
        frames: list[Frame] = []
        while True:
            try:
                raw = decoder.next_raw()
            except UnknownFrameType:
                continue  # a newer relay's frame: skipped
            if raw is None:
                return frames
            frame_type, body = raw
            self.frames_received += 1
            if frame_type == RECV and len(body) >= 32:
                if len(body) - 32 > MAX_DATAGRAM:
                    self.drops[OVERSIZED] += 1
                    continue
                frames.append(Recv(self._node_id(body[:32]), body[32:]))
                continue
            if frame_type == RECV_BATCH and len(body) >= 32:
                try:
                    datagrams = split_batch(body)
                except MalformedFrame:
                    self.drops[MALFORMED] += 1
                    continue
                frames.append(RecvBatch(self._node_id(body[:32]), tuple(datagrams)))
                continue
            if frame_type in (SEND, SEND_BATCH):
                raise RelayProtocolError("the relay sent a SEND frame")
            frame = parse_frame(frame_type, body)
            if isinstance(frame, Ping):
                self._queue_frame(encode_frame(Pong(frame.payload)))
            elif isinstance(frame, Pong):
                if frame.payload == self._ping_payload:
                    self.rtt = now - self._ping_sent
                    self._ping_payload = None
            else:
                if isinstance(frame, ServerInfo):
                    self.server_info = frame
                frames.append(frame)

    def _node_id(self, key: bytes) -> NodeId:
        node_id = self._node_ids.get(key)
        if node_id is None:
            if len(self._node_ids) >= NODE_ID_CACHE:
                self._node_ids.clear()
            node_id = self._node_ids[key] = NodeId(key)
        return node_id

    def tick(self, now: float) -> float:
        """Queue a PING when one is due; returns when to call again. A relay silent
        for ``timeout`` makes ``timed_out`` true."""
        if now - self._ping_sent >= self.keepalive:
            self._ping_payload = os.urandom(PING_SIZE)
            self._ping_sent = now
            self._queue_frame(pack_header(PING, PING_SIZE) + self._ping_payload)
        return min(self._ping_sent + self.keepalive, self.last_heard + self.timeout)

    def timed_out(self, now: float) -> bool:
        return now - self.last_heard >= self.timeout
