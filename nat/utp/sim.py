"""A simulated lossy network on a fake clock, for deterministic uTP tests.

Nodes are UtpMultiplexers (or anything with their four driver methods, a
``SimNode``) at made-up addresses; ``SimRelay`` and ``RelayedNode`` add relayed
virtual paths (nat/utp/paths.py), ``SimNetwork.rebind`` a NAT rebinding. Every datagram a node emits is
routed through seeded impairments: loss, duplication, reordering (an extra
delay for some packets), base delay and jitter. Time only moves when nothing
is due: the simulator jumps to the next delivery or timer, so a minute of
simulated retransmission timeouts costs milliseconds.
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, TypeVar, cast

from nat.utp.connection import UtpConnection, UtpEvent
from nat.utp.events import IncomingConnection
from nat.utp.multiplexer import UtpMultiplexer
from nat.utp.packet import decode_packet
from nat.utp.paths import VirtualPath
from nat.utp.states import Address, Datagram


class SimNode(Protocol):
    """What the network drives at each address (a UtpMultiplexer)."""

    def receive_datagram(self, data: bytes, addr: Address, now: float) -> None: ...

    def datagrams_to_send(self, now: float) -> list[Datagram]: ...

    def get_timer(self) -> float | None: ...

    def handle_timer(self, now: float) -> None: ...


NodeT = TypeVar("NodeT", bound=SimNode)


@dataclass
class LinkProfile:
    loss: float = 0.0
    duplicate: float = 0.0
    reorder: float = 0.0  # probability of an extra delay of up to reorder_delay
    reorder_delay: float = 0.02
    delay: float = 0.005
    jitter: float = 0.0
    # datagrams per second the link carries before queuing (None: unlimited)
    rate: float | None = None


class SimulationStalled(RuntimeError):
    """Nothing can happen any more and the goal is not reached."""


class SimulationTimeout(RuntimeError):
    """The goal was not reached within the simulated time limit."""


class SimNetwork:
    def __init__(self, seed: int = 0, profile: LinkProfile | None = None, start_time: float = 0.0) -> None:
        self.rng = random.Random(seed)
        self.profile = profile if profile is not None else LinkProfile()
        self.now = start_time
        self.nodes: dict[Address, SimNode] = {}
        self._queue: list[tuple[float, int, Address, Address, bytes]] = []
        self._counter = 0
        self._link_free_at: dict[tuple[Address, Address], float] = {}
        self.delivered = 0
        self.dropped = 0
        # hooks: filter(src, dst, data) -> bool (False drops the datagram)
        self.filters: list[Callable[[Address, Address, bytes], bool]] = []

    def add(self, addr: Address, node: NodeT) -> NodeT:
        self.nodes[addr] = node
        return node

    def rebind(self, old: Address, new: Address) -> None:
        """A NAT rebinding: the node at ``old`` is at ``new`` from now on (what it
        sends comes from there; what is on its way to ``old`` is lost)."""
        self.nodes[new] = self.nodes.pop(old)

    def queue_delay(self, src: Address, dst: Address) -> float:
        """How long a datagram from ``src`` to ``dst`` sent now would wait behind
        the rate-limited link's queue (zero or less: no queue)."""
        return self._link_free_at.get((src, dst), 0.0) - self.now

    def inject(self, src: Address, dst: Address, data: bytes, delay: float = 0.0) -> None:
        """Put an arbitrary datagram on the wire (bypasses impairments)."""
        self._counter += 1
        heapq.heappush(self._queue, (self.now + delay, self._counter, src, dst, data))

    def _route(self, src: Address, dst: Address, data: bytes) -> None:
        for keep in self.filters:
            if not keep(src, dst, data):
                self.dropped += 1
                return
        profile = self.profile
        rng = self.rng
        if profile.loss and rng.random() < profile.loss:
            self.dropped += 1
            return
        copies = 2 if profile.duplicate and rng.random() < profile.duplicate else 1
        for _ in range(copies):
            at = self.now + profile.delay
            if profile.rate:
                link = (src, dst)
                start = max(self._link_free_at.get(link, 0.0), self.now)
                self._link_free_at[link] = start + 1.0 / profile.rate
                at = start + profile.delay
            if profile.jitter:
                at += rng.random() * profile.jitter
            if profile.reorder and rng.random() < profile.reorder:
                at += rng.random() * profile.reorder_delay
            self._counter += 1
            heapq.heappush(self._queue, (at, self._counter, src, dst, data))

    def flush(self) -> None:
        for addr, mux in self.nodes.items():
            for data, dst in mux.datagrams_to_send(self.now):
                self._route(addr, dst, data)

    def step(self) -> bool:
        """Advance to the next thing that happens; False when nothing is left."""
        self.flush()
        candidates = []
        if self._queue:
            candidates.append(self._queue[0][0])
        for mux in self.nodes.values():
            timer = mux.get_timer()
            if timer is not None:
                candidates.append(timer)
        if not candidates:
            return False
        at = min(candidates)
        if at > self.now:
            self.now = at
        queue = self._queue
        now = self.now
        while queue and queue[0][0] <= now:
            _, _, src, dst, data = heapq.heappop(queue)
            node = self.nodes.get(dst)
            if node is not None:
                self.delivered += 1
                node.receive_datagram(data, src, now)
        for mux in self.nodes.values():
            timer = mux.get_timer()
            if timer is not None and timer <= now:
                mux.handle_timer(now)
        return True

    def run(
        self,
        until: Callable[[], bool],
        *,
        max_time: float = 600.0,
        max_steps: int = 2_000_000,
        on_step: Callable[[], None] | None = None,
    ) -> None:
        """Step until ``until()``; ``on_step`` runs the applications after each step."""
        limit = self.now + max_time
        for _ in range(max_steps):
            if on_step is not None:
                on_step()
            if until():
                self.flush()
                return
            if not self.step():
                if on_step is not None:
                    on_step()
                if until():
                    return
                self.flush()
                if not self._queue:
                    raise SimulationStalled(f"nothing left to do at t={self.now:.3f}")
            if self.now > limit:
                raise SimulationTimeout(f"goal not reached by t={self.now:.3f}")
        raise SimulationTimeout("step limit reached")


class ReceiveBuffer:
    """A node behind a small socket receive buffer, read in batches by a busy host.

    Models a UDP receiver such as libutp under Node: datagrams wait in a kernel
    buffer of ``capacity`` datagrams (arrivals beyond it are dropped, counted in
    ``dropped``); the host takes everything queued (up to ``batch``) at once,
    spends ``1 / rate`` seconds per datagram on it, and only then hands the
    batch to the wrapped node (so its ACKs go out once per batch, as libutp's
    deferred ACKs do). While it works, arrivals queue. ``sack_bytes`` cuts the
    selective ACKs the node sends to that many bytes (libutp's are 4: 32 packets
    past the cumulative ACK).
    """

    def __init__(
        self, node: SimNode, capacity: int, rate: float, batch: int = 64, sack_bytes: int | None = None
    ) -> None:
        self.node = node
        self.capacity = capacity
        self.rate = rate
        self.batch = batch
        self.sack_bytes = sack_bytes
        self.dropped = 0
        self.received = 0
        self._queue: list[tuple[bytes, Address]] = []
        self._working: list[tuple[bytes, Address]] = []
        self._done_at: float | None = None

    def receive_datagram(self, data: bytes, addr: Address, now: float) -> None:
        if len(self._queue) >= self.capacity:
            self.dropped += 1
            return
        self._queue.append((data, addr))
        if self._done_at is None:
            self._take(now)

    def _take(self, now: float) -> None:
        batch, self._queue = self._queue[: self.batch], self._queue[self.batch :]
        self._working = batch
        self._done_at = now + len(batch) / self.rate if batch else None

    def datagrams_to_send(self, now: float) -> list[Datagram]:
        out = self.node.datagrams_to_send(now)
        limit = self.sack_bytes
        if limit is None:
            return out
        cut = []
        for data, addr in out:
            if data[1]:  # an extension: the SACK
                packet = decode_packet(data)
                if packet.sack is not None and len(packet.sack) > limit:
                    packet.sack = packet.sack[:limit]
                    data = packet.encode()
            cut.append((data, addr))
        return cut

    def get_timer(self) -> float | None:
        timer = self.node.get_timer()
        done = self._done_at
        if done is None:
            return timer
        return done if timer is None or done < timer else timer

    def handle_timer(self, now: float) -> None:
        done = self._done_at
        if done is not None and done <= now:
            for data, addr in self._working:
                self.received += 1
                self.node.receive_datagram(data, addr, now)
            self._take(now)
        timer = self.node.get_timer()
        if timer is not None and timer <= now:
            self.node.handle_timer(now)


class SimRelay:
    """A relay node in miniature, at its own address on the simulated network:
    each node it serves has a one-byte number; a node sends it ``number of the
    destination + datagram`` and the destination gets ``number of the sender +
    datagram``. Frames cross the network twice (to the relay and from it), with
    its impairments both times. Frames naming no member are dropped (counted).
    """

    def __init__(self, address: Address) -> None:
        self.address = address
        self.members: list[Address] = []
        self.forwarded = 0
        self.dropped = 0
        self._out: list[Datagram] = []

    def serve(self, member: Address) -> int:
        self.members.append(member)
        return len(self.members) - 1

    def receive_datagram(self, data: bytes, addr: Address, now: float) -> None:
        members = self.members
        if not data or data[0] >= len(members) or addr not in members:
            self.dropped += 1
            return
        self.forwarded += 1
        self._out.append((bytes([members.index(addr)]) + data[1:], members[data[0]]))

    def datagrams_to_send(self, now: float) -> list[Datagram]:
        out, self._out = self._out, []
        return out

    def get_timer(self) -> float | None:
        return None

    def handle_timer(self, now: float) -> None:
        pass


class RelayedNode:
    """A multiplexer that also reaches its peers through a :class:`SimRelay`
    (which must already serve it), over virtual paths ``relay_path(peer)`` =
    ``VirtualPath(("relay", relay address, peer address))``: the sans-IO twin of
    an Endpoint with a relay link (add_path / receive_from_path)."""

    def __init__(self, mux: UtpMultiplexer, relay: SimRelay) -> None:
        self.mux = mux
        self.relay = relay

    def relay_path(self, peer: Address) -> VirtualPath:
        return VirtualPath(("relay", self.relay.address, peer))

    def receive_datagram(self, data: bytes, addr: Address, now: float) -> None:
        relay = self.relay
        if addr == relay.address:
            if data and data[0] < len(relay.members):
                self.mux.receive_datagram(data[1:], self.relay_path(relay.members[data[0]]), now)
            return
        self.mux.receive_datagram(data, addr, now)

    def datagrams_to_send(self, now: float) -> list[Datagram]:
        out = self.mux.datagrams_to_send(now)
        relay = self.relay
        for index, (data, dst) in enumerate(out):
            if type(dst) is VirtualPath:
                _, relay_address, peer = cast(tuple[str, Address, Address], dst.key)
                out[index] = (bytes([relay.members.index(peer)]) + data, relay_address)
        return out

    def get_timer(self) -> float | None:
        return self.mux.get_timer()

    def handle_timer(self, now: float) -> None:
        self.mux.handle_timer(now)


class StreamApp:
    """Plays an application on one connection: writes ``outgoing`` then EOF, reads all.

    ``read_budget`` bytes per step model a slow reader (None: read everything).
    """

    def __init__(
        self,
        conn: UtpConnection,
        outgoing: bytes = b"",
        *,
        send_eof: bool = True,
        read_budget: int | None = None,
        write_chunk: int = 65536,
    ) -> None:
        self.conn = conn
        self.outgoing = memoryview(outgoing)
        self.position = 0
        self.want_eof = send_eof
        self.read_budget = read_budget
        self.write_chunk = write_chunk
        self.received = bytearray()
        self.events: list[UtpEvent] = []
        self.paused = False  # a reader that stopped reading

    @property
    def sent_all(self) -> bool:
        return self.position >= len(self.outgoing)

    @property
    def done(self) -> bool:
        """Everything written and acknowledged, and the peer's EOF read."""
        conn = self.conn
        return self.sent_all and conn.at_eof and (not self.want_eof or conn.all_data_acked)

    def pump(self) -> None:
        conn = self.conn
        if conn.is_closed:
            self._read()
            return
        while self.position < len(self.outgoing):
            chunk = self.outgoing[self.position : self.position + self.write_chunk]
            taken = conn.send(chunk)
            self.position += taken
            if taken < len(chunk):
                break
        if self.sent_all and self.want_eof and not conn.eof_sent:
            conn.send_eof()
        self._read()

    def _read(self) -> None:
        if self.paused:
            return
        budget = self.read_budget
        if budget is None:
            while True:
                data = self.conn.read(1 << 20)
                if not data:
                    return
                self.received += data
        else:
            self.received += self.conn.read(budget)


class AppRunner:
    """Dispatches multiplexer events to StreamApps (one per connection)."""

    def __init__(
        self, muxes: list[UtpMultiplexer], make_incoming: Callable[[UtpConnection], StreamApp] | None = None
    ) -> None:
        self.muxes = muxes
        self.apps: dict[UtpConnection, StreamApp] = {}
        self.make_incoming = make_incoming
        self.events: list[UtpEvent] = []

    def add(self, app: StreamApp) -> StreamApp:
        self.apps[app.conn] = app
        return app

    def __call__(self) -> None:
        for mux in self.muxes:
            while (event := mux.next_event()) is not None:
                self.events.append(event)
                if isinstance(event, IncomingConnection) and self.make_incoming is not None:
                    self.add(self.make_incoming(event.conn))
                app = self.apps.get(event.conn)
                if app is not None:
                    app.events.append(event)
        for app in list(self.apps.values()):
            app.pump()
