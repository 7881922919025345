"""Typed failures of the HTTP/2 identity relay (h2_relay.py, h2_identity.py).

Each ends one relayed connection, never the process: the splicer catches them,
logs them once and returns, so the tunnel connection finishes as it would after
a reset.
"""

from __future__ import annotations

from proxy.identity.errors import KeynodeError


class H2RelayError(KeynodeError):
    """The HTTP/2 relay between a tunnel and a gRPC server had to end the connection."""


class TunnelProtocolError(H2RelayError):
    """The tunnel side (the remote caller) broke HTTP/2: garbage, a protocol or
    flow-control violation, a header flood. Answered with GOAWAY, then closed."""


class ServerProtocolError(H2RelayError):
    """The local server broke HTTP/2 (or is not an HTTP/2 server at all)."""
