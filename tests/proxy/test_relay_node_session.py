"""The client side of a relay connection (sans-IO): what it writes and what it hands on."""

from __future__ import annotations

import pytest

from proxy.identity.node_id import NodeId
from proxy.relay.errors import RelayProtocolError
from proxy.relay.frames import (
    MAX_DATAGRAM,
    Health,
    Ping,
    Pong,
    Recv,
    RecvBatch,
    Send,
    SendBatch,
    ServerInfo,
    decode_frames,
    encode_frame,
    frame_bytes,
)
from proxy.relay.session import RelayClientSession

A, B = NodeId(b"\x01" * 32), NodeId(b"\x02" * 32)


def test_runs_for_one_peer_leave_as_batches_in_order() -> None:
    session = RelayClientSession(0.0)
    for n in range(3):
        session.send(A, b"a%d" % n)
    session.send(B, b"b0")
    session.send(A, b"a3")
    assert decode_frames(session.take_output()) == [
        SendBatch(A, (b"a0", b"a1", b"a2")), Send(B, b"b0"), Send(A, b"a3")]
    assert session.take_output() == b""


def test_a_batch_is_cut_at_64_kib_and_a_64_kib_datagram_goes_alone() -> None:
    session = RelayClientSession(0.0)
    for _ in range(100):
        session.send(A, b"x" * 1400)
    session.send(A, b"y" * MAX_DATAGRAM)
    frames = decode_frames(session.take_output())
    assert [len(f.datagrams) for f in frames[:-1]] == [46, 46, 8]  # type: ignore[union-attr]
    assert frames[-1] == Send(A, b"y" * MAX_DATAGRAM)


def test_the_queue_is_bounded_and_drops_are_counted() -> None:
    session = RelayClientSession(0.0, queue_bytes=10_000)
    sent = sum(session.send(A, b"x" * 1000) for _ in range(20))
    assert sent == 9 and session.drops["queue_full"] == 11
    assert not session.send(A, b"x" * (MAX_DATAGRAM + 1)) and session.drops["oversized"] == 1


def test_receiving_hands_on_datagrams_answers_pings_and_learns_registration() -> None:
    session = RelayClientSession(0.0)
    info = ServerInfo(1, MAX_DATAGRAM, 1000, 100_000, 30_000)
    data = (encode_frame(info) + encode_frame(Recv(A, b"one")) + encode_frame(RecvBatch(B, (b"two", b"three")))
            + encode_frame(Ping(b"12345678")) + encode_frame(Health("degraded")) + frame_bytes(0x7D, b"new"))
    frames = session.receive_bytes(data, 1.0)
    assert frames == [info, Recv(A, b"one"), RecvBatch(B, (b"two", b"three")), Health("degraded")]
    assert session.registered
    assert decode_frames(session.take_output()) == [Pong(b"12345678")]


def test_keepalive_pings_measure_the_rtt_and_silence_times_out() -> None:
    session = RelayClientSession(0.0, keepalive=10.0, timeout=30.0)
    assert session.tick(5.0) == 10.0
    session.tick(10.0)
    (ping,) = decode_frames(session.take_output())
    assert isinstance(ping, Ping)
    session.receive_bytes(encode_frame(Pong(ping.payload)), 10.25)
    assert session.rtt == 0.25
    assert not session.timed_out(40.0) and session.timed_out(40.25)


def test_a_relay_sending_send_frames_is_a_protocol_error() -> None:
    with pytest.raises(RelayProtocolError):
        RelayClientSession(0.0).receive_bytes(encode_frame(SendBatch(A, (b"x",))), 0.0)
