"""The relay frame codec: round trips (Hypothesis) and hostile input."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.identity.node_id import NodeId
from proxy.relay.errors import (
    DatagramTooLarge,
    FrameTooLarge,
    FrameTruncated,
    MalformedFrame,
    RelayFrameError,
    UnknownFrameType,
)
from proxy.relay.frames import (
    FRAME_TYPES,
    MAX_DATAGRAM,
    MAX_FRAME,
    FrameDecoder,
    Health,
    PeerGone,
    Ping,
    Pong,
    Recv,
    RecvBatch,
    Restarting,
    Send,
    SendBatch,
    ServerInfo,
    count_batch,
    decode_frames,
    encode_frame,
    frame_bytes,
    parse_frame,
)

node_ids = st.binary(min_size=32, max_size=32).map(NodeId)
datagrams = st.binary(max_size=2048) | st.just(b"\x01" * MAX_DATAGRAM)
u32 = st.integers(0, 2**32 - 1)
u64 = st.integers(0, 2**64 - 1)
frames = st.one_of(
    st.builds(Send, node_ids, datagrams),
    st.builds(Recv, node_ids, datagrams),
    st.builds(SendBatch, node_ids, st.lists(st.binary(max_size=1500), min_size=1, max_size=20).map(tuple)),
    st.builds(RecvBatch, node_ids, st.lists(st.binary(max_size=1500), min_size=1, max_size=20).map(tuple)),
    st.builds(PeerGone, node_ids, st.integers(0, 255)),
    st.builds(Ping, st.binary(min_size=8, max_size=8)),
    st.builds(Pong, st.binary(min_size=8, max_size=8)),
    st.builds(Health, st.text(max_size=200)),
    st.builds(ServerInfo, st.integers(0, 255), u32, u64, u64, u32),
    st.builds(Restarting, u32, u32),
)


@given(st.lists(frames, max_size=8))
def test_frames_round_trip(sequence: list) -> None:
    assert decode_frames(b"".join(encode_frame(frame) for frame in sequence)) == sequence


@given(st.lists(frames, min_size=1, max_size=6), st.data())
def test_frames_round_trip_whatever_the_read_sizes(sequence: list, data: st.DataObject) -> None:
    stream = b"".join(encode_frame(frame) for frame in sequence)
    decoder = FrameDecoder()
    out = []
    position = 0
    while position < len(stream):
        step = data.draw(st.integers(1, max(1, len(stream) - position)))
        decoder.feed(stream[position : position + step])
        position += step
        while (frame := decoder.next_frame()) is not None:
            out.append(frame)
    decoder.end()
    assert out == sequence


@given(st.lists(frames, min_size=1, max_size=4), st.data())
def test_a_stream_cut_inside_a_frame_is_truncated(sequence: list, data: st.DataObject) -> None:
    stream = b"".join(encode_frame(frame) for frame in sequence)
    cut = data.draw(st.integers(1, len(stream) - 1))
    decoder = FrameDecoder()
    decoder.feed(stream[:cut])
    while decoder.next_raw() is not None:
        pass
    if decoder.buffered:
        with pytest.raises(FrameTruncated):
            decoder.end()


@given(st.binary(max_size=4096))
def test_arbitrary_bytes_give_frames_or_typed_errors(junk: bytes) -> None:
    decoder = FrameDecoder()
    decoder.feed(junk)
    for _ in range(len(junk) + 1):
        try:
            if decoder.next_frame() is None:
                break
        except (UnknownFrameType, MalformedFrame):
            continue  # consumed: the decoder goes on
        except FrameTooLarge:
            with pytest.raises(FrameTooLarge):  # and stays failed
                decoder.next_raw()
            break
    try:
        decoder.end()
    except FrameTruncated:
        pass


def test_an_oversized_header_is_refused_before_its_body_arrives() -> None:
    decoder = FrameDecoder()
    decoder.feed(struct.pack("!BI", 0x01, MAX_FRAME + 1))
    with pytest.raises(FrameTooLarge):
        decoder.next_raw()
    assert decoder.buffered == 5  # nothing more was waited for or buffered
    decoder.feed(encode_frame(Ping(b"12345678")))
    with pytest.raises(FrameTooLarge):
        decoder.next_raw()


def test_the_largest_frame_passes_and_one_more_byte_does_not() -> None:
    body = b"x" * MAX_FRAME
    decoder = FrameDecoder()
    decoder.feed(frame_bytes(0x06, body))
    assert decoder.next_raw() == (0x06, body)
    with pytest.raises(FrameTooLarge):
        frame_bytes(0x06, body + b"x")


def test_an_unknown_type_is_consumed_and_reported() -> None:
    assert 0x7F not in FRAME_TYPES
    decoder = FrameDecoder()
    decoder.feed(frame_bytes(0x7F, b"future") + encode_frame(Ping(b"abcdefgh")))
    with pytest.raises(UnknownFrameType) as caught:
        decoder.next_raw()
    assert caught.value.frame_type == 0x7F
    assert decoder.next_frame() == Ping(b"abcdefgh")


@pytest.mark.parametrize(
    ("frame_type", "body"),
    [(0x01, b"short"), (0x02, b""), (0x03, b"\x00" * 32), (0x04, b"1234567"), (0x05, b"123456789"),
     (0x06, b"\xff\xfe"), (0x07, b"\x00" * 24), (0x08, b"\x00" * 7)],
)
def test_bad_bodies_are_malformed(frame_type: int, body: bytes) -> None:
    with pytest.raises(MalformedFrame):
        parse_frame(frame_type, body)


def test_datagrams_over_the_limit_are_refused_both_ways() -> None:
    node = NodeId(b"\x07" * 32)
    with pytest.raises(DatagramTooLarge):
        encode_frame(Send(node, b"x" * (MAX_DATAGRAM + 1)))
    with pytest.raises(DatagramTooLarge):
        parse_frame(0x02, bytes(node) + b"x" * (MAX_DATAGRAM + 1))
    assert issubclass(DatagramTooLarge, RelayFrameError)


def test_values_that_do_not_fit_are_refused() -> None:
    with pytest.raises(MalformedFrame):
        encode_frame(PeerGone(NodeId(b"\x01" * 32), 256))
    with pytest.raises(MalformedFrame):
        encode_frame(Ping(b"short"))
    with pytest.raises(MalformedFrame):
        encode_frame(Restarting(-1, 0))


def test_wire_layout_of_send() -> None:
    node = NodeId(bytes(range(32)))
    assert encode_frame(Send(node, b"hi")) == b"\x01\x00\x00\x00\x22" + bytes(range(32)) + b"hi"


@pytest.mark.parametrize("body", [b"", b"\x00\x05abc", b"\x00\x01a\x00", b"\x00\x03abcd"])
def test_batches_whose_lengths_do_not_add_up_are_malformed(body: bytes) -> None:
    node = bytes(32)
    for frame_type in (0x09, 0x0A):
        with pytest.raises(MalformedFrame):
            parse_frame(frame_type, node + body)
    with pytest.raises(MalformedFrame):
        count_batch(node + body)


def test_batch_limits() -> None:
    node = NodeId(b"\x05" * 32)
    with pytest.raises(MalformedFrame):
        encode_frame(SendBatch(node, ()))
    with pytest.raises(DatagramTooLarge):
        encode_frame(SendBatch(node, (b"x" * 0x10000,)))
    assert count_batch(encode_frame(SendBatch(node, (b"", b"ab", b"x" * 0xFFFF)))[5:]) == 3
