"""Who is calling? The verified remote NodeId of a gRPC call that came through the proxy.

A grpcio server behind the reverse proxy sees every call arrive from the proxy's
TCP socket to it; ``context.peer()`` names that socket's address (``ipv4:H:P`` or
``ipv6:[H]:P``). The Proxy knows which reverse connection owns that socket and
therefore which NodeId (and certificate chain) it verified.

grpcio runs handlers in its own threads while the Proxy lives in a trio loop, so
lookups cross into the loop with ``trio.from_thread.run_sync`` (the Proxy's
registries are only ever touched from its own thread).

Use either the function (``CallerLookup(proxy, token).info(context)``) or the
server interceptor, which makes the caller available to handlers through
``current_caller()`` and can refuse calls that did not come through the proxy.
"""

from __future__ import annotations

import contextvars
import ipaddress
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import trio

from proxy.tunnel.connection import ConnectionInfo

_CALLER: contextvars.ContextVar[ConnectionInfo | None] = contextvars.ContextVar("keynode_caller", default=None)


def parse_grpc_peer(peer: str) -> tuple[str, int] | None:
    """``ipv4:127.0.0.1:5000`` / ``ipv6:[::1]:5000`` (either URL-escaped) -> (host, port)."""
    peer = peer.replace("%5B", "[").replace("%5D", "]").replace("%3A", ":")
    scheme, _, rest = peer.partition(":")
    if scheme not in ("ipv4", "ipv6") or not rest:
        return None
    if rest.startswith("["):
        host, _, port = rest[1:].partition("]:")
    else:
        host, _, port = rest.rpartition(":")
    try:
        return str(ipaddress.ip_address(host.split("%", 1)[0])), int(port)
    except ValueError:
        return None


class CallerLookup:
    """Look up callers of a grpcio server in a Proxy running in a trio loop.

    ``trio_token``: ``trio.lowlevel.current_trio_token()`` of the Proxy's loop.
    """

    def __init__(self, proxy: Any, trio_token: trio.lowlevel.TrioToken) -> None:
        self.proxy = proxy
        self.trio_token = trio_token

    def info_for_peer(self, peer: str) -> ConnectionInfo | None:
        address = parse_grpc_peer(peer)
        if address is None:
            return None
        try:
            info: ConnectionInfo | None = trio.from_thread.run_sync(
                self.proxy.get_connection_info_by_reverse, *address, trio_token=self.trio_token
            )
            return info
        except trio.RunFinishedError:
            return None  # the proxy's loop is gone: nobody can vouch for the caller

    def info(self, context: grpc.ServicerContext) -> ConnectionInfo | None:
        """The verified ConnectionInfo of the call, or None if it did not come through the proxy."""
        return self.info_for_peer(context.peer())


def current_caller() -> ConnectionInfo | None:
    """Inside a handler wrapped by NodeIdentityInterceptor: the caller's ConnectionInfo."""
    return _CALLER.get()


class NodeIdentityInterceptor(grpc.ServerInterceptor):  # type: ignore[misc]  # grpc ships no types
    """Expose the caller's verified identity to handlers; optionally require one."""

    def __init__(self, lookup: CallerLookup, *, require: bool = False) -> None:
        self.lookup = lookup
        self.require = require

    def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None], details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(details)
        if handler is None:
            return None
        kinds = {
            "unary_unary": grpc.unary_unary_rpc_method_handler,
            "unary_stream": grpc.unary_stream_rpc_method_handler,
            "stream_unary": grpc.stream_unary_rpc_method_handler,
            "stream_stream": grpc.stream_stream_rpc_method_handler,
        }
        for name, make in kinds.items():
            behavior = getattr(handler, name)
            if behavior is not None:
                streaming = name.endswith("_stream")
                return make(
                    self._wrap(behavior, streaming),
                    request_deserializer=handler.request_deserializer,
                    response_serializer=handler.response_serializer,
                )
        return handler

    def _identify(self, context: grpc.ServicerContext) -> ConnectionInfo | None:
        info = self.lookup.info(context)
        if info is None and self.require:
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "call did not come through a verified keynode connection")
        return info

    def _wrap(self, behavior: Callable[..., Any], streaming: bool) -> Callable[..., Any]:
        if streaming:

            def stream_behavior(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
                # grpcio may resume the generator in another context: set and
                # clear instead of token-reset, which needs the same context.
                _CALLER.set(self._identify(context))
                try:
                    yield from behavior(request, context)
                finally:
                    _CALLER.set(None)

            return stream_behavior

        def unary_behavior(request: Any, context: grpc.ServicerContext) -> Any:
            token = _CALLER.set(self._identify(context))
            try:
                return behavior(request, context)
            finally:
                _CALLER.reset(token)

        return unary_behavior
