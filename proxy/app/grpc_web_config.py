"""The ``[grpc_web]`` table: where the in-process grpc-web bridge listens, what it calls,
which browser origins may use it.

    [grpc_web]
    listen = "127.0.0.1:8080"          # host:port (port 0 = any free port)
    target = "<NodeId>:<port>"         # a remote node's service, through this node's tunnel
    # target = "127.0.0.1:50051"       # or a gRPC server this node reaches directly
    allow_origins = ["https://app.example"]   # "*" = any origin; requests without Origin always pass
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import trio

from grpc_bridge.web import WebBridgeSettings, serve_web_bridge
from grpc_bridge.web_connect import direct_upstream, tunnel_upstream
from grpc_bridge.web_upstream import OpenUpstream
from proxy.app.errors import ConfigError
from proxy.identity.errors import NodeIdInvalid
from proxy.identity.node_id import NodeId
from proxy.tunnel.hosts import HostPort, HostPortInvalid, parse_host_port, parse_port_text, split_host_port

SECTION = "grpc_web"
KEYS = ("listen", "target", "allow_origins")


@dataclass(frozen=True)
class GrpcWebTarget:
    """Either a remote node (node_id set: reached through the tunnel as ``NodeId:port``)
    or a host:port this node connects to directly."""

    port: int
    node_id: NodeId | None = None
    host: str | None = None

    def __str__(self) -> str:
        if self.node_id is not None:
            return f"{self.node_id.encode()}:{self.port}"
        return str(HostPort(self.host or "", self.port))


@dataclass(frozen=True)
class GrpcWebConfig:
    listen: HostPort
    target: GrpcWebTarget
    allow_origins: tuple[str, ...]


def read_grpc_web(table: object, path: str = "keynode.toml") -> GrpcWebConfig | None:
    """The parsed ``[grpc_web]`` table (``table`` as read from TOML; None when absent);
    raises ConfigError naming the key."""
    if table is None:
        return None
    if not isinstance(table, Mapping):
        raise ConfigError(path, SECTION, f"must be a table [{SECTION}], not {type(table).__name__}")
    for key in table:
        if key not in KEYS:
            raise ConfigError(path, f"{SECTION}.{key}", f"unknown key (known: {', '.join(KEYS)})")
    for key in ("listen", "target"):
        if key not in table:
            raise ConfigError(path, f"{SECTION}.{key}", "missing")
    try:
        listen = parse_host_port(table["listen"], allow_zero=True)
    except HostPortInvalid as error:
        raise ConfigError(path, f"{SECTION}.listen", str(error)) from None
    return GrpcWebConfig(listen, _read_target(table["target"], path), _read_origins(table.get("allow_origins", []), path))


def _read_target(value: Any, path: str) -> GrpcWebTarget:
    key = f"{SECTION}.target"
    if not isinstance(value, str):
        raise ConfigError(path, key, f"must be a string '<NodeId>:<port>' or 'host:port', not {type(value).__name__}")
    try:
        host, port_text = split_host_port(value)
        port = parse_port_text(port_text, allow_zero=False)
    except HostPortInvalid as error:
        raise ConfigError(path, key, str(error)) from None
    if host.startswith("v") and len(host) == 53:
        try:
            return GrpcWebTarget(port, node_id=NodeId.decode(host))
        except NodeIdInvalid as error:
            raise ConfigError(path, key, f"looks like a NodeId but is not one: {error}") from None
    try:
        address = parse_host_port(value, allow_wildcard=False)
    except HostPortInvalid as error:
        raise ConfigError(path, key, str(error)) from None
    return GrpcWebTarget(address.port, host=address.host)


def _read_origins(value: Any, path: str) -> tuple[str, ...]:
    key = f"{SECTION}.allow_origins"
    if not isinstance(value, list):
        raise ConfigError(path, key, f"must be a list of origins, not {type(value).__name__}")
    origins = []
    for index, origin in enumerate(value):
        where = f"{key}[{index}]"
        if not isinstance(origin, str):
            raise ConfigError(path, where, f"must be a string, not {type(origin).__name__}")
        if origin != "*":
            parts = urlsplit(origin)
            if parts.scheme not in ("http", "https") or not parts.hostname or parts.path or parts.query or parts.fragment:
                raise ConfigError(path, where, f"{origin!r} is not an origin 'http(s)://host[:port]' (or '*')")
            if origin != origin.lower():
                raise ConfigError(path, where, f"{origin!r}: write origins in lower case, as browsers send them")
        origins.append(origin)
    return tuple(origins)


def open_upstream_for(config: GrpcWebConfig, forward_host: str, forward_port: int, auth_token: str | None) -> OpenUpstream:
    """How the bridge reaches config.target: a NodeId target through this node's own
    CONNECT port (forward_host:forward_port, with its auth token), so the remote node's
    reverse side authenticates this node and injects its identity; a host:port directly."""
    target = config.target
    if target.node_id is not None:
        return tunnel_upstream(forward_host, forward_port, str(target), auth_token)
    assert target.host is not None
    return direct_upstream(target.host, target.port)


async def serve_grpc_web(
    config: GrpcWebConfig,
    open_upstream: OpenUpstream,
    *,
    task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the bridge until cancelled; task_status gets the bound (host, port).
    ``open_upstream``: usually open_upstream_for(config, ...)."""
    settings = WebBridgeSettings(config.listen.host, config.listen.port, config.allow_origins, str(config.target))
    await serve_web_bridge(settings, open_upstream, task_status=task_status)
