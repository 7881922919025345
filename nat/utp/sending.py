"""The sending half of a uTP connection: a :class:`Sender` the connection owns.

Packetizing the send buffer, (re)transmission, the retransmission and
zero-window timers, cumulative and selective ACK processing, fast retransmit
(the loss rules are loss.py's) and the congestion controller's inputs.

The sender packs every header the connection sends; the ACK fields (ack_nr,
window, timestamp echo) come from the connection's
:class:`~nat.utp.receiving.Receiver`, which also hands it the ACK part of every
packet received (``on_ack``) and knows the peer's window.

The retransmission timer (``rto_deadline``) runs from the oldest packet's last
transmission (so ACKs of its retransmitted predecessors cannot postpone the
timeout of a flight lost behind them), and after an ACK that made progress it
first fires as a tail-loss probe: two round trips (plus the peer's ACK delay)
without any ACK send the oldest packet again, without touching the window
(libutp's RTO floor is a second, ours half of one). The sender also sorts the
first transmissions found lost into loss episodes and tells the congestion
controller of a dense burst (``on_overflow``, loss.overflow_burst). What it does
when the connection changes path is migration.py's.
"""

from __future__ import annotations

import heapq
from math import trunc as _trunc  # int(float), about 60 ns cheaper per call
from typing import Generic

from nat.errors import UtpClosed
from nat.utp.config import UtpConfig
from nat.utp.congestion import CongestionController, DelayHistory, make_controller
from nat.utp.events import ConnT, UtpEventOf
from nat.utp.loss import (
    OVERFLOW_RUN,
    Reordering,
    head_retransmission_lost,
    overflow_burst,
    sack_holes_lost,
    sent_before_delivered,
    timed_out,
    unsacked_range_lost,
)
from nat.utp.outbox import Flushable, Outbox
from nat.utp.packet import HEADER, ST_DATA, ST_FIN, ST_RESET, ST_STATE, ST_SYN, pack_header, type_byte
from nat.utp.receiving import Receiver
from nat.utp.rtt import RttEstimator
from nat.utp.states import MASK16, MASK32, MAX_PROBE_INTERVAL, Address, Datagram, new_data_record
from nat.utp.states import OutgoingPacket as _Outgoing

__all__ = ["Sender"]

_DATA_FIRST = type_byte(ST_DATA)
_pack = HEADER.pack


class Sender(Generic[ConnT]):
    """Send buffer, packets in flight, timers and congestion state of one connection.

    Public attributes are read by the connection; only this class writes them.
    """

    __slots__ = (
        # read by the connection and the receiver
        "isn", "snd_nxt", "snd_una", "outstanding", "outstanding_bytes", "sendbuf", "resend", "eof_requested",
        "fin_sent", "fin_acked", "rto_deadline", "probe_deadline", "last_send", "bytes_sent", "retransmits", "rtt",
        "cc",
        "_flight", "_dup_acks", "reordering", "_recovery_seq", "_latest_delivered_order", "_sack_seen_base", "_sack_seen_bits",
        "_rack_sent_at", "_rack_checked", "_xmit_count", "_send_blocked", "_consecutive_timeouts", "_probe_interval",
        "_probe_ok", "_rto_force", "_sack_skipped", "_syn_fast_resends", "_synack_due", "_stopped", "_delay",
        "_rx", "_owner", "_dirty", "_events", "_stats", "_space_event", "_remote_address", "_send_id", "_recv_id",
        "_mss", "_max_packets", "_send_buffer_size", "_config",
        "_ep_end", "_ep_recent", "_ep_flight", "_ep_reported", "_pto_due", "hold_deadline", "held_below",
    )

    def __init__(
        self, owner: Flushable, outbox: Outbox[ConnT], space_event: UtpEventOf[ConnT], receiver: Receiver[ConnT],
        remote_address: Address, send_id: int, recv_id: int, isn: int, config: UtpConfig, mss: int, now: float,
    ) -> None:  # fmt: skip
        # sequence numbers are unbounded integers; 16 bits only on the wire
        self.isn = self.snd_nxt = self.snd_una = isn
        self.outstanding: dict[int, _Outgoing] = {}  # in sequence order
        self.outstanding_bytes = 0
        self.eof_requested = self.fin_sent = self.fin_acked = False
        # the retransmission timer; after an ACK that made progress it first
        # fires as the tail-loss probe (_pto_due; see expire_rto)
        self.rto_deadline: float | None = None
        self._pto_due = False
        self.probe_deadline: float | None = None
        self.last_send = now
        self.bytes_sent = self.retransmits = 0
        self.rtt = RttEstimator(config.initial_rto, config.min_rto, config.max_rto, config.delayed_ack)
        self.cc: CongestionController = make_controller(config.congestion, mss, int(config.target_delay * 1e6))
        self.sendbuf = bytearray()
        self._flight = 0
        self.resend: list[int] = []  # a heap of sequence numbers to retransmit
        self._dup_acks = 0
        self.reordering = Reordering()  # what the path showed of reordering (loss.Reordering)
        self._recovery_seq = isn
        # loss episodes (loss.overflow_burst): one lasts until snd_una passes
        # _ep_end; the sequence numbers of the latest first transmissions found
        # lost (across episodes), the flight when the episode began, and
        # whether the controller heard of a burst in it
        self._ep_end = isn
        self._ep_recent: list[int] = []
        self._ep_flight, self._ep_reported = 0, False
        self._latest_delivered_order = 0
        # the last SACK applied: its base sequence number and bits (-1: none yet)
        self._sack_seen_base, self._sack_seen_bits = -1, 0
        # send time of the latest-sent packet known delivered, and the value the
        # loss scan last ran for
        self._rack_sent_at = self._rack_checked = 0.0
        self._xmit_count = 0
        self._send_blocked = False
        self._consecutive_timeouts = 0
        self._probe_interval = config.zero_window_probe
        self._syn_fast_resends = 0
        self._probe_ok = self._rto_force = self._sack_skipped = self._synack_due = self._stopped = False
        self.hold_deadline: float | None = None  # a path change's hold (migration.py)
        self.held_below = 0
        self._delay = DelayHistory()
        self._rx = receiver
        self._owner = owner
        self._dirty, self._events, self._stats = outbox.dirty, outbox.events, outbox.stats
        self._space_event = space_event
        self._remote_address = remote_address
        self._send_id, self._recv_id = send_id, recv_id
        self._mss = mss
        self._max_packets = config.max_packets_in_flight
        self._send_buffer_size = config.send_buffer_size
        self._config = config

    # ---- the handshake

    def start_syn(self) -> None:
        """An initiator: the SYN consumes the ISN."""
        isn = self.isn
        self.outstanding[isn] = _Outgoing(isn, ST_SYN, b"")
        self.snd_nxt = isn + 1

    def start_incoming(self) -> None:
        """An acceptor: the SYN-ACK is due."""
        self._synack_due = True

    def on_syn_ack(self, now: float) -> None:
        """An initiator's SYN was answered: the handshake is complete."""
        rec = self.outstanding.pop(self.isn, None)
        if rec is not None and rec.transmissions == 1:
            self.rtt.sample(now - rec.sent_at)
        self.snd_una = self.snd_nxt
        self._recovery_seq = self.snd_nxt
        self.rto_deadline = None
        self._consecutive_timeouts = 0
        if self.rtt.has_sample is False:
            # No clean sample (SYN was retransmitted): restart from the initial RTO.
            self.rtt.rto = self._config.initial_rto

    def resend_syn_now(self) -> None:
        """The acceptor spoke before its SYN-ACK reached us: ask for it again
        (at most three times)."""
        if self._syn_fast_resends < 3:
            rec = self.outstanding.get(self.isn)
            if rec is not None and rec.in_flight:
                self._syn_fast_resends += 1
                rec.in_flight = False
                self._dirty.add(self._owner)

    def resend_synack(self) -> None:
        """The initiator repeated its SYN: it never got our SYN-ACK, so it also
        dropped any DATA we sent: both go again, without waiting for the RTO."""
        self._synack_due = True
        for rec in self.outstanding.values():
            if rec.in_flight:
                self._mark_lost(rec)

    def stop(self) -> None:
        """The connection ended: nothing more is sent or awaited."""
        self._stopped = True
        self.sendbuf.clear()
        self.outstanding.clear()
        self.outstanding_bytes = 0
        self._flight = 0
        self.resend.clear()
        self.rto_deadline = self.probe_deadline = self.hold_deadline = None
        self._synack_due = False

    # ---- the application side

    @property
    def send_buffer_free(self) -> int:
        free = self._send_buffer_size - len(self.sendbuf) - self.outstanding_bytes
        return free if free > 0 else 0

    def send(self, data: bytes | bytearray | memoryview) -> int:
        """Queue up to the free send-buffer space; return the bytes taken."""
        if self._stopped:
            raise UtpClosed("connection is closed")
        if self.eof_requested:
            raise UtpClosed("send after send_eof")
        free = self._send_buffer_size - len(self.sendbuf) - self.outstanding_bytes
        size = len(data)
        if size > free:
            self._send_blocked = True
            if free <= 0:
                return 0
            size = free
            data = memoryview(data)[:size]
        if size:
            self.sendbuf += data
            self._dirty.add(self._owner)
        return size

    def send_eof(self) -> None:
        if not self.eof_requested:
            self.eof_requested = True
            self._dirty.add(self._owner)

    # ---- packing and sending

    def header(self, ptype: int, seq: int, now_us: int, sack: bytes | None) -> bytes:
        """A header carrying our ACK and window (remembered as advertised)."""
        rx = self._rx
        ext = 1 if sack is not None else 0
        return pack_header(ptype, self._send_id, now_us, rx.reply_micro, rx.advertise(), seq, rx.rcv_nxt - 1, ext)

    def reset_datagram(self, now_us: int) -> bytes:
        rx = self._rx
        return pack_header(ST_RESET, self._send_id, now_us, rx.reply_micro, 0, self.snd_nxt, rx.rcv_nxt - 1)

    def keepalive(self, now: float) -> bytes:
        """libutp's keep-alive: a duplicate ACK (ack_nr - 1)."""
        now_us = int(now * 1_000_000) & MASK32
        rx = self._rx
        header = pack_header(
            ST_STATE, self._send_id, now_us, rx.reply_micro, rx.free_window(), self.snd_nxt, rx.rcv_nxt - 2
        )
        self.last_send = now
        return header

    def resend_lost_syn(self, now: float, now_us: int, out: list[Datagram]) -> None:
        """An initiator's flush: the SYN again if it was declared lost."""
        rec = self.outstanding.get(self.isn)
        if rec is not None and not rec.in_flight:
            header = pack_header(ST_SYN, self._recv_id, now_us, 0, self._rx.free_window(), rec.seq, 0)
            out.append((header, self._remote_address))
            self._transmitted(rec, now)
            if self.rto_deadline is None:
                self.rto_deadline = now + self.rtt.rto
            self.last_send = now

    def flush(self, now: float, now_us: int, sack: bytes | None, syn_recv: bool, out: list[Datagram]) -> None:
        """Append what a connected (or half-open) connection sends now: the
        SYN-ACK, retransmissions, new data, the FIN and a bare ACK if needed.
        ``sack`` is the receiver's selective ACK (None: nothing out of order)."""
        addr = self._remote_address
        rx = self._rx
        self._sack_skipped = False
        sent = 0
        if self._synack_due:
            self._synack_due = False
            header = self.header(ST_STATE, self.isn, now_us, sack)
            out.append((header + sack if sack is not None else header, addr))
            sent += 1
        outstanding = self.outstanding
        cwnd = self.cc.cwnd
        peer_wnd = rx.peer_window
        window = cwnd if cwnd < peer_wnd else peer_wnd
        mss = self._mss
        # 1. retransmissions first
        resend = self.resend
        while resend:
            seq = resend[0]
            rec = outstanding.get(seq)
            if rec is None or rec.in_flight:
                heapq.heappop(resend)
                continue
            size = len(rec.payload)
            # The oldest hole always goes: the receiver takes the next in-order
            # packet even when full, and everything it buffers waits on it
            # (held back by a window that only it can reopen, it would wait
            # for the retransmission timeout).
            if self._flight + size > window and self._flight > 0 and not self._rto_force and seq != self.snd_una:
                break
            self._rto_force = False
            heapq.heappop(resend)
            self._transmit(rec, now, now_us, sack, out)
            self.retransmits += 1
            self._stats.retransmits += 1
            sent += 1
        # 2. new data
        sendbuf = self.sendbuf
        if sendbuf and not resend:
            seq = first_seq = self.snd_nxt
            order = self._xmit_count
            flight = self._flight
            send_id = self._send_id
            reply = rx.reply_micro
            ack16 = (rx.rcv_nxt - 1) & MASK16
            total = len(sendbuf)
            if sack is None and total <= mss and flight + total <= window and len(outstanding) < self._max_packets:
                # One packet takes it all (a request or a response): the loop
                # below, unrolled.
                wnd = rx.ack_carried()
                payload = bytes(sendbuf)
                sendbuf.clear()
                order += 1
                outstanding[seq] = new_data_record(seq, ST_DATA, payload, now, order)
                out.append((_pack(_DATA_FIRST, 0, send_id, now_us, reply, wnd, seq & MASK16, ack16) + payload, addr))
                seq += 1
                flight += total
            else:
                # The bulk path: header fields computed once, packets built
                # inline. Both paths call HEADER.pack directly (pack_header's
                # layout): pack_header's frame per packet cost 4% of the bulk
                # and 3% of the ping-pong loop of bench/utp_core.py.
                wnd = rx.advertise()
                max_packets = self._max_packets
                data_record = new_data_record
                pack = _pack
                append = out.append
                first = _DATA_FIRST
                if sack is None:
                    ext = 0
                    tail = b""
                else:
                    ext = 1
                    tail = sack
                    mss -= len(tail)  # new packets shrink to keep the SACK within the MTU
                count = len(outstanding)
                total = 0
                while sendbuf:
                    size = len(sendbuf)
                    if size > mss:
                        size = mss
                    if flight + size > window:
                        if flight == 0 and self._probe_ok:
                            self._probe_ok = False  # one zero-window probe
                        else:
                            if flight == 0 and self.probe_deadline is None:
                                self.probe_deadline = now + self._probe_interval
                            break
                    if count >= max_packets:
                        break
                    if size == len(sendbuf):
                        payload = bytes(sendbuf)
                        sendbuf.clear()
                    else:
                        payload = bytes(sendbuf[:size])
                        del sendbuf[:size]
                    order += 1
                    outstanding[seq] = data_record(seq, ST_DATA, payload, now, order)
                    append((pack(first, ext, send_id, now_us, reply, wnd, seq & MASK16, ack16) + tail + payload, addr))
                    seq += 1
                    flight += size
                    count += 1
                    total += size
                if seq != first_seq:
                    rx.ack_sent()
            if seq != first_seq:
                # new DATA left, our ACK riding on it
                sent += seq - first_seq
                self.snd_nxt = seq
                self._xmit_count = order
                self._flight = flight
                self.outstanding_bytes += total
                self.bytes_sent += total
                # the RTO runs (our ACK rode on them: cleared above)
                if self.rto_deadline is None:
                    self.rto_deadline = now + self.rtt.rto
                self.last_send = now
        if peer_wnd >= mss:
            self.probe_deadline = None
            self._probe_interval = self._config.zero_window_probe
        # 3. FIN once everything before it is packetized
        if self.eof_requested and not self.fin_sent and not sendbuf:
            self.fin_sent = True
            seq = self.snd_nxt
            self.snd_nxt = seq + 1
            rec = _Outgoing(seq, ST_FIN, b"")
            outstanding[seq] = rec
            self._transmit(rec, now, now_us, sack, out)
            sent += 1
        # 4. a bare ACK if nothing above carried one (or a SACK did not fit)
        if rx.ack_due and (not sent or self._sack_skipped):
            # In SYN_RECV every STATE is a SYN-ACK (seq = ISN): see connection.py.
            header = self.header(ST_STATE, self.isn if syn_recv else self.snd_nxt, now_us, sack)
            out.append((header + sack if sack is not None else header, addr))
            rx.ack_sent()
            self.last_send = now

    def _transmitted(self, rec: _Outgoing, now: float) -> None:
        """A packet already recorded left (again)."""
        order = self._xmit_count = self._xmit_count + 1
        rec.sent_at, rec.order, rec.in_flight = now, order, True
        rec.transmissions += 1

    def _transmit(self, rec: _Outgoing, now: float, now_us: int, sack: bytes | None, out: list[Datagram]) -> None:
        if sack is not None and len(rec.payload) + len(sack) > self._mss:
            # keep the datagram within the MTU: the SACK goes in a STATE instead
            sack = None
            self._sack_skipped = True
        header = self.header(rec.ptype, rec.seq, now_us, sack)
        if sack is not None:
            datagram = header + sack + rec.payload
        else:
            datagram = header + rec.payload
        out.append((datagram, self._remote_address))
        self._transmitted(rec, now)
        self._flight += len(rec.payload)
        self.bytes_sent += len(rec.payload) if rec.transmissions == 1 else 0
        # a DATA or FIN packet left: the RTO runs, and it carried our ACK
        if self.rto_deadline is None:
            self.rto_deadline = now + self.rtt.rto
        self._rx.ack_sent()
        self.last_send = now
        if self._sack_skipped:
            self._rx.request_ack()

    # ---- timers

    def on_probe_timer(self, now: float) -> None:
        """Zero-window probing: one packet beyond the window is allowed now."""
        deadline = self.probe_deadline
        if deadline is not None and now >= deadline:
            self.probe_deadline = None
            self._probe_ok = True
            interval = self._probe_interval * 2
            self._probe_interval = interval if interval < MAX_PROBE_INTERVAL else MAX_PROBE_INTERVAL
            self._dirty.add(self._owner)

    def expire_rto(self) -> int:
        """The retransmission timer fired: the number of consecutive timeouts
        (0: nothing was outstanding, or this was the tail-loss probe)."""
        fired = self.rto_deadline
        self.rto_deadline = None
        if not self.outstanding:
            return 0
        if self._pto_due:
            self._pto_due = False
            rto_at = self._oldest_rto()
            if fired is None or rto_at > fired:
                # Tail-loss probe (RFC 8985's TLP, on the oldest packet): no
                # ACK for two round trips. What was lost at the end of a flight
                # has nothing after it to be found by; the oldest packet sent
                # again draws an ACK, and the SACK or the send time of what it
                # acknowledges lets the loss rules find the rest (libutp's SACK
                # names only the 32 packets past the cumulative ACK: the newest
                # packet would tell nothing). The window stays.
                self.rto_deadline = rto_at
                rec = self.outstanding.get(self.snd_una)
                if rec is not None and rec.in_flight:
                    self._mark_lost(rec)
                    self._dirty.add(self._owner)
                return 0
        self._consecutive_timeouts += 1
        self._stats.timeouts += 1
        return self._consecutive_timeouts

    def retransmit_after_timeout(self, now: float, syn_sent: bool, syn_recv: bool) -> None:
        overdue = now - self.rtt.rto
        self.rtt.backoff()
        if not syn_sent:
            self.cc.on_timeout(now)
            self._recovery_seq = self.snd_nxt
        for rec in timed_out(self.outstanding, self.snd_una, overdue):
            self._mark_lost(rec)
        self._rto_force = True
        self._dup_acks = 0
        if syn_recv:
            self._synack_due = True
        self._dirty.add(self._owner)

    # ---- acknowledgements

    def peer_window_full(self) -> None:
        """A packet said the peer's window is below one packet: it is alive, just
        full, so timeouts now are not a dead path."""
        self._consecutive_timeouts = 0

    def on_ack(
        self, ptype: int, ack: int, off: int, sack: bytes | None, wnd: int, ts_diff: int, now: float
    ) -> bool:
        """A packet acknowledging up to ``ack`` (``off`` packets past the last
        cumulative ACK; 0 or less: nothing new) and the ``sack`` bits, or a
        duplicate ACK. True when nothing is left outstanding, our FIN included."""
        una = self.snd_una
        outstanding = self.outstanding
        if wnd < self._mss:
            # the peer is alive, just full: timeouts here are not a dead path
            self._consecutive_timeouts = 0
        if off < 0:
            # A stale ACK (ack_nr below snd_una - 1: overtaken on the path by a
            # newer one, or a keep-alive): no duplicate (libutp counts only the
            # latest ack_nr again), and its SACK and arrival say nothing new to
            # the loss rules. The counter is not reset either (libutp resets it
            # on any other ack_nr; a reordered old ACK is no sign of recovery).
            if wnd >= self._mss:
                self._dirty.add(self._owner)  # the window it carries may have opened
            return self.fin_acked and not outstanding
        acked_bytes = 0
        flight_before = flight = self._flight
        newest_rtt_sent = -1.0
        lost = False
        rtt = self.rtt
        if off > 0:
            self._dup_acks = 0
            latest = self._latest_delivered_order
            rack = self._rack_sent_at
            # (one packet: a request or a response; no range to build)
            for seq in (una,) if off == 1 else range(una, ack + 1):
                rec = outstanding.pop(seq, None)
                if rec is None:
                    continue
                size = len(rec.payload)
                acked_bytes += size
                if rec.in_flight:
                    flight -= size
                sent_at = rec.sent_at
                if rec.transmissions == 1:
                    if sent_at > newest_rtt_sent:
                        newest_rtt_sent = sent_at
                    if rec.order > latest:
                        latest = rec.order
                    else:
                        self._reordered(rec, latest, rack)
                    if sent_at > rack:
                        rack = sent_at
                elif sent_at > rack and now - sent_at >= rtt.srtt * 0.9:
                    # an ACK sooner than about a round trip after a retransmission
                    # may be for an earlier transmission: its send time says nothing
                    rack = sent_at
                if rec.ptype == ST_FIN:
                    self.fin_acked = True
            self._flight = flight
            self.outstanding_bytes -= acked_bytes
            self._latest_delivered_order = latest
            self._rack_sent_at = rack
            if outstanding:
                una = ack + 1
                nxt = self.snd_nxt
                while una < nxt and una not in outstanding:
                    una += 1
                self.snd_una = una
                # The RTO runs from the oldest packet's (last) transmission, not
                # from this ACK: ACKs of its retransmitted predecessors, one a
                # round trip, must not hold off forever the timeout of a flight
                # lost whole behind them. The tail-loss probe may come first.
                rto_at = outstanding[una].sent_at + rtt.rto
                pto_at = now + rtt.pto
                if pto_at < rto_at:
                    self.rto_deadline = pto_at
                    self._pto_due = True
                else:
                    self.rto_deadline = rto_at
                    self._pto_due = False
            else:
                self.snd_una = self.snd_nxt
                self.rto_deadline = None
                self._pto_due = False
            self._consecutive_timeouts = 0
        else:
            if self._pto_due and outstanding:
                # The peer is not silent: the probe waits for two round trips
                # without any ACK (a loss the ACKs tell of is the loss rules'
                # business; a probe then only added a retransmission), the RTO
                # not beyond the oldest packet's.
                pto_at = now + rtt.pto
                rto_at = self._oldest_rto()
                if pto_at < rto_at:
                    self.rto_deadline = pto_at
                else:
                    self.rto_deadline = rto_at
                    self._pto_due = False
            if ptype == ST_STATE and outstanding:
                self._dup_acks += 1
                if self._dup_acks == self.reordering.threshold:
                    rec = outstanding.get(self.snd_una)
                    if rec is not None and rec.in_flight:
                        self._lose(rec, flight_before)
                        lost = True
        if sack is not None and outstanding:
            sacked_bytes, sack_lost = self._on_sack(ack, sack, flight_before, now)
            acked_bytes += sacked_bytes
            lost = lost or sack_lost
        if newest_rtt_sent >= 0.0:
            sample = now - newest_rtt_sent
            rtt.sample(sample)
            self.cc.on_rtt(sample, now)
        if outstanding:
            if not lost:
                rec = outstanding.get(self.snd_una)
                if rec is not None and head_retransmission_lost(rec, rtt, now, self._config.delayed_ack):
                    self._lose(rec, flight_before)
                    lost = True
            rack = self._rack_sent_at
            if rack > self._rack_checked:  # something sent later was delivered
                self._rack_checked = rack
                for rec in sent_before_delivered(outstanding.values(), rack - self.reordering.window(rtt.srtt)):
                    self._lose(rec, flight_before)
                    lost = True
        if lost:
            self._stats.fast_retransmits += 1
            if self.snd_una >= self._recovery_seq:
                self.cc.on_loss(now)
                self._recovery_seq = self.snd_nxt
            if not self._ep_reported and overflow_burst(self._ep_recent):
                # the receiver (or a short queue) overflowed: the controller
                # decides what to make of it
                self._ep_reported = True
                self.cc.on_overflow(self._ep_flight, now)
        if acked_bytes:
            delay = None
            if ts_diff:
                delay = self._delay.add(ts_diff, now)
                # a queuing delay cannot exceed the round trip (clock skew guard)
                limit = _trunc(rtt.srtt * 1e6) if rtt.has_sample else 1_000_000
                if delay > limit:
                    delay = limit
            self.cc.on_ack(acked_bytes, delay, flight_before, now)
            if self._send_blocked and self.send_buffer_free >= (self._send_buffer_size >> 2):
                self._send_blocked = False
                self._events.append(self._space_event)
            self._dirty.add(self._owner)
        elif lost or wnd >= self._mss:
            self._dirty.add(self._owner)
        return self.fin_acked and not outstanding

    def _on_sack(self, ack: int, sack: bytes, flight_before: int, now: float) -> tuple[int, bool]:
        """Apply a selective ACK; return (bytes newly acked, a loss was detected)."""
        outstanding = self.outstanding
        base = ack + 2
        span = self.snd_nxt - base
        if span <= 0:
            return 0, False
        bits = int.from_bytes(sack, "little")
        if not bits:
            if span <= 8 * len(sack) or not self.rtt.has_sample:
                return 0, False
            lost = unsacked_range_lost(outstanding, ack + 1, base + 8 * len(sack), now - self.rtt.srtt * 1.25)
            for hole in lost:
                self._lose(hole, flight_before)
            return 0, bool(lost)
        if bits.bit_length() > span:  # bits for packets never sent
            bits &= (1 << span) - 1
        if not bits:
            return 0, False
        # Every SACK repeats the previous one's bits: only the new ones are
        # walked (a big window's SACK names hundreds of packets).
        fresh = bits
        seen_base = self._sack_seen_base
        if 0 <= seen_base <= base:
            fresh &= ~(self._sack_seen_bits >> (base - seen_base))
        self._sack_seen_base = base
        self._sack_seen_bits = bits
        acked_bytes = 0
        latest = self._latest_delivered_order
        while fresh:
            low = fresh & -fresh
            fresh ^= low
            rec = outstanding.pop(base + low.bit_length() - 1, None)
            if rec is not None:
                size = len(rec.payload)
                acked_bytes += size
                self.outstanding_bytes -= size
                if rec.in_flight:
                    self._flight -= size
                if rec.transmissions == 1:
                    if rec.order > latest:
                        latest = rec.order
                        if rec.sent_at > self._rack_sent_at:
                            self._rack_sent_at = rec.sent_at
                    else:
                        self._reordered(rec, latest, self._rack_sent_at)
                if rec.ptype == ST_FIN:
                    self.fin_acked = True
        self._latest_delivered_order = latest
        threshold = self.reordering.threshold
        if bits.bit_count() < threshold:
            return acked_bytes, False
        holes = sack_holes_lost(outstanding, base, bits, latest, threshold)
        for rec in holes:
            self._lose(rec, flight_before)
        return acked_bytes, bool(holes)

    def _reordered(self, rec: _Outgoing, latest: int, latest_sent_at: float) -> None:
        """``rec``, sent once, was delivered after a packet sent later (order
        ``latest``): the path reorders. Were it marked lost, that was spurious."""
        self.reordering.seen(rec.order, rec.sent_at, latest, latest_sent_at)
        if not rec.in_flight and rec.seq in self._ep_recent:
            self._ep_recent.remove(rec.seq)  # no part of an overflow burst

    def _oldest_rto(self) -> float:
        """When the RTO of the oldest packet outstanding is due."""
        rec = self.outstanding.get(self.snd_una)
        sent_at = rec.sent_at if rec is not None else self.last_send
        return sent_at + self.rtt.rto

    def _lose(self, rec: _Outgoing, flight: int) -> None:
        """An ACK proved ``rec`` lost (``flight``: in flight before that ACK):
        marked for retransmission, and a first transmission counts in the loss
        episode's pattern."""
        self._mark_lost(rec)
        if rec.transmissions == 1:
            if self.snd_una >= self._ep_end:
                # a new episode: until everything now in flight is acknowledged
                self._ep_end = self.snd_nxt
                self._ep_flight = flight
                self._ep_reported = False
            recent = self._ep_recent
            recent.append(rec.seq)
            if len(recent) > OVERFLOW_RUN:
                del recent[0]

    def _mark_lost(self, rec: _Outgoing) -> None:
        rec.in_flight = False
        self._flight -= len(rec.payload)
        heapq.heappush(self.resend, rec.seq)
