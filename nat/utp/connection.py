"""One uTP connection: a sans-IO state machine driven by its UtpMultiplexer.

States: SYN_SENT -> CONNECTED (initiator), SYN_RECV -> CONNECTED (acceptor),
then CLOSED (clean close, timeout) or RESET (reset sent or received). FIN in each
direction is a flag, not a state: ``send_eof`` half-closes, reading continues.

Sequence numbers are kept internally as unbounded integers and converted to 16
bits only on the wire, so wrap-around is handled in exactly two places
(``_unwrap_ack`` and the receive-side offset).

libutp behaviours we follow (where BEP 29 says otherwise, or says nothing):

- The SYN carries a random seq_nr (BEP 29: 1) and ack_nr 0.
- The acceptor's SYN-ACK is a STATE whose seq_nr is a random ISN *not consumed*:
  its first DATA reuses it. The initiator sets ack_nr = STATE.seq_nr - 1. A
  re-sent SYN-ACK keeps the original seq_nr.
- A libutp initiator in SYN_SENT sets ack_nr from *any* packet but only a STATE
  completes the handshake; DATA it gets before that is dropped unacknowledged.
- Only ST_STATE packets count as duplicate ACKs; 3 of them, or 3 packets
  selectively acknowledged past a hole, trigger a fast retransmit.
- Selective ACK: 4-byte bitmask from ack_nr + 2, least-significant bit first.
- Keep-alive is a duplicate ACK (ack_nr - 1) every 29 s of silence.
- wnd_size is the free space of the receive buffer, in bytes.
- A packet whose ack_nr acknowledges something never sent is dropped (libutp's
  anti-spoofing check). libutp also drops packets whose ack_nr is older than
  the window by more than 3; we only ignore such a stale ack_nr and still take
  the payload, so reordered data is not thrown away.

Where we do better than libutp (documented deviations):

- Server speaks first: our acceptor may send DATA while in SYN_RECV (libutp's
  ``utp_write`` refuses until the initiator's first DATA). This is safe with a
  libutp initiator: DATA it receives before the SYN-ACK is dropped and resent
  after our retransmission timer, and every STATE we send in SYN_RECV carries
  the ISN, so whichever STATE completes its handshake sets the right ack_nr. On
  a retransmission timeout in SYN_RECV we re-send the SYN-ACK too. Our own
  initiator, on DATA in SYN_SENT, re-sends its SYN at once, which makes our
  acceptor re-send the SYN-ACK (so a lost SYN-ACK costs one RTT, not an RTO).
- A duplicate SYN is answered again with the same SYN-ACK (libutp drops it, so
  its initiators cannot recover a lost SYN-ACK).
- The acceptor becomes CONNECTED on any valid packet from the initiator (a
  STATE acking our early data, a keep-alive), not only on DATA.
- Half-open (SYN_RECV) connections are reaped after ``syn_recv_timeout``.
- Zero window: the receiver accepts one in-order packet beyond its buffer (a
  probe), so probes are acknowledged and a slow reader never kills the
  connection; the sender probes after 1 s, doubling to 15 s (libutp: 15 s).
- A RESET in SYN_SENT is reported as UtpConnectionRefused (libutp overwrites
  its state first and always reports ECONNRESET). A RESET that arrives when
  every byte both ways was delivered and only our FIN is unacknowledged (a
  libutp peer that closed and forgot us) is a clean close, not an error.
- After a clean close the connection id lingers (``linger_time``, extended by
  every retransmitted FIN) to re-ACK the peer's FIN; new data then gets RESET.
- Our selective ACKs cover the whole reorder buffer, up to 2016 packets (a
  multiple of 4 bytes up to the extension's 252-byte limit; libutp reads any
  length and sends 4): a SACK shorter than the window leaves everything past it
  counted as in flight behind each hole. A SACK rides on DATA only if the
  datagram stays within ``mtu_payload + 20`` bytes, else it goes in a STATE.
- A retransmission timeout marks lost only the oldest packet and those older
  than one RTO; libutp resends the whole window. The oldest missing packet is
  resent even past a full window (it alone can reopen it), and losses are also
  found by send time (RACK, RFC 8985). The loss-tolerant controllers
  (``congestion="tolerant"`` and ``"rate"``, congestion.py) are our additions.
- BEP 29's 500 ms RTO floor instead of libutp's 1000 ms.
"""

from __future__ import annotations

from math import trunc as _trunc  # int(float), about 60 ns cheaper per call
from typing import TYPE_CHECKING

from nat.errors import NatError, UtpClosed, UtpConnectionRefused, UtpConnectionReset, UtpTimeout
from nat.utp.congestion import DelayHistory, make_controller
from nat.utp.config import UtpConfig
from nat.utp.events import ConnectionClosed, Connected, DataAvailable
from nat.utp.packet import HEADER, ST_DATA, ST_FIN, ST_STATE
from nat.utp.receiving import ReceiveSide
from nat.utp.rtt import RttEstimator
from nat.utp.sending import SendSide
from nat.utp.states import (
    CLOSED as _CLOSED,
    CONNECTED as _CONNECTED,
    MASK16 as _MASK16,
    MASK32 as _MASK32,
    MAX_PROBE_INTERVAL as _MAX_PROBE_INTERVAL,
    RESET as _RESET,
    SYN_RECV as _SYN_RECV,
    SYN_SENT as _SYN_SENT,
    VERSION as _VERSION,
    CONNECTION_SLOTS,
    OutgoingPacket as _Outgoing,
    UtpState,
)

if TYPE_CHECKING:
    from nat.utp.multiplexer import UtpMultiplexer


class UtpConnection(SendSide, ReceiveSide):
    """A uTP connection. Created only by :class:`UtpMultiplexer`."""

    __slots__ = CONNECTION_SLOTS

    def __init__(
        self,
        mux: UtpMultiplexer,
        remote_address: tuple,
        recv_id: int,
        send_id: int,
        isn: int,
        state: UtpState,
        config: UtpConfig,
        now: float,
    ) -> None:
        self._mux = mux
        self.remote_address = remote_address
        self.recv_id = recv_id
        self.send_id = send_id
        self.state = state
        self._config = config
        # libutp's UDP payload ceilings: 1402 bytes over IPv4, 1232 over IPv6
        ipv6 = ":" in str(remote_address[0])
        self._mss = config.mtu_payload_ipv6 if ipv6 else config.mtu_payload
        self._recv_buffer_size = config.recv_buffer_size
        self._send_buffer_size = config.send_buffer_size
        self._created = now
        self.error: NatError | None = None

        # send side (sequence numbers unbounded; 16-bit on the wire)
        self._isn = isn
        self._snd_nxt = isn
        self._snd_una = isn
        self._outstanding: dict[int, _Outgoing] = {}
        self._outstanding_bytes = 0
        self._flight = 0
        self._resend: list[int] = []
        self._sendbuf = bytearray()
        self._peer_wnd = config.recv_buffer_size
        self._dup_acks = 0
        self._recovery_seq = isn
        self._latest_delivered_order = 0
        # the last SACK applied: its base sequence number and bits (-1: none yet)
        self._sack_seen_base = -1
        self._sack_seen_bits = 0
        # send time of the latest-sent packet known delivered, and the value the
        # loss scan last ran for
        self._rack_sent_at = 0.0
        self._rack_checked = 0.0
        self._xmit_count = 0
        self._send_blocked = False
        self._eof_requested = False
        self._fin_sent = False
        self._fin_acked = False
        self._close_requested = False
        self._close_deadline: float | None = None
        self._rto_deadline: float | None = None
        self._consecutive_timeouts = 0
        self._probe_deadline: float | None = None
        self._probe_interval = config.zero_window_probe
        self._probe_ok = False
        self._rto_force = False
        self._sack_skipped = False
        self._last_send = now
        self._syn_last_sent = -1.0
        self._syn_fast_resends = 0
        self._synack_due = False
        self._reset_due = False
        self._linger_until: float | None = None
        self._rtt = RttEstimator(config.initial_rto, config.min_rto, config.max_rto)
        self._cc = make_controller(config.congestion, self._mss, int(config.target_delay * 1e6))
        self._delay = DelayHistory()

        # receive side
        self._rcv_nxt = 0  # next expected seq (set at handshake)
        self._syn_seq = -1
        self._rbuf = bytearray()
        self._reorder: dict[int, tuple[int, bytes]] = {}
        self._reorder_bytes = 0
        self._eof_seq: int | None = None
        self._eof_reached = False
        self._readable_signalled = False
        # events are immutable: one DataAvailable serves every edge
        self._readable_event = DataAvailable(self)
        # config values read per packet
        self._delayed_ack = config.delayed_ack
        self._zero_window_probe = config.zero_window_probe
        self._max_packets = config.max_packets_in_flight
        self._keepalive_interval = config.keepalive_interval
        self._ack_due = False
        self._ack_deadline: float | None = None
        self._unacked = 0
        self._reply_micro = 0
        self._last_adv_wnd = config.recv_buffer_size
        self._last_recv = now

        self.bytes_sent = 0
        self.bytes_received = 0
        self.retransmits = 0

    # ------------------------------------------------------------------ API

    def __repr__(self) -> str:
        return (
            f"<UtpConnection {self.state.value} {self.remote_address!r} recv_id={self.recv_id}"
            f" send_id={self.send_id}>"
        )

    @property
    def rtt(self) -> float:
        """Smoothed round-trip time in seconds (0.0 before the first sample)."""
        return self._rtt.srtt

    @property
    def rto(self) -> float:
        return self._rtt.rto

    @property
    def cwnd(self) -> int:
        return self._cc.cwnd

    @property
    def at_eof(self) -> bool:
        """The peer's FIN arrived and every byte before it has been read."""
        return self._eof_reached and not self._rbuf

    @property
    def eof_sent(self) -> bool:
        return self._eof_requested

    @property
    def fin_acked(self) -> bool:
        return self._fin_acked

    @property
    def is_closed(self) -> bool:
        return self.state is _CLOSED or self.state is _RESET

    @property
    def send_buffer_free(self) -> int:
        free = self._send_buffer_size - len(self._sendbuf) - self._outstanding_bytes
        return free if free > 0 else 0

    @property
    def readable_bytes(self) -> int:
        return len(self._rbuf)

    @property
    def all_data_acked(self) -> bool:
        """Everything written (and the FIN, if sent) has been acknowledged."""
        return not self._sendbuf and not self._outstanding

    def send(self, data: bytes | bytearray | memoryview) -> int:
        """Queue up to the free send-buffer space; return the bytes taken."""
        state = self.state
        if state is _CLOSED or state is _RESET:
            raise UtpClosed("connection is closed")
        if self._eof_requested:
            raise UtpClosed("send after send_eof")
        free = self._send_buffer_size - len(self._sendbuf) - self._outstanding_bytes
        size = len(data)
        if size > free:
            self._send_blocked = True
            if free <= 0:
                return 0
            size = free
            data = memoryview(data)[:size]
        if size:
            self._sendbuf += data
            self._mux._dirty.add(self)
        return size

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
        if not self._ack_due:
            size = self._recv_buffer_size
            free = size - len(rbuf) - self._reorder_bytes
            last = self._last_adv_wnd
            # (neither rule can fire unless the window grew since the peer heard)
            if free > last:
                state = self.state
                if state is _CLOSED or state is _RESET:
                    return data
                two = 2 * self._mss
                if (last < two <= free) or free - last >= (size >> 2):
                    self._ack_due = True
                    self._mux._dirty.add(self)
        return data

    def send_eof(self) -> None:
        """Send FIN after all queued data; reading continues (half-close)."""
        if self.state is _CLOSED or self.state is _RESET:
            return
        if not self._eof_requested:
            self._eof_requested = True
            self._mux._dirty.add(self)

    def close(self) -> None:
        """Graceful close: FIN after queued data, done when it is acknowledged.

        Bounded by ``close_timeout``; unread and later data is discarded.
        """
        if self.state is _CLOSED or self.state is _RESET:
            return
        self._close_requested = True
        self._rbuf.clear()
        self._reorder.clear()
        self._reorder_bytes = 0
        self.send_eof()
        self._mux._dirty.add(self)

    def abort(self) -> None:
        """Send RESET now and drop the connection (buffered input stays readable)."""
        if self.state is _CLOSED or self.state is _RESET:
            return
        self._reset_due = True
        self._die(None, _RESET)

    # ------------------------------------------------------------ internals

    def _free_window(self) -> int:
        free = self._recv_buffer_size - len(self._rbuf) - self._reorder_bytes
        return free if free > 0 else 0

    def _emit(self, event: object) -> None:
        self._mux._events.append(event)

    def _die(self, error: NatError | None, state: UtpState = _CLOSED) -> None:
        """Enter a final state and tell the driver (once)."""
        if self.state is _CLOSED or self.state is _RESET:
            return
        if self.state is _SYN_RECV:
            self._mux._half_open -= 1
        self.state = state
        self.error = error
        self._sendbuf.clear()
        self._outstanding.clear()
        self._outstanding_bytes = 0
        self._flight = 0
        self._resend.clear()
        self._reorder.clear()
        self._reorder_bytes = 0
        self._rto_deadline = None
        self._ack_deadline = None
        self._probe_deadline = None
        self._close_deadline = None
        self._ack_due = False
        self._synack_due = False
        self._emit(ConnectionClosed(self, error))
        if state is _RESET or error is not None:
            self._linger_until = None
            self._mux._retire(self)
        self._mux._dirty.add(self)

    def _become_connected(self) -> None:
        if self.state is _SYN_RECV:
            self._mux._half_open -= 1
        self.state = _CONNECTED
        self._emit(Connected(self))

    # ---- outgoing

    # ---- timers

    def next_deadline(self) -> float | None:
        """This connection's earliest timer (None: nothing scheduled)."""
        state = self.state
        if state is _CLOSED or state is _RESET:
            return self._linger_until
        # (the driver asks after every batch: unrolled, no tuple)
        deadline = self._rto_deadline
        other = self._ack_deadline
        if other is not None and (deadline is None or other < deadline):
            deadline = other
        other = self._probe_deadline
        if other is not None and (deadline is None or other < deadline):
            deadline = other
        other = self._close_deadline
        if other is not None and (deadline is None or other < deadline):
            deadline = other
        if state is _CONNECTED:
            if not self._outstanding:
                keepalive = self._last_send + self._keepalive_interval
                if deadline is None or keepalive < deadline:
                    deadline = keepalive
        elif state is _SYN_RECV:
            reap = self._created + self._config.syn_recv_timeout
            if deadline is None or reap < deadline:
                deadline = reap
        return deadline

    def _on_timer(self, now: float) -> None:
        state = self.state
        mux = self._mux
        if state is _CLOSED or state is _RESET:
            if self._linger_until is not None and now >= self._linger_until:
                self._linger_until = None
                mux._retire(self)
            return
        if self._close_deadline is not None and now >= self._close_deadline:
            self._reset_due = True
            self._die(UtpTimeout("close: FIN not acknowledged in time"), _RESET)
            return
        if state is _SYN_RECV and now >= self._created + self._config.syn_recv_timeout:
            mux.stats.reaped_half_open += 1
            self._die(UtpTimeout("incoming connection never completed"))
            return
        if self._ack_deadline is not None and now >= self._ack_deadline:
            self._ack_deadline = None
            self._ack_due = True
            mux._dirty.add(self)
        if self._probe_deadline is not None and now >= self._probe_deadline:
            self._probe_deadline = None
            self._probe_ok = True
            interval = self._probe_interval * 2
            self._probe_interval = interval if interval < _MAX_PROBE_INTERVAL else _MAX_PROBE_INTERVAL
            mux._dirty.add(self)
        if self._rto_deadline is not None and now >= self._rto_deadline:
            self._on_rto(now)
            if self.is_closed:
                return
        if (
            self.state is _CONNECTED
            and now >= self._last_send + self._config.keepalive_interval
            and not self._outstanding
        ):
            # libutp's keep-alive: a duplicate ACK (ack_nr - 1).
            now_us = int(now * 1_000_000) & _MASK32
            header = HEADER.pack(
                (ST_STATE << 4) | _VERSION,
                0,
                self.send_id,
                now_us,
                self._reply_micro,
                self._free_window(),
                self._snd_nxt & _MASK16,
                (self._rcv_nxt - 2) & _MASK16,
            )
            mux._pending.append((header, self.remote_address))
            self._last_send = now

    # ---- incoming

    def _on_packet(
        self,
        ptype: int,
        ts: int,
        ts_diff: int,
        wnd: int,
        seq16: int,
        ack16: int,
        sack: bytes | None,
        data: bytes,
        offset: int,
        now: float,
    ) -> None:
        state = self.state
        self._last_recv = now
        if state is not _CONNECTED:
            if state is _SYN_SENT:
                self._on_packet_syn_sent(ptype, ts, ts_diff, wnd, seq16, ack16, now, int(now * 1_000_000) & _MASK32)
                return
            if state is _CLOSED or state is _RESET:
                self._on_packet_closed(ptype, seq16, now)
                return
        # ack_nr sanity (libutp): never accept an ACK of something not yet sent
        una = self._snd_una
        off = (ack16 - (una - 1)) & _MASK16
        if off >= 0x8000:
            off -= 0x10000
        if off > self._snd_nxt - una:
            self._mux.stats.invalid_ack += 1
            return
        self._reply_micro = (_trunc(now * 1e6) - ts) & _MASK32 if ts else 0
        if state is _SYN_RECV:
            self._become_connected()
        if off > 0 or sack is not None or ptype == ST_STATE:
            self._on_ack(ptype, una - 1 + off, off, sack, wnd, ts_diff, now)
            if self.state is not _CONNECTED:
                return
        elif off == 0:
            # the common DATA packet of a one-way flow: nothing new acked
            self._peer_wnd = wnd
            if wnd < self._mss:
                self._consecutive_timeouts = 0
            elif self._sendbuf or self._resend:
                self._mux._dirty.add(self)
        if ptype == ST_DATA:
            # The next packet in order, nothing buffered out of order: taken
            # here (a call less per packet); everything else is _on_data's.
            rcv_nxt = self._rcv_nxt
            if seq16 == rcv_nxt & _MASK16 and not self._reorder and self._eof_seq is None:
                rbuf = self._rbuf
                size = len(data) - offset
                if len(rbuf) + size <= self._recv_buffer_size + self._mss and not self._close_requested:
                    if size:
                        rbuf += data[offset:]
                        self.bytes_received += size
                    self._rcv_nxt = rcv_nxt + 1
                    unacked = self._unacked + 1
                    self._unacked = unacked
                    if unacked >= 2:
                        if not self._ack_due:
                            self._ack_due = True
                            self._mux._dirty.add(self)
                    elif self._ack_deadline is None:
                        self._ack_deadline = now + self._delayed_ack
                    if rbuf and not self._readable_signalled:
                        self._readable_signalled = True
                        self._mux._events.append(self._readable_event)
                    return
            self._on_data(ptype, seq16, data, offset, now)
        elif ptype == ST_FIN:
            self._on_data(ptype, seq16, data, offset, now)

    def _on_packet_syn_sent(
        self, ptype: int, ts: int, ts_diff: int, wnd: int, seq16: int, ack16: int, now: float, now_us: int
    ) -> None:
        if ack16 != (self._isn & _MASK16):
            self._mux.stats.invalid_ack += 1
            return
        if ptype != ST_STATE:
            # The acceptor spoke before its SYN-ACK reached us: ask for it again.
            if ptype in (ST_DATA, ST_FIN) and self._syn_fast_resends < 3:
                rec = self._outstanding.get(self._isn)
                if rec is not None and rec.in_flight:
                    self._syn_fast_resends += 1
                    rec.in_flight = False
                    self._mux._dirty.add(self)
            return
        self._reply_micro = (now_us - ts) & _MASK32 if ts else 0
        rec = self._outstanding.pop(self._isn, None)
        if rec is not None and rec.transmissions == 1:
            self._rtt.sample(now - rec.sent_at)
        self._snd_una = self._snd_nxt
        self._recovery_seq = self._snd_nxt
        self._rto_deadline = None
        self._consecutive_timeouts = 0
        if self._rtt.has_sample is False:
            # No clean sample (SYN was retransmitted): restart from the initial RTO.
            self._rtt.rto = self._config.initial_rto
        self._rcv_nxt = seq16  # ack_nr = STATE.seq_nr - 1
        self._peer_wnd = wnd
        self._become_connected()
        self._mux._dirty.add(self)

    def _on_packet_closed(self, ptype: int, seq16: int, now: float) -> None:
        if ptype != ST_DATA and ptype != ST_FIN:
            return
        if self._linger_until is not None:
            self._linger_until = now + self._config.linger_time
        off = (seq16 - self._rcv_nxt) & _MASK16
        if off >= 0x8000 or self._eof_reached:
            # a retransmission of something we had (our last ACK was lost): re-ACK
            self._ack_due = True
        else:
            # new data after our close(): nobody will read it
            self._reset_due = True
        self._mux._dirty.add(self)

    def _on_duplicate_syn(self, now: float) -> None:
        if self.state is _SYN_RECV:
            self._synack_due = True
            # The initiator never got our SYN-ACK, so it dropped any DATA we
            # sent: send it again right after the SYN-ACK (no RTO wait).
            for rec in self._outstanding.values():
                if rec.in_flight:
                    self._mark_lost(rec)
        else:
            self._ack_due = True
        self._mux._dirty.add(self)

    def _on_reset(self) -> None:
        if self._eof_reached and self._fin_sent and not self._sendbuf:
            if all(rec.ptype == ST_FIN for rec in self._outstanding.values()):
                # Every byte both ways was delivered; only the ACK of our FIN is
                # missing (a peer that closed and forgot us, as libutp does).
                self._die(None, _CLOSED)
                self._mux._retire(self)
                return
        if self.state is _SYN_SENT:
            self._die(UtpConnectionRefused("connection refused (RESET)"), _RESET)
        else:
            self._die(UtpConnectionReset("connection reset by peer"), _RESET)

    def _finish(self) -> None:
        """Clean end: our FIN acknowledged and (peer FIN received or close())."""
        if self.is_closed:
            return
        self._die(None, _CLOSED)
        self._ack_due = True  # the ACK of the peer's FIN
        self._linger_until = self._last_recv + self._config.linger_time
