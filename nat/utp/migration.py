"""What the sending half of a connection does when the connection changes path.

``UtpMultiplexer.move_connection`` rekeys a connection onto another path
(paths.py) and calls ``UtpConnection.change_path``, which applies
:func:`change_path` to its sender (``sending.Sender``: this module is the one
concern of a path change, apart from the sender's per-packet paths). A move is neither a timeout nor congestion; what the sender
knows about the old path says nothing about the new one:

- The congestion controller starts over (its initial window: slow start on the
  new path), and so does the base one-way delay it measures queuing against.
- The RTT estimate restarts (``RttEstimator.restart``): timeouts back at the
  initial RTO until the new path's first sample, no backoff.
- Losses of packets sent before the move shrink nothing (the recovery point
  moves to the next sequence number): they are the old path's.
- Packets in flight on the old path are *held*: still counted in flight (they
  fill the peer's receive window when they land) but not yet resent, because an
  old path that still works (a relay, after an upgrade to direct) delivers them
  a moment later, and their ACKs come back over whichever path the peer uses.
  After the hold, about one round trip of the old path (its smoothed RTT x 1.5
  plus the peer's ACK delay, within 2 ms .. the initial RTO), whatever of them
  is still unacknowledged is taken for lost and goes again, first, over the new
  path. Until then new data goes over the new path as the fresh window and the
  flight allow. A SYN or SYN-ACK (a connection still opening) goes again at once.

The hold has its own timer (the sender's ``hold_deadline``, part of the
connection's ``next_deadline``, which runs :func:`end_hold`). During the hold
the loss rules still apply to the held packets (a selective ACK of new-path
packets past them proves them lost sooner), with no effect on the new window.
"""

from __future__ import annotations

import heapq
from typing import Protocol

from nat.utp.config import UtpConfig
from nat.utp.congestion import CongestionController, DelayHistory, make_controller
from nat.utp.loss import Reordering
from nat.utp.outbox import Flushable
from nat.utp.packet import ST_SYN
from nat.utp.rtt import RttEstimator
from nat.utp.states import Address, OutgoingPacket

__all__ = ["MovingSender", "change_path", "end_hold"]

MIN_HOLD = 0.002  # seconds: the shortest hold (an old path of a fraction of a millisecond)


class MovingSender(Protocol):
    """What a path change reads and writes of a ``sending.Sender``."""

    hold_deadline: float | None  # the end of the hold (None: nothing held)
    held_below: int  # the sequence number sent next when the hold began
    outstanding: dict[int, OutgoingPacket]
    resend: list[int]
    snd_nxt: int
    rtt: RttEstimator
    cc: CongestionController
    rto_deadline: float | None
    _remote_address: Address
    _config: UtpConfig
    _mss: int
    _delay: DelayHistory
    reordering: Reordering
    _flight: int
    _recovery_seq: int
    _ep_end: int
    _ep_recent: list[int]
    _dup_acks: int
    _consecutive_timeouts: int
    _pto_due: bool
    _dirty: set[Flushable]
    _owner: Flushable


def change_path(tx: MovingSender, path: Address, now: float) -> None:
    """From now on every datagram of ``tx`` goes to ``path``."""
    config = tx._config
    rtt = tx.rtt
    hold = (rtt.srtt * 1.5 if rtt.srtt else config.initial_rto) + config.delayed_ack
    hold = min(max(hold, MIN_HOLD), config.initial_rto)
    tx._remote_address = path
    rtt.restart(config.initial_rto)
    tx.cc = make_controller(config.congestion, tx._mss, int(config.target_delay * 1e6))
    tx._delay = DelayHistory()
    tx.reordering = Reordering()  # another path reorders (or not) in its own way
    outstanding = tx.outstanding
    if outstanding:
        tx.held_below = tx.snd_nxt
        tx.hold_deadline = now + hold
        first = next(iter(outstanding.values()))
        if first.ptype == ST_SYN:
            first.in_flight = False  # an initiator's SYN goes again at once (no payload: no flight)
    tx._recovery_seq = tx._ep_end = tx.snd_nxt
    tx._ep_recent = []
    tx._dup_acks = tx._consecutive_timeouts = 0
    tx.rto_deadline = None
    tx._pto_due = False
    tx._dirty.add(tx._owner)


def end_hold(tx: MovingSender, now: float) -> None:
    """If the hold is over: what it held and is still unacknowledged goes again."""
    deadline = tx.hold_deadline
    if deadline is None or now < deadline:
        return
    tx.hold_deadline = None
    below = tx.held_below
    resend = tx.resend
    for seq, rec in tx.outstanding.items():  # in sequence order
        if seq >= below:
            break
        if rec.in_flight:
            rec.in_flight = False
            tx._flight -= len(rec.payload)
            heapq.heappush(resend, seq)
    tx._dirty.add(tx._owner)
