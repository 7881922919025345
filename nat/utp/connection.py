"""One uTP connection: a sans-IO state machine driven by its UtpMultiplexer.

States: SYN_SENT -> CONNECTED (initiator), SYN_RECV -> CONNECTED (acceptor),
then CLOSED (clean close, timeout) or RESET (reset sent or received). FIN in each
direction is a flag, not a state: ``send_eof`` half-closes, reading continues.

The connection is the state machine (handshake, closing, RESET, keep-alive, the
timers) and owns its two halves: a :class:`~nat.utp.sending.Sender` (send buffer,
packets in flight, retransmission, congestion control; it packs every header)
and a :class:`~nat.utp.receiving.Receiver` (receive and reorder buffers, the
FIN, the ACKs we owe). What it hands its multiplexer goes through the
multiplexer's :class:`~nat.utp.outbox.Outbox`.

Sequence numbers are kept internally as unbounded integers and converted to 16
bits only on the wire, so wrap-around is handled in exactly two places (the
ACK offset in ``Sender.on_packet`` and the receive-side offset).

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
- A RESET is applied only if it echoes one of our sequence numbers in play (or
  carries the seq_nr we expect next): libutp takes any RESET with either id, so
  the RESET drawn by a late packet of an ended connection killed the next one
  between the same addresses when its ids touched the old ones (issue item 16).
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
from typing import Protocol

from nat.errors import NatError, UtpConnectionRefused, UtpConnectionReset, UtpTimeout
from nat.utp.config import UtpConfig
from nat.utp.congestion import CongestionController
from nat.utp.events import Connected, ConnectionClosed, DataAvailable, EofReceived, SendSpaceAvailable, UtpEventOf
from nat.utp.migration import change_path, end_hold
from nat.utp.outbox import Outbox
from nat.utp.packet import ST_DATA, ST_FIN, ST_STATE
from nat.utp.paths import Path, is_ipv6_path
from nat.utp.receiving import Receiver
from nat.utp.sending import Sender
from nat.utp.states import CLOSED, CONNECTED, MASK16, MASK32, RESET, SYN_RECV, SYN_SENT, Address, Datagram, UtpState

__all__ = ["UtpConnection", "UtpState", "UtpEvent"]


class _PacketHandler(Protocol):
    def __call__(self, ptype: int, ts: int, ts_diff: int, wnd: int, seq16: int, ack16: int,
                 sack: bytes | None, data: bytes, offset: int, now: float, /) -> None: ...  # fmt: skip


class UtpConnection:
    """A uTP connection. Made by :class:`UtpMultiplexer` with ``outgoing`` or
    ``incoming``; the methods under "multiplexer side" are its interface."""

    receive_packet: _PacketHandler
    """Multiplexer side: a DATA, FIN or STATE packet for this connection (header
    fields as on the wire, the payload at ``data[offset:]``). The handler of the
    current state, bound in a slot: once connected the receiver's ``on_packet``
    itself (a dispatching method cost 1-2% of the bulk loop of bench/utp_core.py)."""

    __slots__ = (
        "remote_address", "recv_id", "send_id", "state", "error", "receive_packet", "path_moves",
        "_rx", "_tx", "_outbox", "_dirty", "_events", "_stats", "_config", "_created", "_keepalive_interval",
        "_close_requested", "_close_deadline", "_reset_due", "_linger_until",
    )

    def __init__(
        self,
        outbox: Outbox[UtpConnection],
        remote_address: Address,
        recv_id: int,
        send_id: int,
        isn: int,
        state: UtpState,
        config: UtpConfig,
        now: float,
    ) -> None:
        self.remote_address = remote_address
        self.recv_id = recv_id
        self.send_id = send_id
        self.state = state
        self.error: NatError | None = None
        self.path_moves = 0  # times the multiplexer moved it to another path
        # libutp's UDP payload ceilings: 1402 bytes over IPv4, 1232 over IPv6
        # (fixed for the connection's life, whatever path it moves to: paths.py)
        mss = config.mtu_payload_ipv6 if is_ipv6_path(remote_address) else config.mtu_payload
        self._outbox = outbox
        self._dirty, self._events, self._stats = outbox.dirty, outbox.events, outbox.stats
        self._config = config
        self._created = now
        self._keepalive_interval = config.keepalive_interval
        self._close_requested = False
        self._close_deadline: float | None = None
        self._reset_due = False
        self._linger_until: float | None = None
        self._rx: Receiver[UtpConnection]
        self._tx: Sender[UtpConnection]
        self._rx = rx = Receiver(self, outbox, DataAvailable(self), EofReceived(self), config, mss, self._finish)
        self._tx = tx = Sender(
            self, outbox, SendSpaceAvailable(self), rx, remote_address, send_id, recv_id, isn, config, mss, now
        )
        rx.attach(tx)
        self.receive_packet = self._receive_unconnected

    @classmethod
    def outgoing(
        cls, outbox: Outbox[UtpConnection], remote_address: Address, recv_id: int, isn: int, config: UtpConfig, now: float
    ) -> UtpConnection:
        """An initiator: its SYN (which consumes ``isn``) leaves at the next flush."""
        conn = cls(outbox, remote_address, recv_id, (recv_id + 1) & MASK16, isn, SYN_SENT, config, now)
        conn._tx.start_syn()
        outbox.dirty.add(conn)
        return conn

    @classmethod
    def incoming(
        cls,
        outbox: Outbox[UtpConnection],
        remote_address: Address,
        recv_id: int,
        isn: int,
        syn_seq: int,
        wnd: int,
        ts: int,
        config: UtpConfig,
        now: float,
    ) -> UtpConnection:
        """An acceptor of a SYN (seq_nr ``syn_seq``, wnd_size ``wnd``, timestamp
        ``ts``) that carried ``recv_id - 1``: half-open, its SYN-ACK due."""
        conn = cls(outbox, remote_address, recv_id, (recv_id - 1) & MASK16, isn, SYN_RECV, config, now)
        conn._rx.start_incoming(syn_seq, wnd, ts, now)
        conn._tx.start_incoming()
        outbox.enter_half_open()
        outbox.dirty.add(conn)
        return conn

    # ------------------------------------------------------------------ API

    def __repr__(self) -> str:
        return (
            f"<UtpConnection {self.state.value} {self.remote_address!r} recv_id={self.recv_id}"
            f" send_id={self.send_id}>"
        )

    @property
    def rtt(self) -> float:
        """Smoothed round-trip time in seconds (0.0 before the first sample)."""
        return self._tx.rtt.srtt

    @property
    def rto(self) -> float:
        return self._tx.rtt.rto

    @property
    def cwnd(self) -> int:
        return self._tx.cc.cwnd

    @property
    def at_eof(self) -> bool:
        """The peer's FIN arrived and every byte before it has been read."""
        return self._rx.at_eof

    @property
    def eof_sent(self) -> bool:
        return self._tx.eof_requested

    @property
    def fin_acked(self) -> bool:
        return self._tx.fin_acked

    @property
    def is_closed(self) -> bool:
        return self.state is CLOSED or self.state is RESET

    @property
    def send_buffer_free(self) -> int:
        return self._tx.send_buffer_free

    @property
    def readable_bytes(self) -> int:
        return self._rx.buffered

    @property
    def all_data_acked(self) -> bool:
        """Everything written (and the FIN, if sent) has been acknowledged."""
        tx = self._tx
        return not tx.sendbuf and not tx.outstanding

    @property
    def bytes_sent(self) -> int:
        """Payload bytes sent (each byte once, retransmissions not counted)."""
        return self._tx.bytes_sent

    @property
    def bytes_received(self) -> int:
        """Payload bytes received in order (each byte once)."""
        return self._rx.bytes_received

    @property
    def retransmits(self) -> int:
        return self._tx.retransmits

    def send(self, data: bytes | bytearray | memoryview) -> int:
        """Queue up to the free send-buffer space; return the bytes taken
        (UtpClosed once closed or after send_eof)."""
        return self._tx.send(data)

    def read(self, max_bytes: int = 1 << 30) -> bytes:
        """Return up to ``max_bytes`` in-order received bytes (b"" when none)."""
        return self._rx.read(max_bytes)

    def send_eof(self) -> None:
        """Send FIN after all queued data; reading continues (half-close)."""
        if self.state is CLOSED or self.state is RESET:
            return
        self._tx.send_eof()

    def close(self) -> None:
        """Graceful close: FIN after queued data, done when it is acknowledged.

        Bounded by ``close_timeout``; unread and later data is discarded.
        """
        if self.state is CLOSED or self.state is RESET:
            return
        self._close_requested = True
        self._rx.discard()
        self.send_eof()
        self._dirty.add(self)

    def abort(self) -> None:
        """Send RESET now and drop the connection (buffered input stays readable)."""
        if self.state is CLOSED or self.state is RESET:
            return
        self._reset_due = True
        self._die(None, RESET)

    # ---- introspection (tests, diagnostics)

    @property
    def receive_buffered(self) -> int:
        """Receive memory in use: unread bytes plus bytes held out of order."""
        return self._rx.buffered + self._rx.reorder_bytes

    @property
    def reorder_count(self) -> int:
        """Packets held out of order."""
        return self._rx.reorder_count

    @property
    def send_buffered(self) -> int:
        """Send memory in use: bytes not yet sent plus bytes not yet acknowledged."""
        return len(self._tx.sendbuf) + self._tx.outstanding_bytes

    @property
    def unacked_packets(self) -> int:
        """Packets sent (or due for retransmission) and not yet acknowledged."""
        return len(self._tx.outstanding)

    @property
    def initial_seq(self) -> int:
        """Our initial sequence number (the SYN's, or the SYN-ACK's)."""
        return self._tx.isn

    @property
    def next_seq(self) -> int:
        """The sequence number of our next new packet (unbounded: no 16-bit wrap)."""
        return self._tx.snd_nxt

    @property
    def oldest_unacked_seq(self) -> int:
        """The oldest of our sequence numbers not yet acknowledged (next_seq when
        everything is; unbounded)."""
        return self._tx.snd_una

    @property
    def next_expected_seq(self) -> int:
        """The peer's next sequence number we expect (unbounded)."""
        return self._rx.rcv_nxt

    @property
    def peer_window(self) -> int:
        """The receive window the peer last advertised, in bytes."""
        return self._rx.peer_window

    @property
    def congestion(self) -> CongestionController:
        """The congestion controller (its ``cwnd`` may be set by tests)."""
        return self._tx.cc

    def transport_snapshot(self) -> dict[str, object]:
        """What ``ss -ti`` shows for a TCP socket: the window, the flight, the
        buffers, loss repair and the congestion model's state, for status views
        (a tunnel that is slow says here whether the window, the peer or the
        model holds it back)."""
        tx = self._tx
        cc = tx.cc
        snapshot: dict[str, object] = {
            "congestion": getattr(cc, "name", type(cc).__name__),
            "cwnd": cc.cwnd,
            "in_flight": tx.outstanding_bytes,
            "unacked_packets": len(tx.outstanding),
            "peer_window": self._rx.peer_window,
            "send_queued": len(tx.sendbuf),
            "receive_buffered": self.receive_buffered,
            "retransmits": tx.retransmits,
            "srtt": round(tx.rtt.srtt, 6),
            "rto": round(tx.rtt.rto, 6),
            # what the path showed of reordering (loss.Reordering): packets, seconds
            "reorder_packets": tx.reordering.threshold,
            "reorder_gap": round(tx.reordering.gap, 6),
        }
        # the model's own state, where the controller has it (rate: BBR-like; LEDBAT: slow start)
        for key in ("bandwidth", "min_rtt", "ceiling", "startup", "slow_start"):
            value = getattr(cc, key, None)
            if value is not None:
                snapshot[key] = round(value, 6) if isinstance(value, float) else value
        return snapshot

    # ---- multiplexer side

    def next_deadline(self) -> float | None:
        """This connection's earliest timer (None: nothing scheduled)."""
        state = self.state
        if state is CLOSED or state is RESET:
            return self._linger_until
        tx = self._tx
        # (the driver asks after every batch: unrolled, no tuple)
        deadline = tx.rto_deadline
        other = self._rx.ack_deadline
        if other is not None and (deadline is None or other < deadline):
            deadline = other
        other = tx.probe_deadline
        if other is not None and (deadline is None or other < deadline):
            deadline = other
        other = self._close_deadline
        if other is not None and (deadline is None or other < deadline):
            deadline = other
        other = tx.hold_deadline
        if other is not None and (deadline is None or other < deadline):
            deadline = other
        if state is CONNECTED:
            if not tx.outstanding:
                keepalive = tx.last_send + self._keepalive_interval
                if deadline is None or keepalive < deadline:
                    deadline = keepalive
        elif state is SYN_RECV:
            reap = self._created + self._config.syn_recv_timeout
            if deadline is None or reap < deadline:
                deadline = reap
        return deadline

    def run_timers(self, now: float) -> None:
        """Run every timer of this connection that is due at ``now``."""
        state = self.state
        if state is CLOSED or state is RESET:
            if self._linger_until is not None and now >= self._linger_until:
                self._linger_until = None
                self._outbox.retire(self)
            return
        if self._close_deadline is not None and now >= self._close_deadline:
            self._reset_due = True
            self._die(UtpTimeout("close: FIN not acknowledged in time"), RESET)
            return
        if state is SYN_RECV and now >= self._created + self._config.syn_recv_timeout:
            self._stats.reaped_half_open += 1
            self._die(UtpTimeout("incoming connection never completed"))
            return
        self._rx.on_ack_timer(now)
        tx = self._tx
        tx.on_probe_timer(now)
        if tx.hold_deadline is not None:
            end_hold(tx, now)
        if tx.rto_deadline is not None and now >= tx.rto_deadline:
            self._on_rto(now)
            if self.is_closed:
                return
        if self.state is CONNECTED and now >= tx.last_send + self._keepalive_interval and not tx.outstanding:
            self._outbox.datagrams.append((tx.keepalive(now), self.remote_address))

    def flush_into(self, now: float, out: list[Datagram]) -> None:
        """Append every datagram this connection wants to send now."""
        state = self.state
        now_us = _trunc(now * 1e6) & MASK32
        tx = self._tx
        if state is not CONNECTED:
            if state is CLOSED or state is RESET:
                if self._reset_due:
                    self._reset_due = False
                    out.append((tx.reset_datagram(now_us), self.remote_address))
                    self._stats.resets_sent += 1
                elif self._rx.ack_due:
                    self._rx.ack_sent()
                    out.append((tx.header(ST_STATE, tx.snd_nxt, now_us, None), self.remote_address))
                return
            if state is SYN_SENT:
                if self._close_requested and self._close_deadline is None:
                    self._close_deadline = now + self._config.close_timeout
                tx.resend_lost_syn(now, now_us, out)
                return
        if self._close_requested and self._close_deadline is None:
            self._close_deadline = now + self._config.close_timeout
        rx = self._rx
        tx.flush(now, now_us, rx.build_sack() if rx.reorder else None, state is SYN_RECV, out)

    def reset_is_ours(self, seq16: int, ack16: int) -> bool:
        """A RESET with our ids (seq_nr, ack_nr as on the wire) is about this
        connection, not an earlier one with touching ids: its ack_nr echoes one
        of our sequence numbers in play, snd_una - 1 .. snd_nxt (libutp answers
        a packet for an unknown id with its seq_nr; a connection's own RESET
        acknowledges what it received of ours), or its seq_nr is the one we
        expect next (a connection that never heard from us: an initiator
        aborting in SYN_SENT sends ack_nr 0xFFFF and seq_nr ISN + 1)."""
        tx = self._tx
        una = tx.snd_una
        if (ack16 - (una - 1)) & MASK16 <= tx.snd_nxt - una + 1:
            return True
        return seq16 == self._rx.rcv_nxt & MASK16

    def receive_reset(self) -> None:
        """A RESET for this connection (the multiplexer asked reset_is_ours)."""
        tx = self._tx
        if (
            self._rx.eof_reached
            and tx.fin_sent
            and not tx.sendbuf
            and all(rec.ptype == ST_FIN for rec in tx.outstanding.values())
        ):
            # Every byte both ways was delivered; only the ACK of our FIN is
            # missing (a peer that closed and forgot us, as libutp does).
            self._die(None, CLOSED)
            self._outbox.retire(self)
            return
        if self.state is SYN_SENT:
            self._die(UtpConnectionRefused("connection refused (RESET)"), RESET)
        else:
            self._die(UtpConnectionReset("connection reset by peer"), RESET)

    def change_path(self, path: Path, now: float) -> None:
        """The multiplexer moved this connection to ``path`` (it rekeyed it; see
        UtpMultiplexer.move_connection): everything leaves over it from now on,
        packets in flight go again, and an ACK goes at once (it tells the peer
        where we are, and what we hold)."""
        self.remote_address = path
        self.path_moves += 1
        state = self.state
        if state is CLOSED or state is RESET:
            return  # lingering: only its re-ACK of a late FIN goes the new way
        tx = self._tx
        change_path(tx, path, now)
        if state is SYN_RECV:
            tx.resend_synack()  # every STATE in SYN_RECV is the SYN-ACK
        elif state is CONNECTED:
            self._rx.request_ack()
        self._dirty.add(self)

    def receive_syn_again(self, seq: int, now: float) -> bool:
        """A SYN with our connection id: True when it repeats the one that opened
        us (answered again), False when it is another connection's."""
        if seq != self._rx.syn_seq:
            return False
        if self.state is SYN_RECV:
            self._tx.resend_synack()
        else:
            self._rx.request_ack()
        self._dirty.add(self)
        return True

    # ------------------------------------------------------------ internals

    def _die(self, error: NatError | None, state: UtpState = CLOSED) -> None:
        """Enter a final state and tell the driver (once)."""
        if self.state is CLOSED or self.state is RESET:
            return
        if self.state is SYN_RECV:
            self._outbox.leave_half_open()
        self.state = state
        self.error = error
        self.receive_packet = self._receive_unconnected
        self._tx.stop()
        self._rx.stop()
        self._close_deadline = None
        self._events.append(ConnectionClosed(self, error))
        if state is RESET or error is not None:
            self._linger_until = None
            self._outbox.retire(self)
        self._dirty.add(self)

    def _become_connected(self) -> None:
        if self.state is SYN_RECV:
            self._outbox.leave_half_open()
        self.state = CONNECTED
        # from now on the multiplexer hands packets straight to the receiver
        self.receive_packet = self._rx.on_packet
        self._events.append(Connected(self))

    def _finish(self, now: float) -> None:
        """Clean end: our FIN acknowledged and (peer FIN received or close()),
        found by the packet that arrived at ``now``."""
        if self.is_closed:
            return
        self._die(None, CLOSED)
        self._rx.request_ack()  # the ACK of the peer's FIN
        self._linger_until = now + self._config.linger_time

    def _on_rto(self, now: float) -> None:
        tx = self._tx
        timeouts = tx.expire_rto()
        if not timeouts:
            return
        state = self.state
        if state is SYN_SENT:
            if timeouts >= self._config.syn_retries:
                self._die(UtpTimeout("connect: no answer to SYN"))
                return
        elif timeouts > self._config.max_retransmits:
            self._reset_due = True
            self._die(UtpTimeout("retransmissions exhausted"), RESET)
            return
        tx.retransmit_after_timeout(now, state is SYN_SENT, state is SYN_RECV)

    def _receive_unconnected(self, ptype: int, ts: int, ts_diff: int, wnd: int, seq16: int, ack16: int,
                             sack: bytes | None, data: bytes, offset: int, now: float) -> None:  # fmt: skip
        """receive_packet before the handshake completed and after the end."""
        state = self.state
        if state is SYN_SENT:
            tx = self._tx
            if ack16 != (tx.isn & MASK16):
                self._stats.invalid_ack += 1
                return
            if ptype != ST_STATE:
                # The acceptor spoke before its SYN-ACK reached us: ask for it again.
                if ptype == ST_DATA or ptype == ST_FIN:
                    tx.resend_syn_now()
                return
            tx.on_syn_ack(now)
            self._rx.start(seq16, wnd, ts, now)  # ack_nr = STATE.seq_nr - 1
            self._become_connected()
            self._dirty.add(self)
        elif state is SYN_RECV:
            # any valid packet of the initiator completes the handshake
            rx = self._rx
            if not rx.ack_in_window(ack16):
                self._stats.invalid_ack += 1
                return
            self._become_connected()
            rx.on_packet(ptype, ts, ts_diff, wnd, seq16, ack16, sack, data, offset, now)
        elif ptype == ST_DATA or ptype == ST_FIN:  # CLOSED or RESET
            if self._linger_until is not None:
                self._linger_until = now + self._config.linger_time
            if not self._rx.on_data_after_close(seq16):
                # new data after our close(): nobody will read it
                self._reset_due = True
            self._dirty.add(self)


UtpEvent = UtpEventOf[UtpConnection]
"""What UtpMultiplexer.next_event returns (see nat/utp/events.py)."""
