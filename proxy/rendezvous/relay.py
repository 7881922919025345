"""The relay node's rendezvous role (sans-IO): observed addresses, registrations,
lookups and introductions.

- An authenticated PING from a registered node is answered with a PONG carrying
  the address it came from (a node asks this again without re-registering; a
  stranger's PING gets nothing, so the relay reflects nothing at made-up keys).
- REGISTER stores NodeId -> (observed address = the datagram's source, the LAN
  addresses it reports, its signed record) until ``registration_ttl``; the last
  registration wins, but a record is kept only if it verifies under the sender's
  NodeId and its sequence number is above the one held (forged or older: refused).
  The table is bounded (the oldest refreshed entry goes).
- LOOKUP of a registered target: a LOOKUP_REPLY to the caller with the target's
  observed and LAN addresses and record, and an INTRODUCTION, signed by this relay,
  to the target at its observed address with the caller's *observed* address (as
  this relay saw the lookup arrive, never one the caller claims), the caller's LAN
  addresses as extra candidates, a nonce and an expiry.
- A target not registered here over UDP but linked to this relay node's forwarding
  over TCP (``relayed_only``, set by the driver) is found with no address: the
  caller reaches it only through this relay, and no introduction is sent.
- Everything is rate-limited per NodeId and per source address (host and port:
  nodes behind one NAT share a host) with token buckets, 20 burst, 10/s by default;
  what a limit refuses is dropped without an answer.
"""

from __future__ import annotations

import dataclasses
import os
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from proxy.rendezvous.addresses import record_from_bytes
from proxy.rendezvous.buckets import TokenBuckets
from proxy.rendezvous.errors import RecordInvalid
from proxy.rendezvous.keys import KeyRing
from proxy.rendezvous.messages import (
    INTRODUCTION_CONTEXT,
    Address,
    Introduction,
    Lookup,
    LookupReply,
    Message,
    Ping,
    Pong,
    Register,
    Registered,
)

REGISTRATION_TTL = 75.0  # seconds: three missed 20-25 s refreshes
MAX_REGISTRATIONS = 10000
INTRODUCTION_VALIDITY_MS = 45_000  # an introduction is valid 30-60 s: 45

Send = tuple[bytes, Address, Message]  # receiver NodeId (raw), address, message


@dataclass
class Registration:
    observed: Address
    lan: tuple[Address, ...]
    record: bytes
    expires: float


class RelayCore:
    def __init__(
        self,
        keyring: KeyRing,
        *,
        registration_ttl: float = REGISTRATION_TTL,
        max_registrations: int = MAX_REGISTRATIONS,
        burst: float = 20.0,
        rate: float = 10.0,
    ) -> None:
        self.keyring = keyring
        self.registration_ttl = registration_ttl
        self.max_registrations = max_registrations
        self.registrations: OrderedDict[bytes, Registration] = OrderedDict()
        self.per_node = TokenBuckets(burst, rate)
        self.per_source = TokenBuckets(burst, rate)
        self.relayed_only: Callable[[bytes], bool] | None = None
        self.counters = {"pings": 0, "registrations": 0, "lookups": 0, "introductions": 0, "not_found": 0,
                         "rate_limited": 0, "evicted": 0, "bad_records": 0, "old_records": 0, "pings_ignored": 0}

    def allowed(self, sender: bytes, source: Address, now: float) -> bool:
        # Both buckets are charged: a flood from one host under many NodeIds, or one
        # NodeId from many hosts, is cut either way.
        by_node = self.per_node.take(sender, now)
        # Per source address and port, not per host: many nodes behind one NAT (a
        # CGNAT) share the host and differ by port.
        by_source = self.per_source.take(source, now)
        if by_node and by_source:
            return True
        self.counters["rate_limited"] += 1
        return False

    def handle(self, sender: bytes, message: Message, source: Address, now: float, wall_ms: int) -> list[Send]:
        """What to send in answer to one authenticated message (nothing if limited)."""
        if isinstance(message, Ping):
            if self.registration(sender, now) is None:
                self.counters["pings_ignored"] += 1
                return []
            if not self.allowed(sender, source, now):
                return []
            self.counters["pings"] += 1
            return [(sender, source, Pong(message.txid, source))]
        if isinstance(message, Register):
            if not self.allowed(sender, source, now):
                return []
            return self._register(sender, message, source, now)
        if isinstance(message, Lookup):
            if not self.allowed(sender, source, now):
                return []
            return self._lookup(sender, message, source, now, wall_ms)
        return []

    def _register(self, sender: bytes, message: Register, source: Address, now: float) -> list[Send]:
        record = message.record
        held = self.registrations.pop(sender, None)
        if record:
            try:
                parsed = record_from_bytes(record)
            except RecordInvalid:
                parsed = None
            if parsed is None or bytes(parsed.node_id) != sender:
                self.counters["bad_records"] += 1  # forged, or someone else's
                record = held.record if held is not None else b""
            elif held is not None and held.record and record_from_bytes(held.record).seq >= parsed.seq:
                self.counters["old_records"] += 1  # older than the one held: keep that
                record = held.record
        self.registrations[sender] = Registration(source, message.lan, record, now + self.registration_ttl)
        self.counters["registrations"] += 1
        while len(self.registrations) > self.max_registrations:
            self.registrations.popitem(last=False)
            self.counters["evicted"] += 1
        return [(sender, source, Registered(message.txid, source, int(self.registration_ttl)))]

    def registration(self, node_id: bytes, now: float) -> Registration | None:
        entry = self.registrations.get(node_id)
        if entry is not None and entry.expires <= now:
            del self.registrations[node_id]
            return None
        return entry

    def _lookup(self, sender: bytes, message: Lookup, source: Address, now: float, wall_ms: int) -> list[Send]:
        self.counters["lookups"] += 1
        target = self.registration(message.target, now)
        if target is None and message.target != sender and self.relayed_only is not None \
                and self.relayed_only(message.target):
            self.counters["relayed_only"] = self.counters.get("relayed_only", 0) + 1
            return [(sender, source, LookupReply(message.txid, message.target, True))]
        if target is None or message.target == sender:
            self.counters["not_found"] += 1
            return [(sender, source, LookupReply(message.txid, message.target, False))]
        caller = self.registration(sender, now)
        caller_lan = caller.lan if caller is not None else ()
        introduction = Introduction(
            caller=sender, target=message.target, relay=self.keyring.node_id_bytes, observed=source,
            lan=caller_lan, nonce=os.urandom(16), expires_ms=wall_ms + INTRODUCTION_VALIDITY_MS,
        )
        signature = self.keyring.sign(INTRODUCTION_CONTEXT + introduction.signed_part())
        signed = dataclasses.replace(introduction, signature=signature)
        self.counters["introductions"] += 1
        reply = LookupReply(message.txid, message.target, True, (target.observed,), target.lan, target.record)
        return [(sender, source, reply), (message.target, target.observed, signed)]

    def lookup_reply(self, sender: bytes, message: Lookup, now: float) -> LookupReply | None:
        """The answer to a LOOKUP that came over a relay link (TCP): rate-limited per
        NodeId, found if registered here or linked; no introduction (None if limited)."""
        if not self.per_node.take(sender, now):
            self.counters["rate_limited"] += 1
            return None
        self.counters["lookups"] += 1
        target = self.registration(message.target, now)
        if target is not None and message.target != sender:
            return LookupReply(message.txid, message.target, True, (target.observed,), target.lan, target.record)
        if message.target != sender and self.relayed_only is not None and self.relayed_only(message.target):
            return LookupReply(message.txid, message.target, True)
        self.counters["not_found"] += 1
        return LookupReply(message.txid, message.target, False)

    def expire(self, now: float) -> None:
        """Drop expired registrations from the front (the oldest refreshed)."""
        while self.registrations:
            node_id, entry = next(iter(self.registrations.items()))
            if entry.expires > now:
                break
            del self.registrations[node_id]
