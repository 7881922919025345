"""Out-of-band message codec and datagram classification."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nat.errors import MalformedMessage, NatError
from nat.message import (
    PING,
    PONG,
    MessageType,
    classify_datagram,
    decode_message,
    encode_message,
)


def test_original_wire_bytes() -> None:
    # The original system's format: 4-byte big-endian uint32.
    assert encode_message(PING) == b"\x00\x00\x00\x00"
    assert encode_message(PONG) == b"\x00\x00\x00\x01"
    assert decode_message(b"\x00\x00\x00\x00") is MessageType.PING
    assert decode_message(b"\x00\x00\x00\x01") is MessageType.PONG
    assert PING == 0 and PONG == 1


@given(st.integers(min_value=0, max_value=(1 << 24) - 1))
def test_round_trip(value: int) -> None:
    data = encode_message(value)
    assert len(data) == 4
    assert classify_datagram(data) == "message"
    assert decode_message(data) == value


@given(st.one_of(st.integers(max_value=-1), st.integers(min_value=1 << 24)))
def test_encode_rejects_out_of_range(value: int) -> None:
    with pytest.raises(ValueError):
        encode_message(value)


@pytest.mark.parametrize("bad", [b"\x00\x00\x00\x00", 1.0, None, True])
def test_encode_rejects_non_int(bad: object) -> None:
    with pytest.raises(TypeError):
        encode_message(bad)  # type: ignore[arg-type]


@given(st.binary(max_size=2000))
def test_decode_hostile_input_is_typed(data: bytes) -> None:
    kind = classify_datagram(data)
    assert kind in ("utp", "message", "junk")
    if kind == "message":
        assert decode_message(data) == struct.unpack("!I", data)[0]
    else:
        with pytest.raises(MalformedMessage) as info:
            decode_message(data)
        assert isinstance(info.value, NatError)


@given(
    st.integers(min_value=0, max_value=4),
    st.binary(min_size=19, max_size=1500),
)
def test_utp_headers_classify_as_utp(packet_type: int, rest: bytes) -> None:
    data = bytes([packet_type << 4 | 1]) + rest
    assert classify_datagram(data) == "utp"


@given(st.binary(min_size=1, max_size=1500))
def test_classification_rules(data: bytes) -> None:
    kind = classify_datagram(data)
    looks_utp = len(data) >= 20 and data[0] & 0x0F == 1 and data[0] >> 4 <= 4
    if looks_utp:
        assert kind == "utp"
    elif len(data) == 4 and data[0] == 0:
        assert kind == "message"
    else:
        assert kind == "junk"


def test_short_utp_like_and_reserved_extension_space_are_junk() -> None:
    assert classify_datagram(b"\x01" * 19) == "junk"  # uTP-like but no full header
    assert classify_datagram(b"\x51" + bytes(19)) == "junk"  # type 5 does not exist
    assert classify_datagram(b"\x02" + bytes(19)) == "junk"  # version 2
    assert classify_datagram(b"") == "junk"
    # Reserved for future message types: 0x00 then more than 3 bytes.
    assert classify_datagram(b"\x00" * 5) == "junk"
    assert classify_datagram(b"\x00" * 20) == "junk"
