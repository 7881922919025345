"""Codecs of the rendezvous layer: keyed-message wire format, message bodies,
multiserver addresses, signed records. Round trips and hostile input (Hypothesis)."""

from __future__ import annotations

import os

import nacl.signing
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.identity.node_id import NodeId
from proxy.rendezvous import messages as m
from proxy.rendezvous.addresses import (
    Layer,
    RecordBook,
    RelayAddress,
    SequenceClock,
    UtpAddress,
    format_keynode_addresses,
    format_multiaddress,
    keynode_addresses,
    parse_multiaddress,
    parse_relay_server,
    record_from_bytes,
    record_from_text,
    sign_record,
)
from proxy.rendezvous.errors import (
    AddressInvalid,
    Malformed,
    MessageRejected,
    RecordForged,
    RecordInvalid,
    RecordOutdated,
    RelayServerInvalid,
    Replayed,
    Stale,
    Unauthenticated,
)
from proxy.rendezvous.keys import KeyRing
from proxy.rendezvous.wire import HEADER, Opener, seal

ALICE = KeyRing(bytes(range(32)))
BOB = KeyRing(bytes(range(1, 33)))
NOW_MS = 1_700_000_000_000

ipv4 = st.ip_addresses(v=4).map(str)
ipv6 = st.ip_addresses(v=6).map(str)
addresses = st.tuples(st.one_of(ipv4, ipv6), st.integers(1, 65535))
address_lists = st.lists(addresses, max_size=m.MAX_ADDRESSES).map(tuple)
txids = st.binary(min_size=12, max_size=12)
keys32 = st.binary(min_size=32, max_size=32)

message_strategy = st.one_of(
    st.builds(m.Ping, txids, st.integers(0, 200)),
    st.builds(m.Pong, txids, addresses),
    st.builds(m.Register, txids, address_lists, st.binary(max_size=m.MAX_RECORD)),
    st.builds(m.Registered, txids, addresses, st.integers(0, 65535)),
    st.builds(m.Lookup, txids, keys32),
    st.builds(m.LookupReply, txids, keys32, st.booleans(), address_lists, address_lists,
              st.binary(max_size=m.MAX_RECORD)),
    st.builds(m.Introduction, keys32, keys32, keys32, addresses, address_lists,
              st.binary(min_size=16, max_size=16), st.integers(0, 2**64 - 1), st.binary(min_size=64, max_size=64)),
)


def _canonical(message: m.Message) -> m.Message:
    return m.decode_body(message.message_type, message.encode())


@given(message_strategy)
def test_message_bodies_round_trip(message: m.Message) -> None:
    decoded = m.decode_body(message.message_type, message.encode())
    assert decoded == _canonical(decoded)
    assert decoded.encode() == message.encode()


@given(st.integers(0, 40), st.binary(max_size=300))
def test_hostile_bodies_raise_only_malformed(message_type: int, body: bytes) -> None:
    try:
        m.decode_body(message_type, body)
    except Malformed:
        pass


@given(message_strategy, st.data())
def test_truncated_or_extended_bodies_are_malformed(message: m.Message, data: st.DataObject) -> None:
    body = message.encode()
    if isinstance(message, m.Ping):
        return  # padding: any length past the TxID is a ping
    cut = data.draw(st.integers(0, len(body) - 1))
    with pytest.raises(Malformed):
        m.decode_body(message.message_type, body[:cut])
    with pytest.raises(Malformed):
        m.decode_body(message.message_type, body + b"\x00")


@given(message_strategy)
def test_keyed_messages_round_trip_between_two_nodes(message: m.Message) -> None:
    data = seal(ALICE, BOB.node_id_bytes, message.message_type, message.encode(), NOW_MS)
    assert data[:4] == bytes((0, 0, 0, message.message_type)) and data[4] == 1
    opened = Opener(BOB).open(data, NOW_MS + 1000)
    assert opened.sender == ALICE.node_id
    assert m.decode_body(opened.message_type, opened.body).encode() == message.encode()


@given(st.binary(max_size=400))
def test_random_datagrams_are_rejected_with_a_typed_error(data: bytes) -> None:
    opener = Opener(BOB)
    with pytest.raises(MessageRejected):
        opener.open(b"\x00\x00\x00\x02" + data, NOW_MS)
    assert sum(opener.dropped.values()) == 1


@settings(max_examples=300)
@given(st.integers(0, 200), st.integers(0, 255))
def test_any_flipped_byte_is_refused(position: int, flip: int) -> None:
    data = bytearray(seal(ALICE, BOB.node_id_bytes, m.PING, m.Ping(bytes(12), 40).encode(), NOW_MS))
    position %= len(data)
    if flip == 0:
        flip = 1
    data[position] ^= flip
    with pytest.raises(MessageRejected):
        Opener(BOB).open(bytes(data), NOW_MS)


def test_stale_replayed_and_misaddressed_messages_are_refused_and_counted() -> None:
    carol = KeyRing(bytes(range(2, 34)))
    opener = Opener(BOB)
    body = m.Ping(os.urandom(12)).encode()
    with pytest.raises(Stale):
        opener.open(seal(ALICE, BOB.node_id_bytes, m.PING, body, NOW_MS - 31_000), NOW_MS)
    with pytest.raises(Stale):
        opener.open(seal(ALICE, BOB.node_id_bytes, m.PING, body, NOW_MS + 31_000), NOW_MS)
    fresh = seal(ALICE, BOB.node_id_bytes, m.PING, body, NOW_MS)
    opener.open(fresh, NOW_MS)
    with pytest.raises(Replayed):
        opener.open(fresh, NOW_MS + 5)
    with pytest.raises(Unauthenticated):  # for Carol, not for Bob
        opener.open(seal(ALICE, carol.node_id_bytes, m.PING, body, NOW_MS), NOW_MS)
    forged = bytearray(seal(carol, BOB.node_id_bytes, m.PING, body, NOW_MS))
    forged[HEADER.size - 24 - 32 : HEADER.size - 24] = ALICE.node_id_bytes  # claims to be Alice
    with pytest.raises(Unauthenticated):
        opener.open(bytes(forged), NOW_MS)
    swapped = bytearray(seal(ALICE, BOB.node_id_bytes, m.PING, body, NOW_MS))
    swapped[3] = m.PONG  # the clear type differs from the one inside
    with pytest.raises(Malformed):
        opener.open(bytes(swapped), NOW_MS)
    assert opener.dropped == {"malformed": 1, "unauthenticated": 2, "stale": 2, "replayed": 1, "overloaded": 0}
    assert opener.opened == 1


def test_the_replay_window_overflows_safely() -> None:
    opener = Opener(BOB)
    sent = [seal(ALICE, BOB.node_id_bytes, m.PING, m.Ping(os.urandom(12)).encode(), NOW_MS + index)
            for index in range(600)]
    for data in sent:
        opener.open(data, NOW_MS + 600)
    for data in sent:  # every one of them, evicted from the window or not, is refused
        with pytest.raises(Replayed):
            opener.open(data, NOW_MS + 600)


def test_the_sender_table_is_bounded() -> None:
    opener = Opener(BOB, max_senders=50)
    for index in range(60):
        sender = KeyRing(index.to_bytes(32, "big"))
        data = seal(sender, BOB.node_id_bytes, m.PING, m.Ping(os.urandom(12)).encode(), NOW_MS)
        try:
            opener.open(data, NOW_MS, f"192.0.2.{index}")
        except MessageRejected:
            pass
    assert opener.sender_count == 50 and opener.dropped["overloaded"] == 10
    # once those senders' messages are stale they make room
    late = seal(KeyRing(b"\xff" * 32), BOB.node_id_bytes, m.PING, m.Ping(bytes(12)).encode(), NOW_MS + 40_000)
    opener.open(late, NOW_MS + 40_000, "192.0.2.200")
    assert opener.sender_count == 50


def test_new_sender_keys_are_budgeted_per_source_before_any_crypto() -> None:
    opener = Opener(BOB)
    opener.open(seal(ALICE, BOB.node_id_bytes, m.PING, m.Ping(bytes(12)).encode(), NOW_MS), NOW_MS, "192.0.2.9")
    built = BOB.shared_keys_built
    for _ in range(200):  # made-up NodeIds from one host, all at once
        data = seal(KeyRing(os.urandom(32)), BOB.node_id_bytes, m.PING, m.Ping(bytes(12)).encode(), NOW_MS)
        try:
            opener.open(data, NOW_MS, "192.0.2.1", now=0.0)
        except MessageRejected:
            pass
    assert opener.dropped["overloaded"] == 150
    assert BOB.shared_keys_built - built == 50
    known = seal(ALICE, BOB.node_id_bytes, m.PING, m.Ping(bytes(12)).encode(), NOW_MS)
    opener.open(known, NOW_MS, "192.0.2.1", now=0.0)  # a sender whose key is known is not limited
    later = seal(KeyRing(os.urandom(32)), BOB.node_id_bytes, m.PING, m.Ping(bytes(12)).encode(), NOW_MS)
    opener.open(later, NOW_MS, "192.0.2.1", now=1.0)  # the budget refills


# --- multiserver addresses --------------------------------------------------------

names = st.from_regex(r"[a-z][a-z0-9-]{1,8}", fullmatch=True)
args = st.text(st.characters(blacklist_categories=("Z", "C")), max_size=12).filter(
    lambda text: not any(char.isspace() for char in text))
layers = st.builds(Layer, names, st.lists(args, max_size=3).map(tuple))
multiaddresses = st.lists(st.lists(layers, min_size=1, max_size=3).map(tuple), min_size=1, max_size=4).map(tuple)


@given(multiaddresses)
def test_multiserver_text_round_trips(alternatives: tuple[tuple[Layer, ...], ...]) -> None:
    text = format_multiaddress(alternatives)
    assert parse_multiaddress(text) == alternatives
    assert format_multiaddress(parse_multiaddress(text)) == text


@given(st.text(max_size=60))
def test_hostile_address_text_raises_only_address_invalid(text: str) -> None:
    try:
        keynode_addresses(text)
    except AddressInvalid:
        pass


node_ids = st.binary(min_size=32, max_size=32).map(NodeId)
keynode_address = st.one_of(
    st.builds(UtpAddress, st.one_of(ipv4, ipv6).filter(lambda h: h not in ("0.0.0.0", "::")), st.integers(1, 65535)),
    st.builds(RelayAddress, node_ids, ipv4.filter(lambda h: h != "0.0.0.0"), st.integers(1, 65535)),
)


@given(st.lists(keynode_address, min_size=1, max_size=5).map(tuple))
def test_keynode_addresses_round_trip(addresses: tuple[UtpAddress | RelayAddress, ...]) -> None:
    text = format_keynode_addresses(addresses)
    assert keynode_addresses(text) == addresses


def test_the_issue_example_and_ipv6_escapes() -> None:
    relay = NodeId(bytes(32))
    text = f"utp:198.51.100.7:4000;relay:{relay}@198.18.0.2:4000"
    assert keynode_addresses(text) == (UtpAddress("198.51.100.7", 4000), RelayAddress(relay, "198.18.0.2", 4000))
    assert format_keynode_addresses((UtpAddress("2001:db8::1", 4000),)) == "utp:2001!:db8!:!:1:4000"
    assert keynode_addresses("quic:1.2.3.4:1;utp:1.2.3.4:2") == (UtpAddress("1.2.3.4", 2),)  # unknown skipped
    for bad in ("", "utp:1.2.3.4", "utp:1.2.3.4:0", "utp:0.0.0.0:1", "UTP:1.2.3.4:1", "utp:a b:1", "utp:x!y:1",
                "quic:1.2.3.4:1", "relay:1.2.3.4:1"):
        with pytest.raises(AddressInvalid):
            keynode_addresses(bad)


def test_relay_server_entries() -> None:
    relay = NodeId(bytes(range(32)))
    assert parse_relay_server(f"{relay}@198.18.0.2:4000") == RelayAddress(relay, "198.18.0.2", 4000)
    assert parse_relay_server(f"{relay}@[2001:db8::2]:4000") == RelayAddress(relay, "2001:db8::2", 4000)
    assert parse_relay_server(f"relay:{relay}@relay.example:4000") == RelayAddress(relay, "relay.example", 4000)
    for bad in ("198.18.0.2:4000", f"{relay}@198.18.0.2", f"{relay}@2001:db8::2:4000", "v123@1.2.3.4:1",
                f"{relay}@0.0.0.0:1", f"{relay}@1.2.3.4:70000", 5):
        with pytest.raises(RelayServerInvalid):
            parse_relay_server(bad)


# --- signed records ----------------------------------------------------------------------


def test_records_verify_and_only_newer_ones_replace_older() -> None:
    key = nacl.signing.SigningKey(bytes(range(32)))
    clock = SequenceClock()
    first = sign_record(key, clock.next(), "utp:198.51.100.7:4000")
    second = sign_record(key, clock.next(), "utp:198.51.100.7:4001")
    assert second.seq > first.seq
    assert record_from_text(first.to_text()) == first
    book = RecordBook()
    book.offer(second)
    with pytest.raises(RecordOutdated):
        book.offer(first)
    assert book.get(first.node_id) == second
    forged = bytearray(first.to_bytes())
    forged[-70] ^= 1  # the address text
    with pytest.raises((RecordForged, RecordInvalid)):
        record_from_bytes(bytes(forged))
    other = nacl.signing.SigningKey(bytes(range(1, 33)))
    stolen = sign_record(other, clock.next(), "utp:203.0.113.9:4000")
    claimed = NodeId(bytes(key.verify_key)).__bytes__() + stolen.to_bytes()[33:]
    with pytest.raises(RecordForged):
        record_from_bytes(stolen.to_bytes()[:1] + claimed)


@given(st.binary(max_size=200))
def test_hostile_records_raise_only_record_invalid(data: bytes) -> None:
    try:
        record_from_bytes(data)
    except RecordInvalid:
        pass
    try:
        record_from_text("keynode-record:" + data.hex())
    except RecordInvalid:
        pass


def test_nonces_over_all_senders_are_bounded_and_evicted_ones_stay_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    from proxy.rendezvous import wire

    monkeypatch.setattr(wire, "MAX_NONCES", 100)
    opener = Opener(BOB)
    senders = [KeyRing(index.to_bytes(32, "big")) for index in range(1, 11)]
    sent = []
    for round_ in range(30):
        for index, sender in enumerate(senders):
            data = seal(sender, BOB.node_id_bytes, m.PING, m.Ping(os.urandom(12)).encode(), NOW_MS + round_)
            opener.open(data, NOW_MS + 100, f"192.0.2.{index}")
            sent.append(data)
    assert opener.nonce_count <= 100
    for data in sent:
        with pytest.raises(Replayed):
            opener.open(data, NOW_MS + 100, "192.0.2.1")


@given(st.text(max_size=80))
def test_hostile_relay_server_entries_raise_only_relay_server_invalid(text: str) -> None:
    try:
        parse_relay_server(text)
    except RelayServerInvalid:
        pass


@given(st.lists(keynode_address, min_size=1, max_size=4).map(tuple), st.integers(0, 2**64 - 1))
def test_signed_records_round_trip_through_their_text(addresses: tuple[UtpAddress | RelayAddress, ...],
                                                      seq: int) -> None:
    key = nacl.signing.SigningKey(bytes(range(32)))
    record = sign_record(key, seq, format_keynode_addresses(addresses))
    parsed = record_from_text(record.to_text())
    assert parsed == record and parsed.understood() == addresses
