"""The rendezvous cores on a simulated network with NATs and a fake clock (sans-IO).

The NAT model: a mapping is endpoint-independent (one public port per inside
address) or endpoint-dependent (symmetric: one per destination); filtering lets
in only what comes from a destination the inside sent to (by address, or by
address and port), or everything (full cone). Datagrams arrive after 5 ms.
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.rendezvous import messages as m
from proxy.rendezvous.core import Rendezvous
from proxy.rendezvous.keys import KeyRing
from proxy.rendezvous.node import Introduced, PathConfirmed, PunchFailed, RendezvousTimers
from proxy.rendezvous.relay import RelayCore
from proxy.rendezvous.wire import seal

from .test_rendezvous_codec import message_strategy

Address = tuple[str, int]
LATENCY = 0.005
WALL = 1_700_000_000.0
_seeds = itertools.count(1)


def keyring() -> KeyRing:
    return KeyRing(next(_seeds).to_bytes(32, "big"))


@dataclass
class Nat:
    public_ip: str
    mapping: str  # "independent" | "dependent"
    filtering: str  # "none" | "address" | "port"
    ports: itertools.count = field(default_factory=lambda: itertools.count(20000))
    out: dict[tuple[Address, Address | None], int] = field(default_factory=dict)
    inside: dict[int, Address] = field(default_factory=dict)
    allowed: set[tuple[int, Address]] = field(default_factory=set)

    def outbound(self, source: Address, destination: Address) -> Address:
        key = (source, None if self.mapping == "independent" else destination)
        port = self.out.get(key)
        if port is None:
            port = self.out[key] = next(self.ports)
            self.inside[port] = source
        self.allowed.add((port, destination))
        return self.public_ip, port

    def inbound(self, port: int, source: Address) -> Address | None:
        inside = self.inside.get(port)
        if inside is None:
            return None
        if self.filtering == "none":
            return inside
        if self.filtering == "address":
            return inside if any(p == port and a[0] == source[0] for p, a in self.allowed) else None
        return inside if (port, source) in self.allowed else None


NAT_KINDS = {
    "full cone": ("independent", "none"),
    "address-restricted": ("independent", "address"),
    "port-restricted": ("independent", "port"),
    "symmetric": ("dependent", "port"),
}


@dataclass
class Host:
    core: Rendezvous
    address: Address  # its own (inside) address
    nat: Nat | None = None
    received: list[bytes] = field(default_factory=list)


class Network:
    def __init__(self) -> None:
        self.now = 0.0
        self.hosts: dict[Address, Host] = {}
        self.nats: dict[str, Nat] = {}
        self.in_flight: list[tuple[float, Address, Address, bytes]] = []  # due, source (public), dest, data
        self.sent_by: dict[Address, int] = {}

    def add(self, host: Host) -> Host:
        self.hosts[host.address] = host
        if host.nat is not None:
            self.nats[host.nat.public_ip] = host.nat
        return host

    def collect(self) -> None:
        for host in list(self.hosts.values()):
            for data, destination in host.core.take_datagrams():
                self.sent_by[host.address] = self.sent_by.get(host.address, 0) + 1
                self.send_raw(host, data, destination)

    def send_raw(self, host: Host | None, data: bytes, destination: Address, source: Address | None = None) -> None:
        if host is not None:
            source = host.address
            same_lan = host.nat is not None and destination in self.hosts and self.hosts[destination].nat is host.nat
            if host.nat is not None and not same_lan:
                source = host.nat.outbound(host.address, destination)
        assert source is not None
        self.in_flight.append((self.now + LATENCY, source, destination, data))

    def run(self, until: float) -> None:
        while True:
            self.collect()
            next_timer = min((host.core.next_deadline() for host in self.hosts.values()), default=float("inf"))
            next_delivery = min((due for due, *_ in self.in_flight), default=float("inf"))
            step = min(next_timer, next_delivery)
            if step > until:
                self.now = until
                return
            self.now = max(self.now, step)
            due = [item for item in self.in_flight if item[0] <= self.now]
            self.in_flight = [item for item in self.in_flight if item[0] > self.now]
            for _, source, destination, data in due:
                self.deliver(source, destination, data)
            for host in self.hosts.values():
                if host.core.next_deadline() <= self.now:
                    host.core.on_timer(self.now)

    def deliver(self, source: Address, destination: Address, data: bytes) -> None:
        host = self.hosts.get(destination)
        if host is None:
            nat = self.nats.get(destination[0])
            inside = nat.inbound(destination[1], source) if nat is not None else None
            host = self.hosts.get(inside) if inside is not None else None
        if host is not None:
            host.received.append(data)
            host.core.receive(data, source, self.now)


def make_node(net: Network, inside: Address, nat_kind: str | None, relays: list[Host], *, serve: bool = False,
              lan_ip: str | None = None) -> Host:
    ring = keyring()
    nat = None
    if nat_kind is not None:
        mapping, filtering = NAT_KINDS[nat_kind]
        nat = Nat(lan_ip or f"203.0.113.{len(net.nats) + 1}", mapping, filtering)
    relay_list = tuple((relay.core.keyring.node_id_bytes, relay.address) for relay in relays)
    lan = (inside,) if nat is not None else ()
    core = Rendezvous(ring, relay_list, serve=serve, lan=lan, wall_offset=WALL, timers=RendezvousTimers())
    return net.add(Host(core, inside, nat))


def make_relay(net: Network, ip: str = "198.18.0.2", port: int = 4000) -> Host:
    return net.add(Host(Rendezvous(keyring(), serve=True, wall_offset=WALL), (ip, port)))


def events_of(host: Host) -> list[object]:
    return host.core.take_events()


# --- observed addresses and the NAT mapping ------------------------------------------------


@pytest.mark.parametrize(("kind", "expected"), [("port-restricted", "endpoint-independent"),
                                                ("symmetric", "endpoint-dependent"),
                                                (None, "endpoint-independent")])
def test_two_relays_tell_the_mapping(kind: str | None, expected: str) -> None:
    net = Network()
    relays = [make_relay(net, "198.18.0.2"), make_relay(net, "198.18.0.3")]
    node = make_node(net, ("10.0.0.2", 4000) if kind else ("198.51.100.9", 4000), kind, relays)
    net.run(1.0)
    observed = node.core.node.observed_addresses()
    assert len(observed) == 2
    assert node.core.node.nat_mapping() == expected
    if kind is not None:
        assert all(address[0] == node.nat.public_ip for _, address in observed)  # type: ignore[union-attr]


def test_one_relay_leaves_the_mapping_unknown_and_registration_stays_fresh() -> None:
    net = Network()
    relay = make_relay(net)
    node = make_node(net, ("10.0.0.2", 4000), "symmetric", [relay])
    net.run(1.0)
    assert node.core.node.nat_mapping() == "unknown"
    registered_at = relay.core.relay.registrations[node.core.keyring.node_id_bytes].expires  # type: ignore[union-attr]
    net.run(121.0)  # two minutes: refreshed every 20 s (under a 30 s NAT timeout)
    expires = relay.core.relay.registrations[node.core.keyring.node_id_bytes].expires  # type: ignore[union-attr]
    assert expires > registered_at + 100
    assert relay.core.relay.counters["registrations"] == 1 + 6  # type: ignore[union-attr]


# --- connect by NodeId: lookup, introduction, punching ------------------------------------


def connect(net: Network, caller: Host, target: Host) -> tuple[list[object], list[object]]:
    net.run(1.0)  # both registered
    events_of(caller), events_of(target)
    caller.core.lookup(target.core.keyring.node_id_bytes, net.now)
    net.run(net.now + 0.5)
    (done,) = [event for event in events_of(caller) if type(event).__name__ == "LookupDone"]
    assert done.found  # type: ignore[attr-defined]
    caller.core.punch(target.core.keyring.node_id_bytes, done.candidates, net.now)  # type: ignore[attr-defined]
    net.run(net.now + 4.0)
    return events_of(caller), events_of(target)


KINDS = [None, "full cone", "address-restricted", "port-restricted", "symmetric"]
HARD = {("symmetric", "port-restricted"), ("port-restricted", "symmetric"), ("symmetric", "symmetric")}


@pytest.mark.parametrize("caller_kind", KINDS)
@pytest.mark.parametrize("target_kind", KINDS)
def test_the_punch_matrix(caller_kind: str | None, target_kind: str | None) -> None:
    net = Network()
    relay = make_relay(net)
    caller = make_node(net, ("10.1.0.2", 4000) if caller_kind else ("198.51.100.2", 4000), caller_kind, [relay])
    target = make_node(net, ("10.2.0.2", 4000) if target_kind else ("198.51.100.3", 4000), target_kind, [relay])
    caller_events, target_events = connect(net, caller, target)
    assert any(isinstance(event, Introduced) for event in target_events)
    confirmed = [event for event in caller_events if isinstance(event, PathConfirmed)]
    if (caller_kind, target_kind) in HARD:
        assert confirmed == []
        assert any(isinstance(event, PunchFailed) for event in caller_events)
        return
    (path,) = confirmed
    # the confirmed address reaches the target: a datagram sent there arrives
    before = len(target.received)
    net.send_raw(caller, b"\x00\x00\x00\x02probe", path.address)
    net.run(net.now + 0.1)
    assert len(target.received) == before + 1


def test_two_nodes_behind_one_nat_without_hairpin_connect_over_the_lan() -> None:
    net = Network()
    relay = make_relay(net)
    caller = make_node(net, ("10.0.0.2", 4000), "port-restricted", [relay], lan_ip="203.0.113.50")
    target = make_node(net, ("10.0.0.3", 4000), None, [relay])
    target.nat = caller.nat  # the same router (it does not hairpin: no route to its own public address)
    target.core.node.lan = (target.address,)
    net.nats["203.0.113.50"] = caller.nat  # type: ignore[assignment]
    original = net.deliver

    def no_hairpin(source: Address, destination: Address, data: bytes) -> None:
        if source[0] == destination[0] == "203.0.113.50":
            return
        original(source, destination, data)

    net.deliver = no_hairpin  # type: ignore[method-assign]
    caller_events, _ = connect(net, caller, target)
    (path,) = [event for event in caller_events if isinstance(event, PathConfirmed)]
    assert path.address == ("10.0.0.3", 4000)


# --- forgeries and replays: nothing accepted, nothing sent in answer ------------------------


def test_forged_and_replayed_introductions_and_pings_are_dropped_without_an_answer() -> None:
    net = Network()
    relay = make_relay(net)
    victim = make_node(net, ("198.51.100.3", 4000), None, [relay])
    net.run(1.0)
    victim.core.take_events()
    attacker = keyring()
    wall_ms = int((net.now + WALL) * 1000)
    me = victim.core.keyring.node_id_bytes
    relay_id = relay.core.keyring.node_id_bytes
    sent_before = victim.core.counters["sent"]

    def introduction(signer: KeyRing, relay_field: bytes, target: bytes = me, expires: int = wall_ms + 45_000,
                     caller: bytes | None = None) -> m.Introduction:
        intro = m.Introduction(caller or attacker.node_id_bytes, target, relay_field, ("192.0.2.66", 9999), (),
                               os.urandom(16), expires)
        signature = signer.sign(m.INTRODUCTION_CONTEXT + intro.signed_part())
        return m.Introduction(**{**intro.__dict__, "signature": signature})

    forgeries = [
        # from a stranger, signed by itself, claiming to be the relay inside
        seal(attacker, me, m.INTRODUCTION, introduction(attacker, relay_id).encode(), wall_ms),
        # from a stranger naming itself as the relay
        seal(attacker, me, m.INTRODUCTION, introduction(attacker, attacker.node_id_bytes).encode(), wall_ms),
        # the relay's box, but a signature by someone else
        seal(relay.core.keyring, me, m.INTRODUCTION, introduction(attacker, relay_id).encode(), wall_ms),
        # properly signed by the relay but expired, or for another node, or far in the future
        seal(relay.core.keyring, me, m.INTRODUCTION, introduction(relay.core.keyring, relay_id,
                                                                   expires=wall_ms - 1).encode(), wall_ms),
        seal(relay.core.keyring, me, m.INTRODUCTION, introduction(relay.core.keyring, relay_id,
                                                                   target=os.urandom(32)).encode(), wall_ms),
        seal(relay.core.keyring, me, m.INTRODUCTION, introduction(relay.core.keyring, relay_id,
                                                                   expires=wall_ms + 3_600_000).encode(), wall_ms),
        # a box claiming the relay's NodeId but sealed by the attacker (does not open)
        bytes((0, 0, 0, m.INTRODUCTION, 1)) + relay_id + os.urandom(24) + os.urandom(120),
        # an authenticated ping from a stranger with no business here
        seal(attacker, me, m.PING, m.Ping(os.urandom(12)).encode(), wall_ms),
        # a pong nobody asked for
        seal(attacker, me, m.PONG, m.Pong(os.urandom(12), ("192.0.2.1", 1)).encode(), wall_ms),
    ]
    for data in forgeries:
        net.deliver(("192.0.2.66", 9999), victim.address, data)
    assert victim.core.counters["sent"] == sent_before  # not one datagram in answer
    assert victim.core.take_events() == []
    # a genuine introduction, then its replay (same datagram) and a replay of its content in a new box
    genuine = introduction(relay.core.keyring, relay_id)
    boxed = seal(relay.core.keyring, me, m.INTRODUCTION, genuine.encode(), wall_ms)
    net.deliver(relay.address, victim.address, boxed)
    assert victim.core.node.counters["introductions"] == 1
    punches = victim.core.counters["sent"]
    net.deliver(relay.address, victim.address, boxed)
    net.deliver(relay.address, victim.address, seal(relay.core.keyring, me, m.INTRODUCTION, genuine.encode(), wall_ms))
    assert victim.core.node.counters["introductions"] == 1
    assert victim.core.node.counters["introductions_refused"] == 7  # 6 forged + 1 replayed content
    assert victim.core.dropped["unauthenticated"] == 1 and victim.core.dropped["replayed"] == 1
    assert victim.core.node.counters["pings_ignored"] == 1 and victim.core.node.counters["pongs_unmatched"] == 1
    # the genuine one started punching; its replays sent nothing more
    assert punches > sent_before
    assert victim.core.counters["sent"] == punches


def test_a_replayed_ping_gets_no_second_pong() -> None:
    net = Network()
    relay = make_relay(net)
    node = make_node(net, ("198.51.100.3", 4000), None, [relay])
    net.run(1.0)
    wall_ms = int((net.now + WALL) * 1000)
    ping = seal(node.core.keyring, relay.core.keyring.node_id_bytes, m.PING, m.Ping(os.urandom(12)).encode(), wall_ms)
    relay.core.receive(ping, node.address, net.now)
    assert len(relay.core.take_datagrams()) == 1
    for _ in range(100):
        relay.core.receive(ping, node.address, net.now)
    assert relay.core.take_datagrams() == []
    assert relay.core.dropped["replayed"] == 100


# --- the relay node under a flood ---------------------------------------------------------


def test_relay_rate_limits_per_node_id_and_per_source() -> None:
    net = Network()
    relay = make_relay(net)
    node = keyring()
    wall_ms = int(WALL * 1000)
    relay_id = relay.core.keyring.node_id_bytes
    for _ in range(100):  # one NodeId, one host, within one (virtual) second
        relay.core.receive(seal(node, relay_id, m.REGISTER, m.Register(os.urandom(12), ()).encode(), wall_ms),
                           ("192.0.2.5", 1000), 0.0)
    assert len(relay.core.take_datagrams()) == 20  # the burst
    for _ in range(100):  # many NodeIds from one address: the per-source bucket
        relay.core.receive(seal(keyring(), relay_id, m.REGISTER, m.Register(os.urandom(12), ()).encode(), wall_ms),
                           ("192.0.2.6", 1000), 0.0)
    assert len(relay.core.take_datagrams()) == 20
    for index in range(30):  # nodes behind one NAT: one host, their own ports
        relay.core.receive(seal(keyring(), relay_id, m.REGISTER, m.Register(os.urandom(12), ()).encode(), wall_ms),
                           ("192.0.2.8", 2000 + index), 0.0)
    assert len(relay.core.take_datagrams()) == 30
    stranger = keyring()  # a PING from a NodeId that never registered: no answer
    relay.core.receive(seal(stranger, relay_id, m.PING, m.Ping(os.urandom(12)).encode(), wall_ms),
                       ("192.0.2.7", 1000), 0.0)
    assert relay.core.take_datagrams() == []
    relay.core.receive(seal(node, relay_id, m.PING, m.Ping(os.urandom(12)).encode(), wall_ms + 1000),
                       ("192.0.2.5", 1000), 1.0)
    assert len(relay.core.take_datagrams()) == 1  # refilled: 10/s


def test_relay_memory_stays_bounded_under_a_registration_flood_from_many_sources() -> None:
    relay_ring = keyring()
    relay = Rendezvous(relay_ring, serve=True, wall_offset=WALL)
    assert relay.relay is not None
    relay.relay.max_registrations = 500
    relay.opener.max_senders = 1000
    relay.relay.per_node.limit = relay.relay.per_source.limit = 2000
    senders = [keyring() for _ in range(50)]
    for index in range(5000):
        sender = senders[index % 50] if index % 2 else KeyRing(os.urandom(32))
        now = index * 0.001
        data = seal(sender, relay_ring.node_id_bytes, m.REGISTER,
                    m.Register(os.urandom(12), (("10.0.0.1", 4000),)).encode(), int((now + WALL) * 1000))
        relay.receive(data, (f"10.{index >> 16 & 255}.{index >> 8 & 255}.{index & 255}", 1024 + index), now)
        relay.take_datagrams()
    assert len(relay.relay.registrations) <= 500
    assert relay.opener.sender_count <= 1000
    assert len(relay.relay.per_node) <= 2000 and len(relay.relay.per_source) <= 2000
    assert relay.keyring.cached_keys <= relay.keyring.cache_size
    assert relay.relay.counters["evicted"] > 0


def test_the_relay_keeps_only_verified_newer_records() -> None:
    from proxy.rendezvous.addresses import SequenceClock, sign_record

    relay_ring = keyring()
    relay = RelayCore(relay_ring)
    node, other = keyring(), keyring()
    clock = SequenceClock()
    older = sign_record(node.signing_key, clock.next(), "utp:198.51.100.7:4000").to_bytes()
    newer = sign_record(node.signing_key, clock.next(), "utp:198.51.100.7:4001").to_bytes()
    foreign = sign_record(other.signing_key, clock.next(), "utp:192.0.2.1:1").to_bytes()
    forged = bytearray(newer)
    forged[-1] ^= 1
    source = ("198.51.100.7", 4000)
    for index, record in enumerate((newer, older, foreign, bytes(forged))):
        relay.handle(node.node_id_bytes, m.Register(os.urandom(12), (), record), source, float(index), 0)
        assert relay.registrations[node.node_id_bytes].record == newer
    assert relay.counters["old_records"] == 1 and relay.counters["bad_records"] == 2


def test_a_relay_node_punches_like_any_node() -> None:
    net = Network()
    relay = make_relay(net)
    other_relay = make_relay(net, "198.18.0.3")
    # a node that serves as a relay and registers with another relay, reached by NodeId
    serving = net.add(Host(Rendezvous(keyring(), ((other_relay.core.keyring.node_id_bytes, other_relay.address),),
                                      serve=True, wall_offset=WALL), ("198.51.100.20", 4000)))
    caller = make_node(net, ("10.0.0.2", 4000), "port-restricted", [other_relay])
    caller_events, _ = connect(net, caller, serving)
    assert any(isinstance(event, PathConfirmed) for event in caller_events)
    assert relay.core.counters["received"] == 0


@settings(max_examples=300, deadline=None)
@given(st.integers(2, 40), st.binary(max_size=600), st.booleans())
def test_authenticated_hostile_bodies_never_raise(message_type: int, body: bytes, serve: bool) -> None:
    """A sender with a real key (not a forger) sends any type with any body: the core
    drops it or handles it, never raises."""
    ring = keyring()
    sender = KeyRing(b"\x07" * 32)
    core = Rendezvous(ring, ((sender.node_id_bytes, ("192.0.2.1", 4000)),), serve=serve, wall_offset=WALL)
    data = seal(sender, ring.node_id_bytes, message_type, body, int(WALL * 1000))
    core.receive(data, ("192.0.2.1", 4000), 0.0)
    core.on_timer(1.0)
    core.take_datagrams()
    core.take_events()
    assert core.counters["received"] == 1


@settings(max_examples=300, deadline=None)
@given(message_strategy, st.booleans(), st.booleans())
def test_well_formed_messages_with_any_fields_never_raise(message: m.Message, serve: bool, from_relay: bool) -> None:
    """Any well-formed message (any addresses, NodeIds, records, signatures), from a
    configured relay or from a stranger: handled or dropped, never raised."""
    ring = keyring()
    relay_ring = KeyRing(b"\x07" * 32)
    sender = relay_ring if from_relay else KeyRing(b"\x08" * 32)
    core = Rendezvous(ring, ((relay_ring.node_id_bytes, ("192.0.2.1", 4000)),), serve=serve, wall_offset=WALL)
    core.lookup(os.urandom(32), 0.0)
    data = seal(sender, ring.node_id_bytes, message.message_type, message.encode(), int(WALL * 1000))
    core.receive(data, ("192.0.2.1", 4000), 0.0)
    core.on_timer(5.0)
    core.take_datagrams()
    core.take_events()
    assert core.counters["accepted"] == 1
