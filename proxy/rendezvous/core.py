"""One node's rendezvous on its UDP socket (sans-IO): keyed messages in and out,
the node role (node.py) and, with ``serve``, the relay role (relay.py).

Input: ``receive(datagram, source, now)`` for every keyed message the endpoint
hands up, ``on_timer(now)`` at ``next_deadline()``, and requests (``lookup``,
``punch``). Output: ``take_datagrams()`` (bytes and where to send them) and
``take_events()``. ``now`` is monotonic seconds; the wall clock the timestamps
need is ``now + wall_offset``.
"""

from __future__ import annotations

from proxy.rendezvous.errors import Malformed, MessageRejected
from proxy.rendezvous.keys import KeyRing
from proxy.rendezvous.messages import Address, Lookup, Ping, decode_body
from proxy.rendezvous.node import Event, NodeRendezvous, RendezvousTimers
from proxy.rendezvous.relay import RelayCore, Send
from proxy.rendezvous.wire import Opener, seal

MAX_RENDEZVOUS_TYPE = 15  # 16..31 belong to issue 14 (relay forwarding)


class Rendezvous:
    def __init__(
        self,
        keyring: KeyRing,
        relays: tuple[tuple[bytes, Address], ...] = (),
        *,
        serve: bool = False,
        lan: tuple[Address, ...] = (),
        wall_offset: float = 0.0,
        timers: RendezvousTimers | None = None,
    ) -> None:
        self.keyring = keyring
        self.opener = Opener(keyring)
        self.node = NodeRendezvous(keyring.node_id_bytes, relays, lan, timers)
        self.relay = RelayCore(keyring) if serve else None
        self.wall_offset = wall_offset
        self._datagrams: list[tuple[bytes, Address]] = []
        self.counters = {"received": 0, "accepted": 0, "sent": 0, "unexpected_type": 0}

    @property
    def dropped(self) -> dict[str, int]:
        return self.opener.dropped

    def wall_ms(self, now: float) -> int:
        return int((now + self.wall_offset) * 1000)

    def receive(self, data: bytes, source: Address, now: float) -> None:
        """One keyed message from ``source``; what it is not is dropped and counted."""
        self.counters["received"] += 1
        wall_ms = self.wall_ms(now)
        try:
            opened = self.opener.open(data, wall_ms, source[0], now)
            if opened.message_type > MAX_RENDEZVOUS_TYPE:
                self.counters["unexpected_type"] += 1
                return
            try:
                message = decode_body(opened.message_type, opened.body)
            except Malformed:
                self.opener.dropped["malformed"] += 1
                return
        except MessageRejected:
            return
        self.counters["accepted"] += 1
        sender = bytes(opened.sender)
        if self.relay is not None:
            answers = self.relay.handle(sender, message, source, now, wall_ms)
            self._send(answers, now)
            if isinstance(message, Ping) and answers:
                return  # answered by the relay role (else: a peer punching toward this node?)
        self.node.handle(sender, message, source, now, wall_ms)
        self._flush_node(now)

    def receive_over_link(self, data: bytes, client: bytes, now: float) -> bytes | None:
        """A keyed message a relay-link client sent over TCP (a KEYED frame): only a
        LOOKUP, sealed by the NodeId the link authenticated; the answer (LOOKUP_REPLY,
        no introduction: the caller has no UDP to punch with) to send back over the
        link, or None. Everything else is dropped and counted."""
        self.counters["received"] += 1
        wall_ms = self.wall_ms(now)
        try:
            opened = self.opener.open(data, wall_ms, "link", now)
            message = decode_body(opened.message_type, opened.body)
        except Malformed:
            self.opener.dropped["malformed"] += 1
            return None
        except MessageRejected:
            return None
        self.counters["accepted"] += 1
        if self.relay is None or bytes(opened.sender) != client or not isinstance(message, Lookup):
            self.counters["unexpected_type"] += 1
            return None
        reply = self.relay.lookup_reply(client, message, now)
        if reply is None:
            return None
        self.counters["sent"] += 1
        return seal(self.keyring, client, reply.message_type, reply.encode(), wall_ms)

    def on_timer(self, now: float) -> None:
        self.node.on_timer(now)
        if self.relay is not None:
            self.relay.expire(now)
        self._flush_node(now)

    def next_deadline(self) -> float:
        return self.node.next_deadline()

    def lookup(self, target: bytes, now: float, via: tuple[bytes, ...] = ()) -> None:
        self.node.lookup(target, now, via)
        self._flush_node(now)

    def punch(self, target: bytes, candidates: tuple[Address, ...], now: float) -> None:
        self.node.punch(target, candidates, now)
        self._flush_node(now)

    def set_record(self, record: bytes) -> None:
        self.node.record = record

    def take_datagrams(self) -> list[tuple[bytes, Address]]:
        datagrams, self._datagrams = self._datagrams, []
        return datagrams

    def take_events(self) -> list[Event]:
        events, self.node.events = self.node.events, []
        return events

    def _flush_node(self, now: float) -> None:
        if self.node.outgoing:
            sends, self.node.outgoing = self.node.outgoing, []
            self._send(sends, now)

    def _send(self, sends: list[Send], now: float) -> None:
        wall_ms = self.wall_ms(now)
        for receiver, address, message in sends:
            data = seal(self.keyring, receiver, message.message_type, message.encode(), wall_ms)
            self._datagrams.append((data, address))
            self.counters["sent"] += 1
