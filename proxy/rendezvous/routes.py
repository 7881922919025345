"""A node's relayed paths: ``RelayRoutes`` (one per node, owned by its
RendezvousService as ``service.routes``; thin, runs in the service's nursery).

A peer reached through relay node R is the virtual path
``VirtualPath(("relay", R, peer))`` of the node's endpoint (``relay_path``): the
endpoint's datagrams on it go to R as RELAY_SEND(peer, datagram) over the UDP
socket (relay_udp.py) when this node is registered with R over UDP, else over its
TCP + mutual TLS link to R (proxy.relay.RelayLink). What R delivers from ``peer``
(RELAY_RECV over UDP, RECV over TCP) is injected with ``receive_from_path`` as
arriving over that path, so uTP and its TLS run end to end and a connection can
move between this path and a direct one (``UtpStream.move_to``).

Which relay for a peer (``relay_for``), first that applies: the relay its last
relayed datagram came through; its home relay (the first ``relay:`` entry of its
signed record from a lookup, or of its ``[peers]`` list); the relay that found it
in a lookup; this node's own home relay. A relay this node is not registered with
(the peer's home elsewhere) is registered with on demand; datagrams sent before
that registration completes are dropped at the relay (uTP resends).

TCP fallback: when ``tcp_fallback_after`` seconds pass without any UDP
registration and relays offer a TCP port (``:tcp=<port>`` in ``[relay] servers``),
a RelayLink is kept to each of them (once started, a link stays: the relay then
forwards to this node over it, whatever its UDP does).

Liveness: ``ping(peer)`` sends an end-to-end authenticated PATH_PING (sealed for the
peer, so the relay can neither read nor forge it) over the relayed path and
returns the RTT of the authenticated PATH_PONG. ``on_path_event`` sees a
``RelayPathEvent`` when a relayed path appears (the first datagram from a peer
through a relay, e.g. a SYN) or goes (the relay says the peer left).
"""

from __future__ import annotations

import ipaddress
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import trio

from nat.message import is_keyed_message
from nat.utp.paths import VirtualPath
from proxy.identity.node_id import NODE_ID_SIZE, NodeId
from proxy.relay.link import RelayAddress as LinkAddress
from proxy.relay.link import RelayLink
from proxy.rendezvous.addresses import RelayAddress, record_from_bytes
from proxy.rendezvous.core import Rendezvous
from proxy.rendezvous.errors import MessageRejected, NoRelayRoute, RecordInvalid, RelayPingTimeout
from proxy.rendezvous.keys import KeyRing
from proxy.rendezvous.messages import Address
from proxy.rendezvous.relay_udp import (
    GONE_NOT_REGISTERED,
    PATH_PING,
    PATH_PONG,
    RELAY_GONE,
    RELAY_MAX_MESSAGE,
    RELAY_RECV,
    RELAY_SEND,
    TXID_SIZE,
    relay_opener,
    seal_relay,
)
from proxy.rendezvous.wire import Opener


class RouteHost(Protocol):
    """What RelayRoutes uses of its RendezvousService (driver.py)."""

    endpoint: Any
    keyring: KeyRing
    core: Rendezvous | None
    relays: tuple[RelayAddress, ...]
    wall_offset: float

    def home_relays_of(self, peer: bytes) -> tuple[bytes, ...]: ...

    def receive_keyed(self, data: bytes, address: tuple[Any, ...]) -> None: ...

    def wake(self) -> None: ...

__all__ = ["RelayPathEvent", "RelayRoutes", "relay_path"]

log = logging.getLogger("keynode.relay")

MAX_PATHS = 4096  # relayed paths (relay, peer) at once; past it new sources are dropped
APPEARED, GONE = "appeared", "gone"


def relay_path(relay: NodeId, peer: NodeId) -> VirtualPath:
    return VirtualPath(("relay", relay, peer))


@dataclass(frozen=True)
class RelayPathEvent:
    kind: str  # "appeared" (first datagram from peer through relay) or "gone" (the relay says peer left)
    peer: NodeId
    relay: NodeId
    path: VirtualPath


class RelayRoutes:
    """Relayed paths of one node's endpoint; see the module docstring."""

    def __init__(self, service: RouteHost, *, tcp_fallback_after: float = 3.0) -> None:
        self.service = service
        self.endpoint = service.endpoint
        self.tcp_fallback_after = tcp_fallback_after
        self.tls_config: Any = None  # set by configure_relay: links over TCP need the node's TLS identity
        # True: relay over the TCP link whenever the relay offers one, UDP or not (the
        # link batches datagrams: several times the throughput at a tenth of the
        # relay's CPU per byte, measured on loopback); False: TCP only when UDP fails.
        self.prefer_tcp = False
        self.on_path_event: Callable[[RelayPathEvent], None] | None = None
        self.links: dict[bytes, RelayLink] = {}
        self.counters = {"received": 0, "delivered": 0, "not_from_relay": 0, "unexpected_type": 0, "sent": 0,
                         "send_failed": 0, "pings_sent": 0, "pings_answered": 0, "pongs": 0, "forged_path_messages": 0,
                         "dropped_sources": 0, "gone": 0, "registered_again": 0}
        self._opener = relay_opener(service.keyring)  # messages from relays
        self._path_opener = Opener(service.keyring, max_size=RELAY_MAX_MESSAGE)  # end to end, from peers
        self._paths: dict[tuple[bytes, bytes], VirtualPath] = {}
        self._node_ids: dict[bytes, NodeId] = {}
        self._came_via: dict[bytes, bytes] = {}  # peer -> relay its last relayed datagram came through
        self._peer_home: dict[bytes, RelayAddress] = {}  # peer -> its home relay (signed record)
        self._found_via: dict[bytes, bytes] = {}  # peer -> relay that found it in a lookup
        self._pings: dict[bytes, tuple[trio.Event, float, list[float]]] = {}
        self._nursery: trio.Nursery | None = None
        # Relayed datagrams wait here until the socket's batch is read, then go to the
        # endpoint as one batch per path: one uTP service (and its delayed ACKs) per
        # batch, not per datagram.
        self._pending: dict[VirtualPath, list[bytes]] = {}
        self._pending_event = trio.Event()

    # --- the interface for the tunnel -------------------------------------------------

    @property
    def home_relay(self) -> NodeId | None:
        """This node's home relay: the lowest-RTT UDP registration (with hysteresis),
        else the first relay its TCP link registered with."""
        core = self.service.core
        if core is not None and core.node.home is not None:
            return self._node_id(core.node.home)
        for relay, link in self.links.items():
            if link.registered:
                return self._node_id(relay)
        return None

    def relay_for(self, peer: NodeId) -> NodeId | None:
        """The relay node to reach ``peer`` through (see the module docstring)."""
        key = bytes(peer)
        relay = self._came_via.get(key)
        if relay is None:
            home = self._peer_home.get(key)
            if home is not None:
                relay = bytes(home.node_id)
        if relay is None:
            named = self.service.home_relays_of(key)
            if named:
                relay = named[0]
        if relay is None:
            relay = self._found_via.get(key)
        if relay is None:
            home_relay = self.home_relay
            return home_relay
        return self._node_id(relay)

    def path_to(self, peer: NodeId) -> VirtualPath | None:
        """The relayed path to ``peer`` (added to the endpoint), through
        ``relay_for(peer)``; None when no relay is known for it."""
        relay = self.relay_for(peer)
        if relay is None:
            return None
        self._ensure_registered(bytes(relay))
        return self._path(bytes(relay), bytes(peer))

    def send(self, peer: NodeId, datagram: bytes) -> bool:
        """One datagram to ``peer`` through ``relay_for(peer)`` (what the path's sender
        does); False when no relay is known."""
        relay = self.relay_for(peer)
        if relay is None:
            return False
        self._send(bytes(relay), bytes(peer), datagram)
        return True

    def route_ready(self, peer: NodeId) -> bool:
        """Whether this node is registered (UDP or TCP) with the relay for ``peer``."""
        relay = self.relay_for(peer)
        return relay is not None and self._usable(bytes(relay))

    async def ping(self, peer: NodeId, timeout: float = 2.0) -> float:
        """The RTT (s) of an end-to-end authenticated PATH_PING over the relayed path
        to ``peer``; NoRelayRoute, RelayPingTimeout."""
        path = self.path_to(peer)
        if path is None:
            raise NoRelayRoute(f"no relay node known to reach {peer}")
        relay, key = bytes(self.relay_for(peer) or b""), bytes(peer)
        txid = os.urandom(TXID_SIZE)
        event, result = trio.Event(), list[float]()
        self._pings[txid] = (event, trio.current_time(), result)
        try:
            self.counters["pings_sent"] += 1
            self._send(relay, key, seal_relay(self.service.keyring, key, PATH_PING, txid, _wall_ms()))
            with trio.move_on_after(timeout):
                await event.wait()
        finally:
            self._pings.pop(txid, None)
        if not result:
            raise RelayPingTimeout(f"no authenticated answer from {peer} through relay {NodeId(relay)} in {timeout:g} s")
        rtt: float = result[0]
        return rtt

    def learn(self, peer: bytes, record: bytes, found_via: bytes = b"") -> None:
        """What a lookup told about ``peer``: its signed record (home relay) and the relay
        that found it."""
        if found_via:
            self._found_via[peer] = found_via
            _bound(self._found_via)
        if record:
            try:
                parsed = record_from_bytes(record)
            except RecordInvalid:
                return
            if bytes(parsed.node_id) != peer:
                return
            for address in parsed.understood():
                if isinstance(address, RelayAddress):
                    self._peer_home[peer] = address
                    _bound(self._peer_home)
                    break

    def paths(self) -> list[VirtualPath]:
        return list(self._paths.values())

    def status(self) -> dict[str, object]:
        home = self.home_relay
        return {"home_relay": None if home is None else str(home), "paths": len(self._paths),
                "links": {str(self._node_id(relay)): link.status() for relay, link in self.links.items()},
                **self.counters, "path_messages_dropped": dict(self._path_opener.dropped)}

    # --- sending ----------------------------------------------------------------------

    def _path(self, relay: bytes, peer: bytes) -> VirtualPath:
        path = self._paths.get((relay, peer))
        if path is None:
            path = VirtualPath(("relay", self._node_id(relay), self._node_id(peer)))
            self._paths[(relay, peer)] = path
            self.endpoint.add_path(path, self._sender(relay, peer))
        return path

    def _sender(self, relay: bytes, peer: bytes) -> Callable[[bytes], None]:
        def send_over_relay(datagram: bytes) -> None:
            self._send(relay, peer, datagram)

        return send_over_relay

    def _send(self, relay: bytes, peer: bytes, datagram: bytes) -> None:
        """One datagram for ``peer`` through ``relay``: over UDP when registered there,
        else over the TCP link; never blocks (a drop is counted)."""
        core = self.service.core
        state = None if core is None else core.node.relays.get(relay)
        link = self.links.get(relay)
        if link is not None and link.registered and (self.prefer_tcp or state is None or not state.registered):
            if link.send(self._node_id(peer), datagram):
                self.counters["sent"] += 1
            else:
                self.counters["send_failed"] += 1
        elif state is not None:
            data = seal_relay(self.service.keyring, relay, RELAY_SEND, peer + datagram, _wall_ms())
            self.endpoint.send_message(data, state.address)
            self.counters["sent"] += 1
        else:
            self.counters["send_failed"] += 1

    def _usable(self, relay: bytes) -> bool:
        core = self.service.core
        state = None if core is None else core.node.relays.get(relay)
        link = self.links.get(relay)
        return (state is not None and state.registered) or (link is not None and link.registered)

    def _ensure_registered(self, relay: bytes) -> None:
        """Register on demand with a peer's home relay this node does not use yet."""
        core = self.service.core
        if core is None:
            return
        state = core.node.relays.get(relay)
        if state is not None and state.registers:
            return
        home = next((address for address in self._peer_home.values() if bytes(address.node_id) == relay), None)
        if state is not None:
            address: Address = state.address
        elif home is not None and _is_ip(home.host):
            address = (home.host, home.port)
        else:
            return  # a relay named by host name only: only [peers] entries (resolved at start) reach it
        core.node.register_with(relay, address, trio.current_time())
        self.service.wake()
        if home is not None and home.tcp_port is not None and (self.prefer_tcp or self._tcp_needed()):
            self._start_link(RelayAddress(home.node_id, home.host, home.port, home.tcp_port))

    # --- receiving ----------------------------------------------------------------------

    def receive(self, data: bytes, source: Address, now: float) -> None:
        """A keyed message of types 16..31 from the UDP socket (not RELAY_SEND)."""
        self.counters["received"] += 1
        opener = self.opener
        try:
            opened = opener.open(data, int((now + self.service.wall_offset) * 1000), source[0], now)
        except MessageRejected:
            return
        relay = bytes(opened.sender)
        core = self.service.core
        if core is None or relay not in core.node.relays:
            self.counters["not_from_relay"] += 1
            return
        body = opened.body
        if opened.message_type == RELAY_RECV and len(body) > NODE_ID_SIZE:
            self._deliver(relay, body[:NODE_ID_SIZE], body[NODE_ID_SIZE:])
        elif opened.message_type == RELAY_GONE and len(body) == NODE_ID_SIZE + 1:
            if body[:NODE_ID_SIZE] == self.service.keyring.node_id_bytes and body[NODE_ID_SIZE] == GONE_NOT_REGISTERED:
                self._register_again(relay, now)
            else:
                self._gone(relay, body[:NODE_ID_SIZE])
        else:
            self.counters["unexpected_type"] += 1

    def _receive_link(self, relay: bytes, batch: list[tuple[NodeId, bytes]]) -> None:
        for source, datagram in batch:
            self._deliver(relay, bytes(source), datagram)
        self._flush_pending()  # a link delivers a whole read at once already

    def _flush_pending(self) -> None:
        pending, self._pending = self._pending, {}
        receive = self.endpoint.receive_batch_from_path
        for path, datagrams in pending.items():
            receive(datagrams, path)

    async def _deliver_pending(self) -> None:
        while True:
            await self._pending_event.wait()
            self._pending_event = trio.Event()
            self._flush_pending()

    def _deliver(self, relay: bytes, source: bytes, datagram: bytes) -> None:
        path = self._paths.get((relay, source))
        if path is None:
            if len(self._paths) >= MAX_PATHS:
                self.counters["dropped_sources"] += 1
                return
            path = self._path(relay, source)
            self._event(APPEARED, relay, source, path)
        if self._came_via.get(source) != relay:
            self._came_via[source] = relay
            _bound(self._came_via)
        self.counters["delivered"] += 1
        if is_keyed_message(datagram):
            self._path_message(relay, source, datagram)
            return
        pending = self._pending.get(path)
        if pending is None:
            self._pending[path] = [datagram]
            self._pending_event.set()
        else:
            pending.append(datagram)

    def _path_message(self, relay: bytes, source: bytes, datagram: bytes) -> None:
        now = trio.current_time()
        try:
            opened = self._path_opener.open(datagram, _wall_ms(), "relay", now)
        except MessageRejected:
            return
        if bytes(opened.sender) != source:  # sealed by someone other than the relay's tag says
            self.counters["forged_path_messages"] += 1
            return
        if opened.message_type == PATH_PING and len(opened.body) == TXID_SIZE:
            self.counters["pings_answered"] += 1
            self._send(relay, source, seal_relay(self.service.keyring, source, PATH_PONG, opened.body, _wall_ms()))
        elif opened.message_type == PATH_PONG and len(opened.body) == TXID_SIZE:
            waiting = self._pings.get(opened.body)
            if waiting is not None and not waiting[0].is_set():
                self.counters["pongs"] += 1
                waiting[2].append(now - waiting[1])
                waiting[0].set()
        else:
            self.counters["unexpected_type"] += 1

    def _register_again(self, relay: bytes, now: float) -> None:
        """The relay does not know this node (it restarted, or the registration
        lapsed): register now rather than at the next refresh."""
        core = self.service.core
        state = None if core is None else core.node.relays.get(relay)
        if state is None or not state.registers or state.next_register <= now:
            return
        self.counters["registered_again"] += 1
        state.next_register = now
        self.service.wake()

    def _gone(self, relay: bytes, peer: bytes) -> None:
        self.counters["gone"] += 1
        path = self._paths.get((relay, peer))
        if self._came_via.get(peer) == relay:
            del self._came_via[peer]
        if path is not None:
            self._event(GONE, relay, peer, path)

    def _event(self, kind: str, relay: bytes, peer: bytes, path: VirtualPath) -> None:
        callback = self.on_path_event
        if callback is None:
            return
        try:
            callback(RelayPathEvent(kind, self._node_id(peer), self._node_id(relay), path))
        except Exception:
            log.exception("relay routes: a path event callback failed")

    # --- TCP links -------------------------------------------------------------------------

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Start TCP links when UDP registration gets no answer; until cancelled."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._deliver_pending)
            task_status.started()
            started = trio.current_time()
            while True:
                await trio.sleep(0.25)
                if self.tls_config is not None and (self.prefer_tcp or (
                        trio.current_time() - started >= self.tcp_fallback_after and self._tcp_needed())):
                    for relay in self.service.relays:
                        if relay.tcp_port is not None and relay.node_id != self.service.keyring.node_id:
                            self._start_link(relay)

    def _tcp_needed(self) -> bool:
        core = self.service.core
        if self.tls_config is None or core is None:
            return False
        return not any(state.registered for state in core.node.relays.values() if state.own)

    def send_over_link(self, message: bytes, address: Address) -> bool:
        """A rendezvous message for the relay at ``address`` over its TCP link, when this
        node is linked to it and not registered over UDP (else False: send it by UDP)."""
        core = self.service.core
        if core is None or not self.links:
            return False
        for relay, state in core.node.relays.items():
            if state.address == address and not state.registered:
                link = self.links.get(relay)
                return link is not None and link.send_keyed(message)
        return False

    def _receive_keyed(self, relay: bytes, message: bytes) -> None:
        core = self.service.core
        state = None if core is None else core.node.relays.get(relay)
        if state is not None:  # as if it came from the relay's UDP address: the core checks the box
            self.service.receive_keyed(message, state.address)

    def _start_link(self, relay: RelayAddress) -> None:
        key = bytes(relay.node_id)
        if key in self.links or self._nursery is None or relay.tcp_port is None:
            return
        link = RelayLink(self.tls_config, LinkAddress(relay.node_id, relay.host, relay.tcp_port),
                         on_receive_batch=lambda batch: self._receive_link(key, batch),
                         on_peer_gone=lambda peer, reason: self._gone(key, bytes(peer)),
                         on_keyed=lambda message: self._receive_keyed(key, message))
        self.links[key] = link
        log.info("no UDP registration with any relay node: relaying over TCP to %s@%s:%d",
                 relay.node_id, relay.host, relay.tcp_port)
        self._nursery.start_soon(link.run)

    # --- helpers ------------------------------------------------------------------------------

    @property
    def opener(self) -> Opener:
        """The opener of messages from relays, sharing the rendezvous core's drop counters."""
        core = self.service.core
        opener = self._opener
        if opener.keyring is not self.service.keyring or (core is not None and opener.dropped is not core.dropped):
            keyring = self.service.keyring  # a new key (`keynode rotate`), or the core started
            self._opener = opener = relay_opener(keyring, None if core is None else core.dropped)
            self._path_opener = Opener(keyring, max_size=RELAY_MAX_MESSAGE)
        return opener

    def _node_id(self, key: bytes) -> NodeId:
        node_id = self._node_ids.get(key)
        if node_id is None:
            if len(self._node_ids) >= MAX_PATHS:
                self._node_ids.clear()
            node_id = self._node_ids[key] = NodeId(key)
        return node_id


def _wall_ms() -> int:
    return int(time.time() * 1000)


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _bound(table: dict[bytes, Any], limit: int = MAX_PATHS) -> None:
    while len(table) > limit:
        del table[next(iter(table))]
