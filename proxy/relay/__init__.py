"""The relay: forwarding datagrams between registered nodes (issue 14).

frames (the codec), limits, forwarding (the server core), session (a client's
state), serve (the TCP + mutual TLS server), link (the client link), paths (a link
as virtual paths of a nat Endpoint). Sans-IO cores, thin trio drivers; see
docs/architecture.md, "The relay".

What an application needs: ``serve_relay(tls_config, host=, port=, limits=)`` under
``nursery.start`` (reports a ``RelayServer`` with ``port``, ``core.stats``, ``stats``),
``RelayLimits`` (defaults for every limit), ``RelayLink`` + ``RelayAddress`` (a node's
link to ``<relay NodeId>@host:port``), ``RelayPaths`` (uTP over that link).

The relay over UDP and a node's relayed paths live beside the rendezvous (they use
its keyed messages and registrations): ``proxy.rendezvous.relay_udp`` (the relay
node's UDP front of ``RelayCore``) and ``proxy.rendezvous.routes.RelayRoutes``, one
per node, reached as ``Proxy.rendezvous.routes``:

    path_to(peer: NodeId) -> VirtualPath | None   # ("relay", R, peer), add_path-ed
    relay_for(peer: NodeId) -> NodeId | None
    home_relay -> NodeId | None
    on_path_event: Callable[[RelayPathEvent], None] | None   # "appeared" / "gone"
    async ping(peer: NodeId, timeout: float = 2.0) -> float  # RTT, end to end
    send(peer: NodeId, datagram: bytes) -> bool
    route_ready(peer: NodeId) -> bool

See docs/architecture.md, "The relay over UDP" and "A node's relayed paths".
"""

from proxy.relay.limits import RelayLimits
from proxy.relay.link import RelayAddress, RelayLink, RelayLinkStats
from proxy.relay.paths import RelayPaths, relay_path
from proxy.relay.serve import RelayServer, RelayServerStats, serve_relay

__all__ = ["RelayLimits", "RelayAddress", "RelayLink", "RelayLinkStats", "RelayPaths", "relay_path",
           "RelayServer", "RelayServerStats", "serve_relay"]
