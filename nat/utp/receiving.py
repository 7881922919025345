"""The receiving half of a uTP connection (a mixin of UtpConnection).

In-order data goes straight into the receive buffer; out-of-order packets wait
in a reorder buffer bounded by ``reorder_limit`` packets and by the free
receive window, so receive memory stays within ``recv_buffer_size`` plus one
packet (the zero-window probe) whatever the peer sends. ACKs are delayed: every
second in-order packet, or ``delayed_ack`` after a single one; anything out of
order, duplicated or a FIN is acknowledged (with a selective ACK) at once.
"""

from __future__ import annotations

from nat.utp.events import EofReceived
from nat.utp.packet import ST_DATA, ST_FIN
from nat.utp.states import MASK16 as _MASK16


class ReceiveSide:
    """Receive-side methods; state lives on the UtpConnection instance."""

    def _on_data(self, ptype: int, seq16: int, data: bytes, offset: int, now: float) -> None:
        # (the next in-order DATA with nothing buffered out of order, and room,
        # never gets here: UtpConnection._on_packet takes it inline)
        rcv_nxt = self._rcv_nxt
        off = (seq16 - rcv_nxt) & _MASK16
        if off >= 0x8000:  # already delivered: our ACK was lost
            self._ack_due = True
            self._mux._dirty.add(self)
            return
        seq = rcv_nxt + off
        eof_seq = self._eof_seq
        if eof_seq is not None and seq > eof_seq:
            return
        size = len(data) - offset
        if self._close_requested:
            # closing: accept and acknowledge, but keep nothing
            if ptype == ST_FIN and eof_seq is None:
                self._set_eof(seq)
            if off == 0:
                self._rcv_nxt = seq + 1
                self._deliver_reorder()
            elif off < self._config.reorder_limit and seq not in self._reorder:
                self._reorder[seq] = (ptype, b"")
            self._ack_due = True
            self._mux._dirty.add(self)
            return
        if off == 0:
            used = len(self._rbuf) + self._reorder_bytes
            if size and used + size > self._recv_buffer_size + self._mss:
                self._mux.stats.dropped_packets += 1
                self._ack_due = True
                self._mux._dirty.add(self)
                return
            if ptype == ST_FIN and eof_seq is None:
                self._set_eof(seq)
            if size:
                self._rbuf += memoryview(data)[offset:]
                self.bytes_received += size
            self._rcv_nxt = seq + 1
            if self._reorder:
                self._deliver_reorder()
                self._ack_due = True
            self._unacked += 1
            if self._unacked >= 2:
                self._ack_due = True
            elif self._ack_deadline is None:
                self._ack_deadline = now + self._config.delayed_ack
        else:
            self._ack_due = True  # out of order: SACK at once
            if off >= self._config.reorder_limit or seq in self._reorder:
                self._mux._dirty.add(self)
                return
            if size > self._free_window():
                self._mux.stats.dropped_packets += 1
                self._mux._dirty.add(self)
                return
            if ptype == ST_FIN and eof_seq is None:
                self._set_eof(seq)
            self._reorder[seq] = (ptype, bytes(data[offset:]))
            self._reorder_bytes += size
        if self._ack_due:
            self._mux._dirty.add(self)
        if self._rbuf and not self._readable_signalled:
            self._readable_signalled = True
            self._emit(self._readable_event)
        if self._eof_seq is not None and not self._eof_reached and self._rcv_nxt > self._eof_seq:
            self._eof_reached = True
            self._ack_due = True
            self._mux._dirty.add(self)
            self._emit(EofReceived(self))
            if self._fin_acked and not self._outstanding:
                self._finish()

    def _set_eof(self, seq: int) -> None:
        """The peer's FIN has ``seq``: nothing after it will ever be delivered."""
        self._eof_seq = seq
        reorder = self._reorder
        for later in [s for s in reorder if s > seq]:
            self._reorder_bytes -= len(reorder.pop(later)[1])

    def _deliver_reorder(self) -> None:
        reorder = self._reorder
        rcv_nxt = self._rcv_nxt
        discard = self._close_requested
        while rcv_nxt in reorder:
            ptype, payload = reorder.pop(rcv_nxt)
            self._reorder_bytes -= len(payload)
            if payload and not discard:
                self._rbuf += payload
                self.bytes_received += len(payload)
            rcv_nxt += 1
        self._rcv_nxt = rcv_nxt
