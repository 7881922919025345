"""New incoming connections are limited per source IP (issue item 1, nat side).

A spoofed SYN costs its sender 20 bytes and makes us answer the address it
claims; the multiplexer takes at most ``syn_burst`` new-connection SYNs from one
IP at once, then ``syn_rate`` per second, and drops the rest silently (no
SYN-ACK, no RESET), counting them. On the sans-IO multiplexer, on a fixed clock.
"""

from __future__ import annotations

import random

from nat.utp.config import UtpConfig
from nat.utp.events import IncomingConnection
from nat.utp.multiplexer import UtpMultiplexer
from nat.utp.packet import ST_RESET, ST_STATE, ST_SYN, decode_packet, encode_packet


def syn(mux: UtpMultiplexer, host: str, index: int, now: float, seq: int = 7) -> None:
    """A SYN from a fresh port of ``host`` (a new connection each)."""
    mux.receive_datagram(encode_packet(ST_SYN, 100 + 2 * index, seq, 0), (host, 10000 + index), now)


def answers(mux: UtpMultiplexer, now: float) -> list[int]:
    return [decode_packet(data).type for data, _ in mux.datagrams_to_send(now)]


def accepted(mux: UtpMultiplexer) -> int:
    count = 0
    while (event := mux.next_event()) is not None:
        count += isinstance(event, IncomingConnection)
    return count


def test_a_burst_from_one_address_is_cut_at_the_limit_and_dropped_silently() -> None:
    mux = UtpMultiplexer(UtpConfig(syn_burst=32, syn_rate=16.0), rng=random.Random(1))
    for i in range(100):
        syn(mux, "10.0.0.66", i, 0.0)
    sent = answers(mux, 0.0)
    assert sent == [ST_STATE] * 32  # 32 SYN-ACKs, no RESET for the other 68
    assert accepted(mux) == 32 and len(mux.connections) == 32
    assert mux.stats.syn_rate_limited == 68 and mux.stats.syn_received == 100
    assert mux.stats.resets_sent == 0

    # another address is not affected
    syn(mux, "10.0.0.67", 0, 0.0)
    assert answers(mux, 0.0) == [ST_STATE] and mux.stats.syn_rate_limited == 68

    # the bucket refills at syn_rate: half a second buys 8 more
    for i in range(100, 120):
        syn(mux, "10.0.0.66", i, 0.5)
    assert answers(mux, 0.5) == [ST_STATE] * 8 and mux.stats.syn_rate_limited == 68 + 12


def test_a_repeated_syn_of_an_existing_connection_is_answered_as_before() -> None:
    mux = UtpMultiplexer(UtpConfig(syn_burst=2, syn_rate=0.0), rng=random.Random(2))
    syn(mux, "10.0.0.66", 0, 0.0, seq=40)
    syn(mux, "10.0.0.66", 1, 0.0, seq=41)
    (syn_ack,) = [decode_packet(data) for data, _ in mux.datagrams_to_send(0.0) if decode_packet(data).ack_nr == 40]
    syn(mux, "10.0.0.66", 2, 0.0)  # over the limit
    assert answers(mux, 0.0) == [] and mux.stats.syn_rate_limited == 1
    syn(mux, "10.0.0.66", 0, 0.1, seq=40)  # the first one again (its SYN-ACK was lost)
    again = mux.datagrams_to_send(0.1)
    assert [decode_packet(data).type for data, _ in again] == [ST_STATE]
    assert decode_packet(again[0][0]).seq_nr == syn_ack.seq_nr
    assert mux.stats.duplicate_syn == 1 and mux.stats.syn_rate_limited == 1


def test_refusals_are_limited_too() -> None:
    """Not accepting: a SYN is refused with a RESET, which is also a datagram to
    the claimed source."""
    mux = UtpMultiplexer(UtpConfig(syn_burst=4, syn_rate=1.0), rng=random.Random(3))
    mux.accepting = False
    for i in range(10):
        syn(mux, "10.0.0.66", i, 0.0)
    assert answers(mux, 0.0) == [ST_RESET] * 4 and mux.stats.syn_rate_limited == 6


def test_the_table_of_sources_is_bounded_and_forgets_the_least_recently_seen() -> None:
    mux = UtpMultiplexer(UtpConfig(syn_burst=2, syn_rate=0.0, syn_sources=2), rng=random.Random(4))
    for i in range(3):
        syn(mux, "10.0.0.1", i, 0.0)
    assert mux.stats.syn_rate_limited == 1
    syn(mux, "10.0.0.2", 0, 0.0)
    syn(mux, "10.0.0.3", 0, 0.0)  # the table is full: 10.0.0.1 is forgotten
    syn(mux, "10.0.0.1", 10, 0.0)
    assert mux.stats.syn_rate_limited == 1  # a fresh bucket
    assert len(mux._syn_buckets) <= 2


def test_no_limit_when_syn_burst_is_zero() -> None:
    mux = UtpMultiplexer(UtpConfig(syn_burst=0), rng=random.Random(5))
    for i in range(200):
        syn(mux, "10.0.0.66", i, 0.0)
    assert len(answers(mux, 0.0)) == 200 and mux.stats.syn_rate_limited == 0


def test_buckets_that_refilled_are_forgotten() -> None:
    mux = UtpMultiplexer(UtpConfig(syn_burst=4, syn_rate=2.0), rng=random.Random(6))
    syn(mux, "10.0.0.66", 0, 0.0)
    mux.datagrams_to_send(0.0)
    assert len(mux._syn_buckets) == 1
    mux.handle_timer(100.0)
    assert len(mux._syn_buckets) == 0


def test_a_peer_that_proved_it_receives_is_not_limited() -> None:
    """A node opening tunnels faster than syn_rate to a peer it talks to (bench/
    tunnel.py's 200 sequential CONNECTs) is not slowed down: once a connection
    from its address had a packet of ours acknowledged (an RTT sample), its SYNs
    are not limited for syn_proven_time. Half-open connections prove nothing."""
    config = UtpConfig(syn_burst=2, syn_rate=0.0, syn_proven_time=60.0)
    client, server = UtpMultiplexer(rng=random.Random(7)), UtpMultiplexer(config, rng=random.Random(8))
    client_addr, server_addr = ("10.0.0.5", 4000), ("10.0.0.9", 5000)

    def carry(now: float) -> None:
        for _ in range(4):
            for data, _ in client.datagrams_to_send(now):
                server.receive_datagram(data, client_addr, now)
            for data, _ in server.datagrams_to_send(now):
                client.receive_datagram(data, server_addr, now)

    # two half-open connections from the address use up its bucket
    syn(server, "10.0.0.5", 0, 0.0)
    syn(server, "10.0.0.5", 1, 0.0)
    server.datagrams_to_send(0.0)
    conn = client.connect(server_addr, 0.0)
    carry(0.0)
    assert server.stats.syn_rate_limited == 1 and conn.state.value == "SYN_SENT"

    # a second later (the SYN again, the limit scans for a proof once a
    # second): still nothing proven
    client.handle_timer(1.0)
    carry(1.0)
    assert server.stats.syn_rate_limited == 2

    # the limit lifted by hand; a connection whose data the peer acknowledges
    accepted(server)
    server.config.syn_burst = 0
    conn = client.connect(server_addr, 2.0)
    carry(2.0)
    (accepted_conn,) = [e.conn for e in iter(server.next_event, None) if isinstance(e, IncomingConnection)]
    accepted_conn.send(b"server hello")
    carry(2.0)
    client.handle_timer(2.05)  # its delayed ACK
    carry(2.05)
    assert accepted_conn.rtt > 0.0
    server.config.syn_burst = 2

    limited = server.stats.syn_rate_limited
    for _ in range(10):
        client.connect(server_addr, 3.0)
    carry(3.0)
    assert server.stats.syn_rate_limited == limited
    # and it lasts beyond that connection
    accepted_conn.abort()
    server.datagrams_to_send(3.0)
    for _ in range(10):
        client.connect(server_addr, 4.0)
    carry(4.0)
    assert server.stats.syn_rate_limited == limited
    # not for ever
    server.handle_timer(65.0)
    for i in range(3):
        syn(server, "10.0.0.5", 100 + i, 65.0)
    assert server.stats.syn_rate_limited > limited
