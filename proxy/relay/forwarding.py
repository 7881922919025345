"""The relay server's core (sans-IO): registered clients and forwarding between them.

A client is registered under the NodeId its transport authenticated (for the TCP
link, the leaf of the chain it proved in mutual TLS), never one it names. It sends
SEND(destination, datagram); the core hands the destination's client a
RECV(source, datagram) whose source is the sender's registered NodeId, so a client
cannot choose the tag. Forwarding happens only between registered clients: a
datagram for a NodeId nobody registered is dropped (counted ``no_such_peer``) and
nothing else is sent anywhere, so the relay is no amplifier toward any address.

Drops are counted in datagrams (a batch counts as the datagrams it holds) by reason
in ``RelayStats.drops``. Per NodeId, a token bucket (``RelayLimits.rate``/``burst``, whole frames counted)
takes every frame a client sends; over it the frame is dropped (``rate_limited``).
The bucket outlives a connection until it refills, so reconnecting buys nothing.
Each client has a bounded queue of frames for it (``queue_full`` past it).
A second registration of a NodeId wins: the older client is told PEER_GONE(itself,
replaced) and closed. When a client leaves, the NodeIds that sent to it (the most
recent ``senders_tracked``) are told PEER_GONE(it, disconnected).

Transport-neutral: the core takes (frame type, body) pairs and queues (frame type,
body) pairs per client; a driver moves them over TCP + TLS (proxy.relay.serve) or
over keyed UDP messages (proxy.rendezvous.relay_udp, one core for both, so a node
on UDP and a node on TCP reach each other). ``wake`` (given at registration) is
called when a client's queue becomes non-empty or the client is to be closed.
``admit`` (optional) is asked for a destination no client holds: the UDP front
registers there a node the rendezvous registered. ``capture`` (optional, for
tests) sees every forwarded datagram's bytes, so a test can show the relay never
held plaintext.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field

from proxy.identity.node_id import NODE_ID_SIZE, NodeId
from proxy.relay.errors import FrameTooLarge, MalformedFrame, RelayFull, RelayProtocolError, UnknownFrameType
from proxy.relay.frames import (
    GONE_DISCONNECTED,
    GONE_REPLACED,
    HEADER_SIZE,
    KEYED,
    MAX_DATAGRAM,
    PEER_GONE,
    PING,
    PING_SIZE,
    PONG,
    PROTOCOL_VERSION,
    RECV,
    RECV_BATCH,
    RESTARTING,
    SEND,
    SEND_BATCH,
    SERVER_INFO,
    FrameDecoder,
    Restarting,
    ServerInfo,
    count_batch,
    encode_frame,
    split_batch,
)
from proxy.relay.limits import RelayLimits, TokenBucket

OutgoingFrame = tuple[int, bytes]

# Drop reasons (RelayStats.drops keys).
NO_SUCH_PEER = "no_such_peer"
RATE_LIMITED = "rate_limited"
QUEUE_FULL = "queue_full"
OVERSIZED = "oversized"
MALFORMED = "malformed"
UNKNOWN_TYPE = "unknown_type"


@dataclass
class RelayStats:
    registered: int = 0  # registrations accepted, ever
    replaced: int = 0  # older clients closed by a newer registration of their NodeId
    refused_full: int = 0  # registrations refused at max_clients
    frames_forwarded: int = 0
    bytes_forwarded: int = 0  # datagram bytes handed to a destination's queue
    drops: Counter[str] = field(default_factory=Counter)


class RelayClient:
    """One registered client of the relay, whatever its transport."""

    __slots__ = ("node_id", "key", "wake", "queue", "queued_bytes", "closing", "close_reason",
                 "senders", "last_heard", "last_ping_sent", "pings_sent", "decoder", "frames_received")

    def __init__(self, node_id: NodeId, wake: Callable[[], None], now: float) -> None:
        self.node_id = node_id
        self.key = bytes(node_id)
        self.wake = wake
        self.queue: deque[OutgoingFrame] = deque()
        self.queued_bytes = 0
        self.closing = False
        self.close_reason = ""
        self.senders: dict[bytes, None] = {}  # insertion order: oldest first
        self.last_heard = now
        self.last_ping_sent = now
        self.pings_sent = 0
        self.decoder = FrameDecoder()  # for stream transports (TCP)
        self.frames_received = 0

    def take_output(self) -> list[OutgoingFrame]:
        """Every queued frame, oldest first; the queue is empty afterwards."""
        frames = list(self.queue)
        self.queue.clear()
        self.queued_bytes = 0
        return frames

    def __repr__(self) -> str:
        return f"<RelayClient {self.node_id} queued={len(self.queue)}{' closing' if self.closing else ''}>"


class RelayCore:
    """Registered clients by NodeId, and the forwarding rules in the module docstring."""

    def __init__(self, limits: RelayLimits | None = None) -> None:
        self.limits = limits or RelayLimits()
        self.stats = RelayStats()
        self._clients: dict[bytes, RelayClient] = {}
        self._buckets: dict[bytes, TokenBucket] = {}
        self.admit: Callable[[bytes, float], RelayClient | None] | None = None
        # KEYED frames from a client (a rendezvous message over its link), if anyone takes them
        self.on_keyed: Callable[[RelayClient, bytes, float], None] | None = None
        self.capture: Callable[[bytes], None] | None = None
        self._server_info = encode_frame(ServerInfo(
            PROTOCOL_VERSION, MAX_DATAGRAM, self.limits.rate, self.limits.burst,
            round(self.limits.keepalive * 1000)))[HEADER_SIZE:]

    def set_limits(self, limits: RelayLimits) -> None:
        """New limits for every client, registered or not (the buckets keep their
        tokens, capped at the new burst)."""
        self.limits = limits
        for bucket in self._buckets.values():
            bucket.rate = limits.rate
            bucket.burst = limits.burst
            bucket.tokens = min(bucket.tokens, float(limits.burst))
        self._server_info = encode_frame(ServerInfo(
            PROTOCOL_VERSION, MAX_DATAGRAM, limits.rate, limits.burst, round(limits.keepalive * 1000)))[HEADER_SIZE:]

    # --- registration ------------------------------------------------------------

    def client(self, node_id: NodeId) -> RelayClient | None:
        return self._clients.get(bytes(node_id))

    def clients(self) -> list[RelayClient]:
        return list(self._clients.values())

    @property
    def client_count(self) -> int:
        return len(self._clients)

    def register(self, node_id: NodeId, wake: Callable[[], None], now: float) -> RelayClient:
        """Register an authenticated NodeId (RelayFull at max_clients). The client's
        first frame is SERVER_INFO: the client knows it is registered."""
        key = bytes(node_id)
        older = self._clients.get(key)
        if older is None and len(self._clients) >= self.limits.max_clients:
            self.stats.refused_full += 1
            raise RelayFull(f"the relay serves {len(self._clients)} clients, its limit")
        if older is not None:
            self.stats.replaced += 1
            del self._clients[key]
            self._enqueue(older, PEER_GONE, key + bytes((GONE_REPLACED,)), control=True)
            self._mark_closing(older, "replaced by a newer connection of this NodeId")
        client = RelayClient(node_id, wake, now)
        if older is not None:
            client.senders = older.senders  # they still talk to this NodeId
        self._clients[key] = client
        self._prune_buckets(now)
        self._buckets.setdefault(key, TokenBucket(self.limits.rate, self.limits.burst, now))
        self.stats.registered += 1
        self._enqueue(client, SERVER_INFO, self._server_info, control=True)
        return client

    def unregister(self, client: RelayClient, reason: str = "disconnected") -> None:
        """The client left (or is closed): forget it, tell its senders. Idempotent."""
        if self._clients.get(client.key) is client:
            del self._clients[client.key]
            gone = client.key + bytes((GONE_DISCONNECTED,))
            for sender_key in client.senders:
                sender = self._clients.get(sender_key)
                if sender is not None:
                    self._enqueue(sender, PEER_GONE, gone, control=True)
        self._mark_closing(client, reason)

    def _mark_closing(self, client: RelayClient, reason: str) -> None:
        if not client.closing:
            client.closing = True
            client.close_reason = reason
            client.wake()

    def _prune_buckets(self, now: float) -> None:
        # Buckets of NodeIds no longer registered are kept only until they refill.
        if len(self._buckets) > 2 * len(self._clients) + 64:
            for key in [k for k, b in self._buckets.items() if k not in self._clients and b.full(now)]:
                del self._buckets[key]

    # --- frames from a client -------------------------------------------------------

    def receive_bytes(self, client: RelayClient, data: bytes | bytearray, now: float) -> None:
        """Bytes of a stream transport: every whole frame in them is handled.
        FrameTooLarge or RelayProtocolError: the driver closes the client."""
        decoder = client.decoder
        decoder.feed(data)
        while True:
            try:
                raw = decoder.next_raw()
            except UnknownFrameType:
                self.stats.drops[UNKNOWN_TYPE] += 1
                continue
            except FrameTooLarge:
                self.stats.drops[MALFORMED] += 1
                raise
            if raw is None:
                return
            self.handle_frame(client, raw[0], raw[1], now)

    def handle_frame(self, client: RelayClient, frame_type: int, body: bytes, now: float) -> None:
        """One frame from a registered client."""
        if client.closing:
            return
        client.last_heard = now
        client.frames_received += 1
        bucket = self._buckets[client.key]
        if not bucket.take(HEADER_SIZE + len(body), now):
            self.stats.drops[RATE_LIMITED] += _datagrams_in(frame_type, body)
            return
        if frame_type == SEND:
            self._forward(client, body, now)
        elif frame_type == SEND_BATCH:
            self._forward_batch(client, body, now)
        elif frame_type == PING:
            if len(body) != PING_SIZE:
                self.stats.drops[MALFORMED] += 1
                return
            self._enqueue(client, PONG, body)
        elif frame_type == PONG:
            pass  # heard from: last_heard is all a PONG is for
        elif frame_type == KEYED:
            if self.on_keyed is None:
                self.stats.drops[UNKNOWN_TYPE] += 1
            else:
                self.on_keyed(client, body, now)
        else:
            self.stats.drops[MALFORMED] += 1
            raise RelayProtocolError(f"a client may not send frame type 0x{frame_type:02x}")

    def _destination(self, key: bytes, now: float) -> RelayClient | None:
        destination = self._clients.get(key)
        if destination is None and self.admit is not None:
            destination = self.admit(key, now)
        return destination

    def _forward(self, sender: RelayClient, body: bytes, now: float) -> None:
        size = len(body) - NODE_ID_SIZE
        if size < 0:
            self.stats.drops[MALFORMED] += 1
            return
        if size > MAX_DATAGRAM:
            self.stats.drops[OVERSIZED] += 1
            return
        destination = self._destination(body[:NODE_ID_SIZE], now)
        if destination is None:
            self.stats.drops[NO_SUCH_PEER] += 1
            return
        datagram = body[NODE_ID_SIZE:]
        if self._enqueue(destination, RECV, sender.key + datagram):
            self.stats.frames_forwarded += 1
            self.stats.bytes_forwarded += size
            self._note_sender(destination, sender)
            if self.capture is not None:
                self.capture(datagram)

    def _forward_batch(self, sender: RelayClient, body: bytes, now: float) -> None:
        try:
            count = count_batch(body)
        except MalformedFrame:
            self.stats.drops[MALFORMED] += 1
            return
        destination = self._destination(body[:NODE_ID_SIZE], now)
        if destination is None:
            self.stats.drops[NO_SUCH_PEER] += count
            return
        if self.capture is not None:
            for datagram in split_batch(body):
                self.capture(datagram)
        if self._enqueue(destination, RECV_BATCH, sender.key + body[NODE_ID_SIZE:]):
            self.stats.frames_forwarded += count
            self.stats.bytes_forwarded += len(body) - NODE_ID_SIZE - 2 * count
            self._note_sender(destination, sender)
        else:
            self.stats.drops[QUEUE_FULL] += count - 1  # _enqueue counted one

    def _note_sender(self, destination: RelayClient, sender: RelayClient) -> None:
        senders = destination.senders
        if sender.key not in senders:
            if len(senders) >= self.limits.senders_tracked:
                del senders[next(iter(senders))]
            senders[sender.key] = None

    def _enqueue(self, client: RelayClient, frame_type: int, body: bytes, *, control: bool = False) -> bool:
        """Queue a frame for ``client``; False (counted queue_full) when its queue is
        full. Control frames (SERVER_INFO, PEER_GONE) may pass the bound by a few."""
        if client.closing:
            return False
        size = HEADER_SIZE + len(body)
        queue = client.queue
        if not control and (len(queue) >= self.limits.queue_frames
                            or client.queued_bytes + size > self.limits.queue_bytes):
            self.stats.drops[QUEUE_FULL] += 1
            return False
        was_empty = not queue
        queue.append((frame_type, body))
        client.queued_bytes += size
        if was_empty:
            client.wake()
        return True

    def send_keyed(self, node_id: NodeId, message: bytes) -> bool:
        """Queue a KEYED frame (a rendezvous message) for a client; False if it has none."""
        client = self._clients.get(bytes(node_id))
        return client is not None and self._enqueue(client, KEYED, message)

    def announce_restart(self, reconnect_in: float, try_for: float) -> None:
        """Tell every client the relay is going away and when to come back
        (RESTARTING); the driver closes the connections after that."""
        body = encode_frame(Restarting(round(reconnect_in * 1000), round(try_for * 1000)))[HEADER_SIZE:]
        for client in list(self._clients.values()):
            self._enqueue(client, RESTARTING, body, control=True)

    # --- time --------------------------------------------------------------------

    def tick(self, client: RelayClient, now: float) -> float:
        """Keep-alive: queue a PING when due, close a client silent past
        idle_timeout. Returns when to call again."""
        limits = self.limits
        if client.closing:
            return now + limits.keepalive
        if now - client.last_heard >= limits.idle_timeout:
            self.unregister(client, f"nothing heard for {limits.idle_timeout:g} s")
            return now + limits.keepalive
        if now - client.last_ping_sent >= limits.keepalive:
            client.last_ping_sent = now
            client.pings_sent += 1
            self._enqueue(client, PING, client.pings_sent.to_bytes(PING_SIZE, "big"), control=True)
        return min(client.last_ping_sent + limits.keepalive, client.last_heard + limits.idle_timeout)



def _datagrams_in(frame_type: int, body: bytes) -> int:
    """What one dropped frame counts as: a batch, its datagrams; anything else, 1."""
    if frame_type == SEND_BATCH:
        try:
            return count_batch(body)
        except MalformedFrame:
            return 1
    return 1
