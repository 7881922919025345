"""uTP state machine: libutp handshake quirks, setup under loss, RESET, timers."""

from __future__ import annotations

import random

import pytest

from nat.errors import UtpConnectionRefused, UtpConnectionReset, UtpTimeout
from nat.utp.connection import UtpState
from nat.utp.events import (
    Connected,
    ConnectionClosed,
    DataAvailable,
    EofReceived,
    IncomingConnection,
)
from nat.utp.multiplexer import UtpConfig, UtpMultiplexer
from nat.utp.packet import (
    ST_DATA,
    ST_FIN,
    ST_RESET,
    ST_STATE,
    ST_SYN,
    Packet,
    decode_packet,
    encode_packet,
)
from nat.utp.sim import AppRunner, LinkProfile, SimNetwork, StreamApp

A = ("10.0.0.1", 1000)
B = ("10.0.0.2", 2000)


def drain(mux: UtpMultiplexer) -> list:
    events = []
    while (event := mux.next_event()) is not None:
        events.append(event)
    return events


def sent(mux: UtpMultiplexer, now: float) -> list[Packet]:
    return [decode_packet(data) for data, _ in mux.datagrams_to_send(now)]


def deliver(packets: list[Packet], mux: UtpMultiplexer, src: tuple, now: float) -> None:
    for packet in packets:
        mux.receive_datagram(packet.encode(), src, now)


def pair(seed: int = 0, config: UtpConfig | None = None):
    return (
        UtpMultiplexer(config, rng=random.Random(seed)),
        UtpMultiplexer(config, rng=random.Random(seed + 100)),
    )


def test_handshake_follows_libutp() -> None:
    a, b = pair()
    conn = a.connect(B, 0.0)
    assert conn.state is UtpState.SYN_SENT
    (syn,) = sent(a, 0.0)
    assert syn.type == ST_SYN and syn.connection_id == conn.recv_id and syn.ack_nr == 0
    assert conn.send_id == (conn.recv_id + 1) & 0xFFFF
    assert syn.wnd_size == 1 << 20
    deliver([syn], b, A, 0.01)
    (incoming,) = drain(b)
    assert isinstance(incoming, IncomingConnection)
    server = incoming.conn
    assert server.state is UtpState.SYN_RECV
    assert (server.recv_id, server.send_id) == ((syn.connection_id + 1) & 0xFFFF, syn.connection_id)
    (synack,) = sent(b, 0.01)
    assert synack.type == ST_STATE and synack.ack_nr == syn.seq_nr
    assert synack.connection_id == syn.connection_id
    # the acceptor may speak first; its first DATA reuses the SYN-ACK's seq_nr
    assert server.send(b"hello") == 5
    (first,) = sent(b, 0.02)
    assert first.type == ST_DATA and first.seq_nr == synack.seq_nr and first.payload == b"hello"
    deliver([synack, first], a, B, 0.03)
    events = drain(a)
    assert isinstance(events[0], Connected) and isinstance(events[1], DataAvailable)
    assert conn.read(100) == b"hello"
    conn.send(b"x")
    (reply,) = sent(a, 0.03)
    # initiator: ack_nr = STATE.seq - 1, then acks the DATA; its own seq follows the SYN
    assert reply.ack_nr == synack.seq_nr and reply.seq_nr == (syn.seq_nr + 1) & 0xFFFF
    deliver([reply], b, A, 0.04)
    assert server.state is UtpState.CONNECTED
    assert server.read() == b"x"


def test_acceptor_stays_syn_recv_until_initiator_speaks() -> None:
    a, b = pair(1)
    a.connect(B, 0.0)
    deliver(sent(a, 0.0), b, A, 0.0)
    server = drain(b)[0].conn
    sent(b, 0.0)
    assert server.state is UtpState.SYN_RECV
    assert [type(e) for e in drain(b)] == []


def test_duplicate_syn_gets_the_same_synack_again() -> None:
    a, b = pair(2)
    a.connect(B, 0.0)
    (syn,) = sent(a, 0.0)
    deliver([syn], b, A, 0.0)
    drain(b)
    (first,) = sent(b, 0.0)
    server_conn = b.connections[0]
    server_conn.send(b"early data")
    sent(b, 0.0)
    deliver([syn], b, A, 1.0)
    again, resent = sent(b, 1.0)
    assert again.type == ST_STATE and again.seq_nr == first.seq_nr and again.ack_nr == first.ack_nr
    # the early DATA went to an initiator still in SYN_SENT (dropped there): resent at once
    assert resent.type == ST_DATA and resent.seq_nr == first.seq_nr and resent.payload == b"early data"
    assert b.stats.duplicate_syn == 1
    assert len(b.connections) == 1


@pytest.mark.parametrize("lost", ["syn", "synack", "first_data", "first_two"])
def test_setup_survives_loss_of_handshake_packets(lost: str) -> None:
    net = SimNetwork(7, LinkProfile(delay=0.01))
    a = net.add(A, UtpMultiplexer(rng=random.Random(3)))
    b = net.add(B, UtpMultiplexer(rng=random.Random(4)))
    dropped: list[Packet] = []

    def drop_first(src: tuple, dst: tuple, data: bytes) -> bool:
        packet = decode_packet(data)
        kinds = {
            "syn": [(A, ST_SYN)],
            "synack": [(B, ST_STATE)],
            "first_data": [(A, ST_DATA)],
            "first_two": [(A, ST_DATA), (B, ST_DATA)],
        }[lost]
        for kind in kinds:
            if (src, packet.type) == kind and kind not in [k for k, _ in dropped]:
                dropped.append((kind, packet))
                return False
        return True

    net.filters.append(drop_first)
    runner = AppRunner([a, b], make_incoming=lambda conn: StreamApp(conn, b"server says hi" * 10))
    client = runner.add(StreamApp(a.connect(B, net.now), b"client data" * 1000))
    net.run(lambda: client.done and all(app.done for app in runner.apps.values()), on_step=runner, max_time=30)
    server = next(app for app in runner.apps.values() if app is not client)
    assert bytes(server.received) == b"client data" * 1000
    assert bytes(client.received) == b"server says hi" * 10
    assert dropped


def test_server_speaks_first_with_synack_lost() -> None:
    net = SimNetwork(8, LinkProfile(delay=0.01))
    a = net.add(A, UtpMultiplexer(rng=random.Random(5)))
    b = net.add(B, UtpMultiplexer(rng=random.Random(6)))
    state = {"dropped": False}

    def drop_synack(src: tuple, dst: tuple, data: bytes) -> bool:
        if src == B and decode_packet(data).type == ST_STATE and not state["dropped"]:
            state["dropped"] = True
            return False
        return True

    net.filters.append(drop_synack)
    # the server writes at once, before the client said anything; the client only reads
    runner = AppRunner([a, b], make_incoming=lambda conn: StreamApp(conn, b"banner\r\n" * 500))
    client = runner.add(StreamApp(a.connect(B, net.now), b""))
    net.run(lambda: client.conn.at_eof, on_step=runner, max_time=30)
    assert bytes(client.received) == b"banner\r\n" * 500
    assert state["dropped"]
    # DATA in SYN_SENT made our initiator re-send its SYN at once (no 1 s RTO wait)
    assert net.now < 1.0


def test_reset_for_unknown_connection_is_rate_limited() -> None:
    config = UtpConfig(reset_memory=10.0, reset_memory_cap=3)
    b = UtpMultiplexer(config, rng=random.Random(1))
    stray = encode_packet(ST_DATA, 4242, 10, 20, payload=b"?")
    b.receive_datagram(stray, A, 0.0)
    b.receive_datagram(stray, A, 0.1)
    (reset,) = sent(b, 0.1)
    assert reset.type == ST_RESET and reset.connection_id == 4242 and reset.ack_nr == 10
    assert b.stats.resets_sent == 1 and b.stats.resets_suppressed == 1
    for conn_id in range(10):  # the cap bounds memory and the RESET rate
        b.receive_datagram(encode_packet(ST_DATA, conn_id, 1, 1), A, 1.0)
    assert b.stats.resets_sent == 3
    assert b.reset_memory_size <= 3
    b.receive_datagram(stray, A, 11.0)  # memory expired: answered again
    assert b.stats.resets_sent == 4
    # a RESET is never answered with a RESET
    b.receive_datagram(encode_packet(ST_RESET, 9999, 1, 1), A, 30.0)
    assert b.stats.resets_sent == 4


def test_refused_when_not_accepting() -> None:
    a, b = pair(3)
    b.accepting = False
    conn = a.connect(B, 0.0)
    deliver(sent(a, 0.0), b, A, 0.0)
    assert b.connections == [] and b.stats.refused == 1
    deliver(sent(b, 0.0), a, B, 0.0)
    (closed,) = drain(a)
    assert isinstance(closed, ConnectionClosed) and isinstance(closed.error, UtpConnectionRefused)
    assert conn.state is UtpState.RESET and a.connections == []


def test_connect_timeout() -> None:
    a = UtpMultiplexer(UtpConfig(syn_retries=3), rng=random.Random(1))
    conn = a.connect(B, 0.0)
    now = 0.0
    syns = 0
    for _ in range(20):
        syns += len(a.datagrams_to_send(now))
        timer = a.get_timer()
        if timer is None:
            break
        now = timer
        a.handle_timer(now)
    (closed,) = drain(a)
    assert isinstance(closed.error, UtpTimeout) and conn.is_closed
    assert syns == 3 and now == pytest.approx(1.0 + 2.0 + 4.0)


def test_retransmission_limit_kills_connection() -> None:
    net = SimNetwork(9, LinkProfile(delay=0.01))
    config = UtpConfig(max_retransmits=3)
    a = net.add(A, UtpMultiplexer(config, rng=random.Random(1)))
    b = net.add(B, UtpMultiplexer(config, rng=random.Random(2)))
    runner = AppRunner([a, b], make_incoming=lambda conn: StreamApp(conn, b"", send_eof=False))
    client = runner.add(StreamApp(a.connect(B, net.now), b"x" * 100_000, send_eof=False))
    net.run(lambda: len(runner.apps) == 2 and client.conn.bytes_sent > 20_000, on_step=runner)
    net.filters.append(lambda src, dst, data: False)  # the path dies
    net.run(lambda: client.conn.is_closed, on_step=runner, max_time=120)
    assert isinstance(client.conn.error, UtpTimeout)
    assert any(isinstance(e, ConnectionClosed) and isinstance(e.error, UtpTimeout) for e in client.events)


def test_peer_reset_mid_transfer() -> None:
    net = SimNetwork(10, LinkProfile(delay=0.01))
    a = net.add(A, UtpMultiplexer(rng=random.Random(1)))
    b = net.add(B, UtpMultiplexer(rng=random.Random(2)))
    runner = AppRunner([a, b], make_incoming=lambda conn: StreamApp(conn, b""))
    client = runner.add(StreamApp(a.connect(B, net.now), b"y" * 300_000))
    net.run(lambda: len(runner.apps) == 2 and client.conn.bytes_sent > 50_000, on_step=runner)
    server = next(app for app in runner.apps.values() if app is not client)
    server.conn.abort()
    net.run(lambda: client.conn.is_closed, on_step=runner, max_time=10)
    assert isinstance(client.conn.error, UtpConnectionReset)
    assert server.conn.state is UtpState.RESET and server.conn.error is None
    assert a.connections == [] and b.connections == []


def test_half_open_connections_are_reaped() -> None:
    b = UtpMultiplexer(UtpConfig(syn_recv_timeout=20.0), rng=random.Random(1))
    for i in range(5):
        b.receive_datagram(encode_packet(ST_SYN, 100 + 2 * i, 7, 0), A, 0.0)
    assert len(b.connections) == 5
    b.datagrams_to_send(0.0)
    assert b.get_timer() == pytest.approx(20.0)
    b.handle_timer(20.0)
    assert b.connections == [] and b.stats.reaped_half_open == 5
    assert all(isinstance(e.error, UtpTimeout) for e in drain(b) if isinstance(e, ConnectionClosed))
    assert b.half_open == 0


def test_half_open_cap() -> None:
    b = UtpMultiplexer(UtpConfig(max_half_open=3), rng=random.Random(1))
    for i in range(6):
        b.receive_datagram(encode_packet(ST_SYN, 100 + 2 * i, 7, 0), A, 0.0)
    assert len(b.connections) == 3 and b.stats.syn_dropped == 3


def test_invalid_ack_is_dropped() -> None:
    a, b = pair(4)
    conn = a.connect(B, 0.0)
    deliver(sent(a, 0.0), b, A, 0.0)
    deliver(sent(b, 0.0), a, B, 0.0)
    drain(a)
    server = b.connections[0]
    # DATA claiming to acknowledge data we never sent: ignored entirely
    forged = encode_packet(ST_DATA, conn.recv_id, server.next_seq, conn.next_seq + 5, payload=b"evil")
    a.receive_datagram(forged, B, 0.1)
    assert conn.read() == b"" and a.stats.invalid_ack == 1


def test_delayed_ack_every_second_packet_or_timer() -> None:
    config = UtpConfig(delayed_ack=0.005)
    a, b = pair(5, config)
    conn = a.connect(B, 0.0)
    deliver(sent(a, 0.0), b, A, 0.0)
    deliver(sent(b, 0.0), a, B, 0.0)
    conn.send(b"1")
    deliver(sent(a, 0.0), b, A, 0.001)
    assert sent(b, 0.001) == []  # one packet: ACK deferred
    assert b.get_timer() == pytest.approx(0.006)
    b.handle_timer(0.006)
    (ack,) = sent(b, 0.006)
    assert ack.type == ST_STATE
    conn.send(b"2")
    deliver(sent(a, 0.01), b, A, 0.01)
    conn.send(b"3")
    deliver(sent(a, 0.01), b, A, 0.01)
    (ack,) = sent(b, 0.01)  # second packet: ACK at once
    assert ack.ack_nr == (conn.next_seq - 1) & 0xFFFF


def test_keepalive_is_a_duplicate_ack() -> None:
    a, b = pair(6)
    conn = a.connect(B, 0.0)
    deliver(sent(a, 0.0), b, A, 0.0)
    deliver(sent(b, 0.0), a, B, 0.0)
    conn.send(b"hi")
    deliver(sent(a, 0.0), b, A, 0.0)
    b.handle_timer(1.0)
    deliver(sent(b, 1.0), a, B, 1.0)
    assert a.get_timer() == pytest.approx(29.0)
    a.handle_timer(29.0)
    (keepalive,) = sent(a, 29.0)
    assert keepalive.type == ST_STATE and keepalive.ack_nr == (conn.next_expected_seq - 2) & 0xFFFF
    deliver([keepalive], b, A, 29.0)
    assert b.stats.resets_sent == 0 and not b.connections[0].is_closed


def test_graceful_close_and_linger() -> None:
    net = SimNetwork(11, LinkProfile(delay=0.01))
    a = net.add(A, UtpMultiplexer(rng=random.Random(1)))
    b = net.add(B, UtpMultiplexer(rng=random.Random(2)))
    runner = AppRunner([a, b], make_incoming=lambda conn: StreamApp(conn, b"bye" * 100))
    client = runner.add(StreamApp(a.connect(B, net.now), b"data" * 1000))
    net.run(lambda: client.done and all(app.done for app in runner.apps.values()), on_step=runner)
    server = next(app for app in runner.apps.values() if app is not client)
    for app in (client, server):
        closed = [e for e in app.events if isinstance(e, ConnectionClosed)]
        assert len(closed) == 1 and closed[0].error is None
        assert app.conn.state is UtpState.CLOSED
        assert any(isinstance(e, EofReceived) for e in app.events)
    # the connection ids linger a little to re-ACK a retransmitted FIN, then go
    net.run(lambda: not a.connections and not b.connections, max_time=10)
    assert a.stats.resets_sent == 0 and b.stats.resets_sent == 0


def test_close_waits_for_fin_ack_then_closes() -> None:
    net = SimNetwork(12, LinkProfile(delay=0.01))
    a = net.add(A, UtpMultiplexer(rng=random.Random(1)))
    b = net.add(B, UtpMultiplexer(rng=random.Random(2)))
    runner = AppRunner([a, b], make_incoming=lambda conn: StreamApp(conn, b"", send_eof=False))
    client = runner.add(StreamApp(a.connect(B, net.now), b"z" * 20_000, send_eof=False))
    net.run(lambda: len(runner.apps) == 2 and client.sent_all, on_step=runner)
    client.conn.close()
    net.run(lambda: client.conn.is_closed, on_step=runner, max_time=10)
    assert client.conn.error is None and client.conn.state is UtpState.CLOSED
    server = next(app for app in runner.apps.values() if app is not client)
    assert bytes(server.received) == b"z" * 20_000 and server.conn.at_eof


def test_close_is_bounded_when_the_peer_vanishes() -> None:
    net = SimNetwork(13, LinkProfile(delay=0.01))
    config = UtpConfig(close_timeout=2.0)
    a = net.add(A, UtpMultiplexer(config, rng=random.Random(1)))
    b = net.add(B, UtpMultiplexer(config, rng=random.Random(2)))
    runner = AppRunner([a, b], make_incoming=lambda conn: StreamApp(conn, b"", send_eof=False))
    client = runner.add(StreamApp(a.connect(B, net.now), b"q", send_eof=False))
    net.run(lambda: len(runner.apps) == 2 and client.conn.all_data_acked, on_step=runner)
    net.filters.append(lambda src, dst, data: False)
    start = net.now
    client.conn.close()
    net.run(lambda: client.conn.is_closed, on_step=runner, max_time=30)
    assert isinstance(client.conn.error, UtpTimeout)
    assert net.now - start <= 2.5


def test_reset_after_everything_was_delivered_is_a_clean_close() -> None:
    # libutp forgets a connection once its FIN is acked; our FIN may then meet a RESET
    net = SimNetwork(14, LinkProfile(delay=0.01))
    a = net.add(A, UtpMultiplexer(rng=random.Random(1)))
    b = net.add(B, UtpMultiplexer(rng=random.Random(2)))
    runner = AppRunner([a, b], make_incoming=lambda conn: StreamApp(conn, b"answer"))
    client = runner.add(StreamApp(a.connect(B, net.now), b"question", send_eof=False))
    net.run(lambda: client.conn.at_eof and client.conn.all_data_acked, on_step=runner)
    net.filters.append(lambda src, dst, data: src != A or decode_packet(data).type != ST_FIN)
    client.conn.send_eof()
    net.flush()
    server = next(app for app in runner.apps.values() if app is not client)
    server.conn.abort()  # the peer forgets the connection
    net.run(lambda: client.conn.is_closed, on_step=runner, max_time=10)
    assert client.conn.error is None and client.conn.state is UtpState.CLOSED
    assert a.connections == []


def _connected_pair(seed: int = 20):
    a, b = pair(seed)
    conn = a.connect(B, 0.0)
    deliver(sent(a, 0.0), b, A, 0.0)
    deliver(sent(b, 0.0), a, B, 0.0)
    drain(a)
    drain(b)
    conn.congestion.cwnd = 64 * 1382  # past slow start's first windows
    return a, b, conn, b.connections[0]


def test_fast_retransmit_on_three_duplicate_acks() -> None:
    a, b, conn, server = _connected_pair()
    conn.send(bytes(1382 * 6))
    packets = sent(a, 0.01)
    assert len(packets) == 6
    lost, rest = packets[0], packets[1:]
    ack16 = (server.next_expected_seq - 1) & 0xFFFF
    # a peer without selective ACKs: three duplicate STATE packets
    for _ in range(3):
        a.receive_datagram(encode_packet(ST_STATE, conn.recv_id, 0, ack16, wnd_size=1 << 20), B, 0.02)
    (resent,) = sent(a, 0.02)  # long before the 1 s RTO
    assert resent.seq_nr == lost.seq_nr and resent.payload == lost.payload
    assert a.stats.fast_retransmits == 1 and a.stats.timeouts == 0
    deliver(rest + [resent], b, A, 0.03)
    assert server.read() == bytes(1382 * 6)


def test_fast_retransmit_on_selective_acks_past_a_hole() -> None:
    a, b, conn, server = _connected_pair(21)
    conn.send(bytes(range(256)) * 40)
    packets = sent(a, 0.01)
    lost = packets[1]
    deliver([packets[0]] + packets[2:], b, A, 0.02)
    acks = sent(b, 0.02)
    assert acks[-1].sack is not None
    deliver(acks, a, B, 0.03)
    resent = [p for p in sent(a, 0.03) if p.type == ST_DATA]
    assert [p.seq_nr for p in resent] == [lost.seq_nr]
    deliver(resent, b, A, 0.04)
    assert server.read() == bytes(range(256)) * 40
    assert a.stats.timeouts == 0


def test_duplicate_and_reordered_data_is_delivered_once() -> None:
    a, b, conn, server = _connected_pair(22)
    conn.send(b"".join(bytes([i]) * 1382 for i in range(5)))
    packets = sent(a, 0.01)
    shuffled = packets[::-1] + packets[2:4] + packets
    deliver(shuffled, b, A, 0.02)
    assert server.read() == b"".join(bytes([i]) * 1382 for i in range(5))
    assert server.read() == b""


def test_nothing_after_the_fin_is_delivered() -> None:
    a, b, conn, server = _connected_pair(23)
    seq = conn.next_seq
    ack16 = (conn.next_expected_seq - 1) & 0xFFFF
    data = lambda s, payload: encode_packet(ST_DATA, server.recv_id, s, ack16, wnd_size=1 << 20, payload=payload)  # noqa: E731
    fin = encode_packet(ST_FIN, server.recv_id, seq + 1, ack16, wnd_size=1 << 20)
    b.receive_datagram(data(seq + 2, b"after the end"), A, 0.1)  # out of order, past the FIN
    b.receive_datagram(fin, A, 0.1)
    b.receive_datagram(data(seq, b"the data"), A, 0.1)
    assert server.read() == b"the data"
    assert server.at_eof and server.reorder_count == 0 and server.receive_buffered == 0
    b.receive_datagram(data(seq + 3, b"more"), A, 0.2)
    assert server.read() == b""
