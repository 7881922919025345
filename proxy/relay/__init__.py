"""The relay: forwarding datagrams between registered nodes (issue 14).

frames (the codec), limits, forwarding (the server core), session (a client's
state), serve (the TCP + mutual TLS server), link (the client link), paths (a link
as virtual paths of a nat Endpoint). Sans-IO cores, thin trio drivers; see
docs/architecture.md, "The relay".

What an application needs: ``serve_relay(tls_config, host=, port=, limits=)`` under
``nursery.start`` (reports a ``RelayServer`` with ``port``, ``core.stats``, ``stats``),
``RelayLimits`` (defaults for every limit), ``RelayLink`` + ``RelayAddress`` (a node's
link to ``<relay NodeId>@host:port``), ``RelayPaths`` (uTP over that link).
"""

from proxy.relay.limits import RelayLimits
from proxy.relay.link import RelayAddress, RelayLink, RelayLinkStats
from proxy.relay.paths import RelayPaths, relay_path
from proxy.relay.serve import RelayServer, RelayServerStats, serve_relay

__all__ = ["RelayLimits", "RelayAddress", "RelayLink", "RelayLinkStats", "RelayPaths", "relay_path",
           "RelayServer", "RelayServerStats", "serve_relay"]
