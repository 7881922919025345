"""Services: several local servers behind one node, chosen in the TLS handshake,
each with its own allow list of NodeIds; and which nodes local clients may reach.

Naming (wire). A CONNECT of the form ``<NodeId>:<PORT>`` names the remote's
service by PORT: the forward side sends the TLS SNI ``<PORT>.port.keynode`` (beside
ALPN ``keynode/1``). ``<name>.<NodeId>:<any port>`` names it by name: SNI
``<name>.service.keynode``. The original's form ``HOST:PORT?nodeId=`` (HOST:PORT
is the remote proxy) names none, and no SNI is sent. The reverse side reads the
SNI: a name of those forms names the port or the service; no SNI, or any other
name (Node's TLS may send ``localhost``), names nothing.

Selection (the port rule), on the reverse side:

- nothing named (original, wave-1 and Node peers): the default service ([server]);
- a port named, no other services configured: the default service, whatever the
  port (wave-1: every CONNECT port reached [server]);
- a port named, services configured: the service whose ``port`` it is, or the
  default service when it is the default's own ``port``; else no such service (404);
- a name named: that service ("server" is the default), else 404.

No default service configured and nothing (or its absent port) named: 404.

Authorisation, after the caller's chain is verified and before any connection to
the service's target: the default service allows every verified node; a service
allows "*" or a list of NodeIds. A verified chain proves the NodeId of each of its
certificates (each link is signed by the next key: a rotation is vouched for by the
old key, and the forward side's verifier accepts a rotated node under any NodeId
of its chain in the same way), so a caller is allowed when any NodeId of its chain
is in the list; the first one, leaf first, is the NodeId it is allowed as.

A ``ServicePolicy`` is immutable; a reload builds a new one and the Proxy swaps it
(``Proxy.set_policy``), closing live tunnels whose NodeId lost access with the end
reason ``revoked``. Plain logic, no I/O.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from proxy.identity.node_id import NodeId
from proxy.tunnel.errors import ServiceForbidden, ServiceNotFound, TargetNotAllowed
from proxy.tunnel.hosts import format_host_port

DEFAULT_SERVICE = "server"  # the name [server] goes by
KINDS = ("tcp", "grpc")
SERVICE_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}\Z")  # also a DNS label
_PORT_NAME = re.compile(r"([1-9][0-9]{0,4})\.port\.keynode\Z")
_SERVICE_NAME = re.compile(r"([a-z0-9][a-z0-9_-]{0,62})\.service\.keynode\Z")


def server_name_for(port: int | None = None, service: str | None = None) -> bytes | None:
    """The SNI a forward side sends to name the remote's service, by name or port."""
    if service is not None:
        if not SERVICE_NAME.match(service):
            raise ValueError(f"not a service name: {service!r}")
        return f"{service}.service.keynode".encode("ascii")
    if port is None:
        return None
    if not 0 < port < 65536:
        raise ValueError(f"a service port is 1..65535, not {port}")
    return f"{port}.port.keynode".encode("ascii")


def named_in(server_name: bytes | None) -> int | str | None:
    """What a received SNI names: a port, a service name, or None (no SNI, or a name
    not of ours)."""
    if not server_name:
        return None
    text = server_name.decode("ascii", "replace").lower()
    match = _PORT_NAME.match(text)
    if match is not None:
        port = int(match.group(1))
        return port if port < 65536 else None
    match = _SERVICE_NAME.match(text)
    return None if match is None else match.group(1)


def requested_service(server_name: bytes | None) -> str | None:
    """What a forward connection asked for, for status lines: "port N", the name, or None."""
    named = named_in(server_name)
    return f"port {named}" if isinstance(named, int) else named


@dataclass(frozen=True)
class Service:
    """One local server callers may reach."""

    name: str
    target: tuple[str, int]  # where the reverse side connects
    port: int | None  # the CONNECT port that names it (the default service: optional)
    allow: frozenset[NodeId] | None = None  # None: every verified node ("*")
    kind: str = "tcp"

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"service kind must be one of {', '.join(KINDS)}, not {self.kind!r}")
        if self.port is not None and not 0 < self.port < 65536:
            raise ValueError(f"service port out of range: {self.port}")

    def allowed_as(self, chain_node_ids: Iterable[NodeId]) -> NodeId | None:
        """The NodeId (leaf first) of a verified chain that the allow list holds."""
        for node_id in chain_node_ids:
            if self.allow is None or node_id in self.allow:
                return node_id
        return None


@dataclass(frozen=True)
class ServicePolicy:
    """The services of a node and which remote nodes its local clients may reach."""

    default: Service | None = None  # [server]: no name, or no services configured
    services: tuple[Service, ...] = ()  # [services.<name>]
    allow_targets: frozenset[NodeId] | None = None  # [forward] allow_targets; None: "*"
    _by_port: Mapping[int, Service] = field(init=False, repr=False, compare=False)
    _by_name: Mapping[str, Service] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        by_port: dict[int, Service] = {}
        by_name: dict[str, Service] = {}
        for service in (*((self.default,) if self.default is not None else ()), *self.services):
            if service.name in by_name:
                raise ValueError(f"two services are named {service.name!r}")
            by_name[service.name] = service
            if service.port is not None:
                if service.port in by_port:
                    other = by_port[service.port].name
                    raise ValueError(f"services {other!r} and {service.name!r} share port {service.port}")
                by_port[service.port] = service
        object.__setattr__(self, "_by_port", by_port)
        object.__setattr__(self, "_by_name", by_name)

    @classmethod
    def single(cls, server: tuple[str, int] | None) -> ServicePolicy:
        """The wave-1 node: one server (or none), everyone allowed, any target."""
        default = None if server is None else Service(DEFAULT_SERVICE, server, None)
        return cls(default=default)

    @property
    def serves(self) -> bool:
        """Has anything for reverse connections (else incoming uTP is refused)."""
        return bool(self._by_name)

    def all(self) -> tuple[Service, ...]:
        return tuple(self._by_name.values())

    def named(self, name: str) -> Service | None:
        return self._by_name.get(name)

    def select(self, server_name: bytes | None) -> Service:
        """The service a caller's SNI names (the rules above); ServiceNotFound."""
        port = named_in(server_name)
        if isinstance(port, str):
            named = self._by_name.get(port)
            if named is None:
                raise ServiceNotFound(f"no service {port!r} on this node")
            return named
        if port is not None and self.services:
            service = self._by_port.get(port)
            if service is None:
                raise ServiceNotFound(f"no service at port {port} on this node")
            return service
        if self.default is None:
            said = "" if port is None else f" (port {port} named)"
            raise ServiceNotFound(f"this node has no default service{said}")
        return self.default

    def authorise(self, service: Service, chain_node_ids: tuple[NodeId, ...]) -> NodeId:
        """The NodeId the caller is allowed as; ServiceForbidden naming both."""
        allowed = service.allowed_as(chain_node_ids)
        if allowed is None:
            raise ServiceForbidden(f"service {service.name!r} does not allow {chain_node_ids[0]}")
        return allowed

    def still_allows(self, service_name: str | None, chain_node_ids: tuple[NodeId, ...]) -> bool:
        """Whether a live reverse tunnel to ``service_name`` keeps its access."""
        service = None if service_name is None else self._by_name.get(service_name)
        return service is not None and service.allowed_as(chain_node_ids) is not None

    def target_allowed(self, node_ids: Iterable[NodeId]) -> bool:
        return self.allow_targets is None or any(node_id in self.allow_targets for node_id in node_ids)

    def check_target(self, node_ids: tuple[NodeId, ...]) -> None:
        """[forward] allow_targets: TargetNotAllowed (403) for a node left out."""
        if not self.target_allowed(node_ids):
            wanted = ", ".join(str(node_id) for node_id in node_ids)
            raise TargetNotAllowed(f"this node's [forward] allow_targets does not include {wanted}")

    def describe(self) -> list[dict[str, object]]:
        """One document per service (default first), for status."""
        return [
            {
                "name": service.name,
                "target": format_host_port(*service.target),
                "port": service.port,
                "kind": service.kind,
                "allow": "*" if service.allow is None else len(service.allow),
                "default": service is self.default,
            }
            for service in self.all()
        ]
