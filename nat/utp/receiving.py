"""The receiving half of a uTP connection: a :class:`Receiver` the connection owns.

Once connected, every DATA, FIN and STATE packet of the connection comes here
(``on_packet``): the receiver checks its ACK number, keeps what the header says
about the peer (its window, the timestamp our headers echo), hands the ACK part
to the sender and takes the data.

In-order data goes straight into the receive buffer; out-of-order packets wait
in a reorder buffer bounded by ``reorder_limit`` packets and by the free
receive window, so receive memory stays within ``recv_buffer_size`` plus one
packet (the zero-window probe) whatever the peer sends. ACKs are delayed: every
second in-order packet, or ``delayed_ack`` after a single one; anything out of
order, duplicated or a FIN is acknowledged (with a selective ACK) at once.

The receiver also keeps what we owe the peer: whether an ACK is due, and the
window we last advertised (a read that reopens it enough is worth a window
update). The sender asks it for the ACK fields of every header it packs.
"""

from __future__ import annotations

from collections.abc import Callable
from math import trunc as _trunc  # int(float), about 60 ns cheaper per call
from typing import Generic, Protocol

from nat.utp.config import UtpConfig
from nat.utp.events import ConnT, UtpEventOf
from nat.utp.outbox import Flushable, Outbox
from nat.utp.packet import ST_DATA, ST_FIN, ST_STATE
from nat.utp.states import MASK16, MASK32, OutgoingPacket

__all__ = ["Receiver", "AckTaker"]


class AckTaker(Protocol):
    """The connection's sender, as its receiver hands it each packet's ACK part
    (the receiver only reads these)."""

    snd_una: int
    snd_nxt: int
    fin_acked: bool
    outstanding: dict[int, OutgoingPacket]
    sendbuf: bytearray
    resend: list[int]

    def on_ack(self, ptype: int, ack: int, off: int, sack: bytes | None, wnd: int, ts_diff: int, now: float) -> bool:
        """True when nothing is left outstanding, our FIN included."""
        ...

    def peer_window_full(self) -> None: ...

# The SACK extension's length is one byte, a multiple of 4: 252 bytes.
_SACK_MAX_BITS = 252 * 8


class Receiver(Generic[ConnT]):
    """Receive buffer, reorder buffer, FIN and owed ACKs of one connection.

    Public attributes are read by the connection and its sender; only this class
    writes them.
    """

    __slots__ = (
        # read by the connection and the sender
        "peer_window", "reply_micro", "rcv_nxt", "syn_seq", "reorder", "reorder_bytes", "eof_seq", "eof_reached",
        "ack_due", "ack_deadline", "last_adv_wnd", "bytes_received",
        "_rbuf", "_unacked", "_readable_signalled", "_discarding", "_open", "_end", "_tx", "_owner", "_dirty",
        "_events", "_stats", "_readable_event", "_eof_event", "_buffer_size", "_mss", "_reorder_limit", "_delayed_ack",
    )

    def __init__(
        self, owner: Flushable, outbox: Outbox[ConnT], readable_event: UtpEventOf[ConnT],
        eof_event: UtpEventOf[ConnT], config: UtpConfig, mss: int, end: Callable[[float], None],
    ) -> None:  # fmt: skip
        # What the peer's last packet said: its receive window, and the
        # timestamp_difference_microseconds our headers echo (our clock minus
        # its timestamp).
        self.peer_window = config.recv_buffer_size
        self.reply_micro = 0
        # sequence numbers are unbounded integers; 16 bits only on the wire
        self.rcv_nxt = 0  # the next one expected (set by the handshake)
        self.syn_seq = -1  # an acceptor's: the initiator's SYN
        self.reorder: dict[int, tuple[int, bytes]] = {}
        self.reorder_bytes = 0
        self.eof_seq: int | None = None  # the peer's FIN
        self.eof_reached = False  # ... and everything before it arrived
        self.ack_due = False
        self.ack_deadline: float | None = None
        self.last_adv_wnd = config.recv_buffer_size
        self.bytes_received = 0
        self._rbuf = bytearray()
        self._unacked = 0  # in-order packets since our last ACK
        self._readable_signalled = False
        self._discarding = False  # closed by the application: keep nothing
        self._open = True  # False once the connection ended
        # the connection's clean end (both FINs acknowledged), at the time given
        self._end = end
        self._owner = owner  # what goes into ``dirty``: the connection
        self._dirty, self._events, self._stats = outbox.dirty, outbox.events, outbox.stats
        # events are immutable: one instance serves every edge
        self._readable_event = readable_event
        self._eof_event = eof_event
        self._buffer_size = config.recv_buffer_size
        self._mss = mss
        self._reorder_limit = config.reorder_limit
        self._delayed_ack = config.delayed_ack

    _tx: AckTaker

    # ---- state for the connection

    def attach(self, sender: AckTaker) -> None:
        """The sender that takes the ACK part of our packets (made after us)."""
        self._tx = sender

    def start(self, rcv_nxt: int, wnd: int, ts: int, now: float) -> None:
        """An initiator's SYN-ACK (a STATE) named the peer's next sequence number."""
        self._peer_header(wnd, ts, now)
        self.rcv_nxt = rcv_nxt

    def start_incoming(self, syn_seq: int, wnd: int, ts: int, now: float) -> None:
        """An acceptor: the initiator's SYN had ``syn_seq``; its data follows."""
        self._peer_header(wnd, ts, now)
        self.syn_seq = syn_seq
        self.rcv_nxt = syn_seq + 1

    def _peer_header(self, wnd: int, ts: int, now: float) -> None:
        self.peer_window = wnd
        now_us = int(now * 1_000_000) & MASK32
        self.reply_micro = (now_us - ts) & MASK32 if ts else 0

    def stop(self) -> None:
        """The connection ended: drop what waits out of order, owe nothing more."""
        self._open = False
        self.reorder.clear()
        self.reorder_bytes = 0
        self.ack_deadline = None
        self.ack_due = False

    def discard(self) -> None:
        """close(): unread and later data is dropped (still acknowledged)."""
        self._discarding = True
        self._rbuf.clear()
        self.reorder.clear()
        self.reorder_bytes = 0

    def request_ack(self) -> None:
        self.ack_due = True

    @property
    def buffered(self) -> int:
        """Bytes waiting to be read."""
        return len(self._rbuf)

    @property
    def reorder_count(self) -> int:
        """Packets waiting out of order."""
        return len(self.reorder)

    @property
    def at_eof(self) -> bool:
        return self.eof_reached and not self._rbuf

    def free_window(self) -> int:
        free = self._buffer_size - len(self._rbuf) - self.reorder_bytes
        return free if free > 0 else 0

    # ---- what our headers carry

    def advertise(self) -> int:
        """The window for a header being packed (remembered as advertised)."""
        wnd = self._buffer_size - len(self._rbuf) - self.reorder_bytes
        if wnd < 0:
            wnd = 0
        self.last_adv_wnd = wnd
        return wnd

    def ack_carried(self) -> int:
        """advertise() and ack_sent() at once, for a packet that is sure to leave."""
        wnd = self._buffer_size - len(self._rbuf) - self.reorder_bytes
        if wnd < 0:
            wnd = 0
        self.last_adv_wnd = wnd
        self.ack_due = False
        self.ack_deadline = None
        self._unacked = 0
        return wnd

    def ack_sent(self) -> None:
        """A packet carrying our ACK left."""
        self.ack_due = False
        self.ack_deadline = None
        self._unacked = 0

    def build_sack(self) -> bytes | None:
        reorder = self.reorder
        if not reorder:
            return None
        base = self.rcv_nxt + 1
        # Cover the whole reorder buffer (up to the 252-byte extension limit):
        # packets a SACK cannot name count as in flight at the sender until the
        # hole before them is repaired, which stalls a big window for a round
        # trip after every loss. libutp reads any length.
        limit = self._reorder_limit
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

    # ---- the application side

    def read(self, max_bytes: int = 1 << 30) -> bytes:
        """Return up to ``max_bytes`` in-order received bytes (b"" when none)."""
        rbuf = self._rbuf
        if not rbuf or max_bytes <= 0:
            return b""
        if max_bytes >= len(rbuf):
            data = bytes(rbuf)
            rbuf.clear()
            self._readable_signalled = False
        else:
            data = bytes(rbuf[:max_bytes])
            del rbuf[:max_bytes]
        # Window update: when the peer last heard less than two packets of room
        # and now there are two, or a quarter of the buffer has opened since
        # (never for less than two packets: no silly-window updates).
        if not self.ack_due:
            size = self._buffer_size
            free = size - len(rbuf) - self.reorder_bytes
            last = self.last_adv_wnd
            # (neither rule can fire unless the window grew since the peer heard)
            if free > last and self._open:
                two = 2 * self._mss
                if (last < two <= free) or free - last >= (size >> 2):
                    self.ack_due = True
                    self._dirty.add(self._owner)
        return data

    # ---- the network side

    def on_ack_timer(self, now: float) -> None:
        """The delayed-ACK timer: due at ``ack_deadline``."""
        deadline = self.ack_deadline
        if deadline is not None and now >= deadline:
            self.ack_deadline = None
            self.ack_due = True
            self._dirty.add(self._owner)

    def ack_in_window(self, ack16: int) -> bool:
        """libutp's ack_nr sanity check: it acknowledges nothing never sent."""
        tx = self._tx
        una = tx.snd_una
        off = (ack16 - (una - 1)) & MASK16
        if off >= 0x8000:
            off -= 0x10000
        return off <= tx.snd_nxt - una

    def on_packet(self, ptype: int, ts: int, ts_diff: int, wnd: int, seq16: int, ack16: int,
                  sack: bytes | None, data: bytes, offset: int, now: float) -> None:  # fmt: skip
        """A DATA, FIN or STATE packet of a connected connection: header fields as
        on the wire (16-bit sequence numbers), the payload at ``data[offset:]``.
        The multiplexer calls it through ``UtpConnection.receive_packet``."""
        # ack_nr sanity (libutp): never accept an ACK of something not yet sent
        # (ack_in_window written out: this runs for every packet)
        tx = self._tx
        una = tx.snd_una
        off = (ack16 - (una - 1)) & MASK16
        if off >= 0x8000:
            off -= 0x10000
        if off > tx.snd_nxt - una:
            self._stats.invalid_ack += 1
            return
        self.reply_micro = (_trunc(now * 1e6) - ts) & MASK32 if ts else 0
        if off > 0 or sack is not None or ptype == ST_STATE:
            self.peer_window = wnd
            if tx.on_ack(ptype, una - 1 + off, off, sack, wnd, ts_diff, now) and (self._discarding or self.eof_reached):
                self._end(now)  # our FIN acknowledged, and close() or the peer's FIN
                if not self._open:
                    return
        elif off == 0:
            # the common DATA packet of a one-way flow: nothing new acked
            self.peer_window = wnd
            if wnd < self._mss:
                tx.peer_window_full()
            elif tx.sendbuf or tx.resend:
                self._dirty.add(self._owner)
        if ptype >= ST_STATE:
            return
        # The data: the receive rules, all here (inline: a call less per packet).
        rcv_nxt = self.rcv_nxt
        size = len(data) - offset
        # The common packet first, a specialisation of the in-order case below
        # (off == 0): the next DATA in order, nothing waiting out of order or
        # after a FIN, and room (one packet beyond the buffer is taken: the
        # zero-window probe).
        if (
            ptype == ST_DATA
            and seq16 == rcv_nxt & MASK16
            and not self.reorder
            and self.eof_seq is None
            and not self._discarding
        ):
            rbuf = self._rbuf
            if len(rbuf) + size <= self._buffer_size + self._mss:
                if size:
                    rbuf += data[offset:]
                    self.bytes_received += size
                self.rcv_nxt = rcv_nxt + 1
                unacked = self._unacked + 1
                self._unacked = unacked
                if unacked >= 2:
                    if not self.ack_due:
                        self.ack_due = True
                        self._dirty.add(self._owner)
                elif self.ack_deadline is None:
                    self.ack_deadline = now + self._delayed_ack
                if rbuf and not self._readable_signalled:
                    self._readable_signalled = True
                    self._events.append(self._readable_event)
                return
        off = (seq16 - rcv_nxt) & MASK16
        if off >= 0x8000:  # already delivered: our ACK was lost
            self.ack_due = True
            self._dirty.add(self._owner)
            return
        seq = rcv_nxt + off
        eof_seq = self.eof_seq
        if eof_seq is not None and seq > eof_seq:
            return
        if self._discarding:
            # closing: accept and acknowledge, but keep nothing
            if ptype == ST_FIN and eof_seq is None:
                self._set_eof(seq)
            if off == 0:
                self.rcv_nxt = seq + 1
                self._deliver_reorder()
            elif off < self._reorder_limit and seq not in self.reorder:
                self.reorder[seq] = (ptype, b"")
            self.ack_due = True
            self._dirty.add(self._owner)
            return
        if off == 0:
            used = len(self._rbuf) + self.reorder_bytes
            if size and used + size > self._buffer_size + self._mss:
                self._stats.dropped_packets += 1
                self.ack_due = True
                self._dirty.add(self._owner)
                return
            if ptype == ST_FIN and eof_seq is None:
                self._set_eof(seq)
            if size:
                self._rbuf += memoryview(data)[offset:]
                self.bytes_received += size
            self.rcv_nxt = seq + 1
            if self.reorder:
                self._deliver_reorder()
                self.ack_due = True
            self._unacked += 1
            if self._unacked >= 2:
                self.ack_due = True
            elif self.ack_deadline is None:
                self.ack_deadline = now + self._delayed_ack
        else:
            self.ack_due = True  # out of order: SACK at once
            if off >= self._reorder_limit or seq in self.reorder:
                self._dirty.add(self._owner)
                return
            if size > self.free_window():
                self._stats.dropped_packets += 1
                self._dirty.add(self._owner)
                return
            if ptype == ST_FIN and eof_seq is None:
                self._set_eof(seq)
            self.reorder[seq] = (ptype, bytes(data[offset:]))
            self.reorder_bytes += size
        if self.ack_due:
            self._dirty.add(self._owner)
        if self._rbuf and not self._readable_signalled:
            self._readable_signalled = True
            self._events.append(self._readable_event)
        if self.eof_seq is not None and not self.eof_reached and self.rcv_nxt > self.eof_seq:
            self.eof_reached = True
            self.ack_due = True
            self._dirty.add(self._owner)
            self._events.append(self._eof_event)
            if tx.fin_acked and not tx.outstanding:
                self._end(now)  # the peer's FIN reached, and ours was acknowledged

    def on_data_after_close(self, seq16: int) -> bool:
        """DATA or FIN after the connection closed: True (and an ACK is due) for a
        retransmission of what we had, False for new data nobody will read."""
        off = (seq16 - self.rcv_nxt) & MASK16
        if off >= 0x8000 or self.eof_reached:
            # a retransmission of something we had (our last ACK was lost): re-ACK
            self.ack_due = True
            return True
        return False

    def _set_eof(self, seq: int) -> None:
        """The peer's FIN has ``seq``: nothing after it will ever be delivered."""
        self.eof_seq = seq
        reorder = self.reorder
        for later in [s for s in reorder if s > seq]:
            self.reorder_bytes -= len(reorder.pop(later)[1])

    def _deliver_reorder(self) -> None:
        reorder = self.reorder
        rcv_nxt = self.rcv_nxt
        discard = self._discarding
        while rcv_nxt in reorder:
            ptype, payload = reorder.pop(rcv_nxt)
            self.reorder_bytes -= len(payload)
            if payload and not discard:
                self._rbuf += payload
                self.bytes_received += len(payload)
            rcv_nxt += 1
        self.rcv_nxt = rcv_nxt
