"""The sending half of a uTP connection (a mixin of UtpConnection).

Packetizing the send buffer, (re)transmission, the retransmission timer,
cumulative and selective ACK processing, fast retransmit and the congestion
controller's inputs. Loss rules (libutp): 3 duplicate ACKs (ST_STATE only) or 3
packets selectively acknowledged past a hole; in addition a hole is declared
lost again only if something sent after its last transmission was delivered (by
transmission order, so a hole and the packets past it sent in one batch count),
so one old SACK cannot trigger a second retransmission of the same packet.
Only packets sent once move that "latest delivered" mark: an ACK of a
retransmitted packet may come from its first transmission (a spurious
retransmission), and taking the retransmission's place in the order would
declare every other retransmission in flight lost again, a cascade.
"""

from __future__ import annotations

import heapq
from math import trunc as _trunc  # int(float), about 60 ns cheaper per call

from nat.errors import UtpTimeout
from nat.utp.events import SendSpaceAvailable
from nat.utp.packet import HEADER, ST_DATA, ST_FIN, ST_RESET, ST_STATE, ST_SYN
from nat.utp.states import (
    CLOSED as _CLOSED,
    CONNECTED as _CONNECTED,
    DUP_ACK_THRESHOLD as _DUP_ACK_THRESHOLD,
    MASK16 as _MASK16,
    MASK32 as _MASK32,
    RESET as _RESET,
    SYN_RECV as _SYN_RECV,
    SYN_SENT as _SYN_SENT,
    VERSION as _VERSION,
    OutgoingPacket as _Outgoing,
)


# The SACK extension's length is one byte, a multiple of 4: 252 bytes.
_SACK_MAX_BITS = 252 * 8
_DATA_FIRST = (ST_DATA << 4) | _VERSION
_new_record = _Outgoing.__new__


def _data_record(seq: int, payload: bytes, now: float, order: int) -> _Outgoing:
    """The record of a new DATA packet, fields set directly: cheaper than __init__."""
    rec = _new_record(_Outgoing)
    rec.seq = seq
    rec.ptype = ST_DATA
    rec.payload = payload
    rec.sent_at = now
    rec.transmissions = 1
    rec.in_flight = True
    rec.order = order
    return rec


class SendSide:
    """Send-side methods; state lives on the UtpConnection instance."""

    def _data_sent(self, snd_nxt: int, order: int, flight: int, size: int, now: float) -> None:
        """Bookkeeping after new DATA packets left (their ACK rides on them)."""
        self._snd_nxt = snd_nxt
        self._xmit_count = order
        self._flight = flight
        self._outstanding_bytes += size
        self.bytes_sent += size
        self._packet_left(now)

    def _packet_left(self, now: float) -> None:
        """A DATA or FIN packet left: the RTO runs, and it carried our ACK."""
        if self._rto_deadline is None:
            self._rto_deadline = now + self._rtt.rto
        self._ack_due = False
        self._ack_deadline = None
        self._unacked = 0
        self._last_send = now

    def _header(self, ptype: int, seq: int, now_us: int, sack: bytes | None) -> bytes:
        wnd = self._free_window()
        self._last_adv_wnd = wnd
        return HEADER.pack(
            (ptype << 4) | _VERSION,
            1 if sack is not None else 0,
            self.send_id,
            now_us,
            self._reply_micro,
            wnd,
            seq & _MASK16,
            (self._rcv_nxt - 1) & _MASK16,
        )

    def _build_sack(self) -> bytes | None:
        reorder = self._reorder
        if not reorder:
            return None
        base = self._rcv_nxt + 1
        # Cover the whole reorder buffer (up to the 252-byte extension limit):
        # packets a SACK cannot name count as in flight at the sender until the
        # hole before them is repaired, which stalls a big window for a round
        # trip after every loss. libutp reads any length.
        limit = self._config.reorder_limit
        if limit > _SACK_MAX_BITS:
            limit = _SACK_MAX_BITS
        mask = 0
        for seq in reorder:
            offset = seq - base
            if 0 <= offset < limit:
                mask |= 1 << offset
        if not mask:
            return None
        # bit i of the mask <-> ack_nr + 2 + i, least-significant bit first per
        # byte, a multiple of 4 bytes (BEP 29).
        size = ((mask.bit_length() + 31) >> 5) << 2
        return bytes((0, size)) + mask.to_bytes(size, "little")

    def _flush(self, now: float, out: list) -> None:
        """Append every datagram this connection wants to send now."""
        state = self.state
        addr = self.remote_address
        now_us = _trunc(now * 1e6) & _MASK32
        if state is not _CONNECTED:
            if state is _CLOSED or state is _RESET:
                if self._reset_due:
                    self._reset_due = False
                    out.append((self._reset_datagram(now_us), addr))
                    self._mux.stats.resets_sent += 1
                elif self._ack_due:
                    self._ack_due = False
                    out.append((self._header(ST_STATE, self._snd_nxt, now_us, None), addr))
                return
            if state is _SYN_SENT:
                if self._close_requested and self._close_deadline is None:
                    self._close_deadline = now + self._config.close_timeout
                rec = self._outstanding.get(self._isn)
                if rec is not None and not rec.in_flight:
                    self._transmit_syn(rec, now, now_us, out)
                return
        if self._close_requested and self._close_deadline is None:
            self._close_deadline = now + self._config.close_timeout
        sack = self._build_sack() if self._reorder else None
        self._sack_skipped = False
        sent = 0
        if self._synack_due:
            self._synack_due = False
            header = self._header(ST_STATE, self._isn, now_us, sack)
            out.append((header + sack if sack is not None else header, addr))
            sent += 1
        outstanding = self._outstanding
        cwnd = self._cc.cwnd
        peer_wnd = self._peer_wnd
        window = cwnd if cwnd < peer_wnd else peer_wnd
        mss = self._mss
        # 1. retransmissions first
        resend = self._resend
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
            if self._flight + size > window and self._flight > 0 and not self._rto_force and seq != self._snd_una:
                break
            self._rto_force = False
            heapq.heappop(resend)
            self._transmit(rec, now, now_us, sack, out)
            self.retransmits += 1
            self._mux.stats.retransmits += 1
            sent += 1
        # 2. new data
        sendbuf = self._sendbuf
        if not sendbuf or resend:
            pass
        elif (
            sack is None
            and len(sendbuf) <= mss
            and self._flight + len(sendbuf) <= window
            and len(outstanding) < self._max_packets
        ):
            # One packet takes it all (a request or a response): the loop
            # below, unrolled.
            size = len(sendbuf)
            payload = bytes(sendbuf)
            sendbuf.clear()
            seq = self._snd_nxt
            order = self._xmit_count + 1
            outstanding[seq] = _data_record(seq, payload, now, order)
            wnd = self._recv_buffer_size - len(self._rbuf) - self._reorder_bytes
            if wnd < 0:
                wnd = 0
            self._last_adv_wnd = wnd
            header = HEADER.pack(
                _DATA_FIRST, 0, self.send_id, now_us, self._reply_micro, wnd, seq & _MASK16, (self._rcv_nxt - 1) & _MASK16
            )
            out.append((header + payload, addr))
            sent += 1
            self._data_sent(seq + 1, order, self._flight + size, size, now)
        else:
            # The bulk path: header fields computed once, packets built inline.
            max_packets = self._max_packets
            data_record = _data_record
            pack = HEADER.pack
            append = out.append
            first = _DATA_FIRST
            if sack is None:
                ext = 0
                tail = b""
            else:
                ext = 1
                tail = sack
                mss -= len(tail)  # new packets shrink to keep the SACK within the MTU
            send_id = self.send_id
            reply = self._reply_micro
            wnd = self._recv_buffer_size - len(self._rbuf) - self._reorder_bytes
            if wnd < 0:
                wnd = 0
            self._last_adv_wnd = wnd
            ack16 = (self._rcv_nxt - 1) & _MASK16
            flight = self._flight
            seq = first_seq = self._snd_nxt
            count = len(outstanding)
            total = 0
            order = self._xmit_count
            while sendbuf:
                size = len(sendbuf)
                if size > mss:
                    size = mss
                if flight + size > window:
                    if flight == 0 and self._probe_ok:
                        self._probe_ok = False  # one zero-window probe
                    else:
                        if flight == 0 and self._probe_deadline is None:
                            self._probe_deadline = now + self._probe_interval
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
                outstanding[seq] = data_record(seq, payload, now, order)
                append((pack(first, ext, send_id, now_us, reply, wnd, seq & _MASK16, ack16) + tail + payload, addr))
                seq += 1
                flight += size
                count += 1
                total += size
            if seq != first_seq:
                sent += seq - first_seq
                self._data_sent(seq, order, flight, total, now)
        if peer_wnd >= mss:
            self._probe_deadline = None
            self._probe_interval = self._zero_window_probe
        # 3. FIN once everything before it is packetized
        if self._eof_requested and not self._fin_sent and not sendbuf:
            self._fin_sent = True
            seq = self._snd_nxt
            self._snd_nxt = seq + 1
            rec = _Outgoing(seq, ST_FIN, b"")
            outstanding[seq] = rec
            self._transmit(rec, now, now_us, sack, out)
            sent += 1
        # 4. a bare ACK if nothing above carried one (or a SACK did not fit)
        if self._ack_due and (not sent or self._sack_skipped):
            self._send_state(now, now_us, sack, out)

    def _send_state(self, now: float, now_us: int, sack: bytes | None, out: list) -> None:
        # In SYN_RECV every STATE is a SYN-ACK (seq = ISN): see the module docstring.
        seq = self._isn if self.state is _SYN_RECV else self._snd_nxt
        header = self._header(ST_STATE, seq, now_us, sack)
        out.append((header + sack if sack is not None else header, self.remote_address))
        self._ack_due = False
        self._ack_deadline = None
        self._unacked = 0
        self._last_send = now

    def _transmit(self, rec: _Outgoing, now: float, now_us: int, sack: bytes | None, out: list) -> None:
        if sack is not None and len(rec.payload) + len(sack) > self._mss:
            # keep the datagram within the MTU: the SACK goes in a STATE instead
            sack = None
            self._sack_skipped = True
        header = self._header(rec.ptype, rec.seq, now_us, sack)
        if sack is not None:
            datagram = header + sack + rec.payload
        else:
            datagram = header + rec.payload
        out.append((datagram, self.remote_address))
        rec.sent_at = now
        self._xmit_count += 1
        rec.order = self._xmit_count
        rec.transmissions += 1
        rec.in_flight = True
        self._flight += len(rec.payload)
        self.bytes_sent += len(rec.payload) if rec.transmissions == 1 else 0
        self._packet_left(now)
        if self._sack_skipped:
            self._ack_due = True

    def _transmit_syn(self, rec: _Outgoing, now: float, now_us: int, out: list) -> None:
        header = HEADER.pack(
            (ST_SYN << 4) | _VERSION, 0, self.recv_id, now_us, 0, self._free_window(), rec.seq & _MASK16, 0
        )
        out.append((header, self.remote_address))
        rec.sent_at = now
        self._xmit_count += 1
        rec.order = self._xmit_count
        rec.transmissions += 1
        rec.in_flight = True
        self._syn_last_sent = now
        if self._rto_deadline is None:
            self._rto_deadline = now + self._rtt.rto
        self._last_send = now

    def _reset_datagram(self, now_us: int) -> bytes:
        return HEADER.pack(
            (ST_RESET << 4) | _VERSION,
            0,
            self.send_id,
            now_us,
            self._reply_micro,
            0,
            self._snd_nxt & _MASK16,
            (self._rcv_nxt - 1) & _MASK16,
        )

    def _on_rto(self, now: float) -> None:
        mux = self._mux
        self._rto_deadline = None
        if not self._outstanding:
            return
        self._consecutive_timeouts += 1
        mux.stats.timeouts += 1
        if self.state is _SYN_SENT:
            if self._consecutive_timeouts >= self._config.syn_retries:
                self._die(UtpTimeout("connect: no answer to SYN"))
                return
        elif self._consecutive_timeouts > self._config.max_retransmits:
            self._reset_due = True
            self._die(UtpTimeout("retransmissions exhausted"), _RESET)
            return
        # Lost: the oldest packet, and every packet older than one RTO by its
        # own clock. Younger ones are still on their way (marking them too would
        # resend a whole window after one lost retransmission).
        overdue = now - self._rtt.rto
        self._rtt.backoff()
        if self.state is not _SYN_SENT:
            self._cc.on_timeout(now)
            self._recovery_seq = self._snd_nxt
        oldest = self._outstanding.get(self._snd_una)
        for rec in self._outstanding.values():
            if rec.in_flight and (rec is oldest or rec.sent_at <= overdue):
                self._mark_lost(rec)
        self._rto_force = True
        self._dup_acks = 0
        if self.state is _SYN_RECV:
            self._synack_due = True
        mux._dirty.add(self)

    def _on_ack(
        self,
        ptype: int,
        ack: int,
        off: int,
        sack: bytes | None,
        wnd: int,
        ts_diff: int,
        now: float,
    ) -> None:
        outstanding = self._outstanding
        self._peer_wnd = wnd
        if wnd < self._mss:
            # the peer is alive, just full: timeouts here are not a dead path
            self._consecutive_timeouts = 0
        acked_bytes = 0
        flight_before = flight = self._flight
        newest_rtt_sent = -1.0
        lost = False
        rtt = self._rtt
        if off > 0:
            self._dup_acks = 0
            una = self._snd_una
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
                    if sent_at > rack:
                        rack = sent_at
                elif sent_at > rack and now - sent_at >= rtt.srtt * 0.9:
                    # an ACK sooner than about a round trip after a retransmission
                    # may be for an earlier transmission: its send time says nothing
                    rack = sent_at
                if rec.ptype == ST_FIN:
                    self._fin_acked = True
            self._flight = flight
            self._outstanding_bytes -= acked_bytes
            self._latest_delivered_order = latest
            self._rack_sent_at = rack
            if outstanding:
                una = ack + 1
                nxt = self._snd_nxt
                while una < nxt and una not in outstanding:
                    una += 1
                self._snd_una = una
                self._rto_deadline = now + rtt.rto
            else:
                self._snd_una = self._snd_nxt
                self._rto_deadline = None
            self._consecutive_timeouts = 0
        elif ptype == ST_STATE and outstanding:
            self._dup_acks += 1
            if self._dup_acks == _DUP_ACK_THRESHOLD:
                rec = outstanding.get(self._snd_una)
                if rec is not None and rec.in_flight:
                    self._mark_lost(rec)
                    lost = True
        if sack is not None and outstanding:
            sacked_bytes, sack_lost = self._on_sack(ack, sack)
            acked_bytes += sacked_bytes
            lost = lost or sack_lost
        if newest_rtt_sent >= 0.0:
            sample = now - newest_rtt_sent
            rtt.sample(sample)
            self._cc.on_rtt(sample, now)
        if outstanding:
            if not lost:
                lost = self._head_retransmission_lost(now)
            if self._rack_sent_at > self._rack_checked:
                lost = self._sent_before_delivered_lost() or lost
        if lost:
            self._mux.stats.fast_retransmits += 1
            if self._snd_una >= self._recovery_seq:
                self._cc.on_loss(now)
                self._recovery_seq = self._snd_nxt
        if acked_bytes:
            delay = None
            if ts_diff:
                delay = self._delay.add(ts_diff, now)
                # a queuing delay cannot exceed the round trip (clock skew guard)
                limit = _trunc(rtt.srtt * 1e6) if rtt.has_sample else 1_000_000
                if delay > limit:
                    delay = limit
            self._cc.on_ack(acked_bytes, delay, flight_before, now)
            if self._send_blocked and self.send_buffer_free >= (self._send_buffer_size >> 2):
                self._send_blocked = False
                self._emit(SendSpaceAvailable(self))
            self._mux._dirty.add(self)
        elif lost or wnd >= self._mss:
            self._mux._dirty.add(self)
        if self._fin_acked and not outstanding:
            if self._close_requested or self._eof_reached:
                self._finish()

    def _on_sack(self, ack: int, sack: bytes) -> tuple[int, bool]:
        """Apply a selective ACK; return (bytes newly acked, a loss was detected)."""
        outstanding = self._outstanding
        base = ack + 2
        span = self._snd_nxt - base
        if span <= 0:
            return 0, False
        bits = int.from_bytes(sack, "little")
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
                self._outstanding_bytes -= size
                if rec.in_flight:
                    self._flight -= size
                if rec.order > latest and rec.transmissions == 1:
                    latest = rec.order
                    if rec.sent_at > self._rack_sent_at:
                        self._rack_sent_at = rec.sent_at
                if rec.ptype == ST_FIN:
                    self._fin_acked = True
        self._latest_delivered_order = latest
        if bits.bit_count() < _DUP_ACK_THRESHOLD:
            return acked_bytes, False
        # A hole is lost once 3 packets above it are SACKed and something sent
        # after its last transmission was delivered (so a retransmission is not
        # declared lost again by the same old SACK bits).
        for _ in range(_DUP_ACK_THRESHOLD - 1):
            bits ^= 1 << (bits.bit_length() - 1)
        limit = base + bits.bit_length() - 1
        lost = False
        # outstanding is in sequence order and below ``limit`` holds only holes
        for seq, rec in outstanding.items():
            if seq >= limit:
                break
            if rec.in_flight and rec.order < latest:
                self._mark_lost(rec)
                lost = True
        return acked_bytes, lost

    def _sent_before_delivered_lost(self) -> bool:
        """RACK (RFC 8985) in brief: what was sent a reordering window (a
        quarter RTT) before a packet that got delivered is lost.

        This catches what the SACK rule cannot: a run of packets dropped
        together (a bottleneck queue overflowing) with nothing after them
        delivered but retransmissions of earlier holes. Their phantom flight
        would hold the window shut, each ACK restarting the retransmission
        timer, and only one hole a round trip would be repaired.
        """
        rack = self._rack_sent_at
        self._rack_checked = rack
        cutoff = rack - self._rtt.srtt * 0.25
        lost = False
        # in sequence order, first transmissions were also sent in order
        for rec in self._outstanding.values():
            if rec.sent_at >= cutoff:
                if rec.transmissions == 1:
                    break
                continue
            if rec.in_flight and rec.ptype != ST_SYN:
                self._mark_lost(rec)
                lost = True
        return lost

    def _head_retransmission_lost(self, now: float) -> bool:
        """Mark the oldest packet lost again when its retransmission was lost.

        What was sent after that retransmission lies beyond the SACK range on a
        big window, so the SACK rule never sees it delivered: an ACK arriving
        more than a round trip (plus a reordering allowance) after the
        retransmission, without covering it, is the evidence instead of an RTO.
        """
        rec = self._outstanding.get(self._snd_una)
        if rec is None or not rec.in_flight or rec.transmissions < 2 or not self._rtt.has_sample:
            return False
        rtt = self._rtt
        allowance = rtt.srtt * 0.25
        if rtt.rttvar > allowance:
            allowance = rtt.rttvar
        if now - rec.sent_at <= rtt.srtt + allowance + self._config.delayed_ack:
            return False
        self._mark_lost(rec)
        return True

    def _mark_lost(self, rec: _Outgoing) -> None:
        rec.in_flight = False
        self._flight -= len(rec.payload)
        heapq.heappush(self._resend, rec.seq)
