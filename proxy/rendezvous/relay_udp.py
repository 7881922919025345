"""Relay forwarding over keyed UDP messages (types 16..31), and the relay node's
UDP front of the transport-neutral RelayCore (proxy.relay.forwarding). Sans-IO.

Messages (keyed, wire.py: boxed between the two ends of one hop, stamped, nonce):

    16 RELAY_SEND  node -> relay   destination NodeId 32 | datagram
    17 RELAY_RECV  relay -> node   source NodeId 32 | datagram
    18 RELAY_GONE  relay -> node   NodeId 32 | reason u8 (0 disconnected, 1 replaced,
                                   2 not registered: the node itself, e.g. after the
                                   relay restarted; it registers again at once)
    20 PATH_PING   node -> node    txid 12 (end to end, carried as a relayed datagram)
    21 PATH_PONG   node -> node    txid 12

The bodies of SEND and RECV are those of the TCP relay's SEND and RECV frames, so
one RelayCore forwards between nodes on either transport. A relayed datagram (a
uTP datagram, or a PATH_PING/PONG sealed end to end) is at most MAX_RELAYED bytes;
a relay message is at most RELAY_MAX_MESSAGE (the 1400-byte bound of the
rendezvous messages is too small for a uTP datagram plus RELAY_OVERHEAD).

The relay node admits over UDP only a NodeId the rendezvous registered (REGISTER,
authenticated, live): a RELAY_SEND from anyone else is dropped (``unregistered``)
and nothing is forwarded; the sender (authenticated, so no stranger's address) gets
at most one RELAY_GONE(itself, not registered) a second, smaller than what it sent,
so it registers again at once instead of at its next refresh. The source tag of a RELAY_RECV is the NodeId that opened the
sender's box, never a field the sender writes; a RELAY_RECV goes only to the
destination's registered address, looked up per datagram, so the last
registration wins at once. Replays, forgeries and stale messages die in the
Opener (counted in ``opener.dropped``); limits, queues and drops by reason are the
core's (``core.stats``).
"""

from __future__ import annotations

from collections.abc import Callable

from proxy.identity.node_id import NODE_ID_SIZE, NodeId
from proxy.relay.errors import RelayFull
from proxy.relay.forwarding import RelayClient, RelayCore
from proxy.relay.frames import PEER_GONE, RECV, RECV_BATCH, SEND, split_batch
from proxy.rendezvous.buckets import TokenBuckets
from proxy.rendezvous.errors import MessageRejected
from proxy.rendezvous.keys import KeyRing
from proxy.rendezvous.messages import Address
from proxy.rendezvous.wire import HEADER, INNER, MAC_SIZE, Opener, seal

RELAY_SEND, RELAY_RECV, RELAY_GONE = 16, 17, 18
PATH_PING, PATH_PONG = 20, 21
MIN_RELAY_TYPE, MAX_RELAY_TYPE = 16, 31
TXID_SIZE = 12
# What one hop adds to a datagram: the keyed header, MAC, inner type and stamp, a NodeId.
RELAY_OVERHEAD = HEADER.size + MAC_SIZE + INNER.size + NODE_ID_SIZE
MAX_RELAYED = 2048  # a relayed datagram (a uTP datagram of mtu_payload + 20 and its SACK fits)
RELAY_MAX_MESSAGE = MAX_RELAYED + RELAY_OVERHEAD
# Replay windows of relay messages: a uTP window leaves a node within a millisecond,
# hundreds of datagrams under one timestamp, so a sender's share of nonces is large.
RELAY_NONCES_PER_SENDER = 8192
RELAY_MAX_NONCES = 262144  # over all senders (about 190 bytes each: 50 MB at worst)

GONE_NOT_REGISTERED = 2
Registered = Callable[[bytes, float], Address | None]  # raw NodeId, now -> its registered address


def is_relay_message(data: bytes) -> bool:
    """A keyed message of this module's types (the caller checked it is keyed)."""
    return MIN_RELAY_TYPE <= data[3] <= MAX_RELAY_TYPE


def relay_opener(keyring: KeyRing, dropped: dict[str, int] | None = None) -> Opener:
    """An Opener for relay messages (their size bound and replay windows)."""
    return Opener(keyring, max_size=RELAY_MAX_MESSAGE, dropped=dropped,
                  nonces_per_sender=RELAY_NONCES_PER_SENDER, max_nonces=RELAY_MAX_NONCES)


def seal_relay(keyring: KeyRing, receiver: bytes, message_type: int, body: bytes, wall_ms: int) -> bytes:
    return seal(keyring, receiver, message_type, body, wall_ms, max_size=RELAY_MAX_MESSAGE)


class _UdpClient:
    """The wake-up of one UDP client of the core: it joins the front's dirty list."""

    __slots__ = ("front", "client")

    def __init__(self, front: UdpRelayFront) -> None:
        self.front = front
        self.client: RelayClient | None = None

    def __call__(self) -> None:
        if self.client is not None:
            front = self.front
            if not front._dirty and not front._receiving and front.on_pending is not None:
                front.on_pending()  # queued by another transport (a TCP client's SEND)
            front._dirty.append(self.client)


class UdpRelayFront:
    """The relay node's UDP side: RELAY_SEND in, RELAY_RECV / RELAY_GONE out."""

    def __init__(self, keyring: KeyRing, core: RelayCore, registered: Registered,
                 dropped: dict[str, int] | None = None) -> None:
        self.keyring = keyring
        self.core = core
        self.registered = registered
        self.opener = relay_opener(keyring, dropped)
        self.clients: dict[bytes, RelayClient] = {}  # the core's clients this front serves
        self._dirty: list[RelayClient] = []
        self._receiving = False
        # Called when the core queues for a UDP client outside ``receive`` (a TCP
        # client sent to it): the driver then calls ``flush`` soon.
        self.on_pending: Callable[[], None] | None = None
        self.output: list[tuple[bytes, Address]] = []
        self._not_registered_hints = TokenBuckets(burst=1.0, rate=1.0, limit=4096)
        self.counters = {"received": 0, "unregistered": 0, "unexpected_type": 0, "sent": 0,
                         "destination_expired": 0, "full": 0}
        core.admit = self._admit

    def rebind(self, keyring: KeyRing, registered: Registered, dropped: dict[str, int] | None = None) -> None:
        """A new identity for this relay node (``keynode rotate``): messages are boxed
        with its keys, clients admitted by its new rendezvous core."""
        self.keyring = keyring
        self.opener = relay_opener(keyring, dropped)
        self.registered = registered

    def receive(self, data: bytes, source: Address, now: float, wall_ms: int) -> None:
        """One keyed message of types 16..31 addressed to this relay node."""
        self.counters["received"] += 1
        try:
            opened = self.opener.open(data, wall_ms, source[0], now)
        except MessageRejected:
            return
        if opened.message_type != RELAY_SEND:
            self.counters["unexpected_type"] += 1
            return
        sender = bytes(opened.sender)
        client = self.core.client(opened.sender)
        if client is None:
            client = self._admit(sender, now)
            if client is None:
                self.counters["unregistered"] += 1
                if self._not_registered_hints.take(sender, now):
                    self.output.append((seal_relay(self.keyring, sender, RELAY_GONE,
                                                   sender + bytes((GONE_NOT_REGISTERED,)), wall_ms), source))
                return
        self._receiving = True
        try:
            self.core.handle_frame(client, SEND, opened.body, now)
        finally:
            self._receiving = False
        self.flush(now, wall_ms)

    def _admit(self, key: bytes, now: float) -> RelayClient | None:
        """A core client for a NodeId registered over UDP (None if it is not)."""
        if self.registered(key, now) is None:
            return None
        wake = _UdpClient(self)
        try:
            client = self.core.register(NodeId(key), wake, now)
        except RelayFull:
            self.counters["full"] += 1  # the core counted it too (refused_full)
            return None
        wake.client = client
        self.clients[key] = client
        client.take_output()  # SERVER_INFO: REGISTERED already told the node
        return client

    def flush(self, now: float, wall_ms: int) -> None:
        """Seal what the core queued for UDP clients into ``output``."""
        dirty, self._dirty = self._dirty, []
        keyring = self.keyring
        output = self.output
        for client in dirty:
            key = client.key
            if client.closing:
                if self.clients.get(key) is client:
                    del self.clients[key]
                client.take_output()
                continue
            frames = client.take_output()
            if not frames:
                continue
            address = self.registered(key, now)
            if address is None:
                self.counters["destination_expired"] += len(frames)
                self.core.unregister(client, "its registration expired")
                self.clients.pop(key, None)
                continue
            for frame_type, body in frames:
                if frame_type == RECV:
                    output.append((seal_relay(keyring, key, RELAY_RECV, body, wall_ms), address))
                elif frame_type == RECV_BATCH:
                    source = body[:NODE_ID_SIZE]
                    for datagram in split_batch(body):
                        output.append((seal_relay(keyring, key, RELAY_RECV, source + datagram, wall_ms), address))
                elif frame_type == PEER_GONE:
                    output.append((seal_relay(keyring, key, RELAY_GONE, body, wall_ms), address))
                # PING, SERVER_INFO, RESTARTING: the rendezvous keeps UDP nodes' registrations.

    def take_output(self) -> list[tuple[bytes, Address]]:
        output, self.output = self.output, []
        self.counters["sent"] += len(output)
        return output

    def expire(self, now: float) -> None:
        """Unregister UDP clients whose rendezvous registration expired."""
        for key, client in list(self.clients.items()):
            if client.closing or self.registered(key, now) is None:
                self.core.unregister(client, "its registration expired")
                del self.clients[key]
        # (the PEER_GONEs this queued go out with the next flush)
