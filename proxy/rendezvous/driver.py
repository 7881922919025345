"""The trio driver of a node's rendezvous (core.py) on the endpoint's UDP socket.

It also owns the node's relayed paths (``routes``, a RelayRoutes: routes.py) and,
on a relay node, the relay's forwarding (``relay_core``, proxy.relay's RelayCore,
fed over UDP by ``relay_front`` (relay_udp.py) and, after ``configure_relay`` with
a TCP port, over TCP + mutual TLS by ``relay_server``). Keyed messages of types
16..31 go to those; the rest to the rendezvous core.

It sets the endpoint's ``on_keyed_message`` (the endpoint calls it synchronously
for each keyed message), sends what the core queues with ``send_message``, runs
the core's timers in one task, and turns the core's events into wake-ups of the
tasks waiting in ``find_path``. Relay hosts are resolved once at start. The LAN
address reported to relays is the local address the kernel picks toward each
relay, with the endpoint's port.
"""

from __future__ import annotations

import ipaddress
import logging
import math
import socket as stdlib_socket
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import trio

from nat.errors import EndpointClosed
from proxy.identity.node_id import NodeId
from proxy.relay.forwarding import RelayCore
from proxy.relay.limits import RelayLimits
from proxy.relay.serve import RelayServer, serve_relay
from proxy.rendezvous.addresses import (
    AddressRecord,
    RelayAddress,
    SequenceClock,
    UtpAddress,
    format_keynode_addresses,
    sign_record,
)
from proxy.rendezvous.core import Rendezvous
from proxy.rendezvous.errors import NodeNotFound, NoDirectPath, RendezvousError, RendezvousUnavailable
from proxy.rendezvous.keys import KeyRing
from proxy.rendezvous.messages import LOOKUP, MAX_RECORD, Address
from proxy.rendezvous.node import (
    HomeChanged,
    Introduced,
    LookupDone,
    ObservedAddress,
    PathConfirmed,
    PunchFailed,
    RendezvousTimers,
)
from proxy.rendezvous.relay_udp import MAX_RELAY_TYPE, MIN_RELAY_TYPE, RELAY_SEND, UdpRelayFront
from proxy.rendezvous.routes import RelayRoutes

log = logging.getLogger("keynode.rendezvous")


def _format(address: Address) -> str:
    return f"[{address[0]}]:{address[1]}" if ":" in address[0] else f"{address[0]}:{address[1]}"


def _plain(address: tuple[Any, ...]) -> Address:
    host = str(address[0])
    if host.startswith("::ffff:") and "." in host:
        host = host[7:]
    return host, int(address[1])


@dataclass
class _Waiter:
    event: trio.Event = field(default_factory=trio.Event)
    result: Any = None


class RendezvousService:
    """Rendezvous on one endpoint: register with relays (and serve as one)."""

    def __init__(self, endpoint: Any, keyring: KeyRing, relays: Iterable[RelayAddress] = (), *,
                 serve: bool = False, home_relays: Mapping[NodeId, tuple[RelayAddress, ...]] | None = None,
                 timers: RendezvousTimers | None = None) -> None:
        self.endpoint = endpoint
        self.keyring = keyring
        self.relays = tuple(relays)
        self.serve = serve
        self.timers = timers or RendezvousTimers()
        self.core: Rendezvous | None = None
        self._wakeup = trio.Event()
        self._lookups: dict[bytes, list[_Waiter]] = {}
        self._paths: dict[bytes, list[_Waiter]] = {}
        self._sequence = SequenceClock()
        self._relay_names: dict[bytes, RelayAddress] = {relay.node_id.__bytes__(): relay for relay in self.relays}
        # A peer's home relays (from its address list or record in [peers]): asked for it.
        self.home_relays = dict(home_relays or {})
        self._home: dict[bytes, tuple[bytes, ...]] = {}
        self.send_failures = 0
        self._resolved: tuple[tuple[bytes, Address], ...] = ()
        self._lan: tuple[Address, ...] = ()
        self.wall_offset = 0.0  # wall clock - trio clock, set by run
        self.routes = RelayRoutes(self)
        self.relay_core: RelayCore | None = RelayCore() if serve else None
        self.relay_front: UdpRelayFront | None = None
        self.relay_server: RelayServer | None = None
        self._nursery: trio.Nursery | None = None
        self._relay_pending = trio.Event()

    # --- what the node knows ------------------------------------------------------

    def observed_addresses(self) -> list[dict[str, str]]:
        if self.core is None:
            return []
        return [{"address": _format(address), "relay": str(NodeId(relay))}
                for relay, address in self.core.node.observed_addresses()]

    def nat_mapping(self) -> str:
        return "unknown" if self.core is None else self.core.node.nat_mapping()

    def address_record(self, above: int = 0) -> AddressRecord:
        """This node's current address list, signed, with a new (higher) sequence number
        (above ``above`` too: the last one an earlier run gave, say)."""
        self._sequence.advance_past(above)
        alternatives: list[UtpAddress | RelayAddress] = []
        if self.core is not None:
            for _, (host, port) in self.core.node.observed_addresses():
                if UtpAddress(host, port) not in alternatives:
                    alternatives.append(UtpAddress(host, port))
        local = self.endpoint.address
        if not alternatives and not ipaddress.ip_address(_plain(local)[0]).is_unspecified:
            alternatives.append(UtpAddress(*_plain(local)))
        # The home relay first: a caller reaches this node through it (routes.py); never itself.
        home = None if self.core is None else self.core.node.home
        others = [relay for relay in self.relays if relay.node_id != self.keyring.node_id]
        alternatives.extend([relay for relay in others if bytes(relay.node_id) == home]
                            + [relay for relay in others if bytes(relay.node_id) != home])
        if not alternatives:
            raise RendezvousUnavailable("no address known yet: no relay has answered and the socket is a wildcard")
        return sign_record(self.keyring.signing_key, self._sequence.next(),
                           format_keynode_addresses(tuple(alternatives)))

    @property
    def counters(self) -> dict[str, Any]:
        if self.core is None:
            return {}
        forwarding: dict[str, Any] = {}
        if self.relay_core is not None and self.relay_front is not None:
            stats = self.relay_core.stats
            forwarding = {"forwarding": {
                "clients": self.relay_core.client_count, "udp_clients": len(self.relay_front.clients),
                "datagrams_forwarded": stats.frames_forwarded, "bytes_forwarded": stats.bytes_forwarded,
                "drops": dict(stats.drops), "udp": dict(self.relay_front.counters),
                "tcp": None if self.relay_server is None else self.relay_server.status()}}
        return {**self.core.counters, "dropped": dict(self.core.dropped), **self.core.node.counters,
                **({} if self.core.relay is None else {"relay": dict(self.core.relay.counters),
                                                       "registrations": len(self.core.relay.registrations)}),
                **forwarding, "relay_routes": self.routes.status()}

    def home_relays_of(self, peer: bytes) -> tuple[bytes, ...]:
        """The relays named for ``peer`` by its [peers] list or record (resolved at start)."""
        return self._home.get(peer, ())

    def wake(self) -> None:
        """Run the core's timers now (something was queued outside a message)."""
        self._wakeup.set()

    # --- running --------------------------------------------------------------------

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        relays = []
        for relay in self.relays:
            if relay.node_id == self.keyring.node_id:
                continue  # a relay node listing itself (one config for all): nothing to register
            try:
                address = await self._resolve(relay.host, relay.port)
            except OSError as error:
                log.warning("relay node %s@%s:%d not resolved: %s", relay.node_id, relay.host, relay.port, error)
                continue
            relays.append((bytes(relay.node_id), address))
        self._resolved = tuple(relays)
        self._lan = self._lan_addresses([address for _, address in relays])
        home: list[tuple[bytes, bytes, Address]] = []
        for peer, peer_relays in self.home_relays.items():
            for relay in peer_relays:
                try:
                    home.append((bytes(peer), bytes(relay.node_id), await self._resolve(relay.host, relay.port)))
                except OSError as error:
                    log.warning("home relay %s of %s not resolved: %s", relay.host, peer, error)
        now = trio.current_time()
        self.wall_offset = time.time() - now
        self.core = Rendezvous(self.keyring, self._resolved, serve=self.serve, lan=self._lan,
                               wall_offset=self.wall_offset, timers=self.timers)
        self._attach_relay()
        for peer_id, relay_id, address in home:
            self.core.node.add_relay(relay_id, address)
            self._home[peer_id] = (*self._home.get(peer_id, ()), relay_id)
        self.endpoint.on_keyed_message = self.receive_keyed
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                await nursery.start(self.routes.run)
                if self.relay_front is not None:
                    nursery.start_soon(self._flush_relay_soon)
                task_status.started()
                while True:
                    deadline = self.core.next_deadline()
                    if self.relay_front is not None:
                        deadline = min(deadline, now + 5.0)  # expire UDP clients of the relay
                    self._wakeup = trio.Event()
                    with trio.move_on_at(deadline if math.isfinite(deadline) else math.inf):
                        await self._wakeup.wait()
                    now = trio.current_time()
                    try:
                        if self.core.next_deadline() <= now:
                            self.core.on_timer(now)
                        if self.relay_front is not None:
                            self.relay_front.expire(now)
                            self._flush_relay(now)
                        self._after(now)
                    except Exception:  # a defect: logged, and the node carries on without it
                        log.exception("rendezvous timer failed (contained)")
                        await trio.sleep(1.0)
        finally:
            self._nursery = None
            self.endpoint.on_keyed_message = None

    def _attach_relay(self) -> None:
        """Wire the relay's forwarding to the (new) rendezvous core: UDP clients are the
        nodes its relay role registered; a lookup finds TCP-only nodes too."""
        core = self.core
        if core is None or core.relay is None or self.relay_core is None:
            return
        registrations = core.relay

        def registered(node_id: bytes, now: float) -> Address | None:
            entry = registrations.registration(node_id, now)
            return None if entry is None else entry.observed

        front = self.relay_front
        if front is None:
            front = self.relay_front = UdpRelayFront(self.keyring, self.relay_core, registered, core.dropped)
            front.on_pending = self._on_relay_pending
        else:
            front.rebind(self.keyring, registered, core.dropped)
        relay_core = self.relay_core

        def relayed_only(node_id: bytes) -> bool:
            return node_id not in front.clients and relay_core.client(NodeId(node_id)) is not None

        registrations.relayed_only = relayed_only
        self.relay_core.on_keyed = self._keyed_from_link

    async def configure_relay(self, tls_config: Any, *, limits: RelayLimits | None = None,
                              tcp_port: int | None = None, tcp_fallback_after: float | None = None,
                              prefer_tcp: bool | None = None) -> None:
        """What the application adds once running: the node's TLS identity (for TCP
        links to relays), on a relay node its limits and its relay over TCP + mutual
        TLS on ``tcp_port`` (0: any; the bound port is ``relay_server.port``), sharing
        the UDP front's RelayCore."""
        self.routes.tls_config = tls_config
        if prefer_tcp is not None:
            self.routes.prefer_tcp = prefer_tcp
        if tcp_fallback_after is not None:
            self.routes.tcp_fallback_after = tcp_fallback_after
        if self.relay_core is None:
            return
        if limits is not None:
            self.relay_core.set_limits(limits)
        if tcp_port is not None and self.relay_server is None:
            if self._nursery is None:
                raise RendezvousUnavailable("the rendezvous is not running: no relay over TCP")
            host = _plain(self.endpoint.address)[0]
            self.relay_server = await self._nursery.start(
                partial(serve_relay, tls_config, host=host, port=tcp_port, core=self.relay_core))
            log.info("relaying over TCP + mutual TLS on port %d", self.relay_server.port)

    def set_identity(self, keyring: KeyRing) -> None:
        """A new key (after `keynode rotate`): a fresh core registers the new NodeId with
        the relays at once; lookups and punches under way end as failed."""
        self.keyring = keyring
        if self.core is None:
            return
        previous = self.core
        self.core = Rendezvous(keyring, self._resolved, serve=self.serve, lan=self._lan,
                               wall_offset=self.wall_offset, timers=self.timers)
        self._attach_relay()
        for relay_id, state in previous.node.relays.items():
            if not state.registers:
                self.core.node.add_relay(relay_id, state.address)
        for target, waiters in self._lookups.items():
            for waiter in waiters:
                waiter.result = LookupDone(target, False)
                waiter.event.set()
        for target, waiters in self._paths.items():
            for waiter in waiters:
                waiter.result = PunchFailed(target, ())
                waiter.event.set()
        self._lookups.clear()
        self._paths.clear()
        self._wakeup.set()

    async def _resolve(self, host: str, port: int) -> Address:
        try:
            ipaddress.ip_address(host)
            return host, port
        except ValueError:
            pass
        infos = await trio.socket.getaddrinfo(host, port, type=stdlib_socket.SOCK_DGRAM)
        return _plain(infos[0][4])

    def _lan_addresses(self, relays: list[Address]) -> tuple[Address, ...]:
        port = int(self.endpoint.address[1])
        bound = _plain(self.endpoint.address)[0]
        if not ipaddress.ip_address(bound).is_unspecified:
            return ((bound, port),)
        found: list[Address] = []
        for host, relay_port in relays:
            family = stdlib_socket.AF_INET6 if ":" in host else stdlib_socket.AF_INET
            try:
                with stdlib_socket.socket(family, stdlib_socket.SOCK_DGRAM) as probe:
                    probe.connect((host, relay_port))  # no datagram: the kernel only picks a route
                    local = (probe.getsockname()[0], port)
            except OSError:
                continue
            if local not in found:
                found.append(local)
        return tuple(found[:8])

    def receive_keyed(self, data: bytes, address: tuple[Any, ...]) -> None:
        """The endpoint's keyed-message handler (synchronous)."""
        core = self.core
        if core is None:
            return
        now = trio.current_time()
        if MIN_RELAY_TYPE <= data[3] <= MAX_RELAY_TYPE:
            # One account for every keyed message: received, then dropped (the openers
            # share the core's counters) or accepted.
            counters = core.counters
            counters["received"] += 1
            front = self.relay_front
            if data[3] == RELAY_SEND and front is not None:
                opened = front.opener.opened
                front.receive(data, _plain(address), now, int((now + self.wall_offset) * 1000))
                counters["accepted"] += front.opener.opened - opened
                self._flush_relay(now)
            else:
                opener = self.routes.opener
                opened = opener.opened
                self.routes.receive(data, _plain(address), now)
                counters["accepted"] += opener.opened - opened
            return
        core.receive(data, _plain(address), now)
        self._after(now)

    def _keyed_from_link(self, client: Any, message: bytes, now: float) -> None:
        """A rendezvous message from a node linked over TCP (its lookups)."""
        core, relay_core = self.core, self.relay_core
        if core is None or relay_core is None:
            return
        answer = core.receive_over_link(message, client.key, now)
        if answer is not None:
            relay_core.send_keyed(client.node_id, answer)

    async def _flush_relay_soon(self) -> None:
        """What TCP clients sent to UDP clients of the relay goes out here."""
        while True:
            await self._relay_pending.wait()
            self._relay_pending = trio.Event()
            if self.relay_front is not None:
                self._flush_relay(trio.current_time())

    def _on_relay_pending(self) -> None:
        self._relay_pending.set()

    def _flush_relay(self, now: float) -> None:
        front = self.relay_front
        assert front is not None
        front.flush(now, int((now + self.wall_offset) * 1000))
        send = self.endpoint.send_message
        for data, address in front.take_output():
            try:
                send(data, address)
            except (ValueError, EndpointClosed):
                self.send_failures += 1

    def _after(self, now: float) -> None:
        core = self.core
        assert core is not None
        for data, address in core.take_datagrams():
            if data[3] == LOOKUP and self.routes.send_over_link(data, address):
                continue  # to a relay this node reaches over TCP only
            try:
                self.endpoint.send_message(data, address)
            except (ValueError, EndpointClosed):
                self.send_failures += 1
        for event in core.take_events():
            self._event(event, now)
        if core.next_deadline() < math.inf:
            self._wakeup.set()  # re-arm the timer task at the (possibly earlier) deadline

    def _event(self, event: object, now: float) -> None:
        if isinstance(event, ObservedAddress):
            relay = self._relay_names.get(event.relay)
            log.info("observed address %s (seen by relay %s); NAT mapping: %s", _format(event.address),
                     relay.node_id if relay else NodeId(event.relay), self.nat_mapping(),
                     extra={"fields": {"event": "observed_address", "address": _format(event.address),
                                       "relay": str(NodeId(event.relay)), "nat_mapping": self.nat_mapping()}})
            self._update_record()
        elif isinstance(event, HomeChanged):
            log.info("home relay %s (RTT %.1f ms)", NodeId(event.relay), event.rtt * 1000,
                     extra={"fields": {"event": "home_relay", "relay": str(NodeId(event.relay)),
                                       "rtt_ms": round(event.rtt * 1000, 3)}})
            self._update_record()
        elif isinstance(event, LookupDone):
            if event.found:
                self.routes.learn(event.target, event.record, event.relay)
            for waiter in self._lookups.pop(event.target, []):
                waiter.result = event
                waiter.event.set()
        elif isinstance(event, (PathConfirmed, PunchFailed)):
            for waiter in self._paths.pop(event.node_id, []):
                waiter.result = event
                waiter.event.set()
        elif isinstance(event, Introduced):
            log.info("introduced to %s: punching %s", NodeId(event.caller),
                     ", ".join(_format(address) for address in event.candidates))

    def _update_record(self) -> None:
        """The record REGISTER carries from now on (none if it would not fit)."""
        assert self.core is not None
        try:
            record = self.address_record().to_bytes()
        except RendezvousError as error:
            log.warning("no address record for the relays: %s", error)
            return
        if len(record) > MAX_RECORD:
            log.warning("the address record (%d bytes) is too long to register; relays get none", len(record))
            record = b""
        self.core.set_record(record)

    # --- finding a node by its NodeId -------------------------------------------------

    async def find_path(self, node_id: NodeId) -> Address:
        """Ask the relays for ``node_id``, punch toward what they vouch for, and return the
        address an authenticated PONG confirmed (NodeNotFound, NoDirectPath)."""
        core = self.core
        target = bytes(node_id)
        if core is None or not (self._resolved or self._home.get(target)):
            raise RendezvousUnavailable(f"no address known for {node_id}: no [peers] entry and no [relay] servers")
        confirmed = core.node.path(target)
        if confirmed is not None:
            return confirmed
        lookup = _Waiter()
        self._lookups.setdefault(target, []).append(lookup)
        now = trio.current_time()
        core.lookup(target, now, via=self._home.get(target, ()))
        self._after(now)
        await lookup.event.wait()
        done: LookupDone = lookup.result
        if not done.found:
            raise NodeNotFound(f"{node_id} is not registered with any relay node this node asked "
                               f"({len(core.node.lookup_relays(target, self._home.get(target, ())))}), "
                               "or none answered")
        path = _Waiter()
        self._paths.setdefault(target, []).append(path)
        now = trio.current_time()
        core.punch(target, done.candidates, now)
        self._after(now)
        confirmed = core.node.path(target)
        if confirmed is not None:  # another caller's punch toward it got there first
            waiting = self._paths.get(target, [])
            if path in waiting:
                waiting.remove(path)
            return confirmed
        await path.event.wait()
        if isinstance(path.result, PathConfirmed):
            return path.result.address
        tried = ", ".join(_format(address) for address in path.result.tried)
        raise NoDirectPath(
            f"no direct path could be punched to {node_id} in {self.timers.punch_window:g} s: "
            f"likely both NATs are hard (symmetric, or symmetric and port-restricted), which needs a relay "
            f"(issue 14), or the node went offline; this node's NAT mapping: {self.nat_mapping()}; tried {tried}"
        )
