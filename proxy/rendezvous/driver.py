"""The trio driver of a node's rendezvous (core.py) on the endpoint's UDP socket.

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
from typing import Any

import trio

from nat.errors import EndpointClosed
from proxy.identity.node_id import NodeId
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
from proxy.rendezvous.messages import MAX_RECORD, Address
from proxy.rendezvous.node import (
    Introduced,
    LookupDone,
    ObservedAddress,
    PathConfirmed,
    PunchFailed,
    RendezvousTimers,
)

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
        alternatives.extend(relay for relay in self.relays if relay.node_id != self.keyring.node_id)
        if not alternatives:
            raise RendezvousUnavailable("no address known yet: no relay has answered and the socket is a wildcard")
        return sign_record(self.keyring.signing_key, self._sequence.next(),
                           format_keynode_addresses(tuple(alternatives)))

    @property
    def counters(self) -> dict[str, Any]:
        if self.core is None:
            return {}
        return {**self.core.counters, "dropped": dict(self.core.dropped), **self.core.node.counters,
                **({} if self.core.relay is None else {"relay": dict(self.core.relay.counters),
                                                       "registrations": len(self.core.relay.registrations)})}

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
        self.core = Rendezvous(self.keyring, self._resolved, serve=self.serve, lan=self._lan,
                               wall_offset=time.time() - now, timers=self.timers)
        for peer_id, relay_id, address in home:
            self.core.node.add_relay(relay_id, address)
            self._home[peer_id] = (*self._home.get(peer_id, ()), relay_id)
        self.endpoint.on_keyed_message = self._receive
        try:
            task_status.started()
            while True:
                deadline = self.core.next_deadline()
                self._wakeup = trio.Event()
                with trio.move_on_at(deadline if math.isfinite(deadline) else math.inf):
                    await self._wakeup.wait()
                now = trio.current_time()
                try:
                    if self.core.next_deadline() <= now:
                        self.core.on_timer(now)
                    self._after(now)
                except Exception:  # a defect: logged, and the node carries on without it
                    log.exception("rendezvous timer failed (contained)")
                    await trio.sleep(1.0)
        finally:
            self.endpoint.on_keyed_message = None

    def set_identity(self, keyring: KeyRing) -> None:
        """A new key (after `keynode rotate`): a fresh core registers the new NodeId with
        the relays at once; lookups and punches under way end as failed."""
        self.keyring = keyring
        if self.core is None:
            return
        now = trio.current_time()
        previous = self.core
        self.core = Rendezvous(keyring, self._resolved, serve=self.serve, lan=self._lan,
                               wall_offset=time.time() - now, timers=self.timers)
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

    def _receive(self, data: bytes, address: tuple[Any, ...]) -> None:
        """The endpoint's keyed-message handler (synchronous)."""
        core = self.core
        if core is None:
            return
        now = trio.current_time()
        core.receive(data, _plain(address), now)
        self._after(now)

    def _after(self, now: float) -> None:
        core = self.core
        assert core is not None
        for data, address in core.take_datagrams():
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
        elif isinstance(event, LookupDone):
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
