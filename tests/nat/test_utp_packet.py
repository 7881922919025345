"""uTP packet codec: round trips, libutp's SACK bit order, hostile input."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nat.errors import MalformedPacket
from nat.utp.packet import (
    HEADER_SIZE,
    ST_DATA,
    ST_FIN,
    ST_RESET,
    ST_STATE,
    ST_SYN,
    Packet,
    build_sack,
    decode_packet,
    encode_packet,
    looks_like_utp,
    parse_datagram,
    sack_bits,
)

packets = st.builds(
    Packet,
    st.sampled_from([ST_DATA, ST_FIN, ST_STATE, ST_RESET, ST_SYN]),
    st.integers(0, 0xFFFF),
    st.integers(0, 0xFFFF),
    st.integers(0, 0xFFFF),
    timestamp_us=st.integers(0, 0xFFFFFFFF),
    timestamp_diff_us=st.integers(0, 0xFFFFFFFF),
    wnd_size=st.integers(0, 0xFFFFFFFF),
    sack=st.none() | st.binary(min_size=1, max_size=32),
    payload=st.binary(max_size=1500),
)


@given(packets)
def test_round_trip(packet: Packet) -> None:
    data = packet.encode()
    assert looks_like_utp(data)
    assert decode_packet(data) == packet


def test_header_layout_matches_bep29() -> None:
    data = encode_packet(
        ST_DATA, 0x1234, 0xFFFF, 7, timestamp_us=1, timestamp_diff_us=2, wnd_size=3, payload=b"x"
    )
    assert data == struct.pack(">BBHIIIHH", 0x01, 0, 0x1234, 1, 2, 3, 0xFFFF, 7) + b"x"
    assert len(data) == HEADER_SIZE + 1


def test_sack_bits_are_least_significant_first_like_libutp() -> None:
    # offset 0 (ack_nr + 2) is bit 0 of byte 0; offset 9 is bit 1 of byte 1
    assert build_sack([0, 9, 31]) == bytes([0x01, 0x02, 0x00, 0x80])
    assert sack_bits(bytes([0x01, 0x02, 0x00, 0x80])) == [0, 9, 31]
    data = encode_packet(ST_STATE, 1, 2, 3, sack=build_sack([0, 9]))
    assert data[1] == 1  # extension type: selective ACK
    assert data[HEADER_SIZE : HEADER_SIZE + 2] == b"\x00\x04"


def test_unknown_extensions_are_skipped() -> None:
    header = bytearray(encode_packet(ST_DATA, 1, 2, 3))
    header[1] = 2  # extension bits (libutp's extension 2), 8 bytes
    # chain: ext 2 (8 bytes) -> ext 77 (3 bytes) -> ext 1 (SACK, 4 bytes) -> payload
    data = (
        bytes(header)
        + bytes([77, 8]) + b"12345678"
        + bytes([1, 3]) + b"xyz"
        + bytes([0, 4]) + b"\x05\x00\x00\x00"
        + b"payload"
    )
    packet = decode_packet(data)
    assert packet.sack == b"\x05\x00\x00\x00"
    assert packet.payload == b"payload"


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x01" * 19,
        bytes([0x02]) + bytes(19),  # version 2
        bytes([0x51]) + bytes(19),  # type 5
        bytes([0x01, 0x01]) + bytes(18),  # SACK extension header missing
        bytes([0x01, 0x01]) + bytes(18) + b"\x00\x09abc",  # SACK runs past the end
        bytes([0x01, 0x01]) + bytes(18) + b"\x00\x00",  # empty SACK
    ],
)
def test_malformed(data: bytes) -> None:
    with pytest.raises(MalformedPacket):
        decode_packet(data)


def test_looks_like_utp() -> None:
    assert not looks_like_utp(b"\x00\x00\x00\x00")
    assert not looks_like_utp(bytes([0x41]) + bytes(18))
    assert looks_like_utp(bytes([0x41]) + bytes(19))
    assert not looks_like_utp(bytes([0x51]) + bytes(19))


@settings(max_examples=300)
@given(st.binary(max_size=600))
def test_hostile_bytes_only_raise_malformed(data: bytes) -> None:
    try:
        packet = decode_packet(data)
    except MalformedPacket:
        return
    assert 0 <= packet.type <= ST_SYN
    assert parse_datagram(data)[0] == packet.type


@settings(max_examples=300)
@given(packets, st.data())
def test_mutated_packets_never_crash(packet: Packet, data: st.DataObject) -> None:
    raw = bytearray(packet.encode())
    for _ in range(data.draw(st.integers(1, 4))):
        index = data.draw(st.integers(0, len(raw) - 1))
        raw[index] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(raw)))
    try:
        decode_packet(bytes(raw[:cut]))
    except MalformedPacket:
        pass
