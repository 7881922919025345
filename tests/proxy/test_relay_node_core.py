"""The relay server core (sans-IO, a fake clock): forwarding between registered
clients, the sender tag, limits, drops by reason, last registration wins."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.identity.node_id import NodeId
from proxy.relay.errors import FrameTooLarge, RelayFull, RelayLimitsInvalid, RelayProtocolError
from proxy.relay.forwarding import RelayClient, RelayCore
from proxy.relay.frames import (
    GONE_DISCONNECTED,
    GONE_REPLACED,
    HEADER_SIZE,
    MAX_DATAGRAM,
    PeerGone,
    Ping,
    Pong,
    Recv,
    RecvBatch,
    Restarting,
    Send,
    SendBatch,
    ServerInfo,
    decode_frames,
    encode_frame,
    frame_bytes,
)
from proxy.relay.limits import RelayLimits

A, B, C = (NodeId(bytes([n]) * 32) for n in (1, 2, 3))


class Wakes:
    def __init__(self) -> None:
        self.count = 0

    def __call__(self) -> None:
        self.count += 1


def frames_for(client: RelayClient) -> list[object]:
    return decode_frames(b"".join(frame_bytes(t, body) for t, body in client.take_output()))


def registered(core: RelayCore, node_id: NodeId, now: float = 0.0) -> RelayClient:
    client = core.register(node_id, Wakes(), now)
    assert isinstance(frames_for(client)[0], ServerInfo)
    return client


def test_send_reaches_the_destination_tagged_with_the_senders_registered_nodeid() -> None:
    core = RelayCore()
    a, b = registered(core, A), registered(core, B)
    core.receive_bytes(a, encode_frame(Send(B, b"datagram 1")) + encode_frame(Send(B, b"datagram 2")), 1.0)
    assert frames_for(b) == [Recv(A, b"datagram 1"), Recv(A, b"datagram 2")]
    assert frames_for(a) == []
    assert core.stats.frames_forwarded == 2 and core.stats.bytes_forwarded == 20


def test_a_client_cannot_choose_the_sender_tag() -> None:
    """A client writing a RECV naming someone else is refused outright; a SEND always
    arrives tagged with the NodeId the transport authenticated."""
    core = RelayCore()
    a, b, c = registered(core, A), registered(core, B), registered(core, C)
    with pytest.raises(RelayProtocolError):
        core.receive_bytes(c, encode_frame(Recv(A, b"I am A")), 1.0)
    assert frames_for(b) == [] and frames_for(a) == []
    core.receive_bytes(registered(core, C), encode_frame(Send(B, bytes(A) + b"claims A")), 1.0)
    assert frames_for(b) == [Recv(C, bytes(A) + b"claims A")]


def test_sending_to_an_unregistered_nodeid_is_a_counted_drop_and_nothing_else() -> None:
    core = RelayCore()
    a, b = registered(core, A), registered(core, B)
    for _ in range(100):
        core.handle_frame(a, 0x01, bytes(C) + b"x" * 100, 1.0)
    assert core.stats.drops == {"no_such_peer": 100}
    assert frames_for(a) == [] and frames_for(b) == []
    assert core.stats.frames_forwarded == 0


def test_the_token_bucket_limits_each_nodeid_and_counts_what_it_drops() -> None:
    limits = RelayLimits(rate=100_000, burst=100_000)
    core = RelayCore(limits)
    a, b, c = registered(core, A), registered(core, B), registered(core, C)
    frame = encode_frame(Send(B, b"x" * 963))  # 1000 bytes on the wire
    core.receive_bytes(a, frame * 500, 0.0)  # 500 kB at once: the burst passes
    assert len(frames_for(b)) == 100
    assert core.stats.drops["rate_limited"] == 400
    core.receive_bytes(a, frame * 500, 1.0)  # one second later: rate x 1 s
    assert len(frames_for(b)) == 100
    core.receive_bytes(c, frame * 10, 1.0)  # another NodeId has its own bucket
    assert len(frames_for(b)) == 10


def test_the_bucket_survives_a_reconnect() -> None:
    core = RelayCore(RelayLimits(rate=100_000, burst=100_000))
    a, b = registered(core, A), registered(core, B)
    frame = encode_frame(Send(B, b"x" * 963))
    core.receive_bytes(a, frame * 100, 0.0)
    core.unregister(a)
    a = registered(core, A, 0.0)
    core.receive_bytes(a, frame * 100, 0.0)
    assert len(frames_for(b)) == 100


def test_a_full_queue_drops_and_counts() -> None:
    core = RelayCore(RelayLimits(queue_frames=10))
    a, b = registered(core, A), registered(core, B)
    core.receive_bytes(a, encode_frame(Send(B, b"x")) * 15, 0.0)
    assert len(frames_for(b)) == 10
    assert core.stats.drops["queue_full"] == 5


def test_oversized_and_malformed_sends_are_dropped_and_the_stream_goes_on() -> None:
    core = RelayCore()
    a, b = registered(core, A), registered(core, B)
    data = (frame_bytes(0x01, bytes(B) + b"x" * (MAX_DATAGRAM + 1)) + frame_bytes(0x01, b"short")
            + frame_bytes(0x04, b"1234") + frame_bytes(0x7E, b"future") + encode_frame(Send(B, b"fine")))
    core.receive_bytes(a, data, 0.0)
    assert frames_for(b) == [Recv(A, b"fine")]
    assert core.stats.drops == {"oversized": 1, "malformed": 2, "unknown_type": 1}


def test_ping_is_answered_with_its_payload() -> None:
    core = RelayCore()
    a = registered(core, A)
    core.receive_bytes(a, encode_frame(Ping(b"12345678")), 0.0)
    assert frames_for(a) == [Pong(b"12345678")]


def test_the_last_registration_wins() -> None:
    core = RelayCore()
    old, b = registered(core, A), registered(core, B)
    new = registered(core, A, 1.0)
    assert frames_for(old) == [PeerGone(A, GONE_REPLACED)]
    assert old.closing and not new.closing
    assert core.client(A) is new and core.stats.replaced == 1
    core.receive_bytes(b, encode_frame(Send(A, b"to A")), 1.0)
    assert frames_for(new) == [Recv(B, b"to A")] and frames_for(old) == []
    core.handle_frame(old, 0x01, bytes(B) + b"from the old one", 1.0)  # ignored: it is closing
    assert frames_for(b) == []
    core.unregister(old)  # the old connection ending does not remove the new one
    assert core.client(A) is new and frames_for(b) == []


def test_senders_are_told_when_the_destination_leaves() -> None:
    core = RelayCore()
    a, b, c = registered(core, A), registered(core, B), registered(core, C)
    core.receive_bytes(a, encode_frame(Send(B, b"hello")), 0.0)
    frames_for(b)
    core.unregister(b)
    assert frames_for(a) == [PeerGone(B, GONE_DISCONNECTED)]
    assert frames_for(c) == []  # never sent to B
    assert b.closing and core.client(B) is None


def test_max_clients_refuses_new_nodeids_but_a_reconnect_still_wins() -> None:
    core = RelayCore(RelayLimits(max_clients=2))
    registered(core, A), registered(core, B)
    with pytest.raises(RelayFull):
        core.register(C, Wakes(), 0.0)
    registered(core, A, 1.0)
    assert core.stats.refused_full == 1 and core.client_count == 2


def test_keepalive_pings_and_an_idle_client_is_closed() -> None:
    core = RelayCore(RelayLimits(keepalive=10.0, idle_timeout=25.0))
    a = registered(core, A)
    assert core.tick(a, 5.0) == 10.0
    core.tick(a, 10.0)
    assert frames_for(a) == [Ping((1).to_bytes(8, "big"))]
    core.receive_bytes(a, encode_frame(Pong((1).to_bytes(8, "big"))), 12.0)
    core.tick(a, 30.0)
    assert not a.closing
    core.tick(a, 37.0)
    assert a.closing and core.client(A) is None


def test_wake_is_called_when_a_queue_becomes_non_empty() -> None:
    core = RelayCore()
    wakes = Wakes()
    a, b = registered(core, A), core.register(B, wakes, 0.0)
    assert wakes.count == 1  # SERVER_INFO
    core.receive_bytes(a, encode_frame(Send(B, b"1")) + encode_frame(Send(B, b"2")), 0.0)
    assert wakes.count == 1  # still queued since
    b.take_output()
    core.receive_bytes(a, encode_frame(Send(B, b"3")), 0.0)
    assert wakes.count == 2


@pytest.mark.parametrize("field", ["rate", "burst", "queue_frames", "keepalive", "max_clients"])
def test_limits_must_be_positive(field: str) -> None:
    with pytest.raises(RelayLimitsInvalid, match=field):
        RelayLimits(**{field: 0})


def test_a_burst_smaller_than_one_largest_frame_is_refused() -> None:
    with pytest.raises(RelayLimitsInvalid, match="burst"):
        RelayLimits(burst=MAX_DATAGRAM)
    RelayLimits(burst=HEADER_SIZE + 32 + MAX_DATAGRAM)


def test_a_batch_is_forwarded_whole_tagged_with_the_sender_and_counted_per_datagram() -> None:
    core = RelayCore()
    a, b = registered(core, A), registered(core, B)
    datagrams = tuple(bytes([n]) * (100 + n) for n in range(30))
    core.receive_bytes(a, encode_frame(SendBatch(B, datagrams)), 0.0)
    assert frames_for(b) == [RecvBatch(A, datagrams)]
    assert core.stats.frames_forwarded == 30 and core.stats.bytes_forwarded == sum(map(len, datagrams))
    core.receive_bytes(a, encode_frame(SendBatch(C, datagrams)), 0.0)
    core.receive_bytes(a, frame_bytes(0x09, bytes(B) + b"\x00\x09short"), 0.0)
    assert core.stats.drops == {"no_such_peer": 30, "malformed": 1}
    assert frames_for(b) == []


def test_a_rate_limited_batch_counts_its_datagrams() -> None:
    core = RelayCore(RelayLimits(rate=70_000, burst=70_000))
    a, b = registered(core, A), registered(core, B)
    batch = encode_frame(SendBatch(B, (b"x" * 1000,) * 40))  # about 40 kB
    core.receive_bytes(a, batch * 3, 0.0)
    assert len(frames_for(b)) == 1
    assert core.stats.drops == {"rate_limited": 80}


@given(st.lists(st.binary(max_size=300) | st.sampled_from([
    encode_frame(Send(B, b"ok")), encode_frame(SendBatch(B, (b"1", b"2"))), frame_bytes(0x09, bytes(B) + b"\x00"),
    frame_bytes(0x01, b"short"), frame_bytes(0x66, b"?"), encode_frame(Ping(b"12345678"))]), max_size=30))
def test_hostile_bytes_from_a_client_end_in_typed_errors_and_never_reach_others_untagged(chunks: list[bytes]) -> None:
    core = RelayCore()
    attacker, b = registered(core, A), registered(core, B)
    try:
        for chunk in chunks:
            core.receive_bytes(attacker, chunk, 0.0)
    except (FrameTooLarge, RelayProtocolError):
        pass
    for frame in frames_for(b):
        assert isinstance(frame, Recv | RecvBatch) and frame.source == A
    assert core.client(B) is b


def test_a_restart_is_announced_to_every_client() -> None:
    core = RelayCore()
    a, b = registered(core, A), registered(core, B)
    core.announce_restart(1.5, 60.0)
    assert frames_for(a) == frames_for(b) == [Restarting(1500, 60000)]
