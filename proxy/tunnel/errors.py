"""Errors of the tunnel: the Proxy, its connections and the HTTP CONNECT edge."""

from __future__ import annotations

from proxy.identity.errors import KeynodeError

# --- proxy connections ------------------------------------------------------------


class ProxyError(KeynodeError):
    """The Proxy and its connections."""


class ProxyNotRunning(ProxyError):
    """The proxy is stopping or stopped (HTTP 503)."""

    http_status = 503


class ConnectionStartError(ProxyError):
    """A forward or reverse connection could not be started (HTTP 502)."""

    http_status = 502


class ConnectionStartTimeout(ConnectionStartError):
    """Starting a connection took longer than ``conn_connect_time`` (HTTP 504)."""

    http_status = 504


class ConnectionVerifyError(ConnectionStartError):
    """The peer's certificate chain was rejected while starting (HTTP 526)."""

    http_status = 526


class ConnectionKeepAliveTimeout(ProxyError):
    """No message from the peer within ``conn_keep_alive_timeout_time`` (HTTP 524)."""

    http_status = 524


class ConnectionResetByPeer(ProxyError):
    """The peer reset or ended the connection."""

    http_status = 502


class ConnectionNotFound(ProxyError, LookupError):
    """No connection is registered under that address."""


# --- HTTP CONNECT edge ----------------------------------------------------------


class HTTPConnectError(ProxyError):
    """A CONNECT request that cannot be served as asked."""

    http_status = 400


class BadConnectRequest(HTTPConnectError):
    """Malformed request, bad target, missing/invalid nodeId, wildcard host."""

    http_status = 400


class MethodNotAllowed(HTTPConnectError):
    """Any method other than CONNECT."""

    http_status = 405


class ProxyAuthRequired(HTTPConnectError):
    """Missing or wrong Proxy-Authorization."""

    http_status = 407


class UnknownNodeId(BadConnectRequest):
    """A ``<NodeId>:<port>`` target whose NodeId is not in the address book."""
