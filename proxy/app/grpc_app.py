"""The gRPC layer as `keynode run` wires it: the per-kind splicer that injects the
caller's identity, and the `[grpc_web]` bridge with its upstream.

- Services of kind "grpc" (`[services.<name>] kind = "grpc"`, or `[server] kind =
  "grpc"`) are served by `grpc_bridge.h2_identity.relay_with_identity`: the tunnel's
  reverse side calls it (through `open_proxy(splicers=...)`) with the tunnel, the
  server connection and the verified caller; it re-originates HTTP/2 toward the
  server with `x-keynode-node-id` and `x-keynode-peer` on every request, after
  removing whatever `x-keynode-*` the caller sent. proxy.tunnel never imports
  grpc_bridge: this module hands the splicer in.
- `[grpc_web]` runs `grpc_bridge.web`'s bridge beside the node. Its target is either a
  remote node's service (`<NodeId>:<port>`), reached through this node's own forward
  port (an HTTP CONNECT with the auth token), so the remote reverse side vouches for
  this node's NodeId as it does for any caller; or a local gRPC server (`host:port`,
  or the name of a service of this node's config), connected directly: nothing is
  injected there, since the caller is a local browser, not a verified node.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, cast

import trio

from proxy.app.errors import ConfigError, GrpcWebBindError
from proxy.app.services_config import DEFAULT_SERVICE, ServicesConfig
from proxy.tunnel.hosts import HostPort

if TYPE_CHECKING:
    from grpc_bridge.web_upstream import OpenUpstream
    from proxy.app.grpc_web_config import GrpcWebConfig
    from proxy.tunnel.proxy import Proxy
    from proxy.tunnel.records import Splicer

GRPC_KIND = "grpc"
# Where this node's own forward port is reached when it listens on every address.
_LOOPBACK_FOR = {"0.0.0.0": "127.0.0.1", "::": "::1"}


def service_splicers() -> dict[str, Splicer]:
    """What `open_proxy(splicers=...)` gets: the identity relay for kind "grpc"."""
    from grpc_bridge.h2_identity import relay_with_identity

    return {GRPC_KIND: relay_with_identity}


def read_grpc_web_section(
    path: str, data: Mapping[str, Any], services: ServicesConfig, server: HostPort | None
) -> GrpcWebConfig | None:
    """`[grpc_web]` of a parsed config (None when absent). A target naming one of this
    config's services (`"server"` or a `[services.<name>]`) becomes that service's
    target address; anything else is read by `grpc_web_config.read_grpc_web`."""
    table = data.get("grpc_web")
    if table is None:
        return None
    from proxy.app.grpc_web_config import read_grpc_web

    local = {entry.name: entry.target for entry in services.services}
    if server is not None:
        local[DEFAULT_SERVICE] = server
    if isinstance(table, Mapping) and isinstance(table.get("target"), str) and table["target"] in local:
        table = {**table, "target": str(local[table["target"]])}
    try:
        return read_grpc_web(table, path)
    except ConfigError as error:
        if error.key != "grpc_web.target" or error.reason == "missing":
            raise
        names = ", ".join(sorted(local)) or "none configured"
        raise ConfigError(path, error.key, f"{error.reason} (or a local service name: {names})") from None


def local_forward_address(proxy: Proxy) -> tuple[str, int]:
    """This node's forward (CONNECT) port as a local client reaches it."""
    host = proxy.forward_host
    return _LOOPBACK_FOR.get(host, host), proxy.forward_port


def grpc_web_upstream(web: GrpcWebConfig, proxy: Proxy, auth_token: str) -> OpenUpstream:
    """How the bridge reaches its target: CONNECT through this node for a NodeId,
    a direct TCP connection otherwise."""
    from grpc_bridge.web_connect import direct_upstream, tunnel_upstream

    target = web.target
    if target.node_id is not None:
        host, port = local_forward_address(proxy)
        return tunnel_upstream(host, port, str(target), auth_token)
    assert target.host is not None
    return direct_upstream(target.host, target.port)


async def serve_grpc_web_for_node(
    web: GrpcWebConfig, proxy: Proxy, auth_token: str, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED
) -> None:
    """The `[grpc_web]` bridge until cancelled; reports its bound address as
    `host:port`. A listen address that cannot be bound is GrpcWebBindError."""
    from proxy.app.grpc_web_config import serve_grpc_web

    status = _StartStatus(task_status)
    try:
        await serve_grpc_web(web, grpc_web_upstream(web, proxy, auth_token), task_status=cast(Any, status))
    except (OSError, BaseExceptionGroup) as error:
        leaf = _single_leaf(error)
        if status.has_started or not isinstance(leaf, OSError):
            raise
        raise GrpcWebBindError(
            f"cannot bind [grpc_web] listen {web.listen}: {leaf.strerror or leaf} "
            "(choose another address in the config's [grpc_web], or stop what uses it)"
        ) from error


class _StartStatus:
    """Passes the bridge's bound (host, port) on as `host:port` and remembers that it
    started (a bind failure is only a failure before that)."""

    def __init__(self, task_status: trio.TaskStatus[str]) -> None:
        self.task_status = task_status
        self.has_started = False

    def started(self, address: tuple[str, int]) -> None:
        from proxy.tunnel.hosts import format_host_port

        self.has_started = True
        self.task_status.started(format_host_port(address[0], address[1]))


def _single_leaf(error: BaseException) -> BaseException:
    while isinstance(error, BaseExceptionGroup) and len(error.exceptions) == 1:
        error = error.exceptions[0]
    return error
