"""A node's side of rendezvous (sans-IO): registrations, observed addresses, NAT
mapping, lookups, introductions and punching.

- Registers with every relay node it is given (REGISTER every second until
  REGISTERED, then every ``refresh_interval``, 20 s: under the common 30 s UDP
  timeout, so the NAT mapping toward the relay stays up). Each REGISTERED (and
  PONG from a relay) carries the address the relay saw: the observed addresses.
- NAT mapping: two relay endpoints that saw the same address -> endpoint-
  independent; different ports -> endpoint-dependent; fewer than two -> unknown.
- LOOKUP(target) to every relay, resent every 0.5 s until ``lookup_timeout``; the
  first positive reply gives candidates (the target's observed addresses, then
  its private LAN addresses).
- An INTRODUCTION is accepted only from a configured relay, boxed by it, signed by
  it, naming this node, unexpired, never seen before; it starts punching toward
  the caller's observed address (as the relay saw it) and private LAN addresses.
- Punching: an authenticated PING to every candidate every ``punch_interval``
  (50 ms, the original's) for ``fast_punch_time``, then every 250 ms, until
  ``punch_window``. An authenticated PING from the target is answered to the
  address it came from, and that address becomes a candidate (it is where the
  target's NAT really maps, for a symmetric NAT). A path is confirmed by an
  authenticated PONG to a PING we sent (TxID known, under 5 s old): the address
  the PONG came from.
- PINGs are answered only for relays and for NodeIds this node is punching
  toward; a relay node answers everyone (relay.py). Forged, stale or replayed
  messages never reach this module (wire.py drops them).
"""

from __future__ import annotations

import ipaddress
import os
from collections import OrderedDict
from dataclasses import dataclass, field

from proxy.rendezvous.keys import verify_signature
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

Send = tuple[bytes, Address, Message]


@dataclass(frozen=True)
class RendezvousTimers:
    register_retry: float = 1.0
    refresh_interval: float = 20.0
    lookup_retry: float = 0.5
    lookup_timeout: float = 2.0
    punch_interval: float = 0.05
    fast_punch_time: float = 2.0
    slow_punch_interval: float = 0.25
    punch_window: float = 3.0
    pong_validity: float = 5.0


# --- events -------------------------------------------------------------------------


@dataclass(frozen=True)
class ObservedAddress:
    relay: bytes
    address: Address


@dataclass(frozen=True)
class LookupDone:
    target: bytes
    found: bool
    candidates: tuple[Address, ...] = ()
    record: bytes = b""
    relay: bytes = b""  # the relay node that found it


@dataclass(frozen=True)
class HomeChanged:
    relay: bytes
    rtt: float


@dataclass(frozen=True)
class PathConfirmed:
    node_id: bytes
    address: Address


@dataclass(frozen=True)
class PunchFailed:
    node_id: bytes
    tried: tuple[Address, ...]


@dataclass(frozen=True)
class Introduced:
    caller: bytes
    candidates: tuple[Address, ...]


Event = ObservedAddress | LookupDone | PathConfirmed | PunchFailed | Introduced | HomeChanged

HOME_MIN_GAIN = 0.010  # DERP's hysteresis: switch home only when the other is 10 ms better
HOME_MIN_RATIO = 2 / 3  # and below 2/3 of the current home's RTT


def choose_home(current: bytes | None, rtts: dict[bytes, float]) -> bytes | None:
    """The relay to call home: the lowest RTT, but the current one is kept unless
    another is at least HOME_MIN_GAIN better and below HOME_MIN_RATIO of it."""
    if not rtts:
        return current
    best = min(rtts, key=lambda relay: rtts[relay])
    if current is None or current not in rtts or best == current:
        return best
    if rtts[best] <= rtts[current] - HOME_MIN_GAIN and rtts[best] < rtts[current] * HOME_MIN_RATIO:
        return best
    return current


def private_candidates(addresses: tuple[Address, ...]) -> tuple[Address, ...]:
    """LAN addresses worth a punch: private, link-local or loopback (a claimed public
    address is never punched)."""
    found = []
    for host, port in addresses:
        ip = ipaddress.ip_address(host)
        if ip.is_private or ip.is_link_local or ip.is_loopback:
            found.append((host, port))
    return tuple(found)


@dataclass
class RelayState:
    node_id: bytes
    address: Address
    observed: Address | None = None
    registered: bool = False
    registers: bool = True  # False: a peer's home relay, only asked
    next_register: float = 0.0
    txid: bytes = b""
    own: bool = True  # configured ([relay] servers): may become this node's home
    register_sent: float = 0.0
    rtt: float | None = None  # REGISTER -> REGISTERED, the last one


@dataclass
class LookupState:
    target: bytes
    deadline: float
    next_send: float
    txids: set[bytes] = field(default_factory=set)
    asked: tuple[bytes, ...] = ()  # the relays asked
    negative: set[bytes] = field(default_factory=set)  # relays that answered "not found"


@dataclass
class PunchSession:
    target: bytes
    candidates: list[Address]
    started: float
    deadline: float
    next_ping: float
    confirmed: Address | None = None
    outstanding: dict[bytes, tuple[Address, float]] = field(default_factory=dict)


MAX_SESSIONS = 256
MAX_CANDIDATES = 16
SEEN_INTRODUCTIONS = 4096


class NodeRendezvous:
    def __init__(self, node_id: bytes, relays: tuple[tuple[bytes, Address], ...],
                 lan: tuple[Address, ...] = (), timers: RendezvousTimers | None = None) -> None:
        self.node_id = node_id
        self.timers = timers or RendezvousTimers()
        self.relays = {relay_id: RelayState(relay_id, address) for relay_id, address in relays}
        self.lan = lan
        self.record = b""
        self.lookups: dict[bytes, LookupState] = {}
        self.sessions: OrderedDict[bytes, PunchSession] = OrderedDict()
        self._seen_introductions: OrderedDict[bytes, None] = OrderedDict()
        self.outgoing: list[Send] = []
        self.events: list[Event] = []
        self.home: bytes | None = None
        self.counters = {"introductions": 0, "introductions_refused": 0, "pings_sent": 0, "pings_answered": 0,
                         "pings_ignored": 0, "pongs_unmatched": 0, "paths_confirmed": 0, "punches_failed": 0}

    # --- what the node knows ----------------------------------------------------

    def observed_addresses(self) -> list[tuple[bytes, Address]]:
        return [(state.node_id, state.observed) for state in self.relays.values() if state.observed is not None]

    def nat_mapping(self) -> str:
        seen = [address for _, address in self.observed_addresses()]
        if len(seen) < 2:
            return "unknown"
        return "endpoint-independent" if len({port for _, port in seen}) == 1 else "endpoint-dependent"

    # --- inputs ---------------------------------------------------------------------

    def handle(self, sender: bytes, message: Message, source: Address, now: float, wall_ms: int) -> None:
        if isinstance(message, Ping):
            if sender in self.relays or sender in self.sessions:
                self.counters["pings_answered"] += 1
                self.outgoing.append((sender, source, Pong(message.txid, source)))
                session = self.sessions.get(sender)
                if session is not None:
                    self._add_candidate(session, source)
            else:
                self.counters["pings_ignored"] += 1
        elif isinstance(message, Pong):
            self._pong(sender, message, source, now)
        elif isinstance(message, Registered):
            relay = self.relays.get(sender)
            if relay is not None and message.txid == relay.txid:
                relay.registered = True
                relay.next_register = now + self.timers.refresh_interval
                relay.txid = b""  # one answer per REGISTER: the RTT is measured once
                relay.rtt = now - relay.register_sent
                self._observed(relay, message.observed)
                self._choose_home()
        elif isinstance(message, LookupReply):
            self._lookup_reply(sender, message)
        elif isinstance(message, Introduction):
            self._introduction(sender, message, now, wall_ms)

    def _observed(self, relay: RelayState, address: Address) -> None:
        if relay.observed != address:
            relay.observed = address
            self.events.append(ObservedAddress(relay.node_id, address))

    def _pong(self, sender: bytes, message: Pong, source: Address, now: float) -> None:
        relay = self.relays.get(sender)
        if relay is not None and message.txid == relay.txid:
            self._observed(relay, message.observed)
            return
        session = self.sessions.get(sender)
        sent = session.outstanding.pop(message.txid, None) if session is not None else None
        if session is None or sent is None or now - sent[1] > self.timers.pong_validity:
            self.counters["pongs_unmatched"] += 1
            return
        if session.confirmed is None:
            # The address the authenticated answer came from: where the target's NAT
            # really maps (it may differ from the one pinged, behind a symmetric NAT).
            session.confirmed = source
            self.counters["paths_confirmed"] += 1
            self.events.append(PathConfirmed(sender, source))

    def _lookup_reply(self, sender: bytes, message: LookupReply) -> None:
        if sender not in self.relays:
            return
        lookup = self.lookups.get(message.target)
        if lookup is None or message.txid not in lookup.txids:
            return
        lookup.txids.discard(message.txid)
        if message.found:
            del self.lookups[message.target]
            candidates = _unique(message.observed + private_candidates(message.lan))
            self.events.append(LookupDone(message.target, True, candidates, message.record, sender))
            return
        lookup.negative.add(sender)
        if lookup.negative >= set(lookup.asked):  # every relay asked said so: no need to wait
            del self.lookups[message.target]
            self.events.append(LookupDone(message.target, False))

    def _introduction(self, sender: bytes, message: Introduction, now: float, wall_ms: int) -> None:
        relay = self.relays.get(sender)
        ok = (
            relay is not None
            and relay.registers  # only a relay this node registered with knows where it is
            and message.relay == sender
            and message.target == self.node_id
            and message.caller != self.node_id
            and wall_ms < message.expires_ms <= wall_ms + 90_000
            and message.nonce not in self._seen_introductions
            and verify_signature(sender, INTRODUCTION_CONTEXT + message.signed_part(), message.signature)
        )
        if not ok:
            self.counters["introductions_refused"] += 1
            return
        self._seen_introductions[message.nonce] = None
        if len(self._seen_introductions) > SEEN_INTRODUCTIONS:
            self._seen_introductions.popitem(last=False)
        self.counters["introductions"] += 1
        candidates = _unique((message.observed,) + private_candidates(message.lan))
        self.events.append(Introduced(message.caller, candidates))
        self.punch(message.caller, candidates, now)

    # --- requests ------------------------------------------------------------------

    def add_relay(self, relay_id: bytes, address: Address) -> None:
        """A relay node to ask (a peer's home relay), without registering with it."""
        if relay_id not in self.relays:
            self.relays[relay_id] = RelayState(relay_id, address, registers=False, next_register=float("inf"), own=False)

    def register_with(self, relay_id: bytes, address: Address, now: float) -> None:
        """Register with a relay node on demand (a peer's home relay this node sends
        through); it never becomes this node's home."""
        state = self.relays.get(relay_id)
        if state is None:
            self.relays[relay_id] = RelayState(relay_id, address, own=False, next_register=now)
        elif not state.registers:
            state.registers = True
            state.next_register = now

    def _choose_home(self) -> None:
        rtts = {relay_id: state.rtt for relay_id, state in self.relays.items()
                if state.own and state.registered and state.rtt is not None}
        home = choose_home(self.home, rtts)
        if home is not None and home != self.home:
            self.home = home
            self.events.append(HomeChanged(home, rtts[home]))

    def lookup_relays(self, target: bytes, via: tuple[bytes, ...] = ()) -> tuple[bytes, ...]:
        """The relays a lookup of target asks: those this node registers with, and ``via``."""
        return tuple(relay_id for relay_id, state in self.relays.items() if state.registers or relay_id in via)

    def lookup(self, target: bytes, now: float, via: tuple[bytes, ...] = ()) -> None:
        """Ask the relays this node registers with, and ``via`` (added relays), for target."""
        relay = self.relays.get(target)
        if relay is not None:  # a relay node itself: where this node reaches it
            self.events.append(LookupDone(target, True, (relay.address,)))
            return
        asked = self.lookup_relays(target, via)
        if target in self.lookups or not asked:
            if not asked:
                self.events.append(LookupDone(target, False))
            return
        self.lookups[target] = LookupState(target, now + self.timers.lookup_timeout, now, asked=asked)
        self._send_lookups(self.lookups[target], now)

    def punch(self, target: bytes, candidates: tuple[Address, ...], now: float) -> None:
        """Start (or widen) punching toward ``target`` at candidates a relay vouched for."""
        session = self.sessions.get(target)
        if session is None or session.deadline <= now:
            timers = self.timers
            session = PunchSession(target, [], now, now + timers.punch_window, now)
            self.sessions.pop(target, None)
            self.sessions[target] = session
            while len(self.sessions) > MAX_SESSIONS:
                self.sessions.popitem(last=False)
        for candidate in candidates:
            self._add_candidate(session, candidate)
        session.next_ping = now
        self._ping_session(session, now)

    def path(self, target: bytes) -> Address | None:
        session = self.sessions.get(target)
        return None if session is None else session.confirmed

    # --- timers ------------------------------------------------------------------------

    def on_timer(self, now: float) -> None:
        timers = self.timers
        for relay in self.relays.values():
            if relay.next_register <= now:
                relay.txid = os.urandom(12)
                relay.register_sent = now
                self.outgoing.append((relay.node_id, relay.address, Register(relay.txid, self.lan, self.record)))
                retry = timers.refresh_interval if relay.registered else timers.register_retry
                relay.next_register = now + retry
        for target, lookup in list(self.lookups.items()):
            if lookup.deadline <= now:
                del self.lookups[target]
                self.events.append(LookupDone(target, False))
            elif lookup.next_send <= now:
                self._send_lookups(lookup, now)
        for target, session in list(self.sessions.items()):
            if session.deadline <= now:
                if session.confirmed is None:
                    self.counters["punches_failed"] += 1
                    self.events.append(PunchFailed(target, tuple(session.candidates)))
                del self.sessions[target]
            elif session.next_ping <= now and session.confirmed is None:
                self._ping_session(session, now)

    def next_deadline(self) -> float:
        deadlines = [relay.next_register for relay in self.relays.values()]
        deadlines += [min(lookup.deadline, lookup.next_send) for lookup in self.lookups.values()]
        for session in self.sessions.values():
            deadlines.append(session.deadline if session.confirmed is not None
                             else min(session.deadline, session.next_ping))
        return min(deadlines, default=float("inf"))

    # --- helpers -------------------------------------------------------------------------

    def _send_lookups(self, lookup: LookupState, now: float) -> None:
        for relay_id in lookup.asked:
            relay = self.relays[relay_id]
            txid = os.urandom(12)
            lookup.txids.add(txid)
            self.outgoing.append((relay.node_id, relay.address, Lookup(txid, lookup.target)))
        next_send = now + self.timers.lookup_retry
        lookup.next_send = next_send if next_send < lookup.deadline else float("inf")

    def _add_candidate(self, session: PunchSession, address: Address) -> None:
        if address not in session.candidates and len(session.candidates) < MAX_CANDIDATES:
            session.candidates.append(address)

    def _ping_session(self, session: PunchSession, now: float) -> None:
        if session.confirmed is not None:
            return
        timers = self.timers
        for candidate in session.candidates:
            txid = os.urandom(12)
            session.outstanding[txid] = (candidate, now)
            self.outgoing.append((session.target, candidate, Ping(txid)))
            self.counters["pings_sent"] += 1
        # TxIDs older than a pong may be are forgotten (bounded per session).
        stale = [txid for txid, (_, sent) in session.outstanding.items() if now - sent > timers.pong_validity]
        for txid in stale:
            del session.outstanding[txid]
        fast = now - session.started < timers.fast_punch_time
        session.next_ping = now + (timers.punch_interval if fast else timers.slow_punch_interval)


def _unique(addresses: tuple[Address, ...]) -> tuple[Address, ...]:
    return tuple(dict.fromkeys(addresses))

