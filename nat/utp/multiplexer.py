"""UtpMultiplexer: the sans-IO owner of every uTP connection on one UDP socket.

No sockets, no clock, no trio: the driver feeds datagrams and the current time
in, and takes datagrams, events and the next deadline out.

API (the contract, plus additions marked +)::

    mux = UtpMultiplexer(config: UtpConfig | None = None, rng: random.Random | None = None)

    mux.receive_datagram(data, addr, now)   # uTP datagrams only; malformed ones
                                            # are counted in mux.stats, never raised
    mux.datagrams_to_send(now) -> list[tuple[bytes, addr]]
                                            # everything ready now, all connections
    mux.get_timer() -> float | None         # earliest deadline (absolute, same clock as now)
    mux.handle_timer(now)                   # run every deadline <= now
    mux.next_event() -> event | None        # see nat/utp/events.py
    mux.connect(addr, now) -> UtpConnection # SYN goes out at the next datagrams_to_send
    mux.accepting: bool                     # False: SYNs are answered with RESET
    mux.stats: UtpStats                     # counters (malformed, resets_sent, ...)
  + mux.connections -> list[UtpConnection]  # live connections (including lingering ones)
  + mux.abort_all()                         # RESET every connection (endpoint shutdown)
  + mux.config                              # the UtpConfig in use

A driver loop is::

    for data, addr in received_batch: mux.receive_datagram(data, addr, now)
    if (t := mux.get_timer()) is not None and t <= now: mux.handle_timer(now)
    for data, addr in mux.datagrams_to_send(now): sock.sendto(data, addr)
    while (event := mux.next_event()) is not None: dispatch(event)
    sleep until mux.get_timer() or readable

UtpConnection (created only here; see connection.py)::

    conn.remote_address, conn.state (UtpState), conn.recv_id, conn.send_id
    conn.send(data) -> int      # bytes taken (0 when full: wait for SendSpaceAvailable)
    conn.read(max_bytes) -> bytes
    conn.send_eof(), conn.close(), conn.abort()
    conn.rtt, conn.bytes_sent, conn.bytes_received, conn.at_eof
  + conn.error (the NatError that ended it, or None), conn.is_closed, conn.eof_sent,
  + conn.fin_acked, conn.send_buffer_free, conn.readable_bytes, conn.all_data_acked,
  + conn.rto, conn.cwnd, conn.next_deadline() (that connection's part of get_timer)

Calling send/read/send_eof/close/abort marks the connection for the next
``datagrams_to_send``; the driver must call it after them (as after receiving).
``send`` raises UtpClosed after ``send_eof``/``close`` or once the connection
is closed; nothing else in the API raises on network input.

``IncomingConnection`` comes with the SYN (the acceptor may write at once;
spoofed SYNs are bounded by ``max_half_open`` and reaped after
``syn_recv_timeout``). Addresses are opaque hashable tuples; a host containing
":" is treated as IPv6 and gets libutp's IPv6 packet ceiling, so a dual-stack
driver should hand IPv4 peers over unmapped.

Connections are keyed by (remote address, recv_id). The initiator picks a
random recv_id with send_id = recv_id + 1; the SYN carries recv_id; the acceptor
uses recv_id = id + 1 and send_id = id (BEP 29 and libutp agree). A RESET may
carry either id of the connection, so RESETs are also matched by send_id, as
libutp does. Non-SYN packets for unknown connections get a RESET, at most one
per (address, id) per ``reset_memory`` seconds with at most ``reset_memory_cap``
remembered; beyond that they are dropped and counted.
"""

from __future__ import annotations

import random
from collections import deque

from nat.errors import MalformedPacket
from nat.utp.config import UtpConfig, UtpStats
from nat.utp.connection import UtpConnection, UtpState
from nat.utp.states import OutgoingPacket
from nat.utp.events import IncomingConnection
from nat.utp.packet import HEADER, ST_RESET, ST_SYN, parse_datagram

__all__ = ["UtpMultiplexer", "UtpConfig", "UtpStats", "UtpConnection", "UtpState"]

_MASK16 = 0xFFFF
_MASK32 = 0xFFFFFFFF
_unpack_header = HEADER.unpack_from


class UtpMultiplexer:
    """All uTP connections of one UDP socket, sans-IO."""

    def __init__(self, config: UtpConfig | None = None, rng: random.Random | None = None) -> None:
        self.config = config if config is not None else UtpConfig()
        self._rng = rng if rng is not None else random.Random()
        self.accepting = True
        self.stats = UtpStats()
        self._conns: dict[tuple[tuple, int], UtpConnection] = {}
        self._dirty: set[UtpConnection] = set()
        self._events: deque = deque()
        self._pending: list[tuple[bytes, tuple]] = []
        self._half_open = 0
        self._reset_memory: dict[tuple[tuple, int], float] = {}
        self._next_reset_expiry = 0.0

    # ------------------------------------------------------------ public

    @property
    def connections(self) -> list[UtpConnection]:
        return list(self._conns.values())

    def connect(self, addr: tuple, now: float) -> UtpConnection:
        """Open an outgoing connection; its SYN leaves at the next datagrams_to_send."""
        conns = self._conns
        rng = self._rng
        for _ in range(64):
            recv_id = rng.randrange(0x10000)
            if (addr, recv_id) not in conns:
                break
        else:
            raise RuntimeError("no free connection id for this address")
        isn = rng.randrange(0x10000)
        conn = UtpConnection(
            self, addr, recv_id, (recv_id + 1) & _MASK16, isn, UtpState.SYN_SENT, self.config, now
        )
        # the SYN consumes the ISN
        conn._outstanding[isn] = OutgoingPacket(isn, ST_SYN, b"")
        conn._snd_nxt = isn + 1
        conns[(addr, recv_id)] = conn
        self._dirty.add(conn)
        self.stats.connections_opened += 1
        return conn

    def receive_datagram(self, data: bytes, addr: tuple, now: float) -> None:
        """Process one uTP datagram from ``addr``. Never raises on bad input."""
        stats = self.stats
        stats.datagrams_received += 1
        if len(data) >= 20:
            first, extension, conn_id, ts, ts_diff, wnd, seq, ack = _unpack_header(data)
        else:
            first = extension = 0xFF
        if not extension and first & 0x0F == 1 and first < 0x50:
            # the common case, no extensions: skip the general parser
            ptype = first >> 4
            sack = None
            offset = 20
        else:
            try:
                ptype, conn_id, ts, ts_diff, wnd, seq, ack, sack, offset = parse_datagram(data)
            except MalformedPacket:
                stats.malformed += 1
                return
        conn = self._conns.get((addr, conn_id))
        if ptype < ST_RESET and conn is not None:  # DATA, FIN, STATE
            conn._on_packet(ptype, ts, ts_diff, wnd, seq, ack, sack, data, offset, now)
            return
        if ptype == ST_SYN:
            self._on_syn(addr, conn_id, ts, wnd, seq, now)
            return
        if ptype == ST_RESET:
            stats.resets_received += 1
            if conn is None:
                conn = self._find_by_send_id(addr, conn_id)
            if conn is not None:
                conn._on_reset()
            return
        stats.unknown_connection += 1
        self._send_reset(addr, conn_id, seq, now)

    def datagrams_to_send(self, now: float) -> list[tuple[bytes, tuple]]:
        """Every datagram ready to go now, for all connections."""
        out = self._pending
        self._pending = []
        dirty = self._dirty
        if dirty:
            if len(dirty) == 1:
                dirty.pop()._flush(now, out)
            else:
                self._dirty = set()
                for conn in dirty:
                    conn._flush(now, out)
        self.stats.datagrams_sent += len(out)
        return out

    @property
    def has_output(self) -> bool:
        """datagrams_to_send would have something to send (or to evaluate)."""
        return bool(self._dirty or self._pending)

    def get_timer(self) -> float | None:
        """The earliest deadline of any connection (None: nothing scheduled)."""
        earliest = None
        for conn in self._conns.values():
            deadline = conn.next_deadline()
            if deadline is not None and (earliest is None or deadline < earliest):
                earliest = deadline
        return earliest

    def handle_timer(self, now: float) -> None:
        """Run every deadline that is due at ``now``."""
        for conn in list(self._conns.values()):
            deadline = conn.next_deadline()
            if deadline is not None and deadline <= now:
                conn._on_timer(now)
        if self._reset_memory and now >= self._next_reset_expiry:
            self._expire_reset_memory(now)

    def next_event(self):
        """The next event, or None."""
        events = self._events
        return events.popleft() if events else None

    def abort_all(self) -> None:
        """RESET every connection (for endpoint shutdown)."""
        for conn in list(self._conns.values()):
            conn.abort()
            self._retire(conn)

    # ---------------------------------------------------------- internals

    def _retire(self, conn: UtpConnection) -> None:
        key = (conn.remote_address, conn.recv_id)
        if self._conns.get(key) is conn:
            del self._conns[key]

    def _find_by_send_id(self, addr: tuple, conn_id: int) -> UtpConnection | None:
        for candidate in ((conn_id - 1) & _MASK16, (conn_id + 1) & _MASK16):
            conn = self._conns.get((addr, candidate))
            if conn is not None and conn.send_id == conn_id:
                return conn
        return None

    def _on_syn(self, addr: tuple, conn_id: int, ts: int, wnd: int, seq: int, now: float) -> None:
        stats = self.stats
        stats.syn_received += 1
        recv_id = (conn_id + 1) & _MASK16
        key = (addr, recv_id)
        existing = self._conns.get(key)
        if existing is not None:
            if existing._syn_seq == seq and not existing.is_closed:
                stats.duplicate_syn += 1
                existing._on_duplicate_syn(now)
                return
            if not existing.is_closed:
                stats.syn_dropped += 1  # id clash with a live connection
                return
            self._retire(existing)
        if not self.accepting:
            stats.refused += 1
            self._send_reset(addr, conn_id, seq, now)
            return
        config = self.config
        if self._half_open >= config.max_half_open or len(self._conns) >= config.max_connections:
            stats.syn_dropped += 1
            return
        isn = self._rng.randrange(0x10000)
        conn = UtpConnection(self, addr, recv_id, conn_id, isn, UtpState.SYN_RECV, config, now)
        conn._syn_seq = seq
        conn._rcv_nxt = seq + 1
        conn._peer_wnd = wnd
        now_us = int(now * 1_000_000) & _MASK32
        conn._reply_micro = (now_us - ts) & _MASK32 if ts else 0
        conn._synack_due = True
        self._conns[key] = conn
        self._half_open += 1
        self._dirty.add(conn)
        stats.connections_accepted += 1
        self._events.append(IncomingConnection(conn))

    def _send_reset(self, addr: tuple, conn_id: int, seq: int, now: float) -> None:
        memory = self._reset_memory
        key = (addr, conn_id)
        config = self.config
        last = memory.get(key)
        if last is not None and now - last < config.reset_memory:
            self.stats.resets_suppressed += 1
            return
        if last is None and len(memory) >= config.reset_memory_cap:
            self._expire_reset_memory(now)
            if len(memory) >= config.reset_memory_cap:
                self.stats.resets_suppressed += 1
                return
        memory[key] = now
        datagram = HEADER.pack(
            (ST_RESET << 4) | 1,
            0,
            conn_id,
            int(now * 1_000_000) & _MASK32,
            0,
            0,
            self._rng.randrange(0x10000),
            seq,
        )
        self._pending.append((datagram, addr))
        self.stats.resets_sent += 1

    def _expire_reset_memory(self, now: float) -> None:
        horizon = self.config.reset_memory
        self._next_reset_expiry = now + horizon / 2
        memory = self._reset_memory
        for key in [k for k, t in memory.items() if now - t >= horizon]:
            del memory[key]
