"""Paths in the sans-IO core: spoof protection and the move API's edges.

An attacker who knows a connection's ids and sequence numbers sends datagrams
from a new address: nothing moves, nothing is delivered, nothing is answered
(counted in path_mismatch), and the transfer is unaffected.
"""

from __future__ import annotations

import hashlib
import random

import pytest

from nat.errors import PathInUse, UtpClosed
from nat.utp.config import UtpConfig
from nat.utp.multiplexer import UtpMultiplexer
from nat.utp.packet import ST_DATA, ST_RESET, ST_STATE, pack_header
from nat.utp.paths import VirtualPath, is_ipv6_path, path_host
from nat.utp.sim import AppRunner, LinkProfile, SimNetwork, StreamApp

A = ("10.0.0.1", 1000)
B = ("10.0.0.2", 2000)
ATTACKER = ("10.0.0.66", 6666)


def test_spoofed_datagrams_from_a_new_address_change_nothing() -> None:
    net = SimNetwork(7, LinkProfile(delay=0.005))
    a = net.add(A, UtpMultiplexer(rng=random.Random(1)))
    b = net.add(B, UtpMultiplexer(rng=random.Random(2)))
    payload = random.Random(3).randbytes(8 << 20)
    runner = AppRunner([a, b], make_incoming=lambda conn: StreamApp(conn, b""))
    client = runner.add(StreamApp(a.connect(B, net.now), payload))
    to_attacker = []
    net.filters.append(lambda src, dst, data: to_attacker.append((src, data, net.now)) is None if dst == ATTACKER else True)
    net.run(lambda: len(runner.apps) == 2 and len(next(x for x in runner.apps.values() if x is not client).received)
            > len(payload) // 3, on_step=runner)  # fmt: skip
    server = next(app for app in runner.apps.values() if app is not client)
    injected = 0
    for _ in range(50):
        sc, cc = server.conn, client.conn
        if sc.is_closed or cc.is_closed:
            break  # (a connection that is gone may answer with a RESET, rightly)
        # to the receiver: data it expects next, acknowledging what it sent
        forged = pack_header(ST_DATA, sc.recv_id, 0, 0, 1 << 20, cc.next_seq & 0xFFFF, (sc.next_seq - 1) & 0xFFFF)
        net.inject(ATTACKER, B, forged + b"EVIL" * 300)
        # to the sender: an ACK of everything it sent (it would free the window)
        ack_all = pack_header(ST_STATE, cc.recv_id, 0, 0, 1 << 20, sc.next_seq & 0xFFFF, (cc.next_seq - 1) & 0xFFFF)
        net.inject(ATTACKER, A, ack_all)
        # and RESETs with the right ids and numbers
        net.inject(ATTACKER, A, pack_header(ST_RESET, cc.send_id, 0, 0, 0, sc.next_seq & 0xFFFF, cc.next_seq & 0xFFFF))
        net.inject(ATTACKER, B, pack_header(ST_RESET, sc.send_id, 0, 0, 0, cc.next_seq & 0xFFFF, sc.next_seq & 0xFFFF))
        injected += 1
        net.step()
        runner()
    net.run(lambda: client.done and server.done, on_step=runner)
    assert hashlib.sha256(server.received).digest() == hashlib.sha256(payload).digest()
    assert client.conn.error is None and server.conn.error is None
    assert client.conn.remote_address == B and server.conn.remote_address == A
    assert client.conn.path_moves == server.conn.path_moves == 0
    assert to_attacker == []  # not even a RESET went to the spoofed source
    assert injected >= 20
    assert b.stats.path_mismatch == injected and a.stats.path_mismatch == injected
    assert a.stats.resets_sent == b.stats.resets_sent == 0
    assert a.stats.unknown_connection == b.stats.unknown_connection == 0


def test_a_datagram_with_a_known_id_but_foreign_numbers_is_an_unknown_connection() -> None:
    """Only the connection's own sequence numbers make a datagram "its": others
    with the same id from another address get the usual RESET (one per address
    and id), and the connection is not touched."""
    mux = UtpMultiplexer(rng=random.Random(4))
    conn = mux.connect(B, 0.0)
    mux.datagrams_to_send(0.0)
    conn_seq = conn.next_seq
    far = (conn_seq + 30_000) & 0xFFFF
    mux.receive_datagram(pack_header(ST_STATE, conn.recv_id, 0, 0, 65535, 1, far), ATTACKER, 0.01)
    out = mux.datagrams_to_send(0.01)
    assert [addr for _, addr in out] == [ATTACKER]
    assert mux.stats.unknown_connection == 1 and mux.stats.path_mismatch == 0
    assert conn.remote_address == B and not conn.is_closed


def test_move_errors_and_no_ops() -> None:
    mux = UtpMultiplexer(rng=random.Random(5))
    relay = VirtualPath(("relay", "r", "b"))
    first = mux.connect(B, 0.0)
    second = mux.connect(relay, 0.0)
    mux.move_connection(first, B, 0.0)  # to where it is: nothing
    assert first.path_moves == 0 and mux.stats.path_moves == 0
    if first.recv_id != second.recv_id:
        # make them clash: the second connection's id on the first one's path
        mux.move_connection(second, relay, 0.0)
    other = mux.connect(B, 0.0)
    clash_path = VirtualPath(("relay", "r", "c"))
    moved = mux.connect(clash_path, 0.0)
    # another connection with the same id on a path: refused
    mux._conns[(clash_path, other.recv_id)] = moved  # (only to stage the clash)
    with pytest.raises(PathInUse):
        mux.move_connection(other, clash_path, 0.0)
    del mux._conns[(clash_path, other.recv_id)]
    first.abort()
    with pytest.raises(UtpClosed):
        mux.move_connection(first, relay, 0.0)


def test_late_datagrams_over_the_old_path_are_taken_within_the_grace_only() -> None:
    config = UtpConfig(path_grace=1.0)
    net = SimNetwork(8, LinkProfile(delay=0.002))
    a = net.add(A, UtpMultiplexer(config, rng=random.Random(1)))
    b = net.add(B, UtpMultiplexer(config, rng=random.Random(2)))
    runner = AppRunner([a, b], make_incoming=lambda conn: StreamApp(conn, b"", send_eof=False))
    client = runner.add(StreamApp(a.connect(B, net.now), b"x", send_eof=False))
    net.run(lambda: len(runner.apps) == 2 and client.conn.all_data_acked, on_step=runner)
    server = next(app for app in runner.apps.values() if app is not client)
    b_new = ("10.0.0.2", 2001)
    net.rebind(B, b_new)
    a.move_connection(client.conn, b_new, net.now)
    # b, which did not move, still sends from... b_new now; an old-address
    # datagram within the grace is taken, after it dropped (never a RESET)
    old = pack_header(ST_STATE, client.conn.recv_id, 0, 0, 65535, server.conn.next_seq & 0xFFFF,
                      (client.conn.next_seq - 1) & 0xFFFF)  # fmt: skip
    a.receive_datagram(old, B, net.now + 0.5)
    assert a.stats.old_path_received == 1
    a.receive_datagram(old, B, net.now + 1.5)
    assert a.stats.path_mismatch == 1 and a.stats.resets_sent == 0
    assert not client.conn.is_closed


def test_path_helpers() -> None:
    relay = VirtualPath(("relay", "node:with:colons", "peer"))
    assert path_host(relay) is relay and path_host(("1.2.3.4", 5)) == "1.2.3.4"
    assert not is_ipv6_path(relay) and is_ipv6_path(("::1", 5)) and not is_ipv6_path(("1.2.3.4", 5))
    assert relay != (("relay", "node:with:colons", "peer"), 0)
    # a connection over a virtual path gets the IPv4 packet size, whatever its key says
    mux = UtpMultiplexer()
    conn = mux.connect(relay, 0.0)
    conn.send(b"z" * 5000)
    mux.datagrams_to_send(0.0)
    assert conn.remote_address == relay
