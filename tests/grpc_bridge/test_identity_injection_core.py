"""The sans-IO HTTP/2 identity relay between two in-memory h2 peers (a caller and a
server), bytes moved by hand: forged headers in every variant, flow control and the
bound on what the relay holds, RST_STREAM, GOAWAY, PING, settings, hostile input."""

from __future__ import annotations

from dataclasses import dataclass, field

import h2.config
import h2.connection
import h2.events
import hyperframe.frame
import pytest
from h2.errors import ErrorCodes
from h2.settings import SettingCodes
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from grpc_bridge.h2_errors import ServerProtocolError, TunnelProtocolError
from grpc_bridge.h2_goaway import GoAway, GoAwaySplitter, goaway_frame
from grpc_bridge.h2_identity import identity_headers, parse_peer_header
from grpc_bridge.h2_relay import H2IdentityRelay, strip_keynode_headers
from proxy.identity.node_id import NodeId

OWN = NodeId(bytes(range(32)))
PEER = NodeId(bytes(range(100, 132)))
LEAF_SHA256 = bytes(range(200, 232))
INJECTED = identity_headers(OWN, PEER, LEAF_SHA256)
REQUEST = [(b":method", b"POST"), (b":scheme", b"http"), (b":path", b"/pkg.Svc/Call"), (b":authority", b"node"),
           (b"content-type", b"application/grpc"), (b"te", b"trailers")]
FORGED = [
    (b"x-keynode-node-id", b"vforged"),
    (b"x-keynode-node-id", b"vforged-again"),
    (b"x-keynode-peer", b"By=me;NodeId=vforged;Hash=00"),
    (b"x-keynode-node-id-bin", b"AAFmb3JnZWQ"),  # -bin values travel base64-encoded
    (b"x-keynode-peer-bin", b"forged"),
    (b"x-keynode-anything-else", b"forged"),
]
RESPONSE = [(b":status", b"200"), (b"content-type", b"application/grpc")]
TRAILERS = [(b"grpc-status", b"0"), (b"grpc-message", b"ok")]


def h2_peer(client_side: bool, **options: bool) -> h2.connection.H2Connection:
    connection = h2.connection.H2Connection(h2.config.H2Configuration(client_side=client_side, header_encoding=None, **options))
    connection.initiate_connection()
    return connection


@dataclass
class Wire:
    """caller <-> relay <-> server, in memory. ``pump`` moves bytes until quiet."""

    relay: H2IdentityRelay = field(default_factory=lambda: H2IdentityRelay(INJECTED))
    caller: h2.connection.H2Connection = field(default_factory=lambda: h2_peer(True))
    server: h2.connection.H2Connection = field(default_factory=lambda: h2_peer(False))
    caller_events: list[h2.events.Event] = field(default_factory=list)
    server_events: list[h2.events.Event] = field(default_factory=list)
    peak: int = 0
    server_reads: bool = True  # False: bytes for the server stay in the relay (a server not reading)
    caller_goaways: GoAwaySplitter | None = None  # set: the caller's GOAWAYs kept out of its h2 (as the relay does)

    def __post_init__(self) -> None:
        self.relay.start()
        self.pump()

    def pump(self) -> None:
        moving = True
        while moving:
            moving = False
            data = self.caller.data_to_send()
            if data:
                moving = True
                self.relay.receive_from_tunnel(data)
            data = self.server.data_to_send()
            if data:
                moving = True
                self.relay.receive_from_server(data)
            data = self.relay.take_for_tunnel(1 << 16)
            if data:
                moving = True
                pieces = self.caller_goaways.split(data) if self.caller_goaways else [data]
                for piece in pieces:
                    self.caller_events += [piece] if isinstance(piece, GoAway) else self.caller.receive_data(piece)
            if self.server_reads:
                data = self.relay.take_for_server(1 << 16)
                if data:
                    moving = True
                    self.server_events += self.server.receive_data(data)
            self.peak = max(self.peak, self.relay.buffered_bytes)

    def of(self, kind: type, events: list[h2.events.Event]) -> list:
        return [event for event in events if isinstance(event, kind)]


def collect_data(events: list[h2.events.Event], connection: h2.connection.H2Connection) -> bytes:
    data = b""
    for event in events:
        if isinstance(event, h2.events.DataReceived):
            data += event.data
            connection.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
    return data


def test_identity_header_values() -> None:
    assert INJECTED[0] == (b"x-keynode-node-id", PEER.encode().encode())
    fields = parse_peer_header(INJECTED[1][1].decode("ascii"))
    assert fields == {"by": OWN.encode(), "nodeid": PEER.encode(), "hash": LEAF_SHA256.hex()}


def test_strip_is_case_insensitive_and_drops_every_copy() -> None:
    headers = [(b"X-Keynode-Node-Id", b"a"), (b"x-KEYNODE-peer-bin", b"b"), (b"x-keynode-", b"c"), (b"x-keynodes", b"kept"),
               (b"keep", b"x-keynode-node-id")]
    assert strip_keynode_headers(headers) == [(b"x-keynodes", b"kept"), (b"keep", b"x-keynode-node-id")]


def test_forged_headers_and_trailers_never_reach_the_server() -> None:
    wire = Wire()
    wire.caller.send_headers(1, REQUEST + FORGED)
    wire.caller.send_data(1, b"\x00\x00\x00\x00\x05hello")
    forged_trailers = [(b"x-keynode-node-id", b"vforged"), (b"x-keynode-peer-bin", b"x"), (b"kept", b"1")]
    wire.caller.send_headers(1, forged_trailers, end_stream=True)
    wire.pump()
    [request] = wire.of(h2.events.RequestReceived, wire.server_events)
    keynode = [(name, value) for name, value in request.headers if name.startswith(b"x-keynode-")]
    assert keynode == INJECTED
    assert [name for name, _ in request.headers if not name.startswith(b"x-keynode-")] == [name for name, _ in REQUEST]
    [trailers] = wire.of(h2.events.TrailersReceived, wire.server_events)
    assert trailers.headers == [(b"kept", b"1")]
    assert b"".join(event.data for event in wire.of(h2.events.DataReceived, wire.server_events)) == b"\x00\x00\x00\x00\x05hello"
    assert wire.relay.requests_relayed == 1


def test_upper_case_names_end_the_connection_and_reach_nothing() -> None:
    # HTTP/2 header names are lower case; h2 refuses others as a protocol error.
    wire = Wire(caller=h2_peer(True, validate_outbound_headers=False, normalize_outbound_headers=False))
    wire.caller.send_headers(1, [*REQUEST, (b"X-Keynode-Node-Id", b"vforged")], end_stream=True)
    with pytest.raises(TunnelProtocolError):
        wire.pump()
    assert wire.relay.ended
    wire.pump()
    assert wire.of(h2.events.RequestReceived, wire.server_events) == []
    assert wire.of(h2.events.ConnectionTerminated, wire.caller_events)  # the caller got its GOAWAY
    assert wire.of(h2.events.ConnectionTerminated, wire.server_events)  # the server was told we are gone


def test_response_headers_data_trailers_in_order() -> None:
    wire = Wire()
    wire.caller.send_headers(1, REQUEST, end_stream=True)
    wire.pump()
    body = bytes(range(256)) * 1024  # 256 KiB: beyond the caller's default 64 KiB window
    wire.server.send_headers(1, RESPONSE)
    sent, received = 0, b""
    while sent < len(body):  # send as the server's window allows, as a server would
        size = min(wire.server.local_flow_control_window(1), wire.server.max_outbound_frame_size, len(body) - sent)
        if size:
            wire.server.send_data(1, body[sent : sent + size])
            sent += size
        wire.pump()
        received += collect_data(wire.caller_events, wire.caller)
        wire.caller_events = [event for event in wire.caller_events if not isinstance(event, h2.events.DataReceived)]
        wire.pump()
    wire.server.send_headers(1, TRAILERS, end_stream=True)
    wire.pump()
    while not wire.of(h2.events.StreamEnded, wire.caller_events):  # the rest as the caller's window opens
        received += collect_data(wire.caller_events, wire.caller)
        wire.caller_events = [event for event in wire.caller_events if not isinstance(event, h2.events.DataReceived)]
        wire.pump()
    received += collect_data(wire.caller_events, wire.caller)
    assert received == body
    assert wire.of(h2.events.TrailersReceived, wire.caller_events)[0].headers == TRAILERS
    assert wire.of(h2.events.StreamEnded, wire.caller_events)
    assert wire.relay.open_streams == 0


def test_a_server_that_does_not_read_bounds_what_the_relay_holds() -> None:
    relay = H2IdentityRelay(INJECTED, stream_window=256 << 10, connection_window=512 << 10, outbound_high_water=64 << 10)
    wire = Wire(relay=relay)
    wire.caller.update_settings({SettingCodes.INITIAL_WINDOW_SIZE: 1 << 20})
    wire.caller.send_headers(1, REQUEST)
    wire.pump()
    payload = bytes(i % 251 for i in range(8 << 20))
    offered = received = 0
    chunks: list[bytes] = []
    wire.server_reads = False
    # The server reads nothing: the caller can send no more than the relay's windows.
    while True:
        size = min(wire.caller.local_flow_control_window(1), wire.caller.max_outbound_frame_size, len(payload) - offered)
        if size <= 0:
            break
        wire.caller.send_data(1, payload[offered : offered + size])
        offered += size
        wire.pump()
    assert offered < 1 << 20  # stalled well before the 8 MiB
    bound = relay.connection_window + relay.outbound_high_water + (1 << 16)
    assert wire.peak <= bound
    # The server reads, slowly acknowledging: everything arrives, the bound holds throughout.
    wire.server_reads = True
    while received < len(payload):
        size = min(wire.caller.local_flow_control_window(1), wire.caller.max_outbound_frame_size, len(payload) - offered)
        if size > 0:
            wire.caller.send_data(1, payload[offered : offered + size])
            offered += size
        wire.pump()
        data = collect_data(wire.server_events, wire.server)
        wire.server_events.clear()
        chunks.append(data)
        received += len(data)
        assert data or size > 0, "no progress"
    assert b"".join(chunks) == payload
    assert wire.peak <= bound


def test_rst_stream_both_ways_keeps_the_code() -> None:
    wire = Wire()
    wire.caller.send_headers(1, REQUEST)
    wire.caller.send_headers(3, REQUEST)
    wire.pump()
    wire.caller.reset_stream(1, ErrorCodes.CANCEL)
    wire.pump()
    [reset] = wire.of(h2.events.StreamReset, wire.server_events)
    assert (reset.stream_id, reset.error_code) == (1, ErrorCodes.CANCEL)
    wire.server.reset_stream(3, ErrorCodes.ENHANCE_YOUR_CALM)
    wire.pump()
    [reset] = wire.of(h2.events.StreamReset, wire.caller_events)
    assert (reset.stream_id, reset.error_code) == (3, ErrorCodes.ENHANCE_YOUR_CALM)
    assert wire.relay.open_streams == 0


def test_server_no_error_reset_after_a_complete_response_comes_after_it() -> None:
    wire = Wire()
    wire.caller.send_headers(1, REQUEST)  # the request is still open
    wire.pump()
    wire.server.send_headers(1, RESPONSE)
    wire.server.send_data(1, b"x" * 100)
    wire.server.send_headers(1, TRAILERS, end_stream=True)
    wire.server.reset_stream(1, ErrorCodes.NO_ERROR)
    wire.pump()
    kinds = [type(event) for event in wire.caller_events if getattr(event, "stream_id", None) == 1]
    assert kinds[-3:] == [h2.events.TrailersReceived, h2.events.StreamEnded, h2.events.StreamReset]


def test_server_goaway_refuses_unprocessed_and_new_streams() -> None:
    wire = Wire()
    for stream in (1, 3, 5):
        wire.caller.send_headers(stream, REQUEST)
    wire.pump()
    wire.server.close_connection(ErrorCodes.NO_ERROR, last_stream_id=3)
    wire.pump()
    [goaway] = wire.of(h2.events.ConnectionTerminated, wire.caller_events)
    assert goaway.last_stream_id == 3 and goaway.error_code == ErrorCodes.NO_ERROR
    [reset] = wire.of(h2.events.StreamReset, wire.caller_events)
    assert (reset.stream_id, reset.error_code) == (5, ErrorCodes.REFUSED_STREAM)


def test_caller_goaway_reaches_the_server_and_ping_is_answered_per_hop() -> None:
    wire = Wire()
    wire.caller.ping(b"12345678")
    wire.pump()
    [ack] = wire.of(h2.events.PingAckReceived, wire.caller_events)
    assert ack.ping_data == b"12345678"
    wire.caller.close_connection(ErrorCodes.NO_ERROR)
    wire.pump()
    assert wire.of(h2.events.ConnectionTerminated, wire.server_events)


def test_server_max_concurrent_streams_is_carried_to_the_caller() -> None:
    wire = Wire()
    wire.server.update_settings({SettingCodes.MAX_CONCURRENT_STREAMS: 7})
    wire.pump()
    assert wire.caller.remote_settings.max_concurrent_streams == 7


def test_header_flood_of_continuation_frames_ends_the_connection() -> None:
    wire = Wire()
    headers = hyperframe.frame.HeadersFrame(1)
    headers.data = b""
    flood = headers.serialize()
    for _ in range(200):
        continuation = hyperframe.frame.ContinuationFrame(1)
        continuation.data = b"\x00" * 16000
        flood += continuation.serialize()
    with pytest.raises(TunnelProtocolError):
        wire.relay.receive_from_tunnel(flood)
    assert wire.relay.buffered_bytes < 1 << 16
    assert wire.of(h2.events.RequestReceived, wire.server_events) == []


PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.binary(max_size=200), max_size=6), st.booleans())
def test_hostile_bytes_end_the_connection_or_pass_never_crash(chunks: list[bytes], with_preface: bool) -> None:
    relay = H2IdentityRelay(INJECTED)
    relay.start()
    server = h2_peer(False)
    relay.receive_from_server(server.data_to_send())
    seen: list[h2.events.Event] = []
    try:
        for chunk in ([PREFACE] if with_preface else []) + chunks:
            relay.receive_from_tunnel(chunk)
            seen += server.receive_data(relay.take_for_server(1 << 20))
    except TunnelProtocolError:
        assert relay.ended
    for event in seen:
        if isinstance(event, h2.events.RequestReceived):
            assert [h for h in event.headers if h[0].startswith(b"x-keynode-")] == INJECTED
    assert relay.buffered_bytes < 1 << 20


def frame_bytes(frame_type: int, flags: int, stream: int, payload: bytes) -> bytes:
    return len(payload).to_bytes(3, "big") + bytes([frame_type, flags]) + stream.to_bytes(4, "big") + payload


forged_header = st.tuples(
    st.sampled_from([b"x-keynode-node-id", b"x-keynode-peer", b"x-keynode-node-id-bin", b"x-keynode-z", b"x-other"]),
    st.sampled_from([b"vforged", b"", b"By=x;NodeId=y", b"AAEC"]),
)
hostile_frame = st.one_of(
    # a request on a new or an old stream, forged headers included, maybe as trailers
    st.tuples(st.just("headers"), st.sampled_from([1, 3, 5, 7]), st.lists(forged_header, max_size=4), st.booleans()),
    # any frame at all: type, flags, stream, payload
    st.tuples(st.just("raw"), st.integers(0, 12), st.integers(0, 255), st.sampled_from([0, 1, 2, 3, 5, 2**31 - 1]),
              st.binary(max_size=64)),
    # a well-formed GOAWAY (the relay, not h2, handles those)
    st.tuples(st.just("raw"), st.just(7), st.just(0), st.just(0), st.binary(min_size=8, max_size=16)),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(hostile_frame, max_size=8))
def test_hostile_frames_after_a_valid_start(frames: list[tuple]) -> None:
    """After a valid preface and SETTINGS: requests with forged headers and arbitrary
    frames. Only TunnelProtocolError may come out; the server (a validating h2
    peer) never receives invalid HTTP/2 or a forged header; nothing piles up."""
    relay = H2IdentityRelay(INJECTED)
    relay.start()
    server = h2_peer(False)
    caller = h2_peer(True, validate_outbound_headers=False)
    relay.receive_from_server(server.data_to_send())
    seen: list[h2.events.Event] = []
    goaways = GoAwaySplitter(preface=len(PREFACE))  # kept from the test server's h2, as the relay does

    def to_server(data: bytes) -> list[h2.events.Event]:
        events: list[h2.events.Event] = []
        for piece in goaways.split(data):
            if isinstance(piece, bytes):
                events += server.receive_data(piece)
        return events
    try:
        relay.receive_from_tunnel(caller.data_to_send())
        for frame in frames:
            if frame[0] == "headers":
                _, stream, forged, end = frame
                try:
                    caller.send_headers(stream, REQUEST + forged, end_stream=end)
                    if forged:
                        caller.send_headers(stream, forged, end_stream=True)  # trailers
                except h2.exceptions.ProtocolError:
                    pass  # the caller's own state machine refused: send what it did queue
                data = caller.data_to_send()
            else:
                _, frame_type, flags, stream, payload = frame
                data = frame_bytes(frame_type, flags, stream, payload)
            relay.receive_from_tunnel(data)
            seen += to_server(relay.take_for_server(1 << 20))
            relay.receive_from_server(server.data_to_send())
    except TunnelProtocolError:
        assert relay.ended
    seen += to_server(relay.take_for_server(1 << 20))
    for event in seen:
        if isinstance(event, h2.events.RequestReceived):
            assert [h for h in event.headers if h[0].startswith(b"x-keynode-")] == INJECTED
        if isinstance(event, h2.events.TrailersReceived):
            assert not [h for h in event.headers if h[0].startswith(b"x-keynode-")]
    assert relay.buffered_bytes < 1 << 20


def test_a_caller_that_does_not_read_bounds_what_the_relay_holds() -> None:
    relay = H2IdentityRelay(INJECTED, stream_window=256 << 10, connection_window=512 << 10, outbound_high_water=64 << 10)
    wire = Wire(relay=relay)
    wire.server.update_settings({SettingCodes.INITIAL_WINDOW_SIZE: 1 << 20})
    wire.caller.send_headers(1, REQUEST, end_stream=True)
    wire.pump()
    wire.server.send_headers(1, RESPONSE)
    sent = 0
    # The caller acknowledges nothing: the server can send no more than the windows allow.
    while (size := min(wire.server.local_flow_control_window(1), wire.server.max_outbound_frame_size)) > 0:
        wire.server.send_data(1, b"\x01" * size)
        sent += size
        wire.pump()
    assert sent < 1 << 20
    assert wire.peak <= relay.connection_window + relay.outbound_high_water + (1 << 16)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 9), st.integers(0, 3), st.binary(min_size=8, max_size=40)), max_size=8),
    st.lists(st.integers(1, 50), max_size=20),
)
def test_goaway_splitter_keeps_order_and_bytes_under_any_cut(frames: list[tuple[int, int, bytes]], cuts: list[int]) -> None:
    stream = b""
    expected: list[object] = []
    for frame_type, stream_id, payload in frames:
        raw = frame_bytes(frame_type, 0, stream_id, payload)
        stream += raw
        if frame_type == 7 and stream_id == 0:
            last = int.from_bytes(payload[:4], "big") & 0x7FFFFFFF
            expected.append(GoAway(last, int.from_bytes(payload[4:8], "big"), payload[8:]))
        else:
            expected.append(raw)
    splitter = GoAwaySplitter()
    pieces: list[object] = []
    position = 0
    for cut in [*cuts, len(stream)]:
        pieces += splitter.split(stream[position : position + cut])
        position += cut
    pieces += splitter.split(stream[position:])
    merged: list[object] = []
    for piece in pieces:  # runs for h2 may be cut anywhere: join neighbours
        if isinstance(piece, bytes) and merged and isinstance(merged[-1], bytes):
            merged[-1] += piece
        else:
            merged.append(piece)
    joined: list[object] = []
    for item in expected:
        if isinstance(item, bytes) and joined and isinstance(joined[-1], bytes):
            joined[-1] += item
        else:
            joined.append(item)
    assert merged == joined


def test_graceful_server_goaway_spares_open_streams_and_pings_still_pass() -> None:
    # gRPC's graceful shutdown: GOAWAY(2^31-1) and a PING, then GOAWAY(last), then the
    # open streams finish. h2 alone would close the connection at the first GOAWAY.
    wire = Wire(caller_goaways=GoAwaySplitter())  # the test's h2 peers share h2's limit: not theirs to test
    wire.caller.send_headers(1, REQUEST, end_stream=True)
    wire.pump()
    wire.server.send_headers(1, RESPONSE)
    wire.pump()
    server_goaways = GoAwaySplitter()
    wire.relay.receive_from_server(goaway_frame(2**31 - 1, 0) + frame_bytes(6, 0, 0, b"12345678"))
    wire.server_reads = False
    wire.pump()
    [ping_ack] = [p for p in server_goaways.split(wire.relay.take_for_server(1 << 16)) if isinstance(p, bytes)]
    assert ping_ack == frame_bytes(6, 1, 0, b"12345678")  # the PING after the GOAWAY was answered
    wire.server_reads = True
    [soon] = wire.of(GoAway, wire.caller_events)
    assert soon.last_stream_id == 2**31 - 1
    wire.relay.receive_from_server(goaway_frame(1, 0))
    wire.caller.send_headers(3, REQUEST, end_stream=True)  # after the GOAWAY: refused
    wire.pump()
    wire.server.send_data(1, b"\x00\x00\x00\x00\x02ok")
    wire.server.send_headers(1, TRAILERS, end_stream=True)
    wire.pump()
    data = b"".join(event.data for event in wire.of(h2.events.DataReceived, wire.caller_events))
    assert data == b"\x00\x00\x00\x00\x02ok"
    assert wire.of(h2.events.TrailersReceived, wire.caller_events)[0].headers == TRAILERS
    assert [(event.stream_id, event.error_code) for event in wire.of(h2.events.StreamReset, wire.caller_events)] == [
        (3, ErrorCodes.REFUSED_STREAM)
    ]
    assert len(wire.of(h2.events.RequestReceived, wire.server_events)) == 1
    assert [goaway.last_stream_id for goaway in wire.of(GoAway, wire.caller_events)] == [2**31 - 1, 1]


def test_rapid_reset_is_sent_away_and_the_server_sees_a_bounded_number_of_streams() -> None:
    relay = H2IdentityRelay(INJECTED, max_resets_in_a_row=50)
    wire = Wire(relay=relay)
    with pytest.raises(TunnelProtocolError, match="reset 51 streams in a row"):
        for stream in range(1, 2001, 2):  # open and reset at once, never waiting for an answer
            wire.caller.send_headers(stream, REQUEST)
            wire.caller.reset_stream(stream, ErrorCodes.CANCEL)
            wire.pump()
    wire.pump()
    assert len(wire.of(h2.events.RequestReceived, wire.server_events)) == 51
    [goaway] = wire.of(h2.events.ConnectionTerminated, wire.caller_events)
    assert goaway.error_code == ErrorCodes.ENHANCE_YOUR_CALM


def test_completed_streams_between_resets_keep_a_cancelling_caller_welcome() -> None:
    wire = Wire(relay=H2IdentityRelay(INJECTED, max_resets_in_a_row=5))
    stream = 1
    for _ in range(20):
        for _ in range(5):  # five cancelled calls ...
            wire.caller.send_headers(stream, REQUEST)
            wire.caller.reset_stream(stream, ErrorCodes.CANCEL)
            stream += 2
        wire.caller.send_headers(stream, REQUEST, end_stream=True)  # ... then one that completes
        wire.pump()
        wire.server.send_headers(wire.of(h2.events.RequestReceived, wire.server_events)[-1].stream_id, RESPONSE + TRAILERS,
                                 end_stream=True)
        wire.pump()
        stream += 2
    assert not wire.relay.ended
    assert len(wire.of(h2.events.StreamEnded, wire.caller_events)) == 20


def test_a_header_list_over_the_limit_ends_the_connection_and_reaches_nothing() -> None:
    wire = Wire(relay=H2IdentityRelay(INJECTED, max_header_list_size=8 << 10))
    wire.caller.send_headers(1, [*REQUEST, *((f"x-big-{index}".encode(), b"v" * 1000) for index in range(20))])
    with pytest.raises(TunnelProtocolError):
        wire.pump()
    assert wire.of(h2.events.RequestReceived, wire.server_events) == []


def test_a_server_that_is_not_http2_ends_the_connection_with_a_goaway_to_the_caller() -> None:
    wire = Wire()
    wire.caller.send_headers(1, REQUEST, end_stream=True)
    wire.pump()
    with pytest.raises(ServerProtocolError):
        wire.relay.receive_from_server(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
    wire.pump()
    [goaway] = wire.of(h2.events.ConnectionTerminated, wire.caller_events)
    assert goaway.error_code == ErrorCodes.INTERNAL_ERROR


def test_a_frame_header_announcing_too_much_ends_the_connection_at_once() -> None:
    # h2 alone would buffer the whole announced frame (up to 16 MiB) before refusing it.
    wire = Wire()
    with pytest.raises(TunnelProtocolError, match="frame of"):
        announced = (1 << 24) - 1  # DATA on stream 1 claiming 16 MiB, then a little of it
        wire.relay.receive_from_tunnel(announced.to_bytes(3, "big") + bytes([0, 0]) + (1).to_bytes(4, "big") + b"x" * 1000)
    assert wire.relay.ended and wire.relay.buffered_bytes < 1 << 12
    wire.pump()
    [goaway] = wire.of(h2.events.ConnectionTerminated, wire.caller_events)
    assert goaway.error_code == ErrorCodes.FRAME_SIZE_ERROR
