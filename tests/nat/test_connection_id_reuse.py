"""A new connection must not be killed by the teardown of an earlier one between
the same two addresses (issue item 16: one 502 in a soak of 13,211 tunnels).

The mechanism, on the sans-IO core. Node A opens connection 1 with recv_id R
(send_id R+1; B keys it R+1). The tunnel ends: A's FIN is acknowledged, B's FIN
is on its way, and A's stream closes: with its FIN already acknowledged it
aborts (UtpStream.aclose), so A sends a RESET (id R+1) and forgets id R at once.
B's FIN then reaches A, which no longer knows id R and answers with a RESET for
the unknown id, carrying the packet's id: R. Meanwhile the next tunnel's
connection 2 was opened with the random id R-1, so B keys it R. B matches a
RESET's id first as a recv_id, then as a send_id (libutp does the same): the
RESET meant for connection 1 (send_id R, already gone on B) kills connection 2
in the middle of its TLS handshake ("connection reset by peer" on B).

Mirror case: B closes first and aborts; A's late FIN gets a RESET with id R+1
from B, which A matches to its connection with recv_id R+1 (connection 2 if it
drew R+1); A's start fails (502), and B's connection 2 is reset when its next
packet meets A's RESET for the id A dropped.

Two defences, each tested on its own: the initiator draws no id touching a
connection to the same address that is open or ended within reset_memory, and a
RESET is applied only if it echoes a sequence number of the connection it hits
(the "restarted" variants: connection 2 comes from a fresh multiplexer at the
same address, as after a node restart or from a libutp initiator, so nothing
kept it from drawing the unlucky id).

Everything here goes through the multiplexers' public API by hand, on a fixed
clock; only the initiator's id draw is forced (its first randrange in connect).
"""

from __future__ import annotations

import random

import pytest

from nat.utp.events import IncomingConnection
from nat.utp.multiplexer import UtpMultiplexer

A = ("10.0.0.1", 1000)
B = ("10.0.0.2", 2000)
C = ("10.0.0.3", 3000)
R = 0x1234


class ForcedRandom(random.Random):
    """A seeded Random whose next randrange calls return forced values first."""

    def __init__(self, seed: int) -> None:
        super().__init__(seed)
        self.forced: list[int] = []

    def force(self, *values: int) -> None:
        self.forced.extend(values)

    def randrange(self, start, stop=None, step=1):  # type: ignore[override]
        if self.forced:
            return self.forced.pop(0)
        return super().randrange(start, stop, step)


def datagrams(mux: UtpMultiplexer, now: float) -> list[tuple[bytes, tuple]]:
    return list(mux.datagrams_to_send(now))


def deliver(batch: list[tuple[bytes, tuple]], to: UtpMultiplexer, src: tuple, now: float) -> None:
    for data, _ in batch:
        to.receive_datagram(data, src, now)


def exchange(a: UtpMultiplexer, b: UtpMultiplexer, now: float, rounds: int = 6) -> None:
    """Carry everything both ways until nothing is left to send."""
    for _ in range(rounds):
        deliver(datagrams(a, now), b, A, now)
        deliver(datagrams(b, now), a, B, now)


def accepted(mux: UtpMultiplexer):
    conns = []
    while (event := mux.next_event()) is not None:
        if isinstance(event, IncomingConnection):
            conns.append(event.conn)
    return conns


@pytest.mark.parametrize("restarted", [False, True], ids=["same-node", "restarted"])
@pytest.mark.parametrize("first_to_close", ["initiator", "acceptor"])
def test_teardown_reset_of_an_old_connection_spares_the_next_one(first_to_close: str, restarted: bool) -> None:
    rng = ForcedRandom(1)
    a, b = UtpMultiplexer(rng=rng), UtpMultiplexer(rng=random.Random(2))
    now = 0.0

    # Tunnel 1: connect with id R, a request and an answer.
    rng.force(R)
    old = a.connect(B, now)
    assert old.recv_id == R
    exchange(a, b, now)
    (b_old,) = accepted(b)
    old.send(b"request")
    exchange(a, b, now)
    assert b_old.read() == b"request"
    b_old.send(b"answer")
    exchange(a, b, now)
    assert old.read() == b"answer"

    # One side half-closes; the other acknowledges the FIN and sends its own,
    # which is on the wire when the first side's stream closes: its FIN being
    # acknowledged, UtpStream.aclose aborts (RESET) and the id is forgotten.
    now += 0.01
    if first_to_close == "initiator":
        closer, closer_mux, other, other_mux, other_addr = old, a, b_old, b, B
        # the late FIN meets A, which answers with a RESET carrying id R; B matches
        # it to its connection with recv_id R: the next one if it drew R-1
        next_id = R - 1
    else:
        closer, closer_mux, other, other_mux, other_addr = b_old, b, old, a, A
        # the late FIN meets B, which answers with a RESET carrying id R+1; A matches
        # it to its connection with recv_id R+1: the next one if it drew R+1
        next_id = R + 1
    closer_addr = A if closer_mux is a else B
    closer.send_eof()
    deliver(datagrams(closer_mux, now), other_mux, closer_addr, now)
    deliver(datagrams(other_mux, now), closer_mux, other_addr, now)
    assert closer.fin_acked and closer.all_data_acked
    other.send_eof()
    late_fin = datagrams(other_mux, now)
    assert late_fin
    closer.abort()
    deliver(datagrams(closer_mux, now), other_mux, closer_addr, now)
    assert old.is_closed and b_old.is_closed
    accepted(a), accepted(b)

    if restarted:
        # Node A starts afresh on the same address: the new multiplexer knows
        # nothing of connection 1 (connection 1's late FIN, if it is A's, is
        # already on the wire).
        a = UtpMultiplexer(rng=rng)
        if closer_mux is not b:
            closer_mux = a
        else:
            other_mux = a

    # Tunnel 2 starts at once with the unlucky random id.
    now += 0.001
    rng.force(next_id)
    new = a.connect(B, now)
    assert (new.recv_id == next_id) is restarted
    exchange(a, b, now)
    (b_new,) = accepted(b)
    new.send(b"client hello")
    deliver(datagrams(a, now), b, A, now)
    assert b_new.read() == b"client hello"

    # Connection 1's late FIN arrives: a RESET for the id its receiver forgot.
    unknown_before = closer_mux.stats.unknown_connection
    deliver(late_fin, closer_mux, other_addr, now)
    stray = datagrams(closer_mux, now)
    assert closer_mux.stats.unknown_connection == unknown_before + 1 and stray
    deliver(stray, other_mux, closer_addr, now)

    # That RESET was about connection 1; connection 2 must live on, both ends.
    for conn in (b_new, new):
        assert not conn.is_closed, f"connection 2 was killed by connection 1's RESET: {conn!r} {conn.error!r}"
    b_new.send(b"server hello")
    exchange(a, b, now)
    assert new.read() == b"server hello"
    assert not new.is_closed and not b_new.is_closed


def test_initiator_never_draws_an_id_next_to_a_live_or_recent_connection() -> None:
    """connect() must keep {recv_id, recv_id+1} apart from the ids of every
    connection to the same address that is live, lingering, or ended so
    recently that its stray packets and RESETs may still be on the wire."""
    for ended in (False, True):
        for offset in (-1, 0, 1):
            rng = ForcedRandom(3)
            a = UtpMultiplexer(rng=rng)
            rng.force(R)
            first = a.connect(B, 0.0)
            a.datagrams_to_send(0.0)
            if ended:
                first.abort()  # gone at once, as UtpStream.aclose does after its FIN was acked
                a.datagrams_to_send(0.0)
            rng.force(R + offset)
            second = a.connect(B, 0.001)
            ids = {second.recv_id, (second.recv_id + 1) & 0xFFFF}
            assert not ids & {R, R + 1}, f"ended={ended}: drew {second.recv_id:#x} next to {R:#x}"
            # The rule is per address: another peer may get that id.
            rng.force(R + offset)
            assert a.connect(C, 0.002).recv_id == R + offset


def established(seed: int = 5):
    a, b = UtpMultiplexer(rng=random.Random(seed)), UtpMultiplexer(rng=random.Random(seed + 1))
    conn = a.connect(B, 0.0)
    exchange(a, b, 0.0)
    (peer,) = accepted(b)
    conn.send(b"x" * 3000)
    peer.send(b"y" * 3000)
    deliver(datagrams(a, 0.0), b, A, 0.0)  # in flight from A: b holds them
    return a, b, conn, peer


def reset(conn_id: int, seq: int, ack: int) -> bytes:
    from nat.utp.packet import ST_RESET, pack_header

    return pack_header(ST_RESET, conn_id, 0, 0, 0, seq & 0xFFFF, ack & 0xFFFF)


@pytest.mark.parametrize("by", ["recv_id", "send_id"])
def test_a_reset_must_echo_a_sequence_number_in_play(by: str) -> None:
    a, b, conn, peer = established()
    conn_id = conn.recv_id if by == "recv_id" else conn.send_id
    una, nxt = conn.initial_seq + 1, conn.next_seq  # nothing of the data acked yet
    assert nxt - una >= 2
    far = peer.next_seq + 7  # (not the seq_nr conn expects next)
    for ack in (una - 2, nxt + 1, una + 0x8000):
        a.receive_datagram(reset(conn_id, far, ack), B, 0.0)
        assert not conn.is_closed, f"ack_nr {ack & 0xFFFF:#x} outside [{una - 1:#x}, {nxt:#x}] applied"
    assert a.stats.resets_ignored == 3 and a.stats.resets_received == 3
    a.receive_datagram(reset(conn_id, far, nxt), B, 0.0)
    assert conn.is_closed and conn.error is not None
    for ack in (una - 1, una + 1):
        a, b, conn, peer = established()
        a.receive_datagram(reset(conn_id, far, ack), B, 0.0)
        assert conn.is_closed


def test_the_reset_of_an_initiator_aborting_in_syn_sent_still_ends_the_acceptor() -> None:
    """It acknowledges nothing (it heard nothing yet): its seq_nr is what the
    acceptor expects next."""
    a, b = UtpMultiplexer(rng=random.Random(7)), UtpMultiplexer(rng=random.Random(8))
    conn = a.connect(B, 0.0)
    deliver(datagrams(a, 0.0), b, A, 0.0)
    (peer,) = accepted(b)
    datagrams(b, 0.0)  # the SYN-ACK is lost
    conn.abort()
    deliver(datagrams(a, 0.0), b, A, 0.0)
    assert peer.is_closed and b.stats.resets_ignored == 0


def test_the_reset_of_an_unknown_id_still_ends_a_connection_that_lost_its_peer() -> None:
    """The libutp behaviour the ack_nr rule relies on, from our side: a peer that
    forgot the connection answers its next packet with a RESET echoing that
    packet's seq_nr, and the connection ends on it."""
    a, b, conn, peer = established()
    b2 = UtpMultiplexer(rng=random.Random(9))  # B restarted: it forgot everything
    conn.send(b"more")
    deliver(datagrams(a, 0.0), b2, A, 0.0)
    deliver(datagrams(b2, 0.0), a, B, 0.0)
    assert conn.is_closed and conn.error is not None and a.stats.resets_ignored == 0


@pytest.mark.node
async def test_libutp_resets_still_reach_our_connections() -> None:
    """libutp answers a packet for an id it does not know with a RESET carrying
    that id and the packet's seq_nr as ack_nr. Provoked here on a live
    connection to a utp-native echo server: a DATA packet with our recv_id (an
    id the server does not key) leaves our endpoint's socket. With a seq_nr that
    is not ours in play, libutp's RESET is ignored and the connection carries
    on; with our next seq_nr (what a peer that forgot us echoes), it ends it."""
    import trio

    from nat import open_endpoint
    from nat.utp.packet import ST_DATA, pack_header

    from .conftest import utp_native_echo_server, wait_until

    async with utp_native_echo_server() as address, open_endpoint() as endpoint:
        with trio.fail_after(30):
            stream = await endpoint.connect(address)
            conn = stream.connection
            await stream.send_all(b"ping")
            assert await stream.receive_some() == b"ping"
            mux = endpoint.multiplexer

            def provoke(seq: int) -> None:
                datagram = pack_header(ST_DATA, conn.recv_id, 0, 0, 65535, seq & 0xFFFF, 0) + b"?"
                endpoint._udp.send_one(datagram, address)  # (our socket: libutp sees our address)

            provoke(conn.next_seq + 0x4000)
            await wait_until(lambda: mux.stats.resets_received == 1)
            assert mux.stats.resets_ignored == 1 and not conn.is_closed
            await stream.send_all(b"still here")
            assert await stream.receive_some() == b"still here"

            provoke(conn.next_seq)
            await wait_until(lambda: mux.stats.resets_received == 2)
            assert mux.stats.resets_ignored == 1 and conn.is_closed and conn.error is not None
