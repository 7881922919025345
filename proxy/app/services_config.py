"""The config's services, allow lists and policy tests: `[services.<name>]`,
`[server] service_port`, `[forward] allow_targets` and `[[policy_tests]]`, read and
validated precisely (a ConfigError naming the dotted key), and turned into the
tunnel's `ServicePolicy` (proxy/tunnel/services.py, which says how a caller's
service is chosen and authorised).

    [server]                     # the default service, open to every verified node
    host = "127.0.0.1"
    port = 50051                 # where it listens (its target)
    service_port = 22            # optional: the CONNECT port that names it
    kind = "grpc"                # optional: "tcp" (default) or "grpc" (as a service's kind)

    [services.agent]             # name: a-z, 0-9, '-', '_' (not "server"); callers may
                                 # name it by name too: CONNECT agent.<NodeId>:443
    target = "127.0.0.1:50052"   # the local server
    port = 1314                  # the port a caller names: CONNECT <NodeId>:1314
    allow = "*"                  # every verified node, or a list of NodeIds
    kind = "grpc"                # "tcp" (default) or "grpc"

    [forward]
    allow_targets = ["v..."]     # nodes local clients may reach; "*" (default): any

    [[policy_tests]]             # checked at every load: a failure rejects the config
    node = "v..."
    service = "agent"
    expect = "allow"             # or "deny"

Ports are unique across the services and `[server] service_port`. Everything here
is reloadable (`keynode reload`, SIGHUP).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from proxy.app.errors import ConfigError, PolicyTestFailed
from proxy.identity.errors import NodeIdInvalid
from proxy.tunnel.hosts import HostPort, HostPortInvalid, parse_host_port, parse_port

if TYPE_CHECKING:
    from proxy.tunnel.services import ServicePolicy

SERVICE_KEYS = ("target", "port", "allow", "kind")
POLICY_TEST_KEYS = ("node", "service", "expect")
EXPECTATIONS = ("allow", "deny")
SERVICE_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}\Z")
# Mirrors proxy.tunnel.services.KINDS, DEFAULT_SERVICE and SERVICE_NAME (a name is
# also an SNI label) (checked by a test); the
# config module stays light.
KINDS = ("tcp", "grpc")
DEFAULT_SERVICE = "server"


@dataclass(frozen=True)
class ServiceEntry:
    name: str
    target: HostPort
    port: int
    allow: frozenset[Any] | None  # NodeIds; None: "*"
    kind: str = "tcp"


@dataclass(frozen=True)
class PolicyTest:
    node: Any  # NodeId
    service: str
    expect: str  # "allow" or "deny"


@dataclass(frozen=True)
class ServicesConfig:
    services: tuple[ServiceEntry, ...] = ()
    server_port: int | None = None  # [server] service_port
    allow_targets: frozenset[Any] | None = None  # [forward] allow_targets; None: "*"
    policy_tests: tuple[PolicyTest, ...] = ()
    server_kind: str = "tcp"  # [server] kind


def _fail(path: str, key: str, reason: str) -> ConfigError:
    return ConfigError(path, key, reason)


def _node_id(path: str, key: str, value: object) -> Any:
    from proxy.identity.node_id import NodeId

    if not isinstance(value, str):
        raise _fail(path, key, f"must be a NodeId string, not {type(value).__name__}")
    try:
        return NodeId.decode(value)
    except (NodeIdInvalid, ValueError) as error:
        raise _fail(path, key, f"{value!r} is not a NodeId: {error}") from None


def _node_ids(path: str, key: str, value: object, what: str) -> frozenset[Any] | None:
    """"*" (None) or a list of distinct NodeIds."""
    if value == "*":
        return None
    if not isinstance(value, list):
        raise _fail(path, key, f'must be "*" ({what}) or a list of NodeIds, not {type(value).__name__}')
    node_ids = []
    for index, item in enumerate(value):
        node_id = _node_id(path, f"{key}[{index}]", item)
        if node_id in node_ids:
            raise _fail(path, f"{key}[{index}]", f"{item} is listed twice")
        node_ids.append(node_id)
    return frozenset(node_ids)


def _port(path: str, key: str, value: object) -> int:
    try:
        return parse_port(value, allow_zero=False)
    except HostPortInvalid as error:
        raise _fail(path, key, str(error)) from None


def _kind(path: str, key: str, kind: object) -> str:
    if kind not in KINDS:
        raise _fail(path, key, f"{kind!r} is not one of {', '.join(KINDS)}")
    assert isinstance(kind, str)
    return kind


def _service(path: str, name: str, table: object) -> ServiceEntry:
    prefix = f"services.{name}"
    if not SERVICE_NAME.match(name):
        raise _fail(path, prefix, "a service name is 1-63 of a-z, 0-9, '-', '_', starting with a letter or digit")
    if name == DEFAULT_SERVICE:
        raise _fail(path, prefix, f"{DEFAULT_SERVICE!r} is the default service's name ([server])")
    if not isinstance(table, dict):
        raise _fail(path, prefix, f"must be a table [{prefix}], not {type(table).__name__}")
    for key in table:
        if key not in SERVICE_KEYS:
            raise _fail(path, f"{prefix}.{key}", f"unknown key (known: {', '.join(SERVICE_KEYS)})")
    for key in ("target", "port", "allow"):
        if key not in table:
            hint = ' ("*" for every verified node, or a list of NodeIds)' if key == "allow" else ""
            raise _fail(path, f"{prefix}.{key}", f"missing{hint}")
    try:
        target = parse_host_port(table["target"], allow_wildcard=False)
    except HostPortInvalid as error:
        raise _fail(path, f"{prefix}.target", str(error)) from None
    kind = _kind(path, f"{prefix}.kind", table.get("kind", "tcp"))
    return ServiceEntry(
        name=name,
        target=target,
        port=_port(path, f"{prefix}.port", table["port"]),
        allow=_node_ids(path, f"{prefix}.allow", table["allow"], "every verified node"),
        kind=kind,
    )


def _policy_tests(path: str, value: object, names: set[str]) -> tuple[PolicyTest, ...]:
    if not isinstance(value, list):
        raise _fail(path, "policy_tests", "must be an array of tables [[policy_tests]]")
    tests = []
    for index, table in enumerate(value):
        prefix = f"policy_tests[{index}]"
        if not isinstance(table, dict):
            raise _fail(path, prefix, f"must be a table, not {type(table).__name__}")
        for key in table:
            if key not in POLICY_TEST_KEYS:
                raise _fail(path, f"{prefix}.{key}", f"unknown key (known: {', '.join(POLICY_TEST_KEYS)})")
        for key in POLICY_TEST_KEYS:
            if key not in table:
                raise _fail(path, f"{prefix}.{key}", "missing")
        service = table["service"]
        if service not in names:
            known = ", ".join(sorted(names)) or "none"
            raise _fail(path, f"{prefix}.service", f"no service {service!r} (configured: {known})")
        if table["expect"] not in EXPECTATIONS:
            raise _fail(path, f"{prefix}.expect", f"{table['expect']!r} is not one of allow, deny")
        tests.append(PolicyTest(_node_id(path, f"{prefix}.node", table["node"]), service, table["expect"]))
    return tuple(tests)


def read_services(
    path: str, data: Mapping[str, Any], server: Mapping[str, Any], forward: Mapping[str, Any], has_server: bool
) -> ServicesConfig:
    """The services part of a parsed config (`server` and `forward` are those tables)."""
    services_table = data.get("services", {})
    if not isinstance(services_table, dict):
        raise _fail(path, "services", "must be a table of [services.<name>] tables")
    services = tuple(_service(path, name, table) for name, table in services_table.items())
    server_port = None
    if "service_port" in server:
        if not has_server:
            raise _fail(path, "server.service_port", "needs [server] host and port (the default service)")
        server_port = _port(path, "server.service_port", server["service_port"])
    server_kind = _kind(path, "server.kind", server.get("kind", "tcp"))
    if "kind" in server and not has_server:
        raise _fail(path, "server.kind", "needs [server] host and port (the default service)")
    owners: dict[int, str] = {} if server_port is None else {server_port: "[server] service_port"}
    for service in services:
        if service.port in owners:
            raise _fail(path, f"services.{service.name}.port", f"port {service.port} is taken by {owners[service.port]}")
        owners[service.port] = f"[services.{service.name}]"
    allow_targets = None
    if "allow_targets" in forward:
        allow_targets = _node_ids(path, "forward.allow_targets", forward["allow_targets"], "any node")
    names = {service.name for service in services} | ({DEFAULT_SERVICE} if has_server else set())
    tests = _policy_tests(path, data.get("policy_tests", []), names)
    return ServicesConfig(services, server_port, allow_targets, tests, server_kind)


def build_policy(config: ServicesConfig, server: HostPort | None) -> ServicePolicy:
    """The tunnel's policy for a validated config."""
    from proxy.tunnel.services import DEFAULT_SERVICE as TUNNEL_DEFAULT
    from proxy.tunnel.services import Service, ServicePolicy

    default = None if server is None else Service(
        TUNNEL_DEFAULT, (server.host, server.port), config.server_port, kind=config.server_kind
    )
    services = tuple(
        Service(entry.name, (entry.target.host, entry.target.port), entry.port, entry.allow, entry.kind)
        for entry in config.services
    )
    return ServicePolicy(default=default, services=services, allow_targets=config.allow_targets)


def check_policy_tests(path: str, config: ServicesConfig, policy: ServicePolicy) -> None:
    """Every [[policy_tests]] entry against the policy; PolicyTestFailed names the first
    that fails (its index, node, service and both outcomes)."""
    for index, test in enumerate(config.policy_tests):
        service = policy.named(test.service)
        assert service is not None  # read_services checked the name
        outcome = "allow" if service.allowed_as((test.node,)) is not None else "deny"
        if outcome != test.expect:
            raise PolicyTestFailed(
                path,
                f"policy_tests[{index}]",
                f"expected {test.expect} for {test.node} on service {test.service!r}, but the policy says {outcome}",
            )
