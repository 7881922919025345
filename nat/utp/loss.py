"""Loss detection for the uTP sender: which packets in flight are lost.

The sender keeps the packets in flight (``OutgoingPacket`` records, in sequence
order) and acts on what these rules find: it marks the packets lost (they are
resent first at the next flush) and tells the congestion controller. The rules
only judge; none of them changes a record.

libutp's rules: 3 duplicate ACKs (ST_STATE only; ``Sender.on_ack`` counts them)
or 3 packets selectively acknowledged past a hole (:func:`sack_holes_lost`). In
addition a hole is declared lost again only if something sent after its last
transmission was delivered (by transmission order, so a hole and the packets
past it sent in one batch count), so one old SACK cannot trigger a second
retransmission of the same packet. Only packets sent once move that "latest
delivered" mark: an ACK of a retransmitted packet may come from its first
transmission (a spurious retransmission), and taking the retransmission's place
in the order would declare every other retransmission in flight lost again, a
cascade.

Ours on top: RACK (:func:`sent_before_delivered`), the lost retransmission of
the oldest packet (:func:`head_retransmission_lost`), a SACK that names none of
its range (:func:`unsacked_range_lost`), and a retransmission timeout that
declares lost only what is overdue (:func:`timed_out`; libutp resends the
whole window).

One judgement is about the shape of the loss, not which packets to resend:
:func:`overflow_burst` tells a buffer overflowing under a burst (most packets
past some point of the flight lost) from random loss (spread thinly over it).
The sender keeps the sequence numbers of the latest first transmissions found
lost and tells the congestion controller (``on_overflow``) at most once per
loss episode (from a loss until everything then in flight is acknowledged).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from nat.utp.packet import ST_SYN
from nat.utp.rtt import RttEstimator
from nat.utp.states import DUP_ACK_THRESHOLD, OutgoingPacket

__all__ = [
    "Reordering",
    "sack_holes_lost",
    "unsacked_range_lost",
    "sent_before_delivered",
    "head_retransmission_lost",
    "timed_out",
    "overflow_burst",
]

# A burst: this many first transmissions lost within this many packets.
OVERFLOW_RUN = 12
OVERFLOW_SPAN = 16
# The count rules never wait for more packets past a hole than this (RACK's
# window, bounded by a round trip, still finds the loss in time).
MAX_REORDER_PACKETS = 300


class Reordering:
    """How much the path reorders, learnt by the sender alone (RFC 8985's
    reordering_seen and Linux's tp->reordering, without D-SACK).

    Evidence: a first transmission delivered after a packet sent later was (it
    was never resent, so the copy that arrived is the original, late). The
    count rules (duplicate ACKs, packets SACKed past a hole) then wait for one
    more packet than the deepest reordering seen (``threshold``), and RACK's
    window widens from a quarter round trip to the largest send-time gap seen
    plus a quarter (``window``), never beyond a round trip. Without it a path
    that reorders by jitter (a Wi-Fi or LTE hop, links in parallel, a delay
    queue that reorders) had most of its "losses" spurious: in the lab at 2%
    loss and 20 +- 5 ms, retransmissions were fifteen times the real loss and
    their dense runs read as a receiver overflowing, which capped the window.
    Nothing decays within a connection: a real loss is then found by RACK a
    little later, never missed.
    """

    __slots__ = ("threshold", "gap")

    def __init__(self) -> None:
        self.threshold = DUP_ACK_THRESHOLD
        self.gap = 0.0  # seconds of send time between a late packet and one sent after it

    def seen(self, order: int, sent_at: float, latest: int, latest_sent_at: float) -> None:
        """A packet sent once (transmission ``order``, sent at ``sent_at``) was
        delivered after the packet of order ``latest``, sent at ``latest_sent_at``."""
        depth = latest - order + 1
        if depth > self.threshold:
            self.threshold = depth if depth < MAX_REORDER_PACKETS else MAX_REORDER_PACKETS
        gap = latest_sent_at - sent_at
        if gap > self.gap:
            self.gap = gap

    def window(self, srtt: float) -> float:
        """RACK's reordering window for a smoothed round trip ``srtt``."""
        quarter = srtt * 0.25
        wanted = self.gap * 1.25
        if wanted <= quarter:
            return quarter
        return wanted if wanted < srtt else srtt


def sack_holes_lost(
    outstanding: Mapping[int, OutgoingPacket], base: int, bits: int, latest: int,
    threshold: int = DUP_ACK_THRESHOLD,
) -> list[OutgoingPacket]:
    """The holes a selective ACK proves lost.

    ``bits`` is the SACK bitmask (bit ``i`` stands for ``base + i``) with at least
    ``threshold`` bits set, ``latest`` the transmission order of the latest
    packet known delivered. A hole is lost once ``threshold`` packets above it
    (3, more on a path seen reordering: :class:`Reordering`) are SACKed and
    something sent after its last transmission was delivered (so a
    retransmission is not declared lost again by the same old SACK bits).
    """
    for _ in range(threshold - 1):
        bits ^= 1 << (bits.bit_length() - 1)
    limit = base + bits.bit_length() - 1
    lost = []
    # On a path seen reordering the packets SACKed past a resent hole were
    # mostly sent before it, so they prove nothing of the resend: RACK's
    # send-time rule judges those.
    first_only = threshold > DUP_ACK_THRESHOLD
    # outstanding is in sequence order and below ``limit`` holds only holes
    for seq, rec in outstanding.items():
        if seq >= limit:
            break
        if rec.in_flight and rec.order < latest and not (first_only and rec.transmissions > 1):
            lost.append(rec)
    return lost


def unsacked_range_lost(
    outstanding: Mapping[int, OutgoingPacket], first: int, end: int, cutoff: float
) -> list[OutgoingPacket]:
    """The packets a selective ACK with no bit set proves lost: sequence numbers
    ``first`` (the cumulative ACK's next) up to ``end`` (past the SACK's range),
    sent at ``cutoff`` or before (a round trip and a reordering allowance ago).

    A receiver sends a SACK only while it holds packets out of order, so one
    that names none of its range holds packets beyond it: libutp's names only
    the 32 packets past the cumulative ACK. When a receive buffer dropped the
    tail of a burst, every ACK says so and the SACK rule (three packets named
    past a hole) never fires: without this rule the holes went one per round
    trip, each ACK of a retransmitted head re-arming the timers.
    """
    lost = []
    for seq in range(first, end):
        rec = outstanding.get(seq)
        if rec is not None and rec.in_flight and rec.sent_at <= cutoff and rec.ptype != ST_SYN:
            lost.append(rec)
    return lost


def sent_before_delivered(in_sequence: Iterable[OutgoingPacket], cutoff: float) -> list[OutgoingPacket]:
    """RACK (RFC 8985) in brief: what was sent a reordering window (a quarter
    RTT) before a packet that got delivered is lost; ``cutoff`` is that packet's
    send time minus the window.

    This catches what the SACK rule cannot: a run of packets dropped together (a
    bottleneck queue overflowing) with nothing after them delivered but
    retransmissions of earlier holes. Their phantom flight would hold the window
    shut, each ACK restarting the retransmission timer, and only one hole a
    round trip would be repaired.
    """
    lost = []
    # in sequence order, first transmissions were also sent in order
    for rec in in_sequence:
        if rec.sent_at >= cutoff:
            if rec.transmissions == 1:
                break
            continue
        if rec.in_flight and rec.ptype != ST_SYN:
            lost.append(rec)
    return lost


def head_retransmission_lost(oldest: OutgoingPacket, rtt: RttEstimator, now: float, delayed_ack: float) -> bool:
    """The retransmission of the oldest packet in flight was lost.

    What was sent after that retransmission lies beyond the SACK range on a big
    window, so the SACK rule never sees it delivered: an ACK arriving more than a
    round trip (plus a reordering allowance and the peer's ACK delay) after the
    retransmission, without covering it, is the evidence instead of an RTO.
    """
    if not oldest.in_flight or oldest.transmissions < 2 or not rtt.has_sample:
        return False
    allowance = rtt.srtt * 0.25
    if rtt.rttvar > allowance:
        allowance = rtt.rttvar
    return now - oldest.sent_at > rtt.srtt + allowance + delayed_ack


def timed_out(outstanding: Mapping[int, OutgoingPacket], oldest: int, overdue: float) -> list[OutgoingPacket]:
    """What a retransmission timeout declares lost: the oldest packet (sequence
    number ``oldest``) and every packet in flight sent at ``overdue`` or before
    (one RTO ago, by its own clock). Younger ones are still on their way: marking
    them too would resend a whole window after one lost retransmission."""
    first = outstanding.get(oldest)
    return [rec for rec in outstanding.values() if rec.in_flight and (rec is first or rec.sent_at <= overdue)]


def overflow_burst(recent: list[int]) -> bool:
    """The latest first transmissions found lost (``recent``, sequence numbers,
    up to ``OVERFLOW_RUN``) look like a buffer overflowing: ``OVERFLOW_RUN`` of
    them within ``OVERFLOW_SPAN`` consecutive packets.

    A receive buffer (libutp's 208 KiB socket buffer under its 1 MiB window)
    or a short queue takes the head of a burst and drops most of its tail:
    the losses are dense. Random loss at rate p puts 12 losses within 16
    packets about C(16,12) p^12 of the time: once in 1e9 packets at 10%, in
    3e5 at 20% (eight within sixteen came every few episodes at 20% and
    collapsed the window). Whether a queue built up is the controller's
    question.
    """
    return len(recent) >= OVERFLOW_RUN and max(recent) - min(recent) < OVERFLOW_SPAN
