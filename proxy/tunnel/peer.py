"""Per-remote-peer state: hole punching, keep-alive and liveness, over out-of-band messages.

A *peer* is a remote proxy address (host, port). Every connection to or from that
address shares one ``Peer``: it sends a PING every ``conn_punch_interval_time``
until the peer is heard (any message from it), then every
``conn_keep_alive_interval_time``; any message from the peer resets the keep-alive
timer; after ``conn_keep_alive_timeout_time`` of silence the peer is declared dead
and every connection using it ends with ConnectionKeepAliveTimeout (HTTP 524).

The ``PeerRegistry`` owns the single subscription to the endpoint's messages,
answers every PING with a PONG (that is how the other side learns the path is
open) and hands each message to the peer it came from.

Readiness: the original forward side waited for a PING from the target and the
reverse side for a PONG. Here both wait for *any* message from the peer: either
proves a datagram from the peer reached us after ours reached it, which is what
punching needs, and a peer shared with an older connection is already heard.

Strangers: a peer first used by an unannounced incoming connection is *quiet*
(``use(address, quiet=True)``): its source address may be spoofed, so nothing is
sent to it on our own (PINGs are still answered, one PONG each) until the
connection ``prove()``s that the peer receives what we send (its first uTP data
acknowledged our SYN-ACK). A local request (``use`` without ``quiet``) proves it.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Protocol

import trio

from nat.message import PING, PONG
from proxy.tunnel.errors import ConnectionKeepAliveTimeout, ProxyNotRunning
from proxy.tunnel.hosts import format_host_port

log = logging.getLogger(__name__)

Address = tuple[str, int]


def normalize_address(address: tuple[Any, ...]) -> Address:
    """(host, port[, flow, scope]) from any socket API -> canonical (host, port).

    IPv4-mapped IPv6 addresses (from a dual-stack socket) become plain IPv4, so one
    peer has one key whatever socket family saw it.
    """
    host, port = address[0], int(address[1])
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host, port
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return str(ip), port


class MessageEndpoint(Protocol):
    """The part of nat.Endpoint that peers use."""

    def send_message(self, message: int | bytes, address: tuple[Any, ...]) -> None: ...

    def subscribe_messages(self) -> Any: ...


class Liveness(Protocol):
    """What a connection watches of its peer: a Peer, or a paths.PathPeer."""

    @property
    def died(self) -> trio.Event: ...

    @property
    def death(self) -> BaseException | None: ...


@dataclass(frozen=True)
class PeerTimers:
    punch_interval: float = 0.05
    keep_alive_interval: float = 1.0
    keep_alive_timeout: float = 20.0


class Peer:
    """Punch and keep-alive state of one remote proxy address."""

    def __init__(
        self, endpoint: MessageEndpoint, address: Address, timers: PeerTimers, *, quiet: bool = False
    ) -> None:
        self.endpoint = endpoint
        self.address = address
        self.timers = timers
        self.heard = trio.Event()
        self.died = trio.Event()
        self.death: ConnectionKeepAliveTimeout | None = None
        self.last_heard: float | None = None
        self.pings_sent = 0
        self.messages_received = 0
        self._wakeup = trio.Event()
        self._users = 0
        self._pinged_at_start = False
        # Set when we may send to the peer on our own: at once unless quiet.
        self.proven = trio.Event()
        if not quiet:
            self.proven.set()

    def prove(self) -> None:
        """The peer showed it receives what we send: punch and keep alive from now on."""
        if not self.proven.is_set():
            self.proven.set()

    def message_received(self, message: int) -> None:
        self.messages_received += 1
        self.last_heard = trio.current_time()
        if not self.heard.is_set():
            self.heard.set()
            self._wakeup.set()  # switch from punch to keep-alive pacing now

    async def wait_heard(self) -> None:
        """Return once the peer has been heard; raise if it died first."""
        if self.death is not None:
            raise self.death
        if self.heard.is_set():
            # The common case on the forward side (its punch was answered during
            # the handshake): no watcher task and nursery to set up and tear down.
            await trio.lowlevel.checkpoint()
            return
        async with trio.open_nursery() as nursery:

            async def watch_death() -> None:
                await self.died.wait()
                nursery.cancel_scope.cancel()

            nursery.start_soon(watch_death)
            await self.heard.wait()
            nursery.cancel_scope.cancel()
        if self.death is not None:
            raise self.death

    def _send_ping(self) -> None:
        self.pings_sent += 1
        try:
            self.endpoint.send_message(PING, self.address)
        except OSError as error:  # unreachable right now: punching keeps trying
            log.debug("ping to %s failed: %s", format_host_port(*self.address), error)

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        await self.proven.wait()  # a quiet peer: nothing is sent before it proved it receives
        timers = self.timers
        while True:
            now = trio.current_time()
            # The deadline is computed once and compared, and the sleep ends at it:
            # with "now - last_heard >= timeout" and a sleep of "last_heard + timeout
            # - now", float rounding could leave now one ulp short with nothing left
            # to sleep, and the loop spun (forever on a frozen clock).
            death_at = None if self.last_heard is None else self.last_heard + timers.keep_alive_timeout
            if death_at is not None and now >= death_at:
                self.death = ConnectionKeepAliveTimeout(
                    f"no message from {format_host_port(*self.address)} in {timers.keep_alive_timeout}s"
                )
                self.died.set()
                return
            if self._pinged_at_start:
                self._pinged_at_start = False  # the registry sent the first one
            else:
                self._send_ping()
            if death_at is not None and self.heard.is_set():
                wake_at = min(now + timers.keep_alive_interval, death_at)
            else:
                wake_at = now + timers.punch_interval
            self._wakeup = trio.Event()
            with trio.move_on_at(wake_at):
                await self._wakeup.wait()


class PeerRegistry:
    """All peers of one endpoint, created on first use and dropped with their last user."""

    def __init__(self, endpoint: MessageEndpoint, timers: PeerTimers) -> None:
        self.endpoint = endpoint
        self.timers = timers
        self._peers: dict[Address, Peer] = {}
        self._scopes: dict[Peer, trio.CancelScope] = {}
        self._nursery: trio.Nursery | None = None
        self.pongs_sent = 0

    def get(self, address: tuple[Any, ...]) -> Peer | None:
        return self._peers.get(normalize_address(address))

    def __len__(self) -> int:
        return len(self._peers)

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Receive messages until cancelled; peers run in this task's nursery."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            try:
                with self.endpoint.subscribe_messages() as messages:
                    task_status.started()
                    async for message, address in messages:
                        self._dispatch(message, address)
            finally:
                self._nursery = None
                nursery.cancel_scope.cancel()

    def _dispatch(self, message: int, address: tuple[Any, ...]) -> None:
        if message == PING:
            self.pongs_sent += 1
            try:
                self.endpoint.send_message(PONG, address)
            except OSError as error:
                log.debug("pong to %s failed: %s", format_host_port(address[0], address[1]), error)
        peer = self._peers.get(normalize_address(address))
        if peer is not None:
            peer.message_received(message)

    @asynccontextmanager
    async def use(self, address: tuple[Any, ...], *, quiet: bool = False) -> AsyncIterator[Peer]:
        """The live Peer for ``address`` while the block runs (started if needed).

        ``quiet``: for an unannounced incoming connection; a new Peer sends
        nothing until proven (see the module docstring). Without it, the use is a
        local request and proves the peer.
        """
        key = normalize_address(address)
        peer = self._peers.get(key)
        if peer is not None and not peer.died.is_set():
            if not quiet:
                peer.prove()
        else:
            if self._nursery is None:
                raise ProxyNotRunning("peer registry is not running")
            peer = Peer(self.endpoint, key, self.timers, quiet=quiet)
            self._peers[key] = peer
            if not quiet:
                # The first PING leaves now, ahead of the uTP SYN the caller is about
                # to send, not when the peer's task first runs: the answer (which
                # wait_heard needs) comes back one scheduler pass or more sooner.
                peer._send_ping()
                peer._pinged_at_start = True
            scope = trio.CancelScope()
            self._scopes[peer] = scope
            self._nursery.start_soon(self._run_peer, peer, scope)
        peer._users += 1
        try:
            yield peer
        finally:
            peer._users -= 1
            if peer._users == 0:
                self._drop(peer)

    async def _run_peer(self, peer: Peer, scope: trio.CancelScope) -> None:
        with scope:
            await peer.run()
        if peer.died.is_set() and self._peers.get(peer.address) is peer:
            # A dead peer stays visible to its users but new users get a fresh one.
            del self._peers[peer.address]

    def _drop(self, peer: Peer) -> None:
        scope = self._scopes.pop(peer, None)
        if scope is not None:
            scope.cancel()
        if self._peers.get(peer.address) is peer:
            del self._peers[peer.address]
