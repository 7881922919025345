"""Paths, not addresses: a tunnel belongs to a peer NodeId, and its uTP datagrams
take a path, a direct UDP address or a relayed ``VirtualPath`` (nat/utp/paths.py)
through a relay node. The path may change under a live tunnel
(``UtpStream.move_to``: same uTP connection, same TLS session, nothing lost).

``TunnelPaths`` (one per Proxy) decides:

- **Starting by NodeId.** The relay nodes are asked and both sides punch
  (rendezvous ``find_path``). If no authenticated path is confirmed within
  ``punch_window`` and a relay route to the peer exists, the tunnel starts over
  the relay at once; the punch keeps going in the background. (Starting relayed
  at once costs a relayed start on every connection, even the 22 of 25 NAT pairs
  that punch within 0.1 s, and then a move; waiting up to the window costs only
  the hard pairs the window: bench/paths.py measures both.)
- **Upgrading.** A tunnel on a relay path asks for a direct path again (the
  lookup makes the relay introduce the two nodes again and both punch); a path
  is taken only when this node's authenticated PING was answered by the peer's
  authenticated PONG (rendezvous ``PathConfirmed``: proof both ways from this
  side). Each side moves its own half on its own proof; a datagram of the tunnel
  that arrives over the new path before this side moved is dropped by nat and
  resent by uTP, so nothing depends on who moves first.
- **Falling back.** A tunnel on a direct path whose peer has been silent for
  ``silent_after`` (about two missed keep-alives) moves to the relay path, and
  starts upgrading again.
- **Rebinding.** A peer whose NAT gave it a new mapping: its datagrams from the
  new port are dropped (unauthenticated), so both halves fall silent and go to the
  relay; the next punch confirms the new address and they move there. A fresh
  punch session confirming another address while direct moves the tunnel at once.

Nothing but the rendezvous's authenticated evidence (and the relay's
authenticated sender) moves a tunnel: a spoofed datagram from a new address is
dropped by nat (``UtpStats.path_mismatch``) and counted.

Liveness (``PathPeer``): on a direct path, the shared 4-byte ``Peer`` of the
address (keep-alive PINGs, as for every original peer); on a relay path, the
relay link's own keep-alive and the relay's PEER_GONE, i.e. the route existing.
A tunnel dies when its current path is dead and no other is available.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping
from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import Any, Protocol

import trio

from nat.utp.paths import VirtualPath
from proxy.identity.errors import KeynodeError
from proxy.identity.node_id import NodeId
from proxy.rendezvous.errors import NoDirectPath
from proxy.tunnel.errors import ConnectionKeepAliveTimeout
from proxy.tunnel.hosts import format_host_port
from proxy.tunnel.peer import Address, Peer, PeerRegistry, normalize_address
from proxy.tunnel.records import PathMove

log = logging.getLogger("keynode.paths")

MOVES_KEPT = 8  # the last moves a tunnel's status shows (the count is kept in full)


class RelayRoutes(Protocol):
    """The relay transport as paths of the endpoint: a path to ``peer`` through a
    relay node this node is registered with, or None (no relay, none reachable)."""

    def path_to(self, peer: NodeId) -> VirtualPath | None: ...


class PathFinder(Protocol):
    """The rendezvous: an authenticated direct path to a NodeId (or a typed error)."""

    async def find_path(self, node_id: NodeId) -> tuple[str, int]: ...


@dataclass(frozen=True)
class PathTimers:
    punch_window: float = 1.0  # a CONNECT by NodeId waits this long for a punch, then takes the relay
    silent_after: float = 2.5  # direct peer silent this long (x keep-alive interval 1 s): to the relay
    upgrade_retry: float = 5.0  # a relayed tunnel asks for a direct path again after a failed punch,
    upgrade_retry_max: float = 60.0  # doubling each time up to this (a hard NAT pair stays relayed)
    check_interval: float = 0.25  # how often a tunnel's path is checked


def relay_of(path: object) -> NodeId | None:
    """The relay node a relayed path goes through (keys are ("relay", relay, peer))."""
    if type(path) is VirtualPath and isinstance(path.key, tuple) and len(path.key) == 3:
        relay = path.key[1]
        if isinstance(relay, NodeId):
            return relay
    return None


def relay_sender(path: VirtualPath) -> NodeId | None:
    """The peer a relayed path leads to (the relay authenticated it as the sender)."""
    if isinstance(path.key, tuple) and len(path.key) == 3 and isinstance(path.key[2], NodeId):
        return path.key[2]
    return None


def relayed_address(node_id: NodeId) -> Address:
    """The registry's key for a tunnel that started relayed: no address is known."""
    return (f"relay:{node_id}", 0)


class PathPeer:
    """The liveness of a tunnel whose path may change: what the connection watches
    instead of one address's ``Peer`` (same attributes)."""

    def __init__(self, direct: Peer | None) -> None:
        self.direct = direct
        self.relayed = direct is None
        self.heard = trio.Event()
        self.died = trio.Event()
        self.proven = trio.Event()
        self.proven.set()
        self.death: BaseException | None = None
        if direct is None or direct.heard.is_set():
            self.heard.set()

    @property
    def last_heard(self) -> float | None:
        return None if self.direct is None else self.direct.last_heard

    def prove(self) -> None:
        if self.direct is not None:
            self.direct.prove()

    async def wait_heard(self) -> None:
        if self.death is not None:
            raise self.death
        if not self.relayed and self.direct is not None:
            await self.direct.wait_heard()
        self.heard.set()

    def die(self, death: BaseException) -> None:
        if not self.died.is_set():
            self.death = death
            self.died.set()


class TunnelPath:
    """The path of one tunnel, its moves, and the task that keeps it right."""

    def __init__(self, paths: TunnelPaths, connection: Any, node_id: NodeId, peer: PathPeer) -> None:
        self.paths = paths
        self.connection = connection
        self.node_id = node_id
        self.peer = peer
        self.moves: list[PathMove] = []
        self.move_count = 0
        self.relay_rtt_at: float | None = None  # when a relayed PATH_PONG last came
        self._stall: tuple[int, float] | None = None  # (oldest unacknowledged seq, since when)

    @property
    def current(self) -> object:
        utp = self.connection.utp
        return None if utp is None else utp.path

    @property
    def kind(self) -> str:
        return "relay" if type(self.current) is VirtualPath else "direct"

    @property
    def via(self) -> NodeId | None:
        return relay_of(self.current)

    def _move(self, path: object, reason: str, direct: Peer | None) -> None:
        utp = self.connection.utp
        before = self.kind
        started = time.perf_counter()
        utp.move_to(path)
        took = time.perf_counter() - started
        self.peer.direct, self.peer.relayed = direct, direct is None
        address = None
        if type(path) is not VirtualPath:
            self.connection.address = normalize_address(path)  # type: ignore[arg-type]
            address = format_host_port(*self.connection.address)
        move = PathMove(at=time.time(), from_path=before, to_path=self.kind, reason=reason,
                        address=address, via=None if self.via is None else str(self.via))
        self.move_count += 1
        self.moves.append(move)
        del self.moves[:-MOVES_KEPT]
        log.info("%s: path %s -> %s (%s)%s", self.connection.what, move.from_path, move.to_path, reason,
                 f" via relay {move.via}" if move.via else f" to {move.address}",
                 extra={"fields": {"event": "path_changed", "node_id": str(self.node_id), "from": before,
                                   "to": move.to_path, "reason": reason, "address": move.address,
                                   "via": move.via, "direction": self.connection.direction.value,
                                   "move_seconds": took}})
        self.paths.changed(self.connection, move)

    async def follow(self) -> None:
        """Until the connection ends: upgrade a relayed path, fall back from a silent
        direct one, follow a rebinding; each only on authenticated evidence. While
        relayed, the peer is kept alive by relayed authenticated pings."""
        async with trio.open_nursery() as nursery:
            if callable(getattr(self.paths.routes, "ping", None)):
                nursery.start_soon(self._keep_relayed_alive)
            await self._follow()
            nursery.cancel_scope.cancel()

    async def _keep_relayed_alive(self) -> None:
        """While the tunnel is relayed: an end-to-end authenticated PATH_PING every
        keep-alive interval; silent for the keep-alive timeout, the peer is dead."""
        peers = self.paths.peers.timers
        heard = trio.current_time()
        while True:
            if self.peer.relayed:
                try:
                    await self.paths.routes.ping(self.node_id, timeout=peers.keep_alive_interval * 2)  # type: ignore[union-attr]
                    heard = trio.current_time()
                    self.relay_rtt_at = heard
                except KeynodeError:
                    pass
                if trio.current_time() - heard > peers.keep_alive_timeout:
                    self.peer.die(ConnectionKeepAliveTimeout(
                        f"no relayed PATH_PONG from {self.node_id} in {peers.keep_alive_timeout:g} s"))
                    return
            else:
                heard = trio.current_time()
            await trio.sleep(peers.keep_alive_interval)

    def _stalled(self, now: float) -> bool:
        """Data outstanding and no acknowledgement for ``silent_after``: the path
        carries nothing back (the peer moved its half, or the path broke)."""
        conn = self.connection.utp.connection
        if not conn.unacked_packets:
            self._stall = None
            return False
        oldest = conn.oldest_unacked_seq
        if self._stall is None or self._stall[0] != oldest:
            self._stall = (oldest, now)
            return False
        return now - self._stall[1] > self.paths.timers.silent_after

    async def _follow(self) -> None:
        timers = self.paths.timers
        paths = self.paths
        # Evidence counts only from punch sessions started after this: a path
        # confirmed before the tunnel fell back from it proves nothing now.
        floor = -math.inf if self.peer.relayed else trio.current_time()
        async with AsyncExitStack() as held:  # the direct Peers this task took
            next_try = 0.0
            retry = timers.upgrade_retry
            punching: trio.Event | None = None
            while True:
                now = trio.current_time()
                if self.peer.relayed:
                    if paths.routes is None or paths.routes.path_to(self.node_id) is None:
                        self.peer.die(ConnectionKeepAliveTimeout(f"no relay route to {self.node_id} any more"))
                        return
                    confirmed = paths.confirmed(self.node_id, since=floor)
                    if confirmed is not None:
                        retry = timers.upgrade_retry
                        proven = await held.enter_async_context(paths.peers.use(confirmed))
                        self._move(confirmed, "direct path proven by authenticated ping/pong", proven)
                        floor = trio.current_time()
                        self._stall = None
                    elif punching is not None and punching.is_set():
                        punching = None  # failed (a success shows as confirmed above)
                        next_try = now + retry
                        retry = min(retry * 2, timers.upgrade_retry_max)
                    elif punching is None and now >= next_try:
                        punching = paths.start_punch(self.node_id, stale_before=floor)
                else:
                    direct = self.peer.direct
                    assert direct is not None
                    silent = direct.last_heard is None or now - direct.last_heard > timers.silent_after
                    stalled = self._stalled(now)
                    route = None if paths.routes is None else paths.routes.path_to(self.node_id)
                    if (silent or stalled or direct.died.is_set()) and route is not None:
                        self._move(route, "direct path silent" if silent else "direct path carries nothing back",
                                   None)
                        floor = now
                        next_try = now + timers.upgrade_retry
                        retry = timers.upgrade_retry
                        self._stall = None
                    elif direct.died.is_set():
                        self.peer.die(direct.death or ConnectionKeepAliveTimeout("peer died"))
                        return
                    else:
                        confirmed = paths.confirmed(self.node_id, since=floor)
                        current = normalize_address(self.current)  # type: ignore[arg-type]
                        if confirmed is not None and confirmed != current:
                            rebound = await held.enter_async_context(paths.peers.use(confirmed))
                            self._move(confirmed, "peer's authenticated pings from a new address", rebound)
                            floor = trio.current_time()
                            self._stall = None
                await trio.sleep(timers.check_interval)


class TunnelPaths:
    """The path decisions of one Proxy (see the module docstring)."""

    def __init__(self, peers: PeerRegistry, finder: PathFinder | None, routes: RelayRoutes | None,
                 address_book: Mapping[NodeId, tuple[str, int]], timers: PathTimers,
                 on_change: Callable[[Any, PathMove], None]) -> None:
        self.peers = peers
        self.finder = finder
        self.routes = routes
        self.address_book = address_book
        self.timers = timers
        self.on_change = on_change
        self._nursery: trio.Nursery | None = None
        self._punching: dict[NodeId, trio.Event] = {}
        self._results: dict[NodeId, tuple[Address | None, BaseException | None]] = {}
        self.fallbacks = 0  # CONNECTs that started over a relay because no punch succeeded in time

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            try:
                await trio.sleep_forever()
            finally:
                self._nursery = None

    def changed(self, connection: Any, move: PathMove) -> None:
        self.on_change(connection, move)

    def confirmed(self, node_id: NodeId, since: float = -math.inf) -> Address | None:
        """The direct path the rendezvous confirmed for ``node_id`` by this node's
        authenticated PING and the peer's PONG, in a punch session started at
        ``since`` or later (a lookup by either side makes both punch), if any."""
        core = getattr(self.finder, "core", None)
        if core is None:
            return None
        session = core.node.sessions.get(bytes(node_id))
        if session is None or session.confirmed is None or session.started < since:
            return None
        return normalize_address(session.confirmed)

    def start_punch(self, node_id: NodeId, stale_before: float = -math.inf) -> trio.Event:
        """A lookup and punch toward ``node_id`` in the background (one at a time per
        NodeId); set when it ended. A confirmed session started before
        ``stale_before`` (a path the tunnel fell back from) is dropped first, or the
        rendezvous would answer with it instead of punching again."""
        done = self._punching.get(node_id)
        if done is not None:
            return done
        core = getattr(self.finder, "core", None)
        if core is not None:
            session = core.node.sessions.get(bytes(node_id))
            if session is not None and session.started < stale_before:
                del core.node.sessions[bytes(node_id)]
        done = trio.Event()
        finder = self.finder
        if finder is None or self._nursery is None:  # no rendezvous: nothing to punch with
            done.set()
            return done
        self._punching[node_id] = done

        async def punch() -> None:
            try:
                self._results[node_id] = (normalize_address(await finder.find_path(node_id)), None)
            except KeynodeError as error:
                self._results[node_id] = (None, error)
            finally:
                del self._punching[node_id]
                done.set()

        self._nursery.start_soon(punch)
        return done

    async def route(self, node_id: NodeId, find: Callable[[NodeId], Any]) -> Address | VirtualPath:
        """Where a new tunnel to ``node_id`` starts: the address book's entry or a
        punched path (``find``, the Proxy's find_path), or, when no punch succeeded
        within ``punch_window`` and a relay route exists, the relay path."""
        if self.routes is None or node_id in self.address_book or self.finder is None or self._nursery is None:
            return normalize_address(await find(node_id))
        done = self.start_punch(node_id)
        with trio.move_on_after(self.timers.punch_window):
            await done.wait()
        if done.is_set():
            address, error = self._results.get(node_id, (None, None))
            if address is not None:
                return address
            if error is not None and not isinstance(error, NoDirectPath):
                raise error  # not registered anywhere, no relay answered: a relay cannot help
        route = self.routes.path_to(node_id)  # after the lookup, which told where its home relay is
        if route is None:
            await done.wait()
            address, error = self._results.get(node_id, (None, None))
            if address is not None:
                return address
            assert error is not None
            raise error
        self.fallbacks += 1
        log.info("no direct path to %s within %g s: starting over relay %s", node_id,
                 self.timers.punch_window, relay_of(route))
        return route

    def track(self, connection: Any, node_id: NodeId, peer: PathPeer, spawn: Callable[..., None]) -> TunnelPath:
        """Follow ``connection``'s path from now on (its task runs in the connection nursery)."""
        tracked = TunnelPath(self, connection, node_id, peer)

        async def follow() -> None:
            with trio.CancelScope() as scope:
                connection.path_scope = scope
                await tracked.follow()

        spawn(follow)
        return tracked
