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
  + mux.move_connection(conn, path, now)    # the connection's datagrams take ``path``
                                            # from now on (paths.py; see the method)

A driver loop is::

    for data, addr in received_batch: mux.receive_datagram(data, addr, now)
    if (t := mux.get_timer()) is not None and t <= now: mux.handle_timer(now)
    for data, addr in mux.datagrams_to_send(now): sock.sendto(data, addr)
    while (event := mux.next_event()) is not None: dispatch(event)
    sleep until mux.get_timer() or readable

UtpConnection (made only here, with UtpConnection.outgoing/incoming; see connection.py)::

    conn.remote_address, conn.state (UtpState), conn.recv_id, conn.send_id
    conn.send(data) -> int      # bytes taken (0 when full: wait for SendSpaceAvailable)
    conn.read(max_bytes) -> bytes
    conn.send_eof(), conn.close(), conn.abort()
    conn.rtt, conn.bytes_sent, conn.bytes_received, conn.at_eof
  + conn.error (the NatError that ended it, or None), conn.is_closed, conn.eof_sent,
  + conn.fin_acked, conn.send_buffer_free, conn.readable_bytes, conn.all_data_acked,
  + conn.rto, conn.cwnd, conn.next_deadline() (that connection's part of get_timer)
  + conn.receive_buffered, conn.send_buffered, conn.unacked_packets, conn.reorder_count,
  + conn.peer_window, conn.initial_seq, conn.next_seq, conn.next_expected_seq,
  + conn.congestion (introspection for tests and diagnostics)
  + conn.remote_address is the connection's path (paths.py); conn.path_moves,
  + conn.oldest_unacked_seq

Connections never touch the multiplexer: what they hand it (dirty marks, events,
keep-alives, the end of a half-open phase or of their life) goes through its
Outbox (outbox.py); the multiplexer calls them through receive_packet,
reset_is_ours, receive_reset, receive_syn_again, change_path, flush_into,
run_timers and next_deadline.

Calling send/read/send_eof/close/abort marks the connection for the next
``datagrams_to_send``; the driver must call it after them (as after receiving).
``send`` raises UtpClosed after ``send_eof``/``close`` or once the connection
is closed; nothing else in the API raises on network input.

``IncomingConnection`` comes with the SYN (the acceptor may write at once;
spoofed SYNs are bounded by ``max_half_open`` and reaped after
``syn_recv_timeout``). SYNs that would open a connection (or be refused with a
RESET) are limited per source IP by a token bucket (``syn_burst``, then
``syn_rate`` per second); those over it are dropped silently and counted in
``syn_rate_limited``. A repeated SYN of an existing connection is not limited,
nor is an address that proved it receives what we send (a connection with it
had a packet of ours acknowledged: it has an RTT sample) within the last
``syn_proven_time``: a peer opening tunnels faster than ``syn_rate`` is not
slowed down, a spoofed source never proves anything.

Addresses are opaque hashable tuples; a host containing ":" is treated as IPv6
and gets libutp's IPv6 packet ceiling, so a dual-stack driver should hand IPv4
peers over unmapped. Wherever an address goes, a ``VirtualPath`` (paths.py) may
go instead: a path that is not a UDP address (a relay), whose datagrams the
driver routes itself. Connections made over one, by ``connect`` or by a SYN
that arrived over it, are bound to it; ``move_connection`` moves a connection
between paths. A virtual path is its own unit for the per-source SYN limit.

Paths and spoofing: a connection is on one path at a time (plus, for
``path_grace`` seconds after a move, the one it left). A datagram with its id
over any other path does not reach it: if its sequence numbers are the
connection's (a spoofed source that read them, or a peer that moved before we
did, or whose NAT mapping changed) it is dropped and counted in
``path_mismatch``, without the RESET an unknown connection draws, which would
reach the peer over that path and end its side; otherwise it is an unknown
connection's.

Connections are keyed by (remote address, recv_id). The initiator picks a
random recv_id with send_id = recv_id + 1; the SYN carries recv_id; the acceptor
uses recv_id = id + 1 and send_id = id (BEP 29 and libutp agree). A RESET may
carry either id of the connection, so RESETs are also matched by send_id, as
libutp does. Non-SYN packets for unknown connections get a RESET, at most one
per (address, id) per ``reset_memory`` seconds with at most ``reset_memory_cap``
remembered; beyond that they are dropped and counted.

Ids of consecutive connections between the same two addresses (issue item 16):
a connection that ended may still have packets on the wire, and the RESET such
a packet draws from a node that forgot it carries that connection's id. Since a
RESET is matched by either id, a new connection whose ids touch the old one's
({r, r+1} against {R, R+1}: r = R-1, R, R+1) would take it for its own. So

- ``connect`` draws a recv_id whose pair of ids shares none with a connection
  to the same address that is open, lingering, or retired less than
  ``reset_memory`` seconds ago (at most ``retired_id_memory_cap`` remembered);
- a RESET is applied only if it answers something of this connection: its
  ack_nr echoes one of our sequence numbers still in play, [snd_una - 1,
  snd_nxt] (libutp's RESET for an unknown id echoes the packet's seq_nr; a
  connection's own RESET acknowledges what it received of ours), or its seq_nr
  is the one we expect next (a connection's RESET sent before it heard from us:
  an initiator aborting in SYN_SENT). Others are counted in ``resets_ignored``.
  This also covers initiators that do not avoid ids (libutp, a restarted node).
"""

from __future__ import annotations

import math
import random
from collections import OrderedDict

from nat.errors import MalformedPacket, PathInUse, UtpClosed
from nat.utp.config import UtpConfig, UtpStats
from nat.utp.connection import UtpConnection, UtpEvent, UtpState
from nat.utp.events import IncomingConnection
from nat.utp.outbox import Flushable, Outbox
from nat.utp.packet import HEADER, HEADER_SIZE, ST_RESET, ST_SYN, UTP_FIRST_BYTE, pack_header, parse_datagram
from nat.utp.paths import Path, path_host
from nat.utp.states import MASK16, MASK32, Address, Datagram

__all__ = ["UtpMultiplexer", "UtpConfig", "UtpStats", "UtpConnection", "UtpState"]

_unpack_header = HEADER.unpack_from

PROOF_SCAN_INTERVAL = 1.0  # seconds between looks for a limited address's proof (see _syn_allowed)


class UtpMultiplexer:
    """All uTP connections of one UDP socket, sans-IO."""

    def __init__(self, config: UtpConfig | None = None, rng: random.Random | None = None) -> None:
        self.config = config if config is not None else UtpConfig()
        self._rng = rng if rng is not None else random.Random()
        self.accepting = True
        self.stats = UtpStats()
        self._conns: dict[tuple[Address, int], UtpConnection] = {}
        self._outbox: Outbox[UtpConnection] = Outbox(self.stats, self._retire)
        outbox = self._outbox
        self._dirty = outbox.dirty
        self._events = outbox.events
        self._reset_memory: dict[tuple[Address, int], float] = {}
        self._next_reset_expiry = 0.0
        # (address, recv_id) -> (send_id, when) of connections that left the
        # table, in retirement order (see connect)
        self._retired_ids: OrderedDict[tuple[Address, int], tuple[int, float]] = OrderedDict()
        # source host -> (tokens, when, last proof scan) of the SYN limit, least
        # recently seen first
        self._syn_buckets: OrderedDict[object, tuple[float, float, float]] = OrderedDict()
        # host -> when it last proved it receives our packets (see _on_syn)
        self._proven: OrderedDict[object, float] = OrderedDict()
        # host -> its connections in the table (for that proof)
        self._by_host: dict[object, set[UtpConnection]] = {}
        # recv_id -> the connections in the table with it, on any path (see
        # _on_another_path)
        self._by_id: dict[int, set[UtpConnection]] = {}
        # (old path, recv_id) -> (connection, until when) of connections that
        # moved to another path: what still arrives over the old one is theirs
        # for config.path_grace (see move_connection)
        self._grace: dict[tuple[Path, int], tuple[UtpConnection, float]] = {}
        # the latest time the driver gave us (stamps retirements, which happen
        # inside calls that are not given the time)
        self._clock = 0.0

    # ------------------------------------------------------------ public

    @property
    def connections(self) -> list[UtpConnection]:
        return list(self._conns.values())

    @property
    def half_open(self) -> int:
        """Incoming connections still in SYN_RECV."""
        return self._outbox.half_open

    @property
    def reset_memory_size(self) -> int:
        """(address, connection id) pairs recently answered with a RESET."""
        return len(self._reset_memory)

    def connect(self, addr: Address, now: float) -> UtpConnection:
        """Open an outgoing connection; its SYN leaves at the next datagrams_to_send."""
        self._clock = now
        conns = self._conns
        rng = self._rng
        for _ in range(64):
            recv_id = rng.randrange(0x10000)
            if self._ids_apart(addr, recv_id, now):
                break
        else:
            # (thousands of connections to this one address): only the id itself
            for _ in range(64):
                recv_id = rng.randrange(0x10000)
                if (addr, recv_id) not in conns:
                    break
            else:
                raise RuntimeError("no free connection id for this address")
        isn = rng.randrange(0x10000)
        conn = UtpConnection.outgoing(self._outbox, addr, recv_id, isn, self.config, now)
        conns[(addr, recv_id)] = conn
        self._by_host.setdefault(path_host(addr), set()).add(conn)
        self._by_id.setdefault(recv_id, set()).add(conn)
        self.stats.connections_opened += 1
        return conn

    def move_connection(self, conn: UtpConnection, path: Path, now: float) -> None:
        """Send ``conn``'s datagrams over ``path`` from now on (paths.py): a relay
        to a direct address, back, or a peer's new address after a NAT rebinding.

        The same connection, with the same ids: no handshake, no RESET, nothing
        the application sees. What is in flight goes again over ``path`` within a
        fresh congestion window, and the RTT and delay estimates start over (see
        Sender.change_path). What still arrives over the old path is taken for
        ``config.path_grace`` seconds. Only the caller moves a connection, on
        evidence of its own (an authenticated ping): a datagram from a path the
        connection is not on never moves it, it is dropped and counted in
        ``stats.path_mismatch``. The peer learns the new path only from its own
        caller moving its side. Moving to the current path does nothing.

        PathInUse: another connection has this connection's id on ``path``.
        UtpClosed: ``conn`` already left this multiplexer (reset, or gone after
        lingering).
        """
        self._clock = now
        old = conn.remote_address
        recv_id = conn.recv_id
        old_key = (old, recv_id)
        conns = self._conns
        if conns.get(old_key) is not conn:
            raise UtpClosed("the connection is closed")
        if path == old:
            return
        key = (path, recv_id)
        other = conns.get(key)
        if other is not None:
            raise PathInUse(f"connection id {recv_id} is in use on {path!r}")
        del conns[old_key]
        conns[key] = conn
        old_host, host = path_host(old), path_host(path)
        if old_host != host:
            same_host = self._by_host.get(old_host)
            if same_host is not None:
                same_host.discard(conn)
                if not same_host:
                    del self._by_host[old_host]
            self._by_host.setdefault(host, set()).add(conn)
        grace = self._grace
        grace.pop(key, None)  # moving back: that path is the current one again
        grace[old_key] = (conn, now + self.config.path_grace)
        conn.change_path(path, now)
        self.stats.path_moves += 1

    def receive_datagram(self, data: bytes, addr: Address, now: float) -> None:
        """Process one uTP datagram from ``addr``. Never raises on bad input."""
        stats = self.stats
        stats.datagrams_received += 1
        if len(data) >= HEADER_SIZE:
            first, extension, conn_id, ts, ts_diff, wnd, seq, ack = _unpack_header(data)
        else:
            first = extension = 0xFF
        if not extension and UTP_FIRST_BYTE[first]:
            # the common case, no extensions: skip the general parser
            ptype = first >> 4
            sack = None
            offset = HEADER_SIZE
        else:
            try:
                ptype, conn_id, ts, ts_diff, wnd, seq, ack, sack, offset = parse_datagram(data)
            except MalformedPacket:
                stats.malformed += 1
                return
        conn = self._conns.get((addr, conn_id))
        if ptype < ST_RESET and conn is not None:  # DATA, FIN, STATE
            conn.receive_packet(ptype, ts, ts_diff, wnd, seq, ack, sack, data, offset, now)
            return
        if conn is None and self._grace and ptype != ST_SYN:
            # a connection's old path, within its grace period
            conn = self._moved_from(addr, conn_id, ptype == ST_RESET, now)
            if conn is not None:
                stats.old_path_received += 1
                if ptype < ST_RESET:
                    conn.receive_packet(ptype, ts, ts_diff, wnd, seq, ack, sack, data, offset, now)
                    return
        if ptype == ST_SYN:
            self._on_syn(addr, conn_id, ts, wnd, seq, now)
            return
        if ptype == ST_RESET:
            stats.resets_received += 1
            if conn is None:
                conn = self._find_by_send_id(addr, conn_id)
            if conn is not None:
                if conn.reset_is_ours(seq, ack):
                    conn.receive_reset()
                else:
                    stats.resets_ignored += 1
            return
        if self._on_another_path(conn_id, seq, ack):
            stats.path_mismatch += 1
            return
        stats.unknown_connection += 1
        self._send_reset(addr, conn_id, seq, now)

    def datagrams_to_send(self, now: float) -> list[Datagram]:
        """Every datagram ready to go now, for all connections."""
        self._clock = now
        outbox = self._outbox
        out = outbox.datagrams
        outbox.datagrams = []  # (Outbox.take_datagrams written out: a call less per flush)
        dirty = self._dirty
        if dirty:
            if len(dirty) == 1:
                dirty.pop().flush_into(now, out)
            else:
                conns = list(dirty)
                dirty.clear()
                for conn in conns:
                    conn.flush_into(now, out)
        self.stats.datagrams_sent += len(out)
        return out

    @property
    def has_output(self) -> bool:
        """datagrams_to_send would have something to send (or to evaluate)."""
        return bool(self._dirty or self._outbox.datagrams)

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
        self._clock = now
        for conn in list(self._conns.values()):
            deadline = conn.next_deadline()
            if deadline is not None and deadline <= now:
                conn.run_timers(now)
        if (
            self._reset_memory or self._retired_ids or self._syn_buckets or self._proven or self._grace
        ) and now >= self._next_reset_expiry:
            self._expire_reset_memory(now)

    def next_event(self) -> UtpEvent | None:
        """The next event, or None."""
        events = self._events
        return events.popleft() if events else None

    def abort_all(self) -> None:
        """RESET every connection (for endpoint shutdown)."""
        for conn in list(self._conns.values()):
            conn.abort()
            self._retire(conn)

    # ---------------------------------------------------------- internals

    def _retire(self, conn: Flushable) -> None:
        key = (conn.remote_address, conn.recv_id)
        known = self._conns.get(key)
        if known is conn:
            del self._conns[key]
            same_id = self._by_id.get(known.recv_id)
            if same_id is not None:
                same_id.discard(known)
                if not same_id:
                    del self._by_id[known.recv_id]
            if self._grace:
                for old_key in [k for k, (c, _) in self._grace.items() if c is known]:
                    del self._grace[old_key]
            host = path_host(key[0])
            same_host = self._by_host.get(host)
            if same_host is not None:
                same_host.discard(known)
                if not same_host:
                    del self._by_host[host]
            if known.rtt > 0.0:
                self._mark_proven(host, self._clock)
            retired = self._retired_ids
            retired.pop(key, None)  # re-inserted last: the memory stays in time order
            if len(retired) >= self.config.retired_id_memory_cap:
                retired.popitem(last=False)
            retired[key] = (known.send_id, self._clock)

    def _ids_apart(self, addr: Address, recv_id: int, now: float) -> bool:
        """An initiator's ids {recv_id, recv_id + 1} share none with a connection
        to ``addr`` that is open, lingering or retired within reset_memory."""
        conns = self._conns
        retired = self._retired_ids
        grace = self._grace
        horizon = now - self.config.reset_memory
        send_id = (recv_id + 1) & MASK16
        # a connection keyed k has ids {k, k +- 1}: only k in recv_id-1 .. recv_id+2 can touch
        for key_id, clash in (
            (recv_id, -1),  # any connection keyed recv_id or send_id clashes
            (send_id, -1),
            ((recv_id - 1) & MASK16, recv_id),  # keyed below: clashes if its send_id is our recv_id
            ((recv_id + 2) & MASK16, send_id),  # keyed above: clashes if its send_id is our send_id
        ):
            key = (addr, key_id)
            conn = conns.get(key)
            if conn is None and grace:  # (a connection that moved away: its late packets)
                moved = grace.get(key)
                conn = moved[0] if moved is not None else None
            if conn is not None and (clash < 0 or conn.send_id == clash):
                return False
            old = retired.get(key)
            if old is not None and old[1] > horizon and (clash < 0 or old[0] == clash):
                return False
        return True

    def _find_by_send_id(self, addr: Address, conn_id: int) -> UtpConnection | None:
        for candidate in ((conn_id - 1) & MASK16, (conn_id + 1) & MASK16):
            conn = self._conns.get((addr, candidate))
            if conn is not None and conn.send_id == conn_id:
                return conn
        return None

    def _moved_from(self, addr: Path, conn_id: int, reset: bool, now: float) -> UtpConnection | None:
        """The connection that moved away from ``addr`` within its grace period
        and has id ``conn_id`` (a RESET may carry its send_id too)."""
        grace = self._grace
        entry = grace.get((addr, conn_id))
        if entry is None and reset:
            for candidate in ((conn_id - 1) & MASK16, (conn_id + 1) & MASK16):
                entry = grace.get((addr, candidate))
                if entry is not None and entry[0].send_id == conn_id:
                    break
                entry = None
        if entry is None:
            return None
        if now >= entry[1]:
            return None  # (the entry goes at the next expiry pass)
        return entry[0]

    def _on_another_path(self, conn_id: int, seq: int, ack: int) -> bool:
        """A packet with the id of a live connection on another path, and sequence
        numbers of that connection (its ack_nr echoes one of ours in play, or
        its seq_nr is the one we expect): taken for that connection's, over a
        path it is not on. It must neither move it (only the caller does) nor
        draw a RESET, which would reach the peer over that path and end the
        connection there (a peer that moved before we did)."""
        for conn in self._by_id.get(conn_id, ()):
            if conn.reset_is_ours(seq, ack):
                return True
        return False

    def _on_syn(self, addr: Address, conn_id: int, ts: int, wnd: int, seq: int, now: float) -> None:
        stats = self.stats
        stats.syn_received += 1
        recv_id = (conn_id + 1) & MASK16
        key = (addr, recv_id)
        existing = self._conns.get(key)
        if existing is not None:
            if not existing.is_closed:
                if existing.receive_syn_again(seq, now):
                    stats.duplicate_syn += 1
                else:
                    stats.syn_dropped += 1  # id clash with a live connection
                return
            self._retire(existing)
        if not self._syn_allowed(path_host(addr), now):
            stats.syn_rate_limited += 1
            return
        if not self.accepting:
            stats.refused += 1
            self._send_reset(addr, conn_id, seq, now)
            return
        config = self.config
        if self._outbox.half_open >= config.max_half_open or len(self._conns) >= config.max_connections:
            stats.syn_dropped += 1
            return
        isn = self._rng.randrange(0x10000)
        conn = UtpConnection.incoming(self._outbox, addr, recv_id, isn, seq, wnd, ts, config, now)
        self._conns[key] = conn
        self._by_host.setdefault(path_host(addr), set()).add(conn)
        self._by_id.setdefault(recv_id, set()).add(conn)
        stats.connections_accepted += 1
        self._events.append(IncomingConnection(conn))

    def _syn_allowed(self, host: object, now: float) -> bool:
        """Take a token from ``host``'s bucket; without one, whether ``host``
        has proved it receives our packets."""
        config = self.config
        burst = config.syn_burst
        if burst <= 0:
            return True
        buckets = self._syn_buckets
        bucket = buckets.get(host)
        scanned = -math.inf
        if bucket is None:
            if len(buckets) >= config.syn_sources:
                buckets.popitem(last=False)
            tokens = float(burst)
        else:
            tokens, when, scanned = bucket
            tokens = min(float(burst), tokens + max(0.0, now - when) * config.syn_rate)
            buckets.move_to_end(host)
        if tokens >= 1.0:
            buckets[host] = (tokens - 1.0, now, scanned)
            return True
        proven = self._proven.get(host)
        if proven is not None and now - proven < config.syn_proven_time:
            buckets[host] = (tokens, now, scanned)
            return True
        if now - scanned >= PROOF_SCAN_INTERVAL:
            # (at most once a second per address: a spoofed source may hold
            # hundreds of half-open connections)
            scanned = now
            if any(conn.rtt > 0.0 for conn in self._by_host.get(host, ())):
                self._mark_proven(host, now)
                buckets[host] = (tokens, now, scanned)
                return True
        buckets[host] = (tokens, now, scanned)
        return False

    def _mark_proven(self, host: object, now: float) -> None:
        proven = self._proven
        proven.pop(host, None)
        if len(proven) >= self.config.syn_sources:
            proven.popitem(last=False)
        proven[host] = now

    def _send_reset(self, addr: Address, conn_id: int, seq: int, now: float) -> None:
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
        now_us = int(now * 1_000_000) & MASK32
        datagram = pack_header(ST_RESET, conn_id, now_us, 0, 0, self._rng.randrange(0x10000), seq)
        self._outbox.datagrams.append((datagram, addr))
        self.stats.resets_sent += 1

    def _expire_reset_memory(self, now: float) -> None:
        horizon = self.config.reset_memory
        self._next_reset_expiry = now + horizon / 2
        memory = self._reset_memory
        for key in [k for k, t in memory.items() if now - t >= horizon]:
            del memory[key]
        retired = self._retired_ids
        while retired:  # in time order: the oldest first
            key, (_, when) = next(iter(retired.items()))
            if now - when < horizon:
                break
            retired.popitem(last=False)
        config = self.config
        burst, rate = config.syn_burst, config.syn_rate
        buckets = self._syn_buckets
        full = [h for h, (tokens, when, scanned) in buckets.items() if tokens + (now - when) * rate >= burst]
        for host in full:
            del buckets[host]  # full again: the same as not tracked
        grace = self._grace
        for key in [k for k, (_, until) in grace.items() if now >= until]:
            del grace[key]
        proven = self._proven
        while proven:  # in time order: the oldest first
            host, when = next(iter(proven.items()))
            if now - when < config.syn_proven_time:
                break
            proven.popitem(last=False)
