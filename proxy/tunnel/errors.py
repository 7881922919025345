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


class StartRefused(ConnectionStartError):
    """A start ended by a decision, not by a broken path: a rejected chain, a refusal
    the remote sent. The tunnel still ends with close_notify and FIN (HTTP 502)."""


class ConnectionVerifyError(StartRefused):
    """The peer's certificate chain was rejected while starting (HTTP 526)."""

    http_status = 526


class ServerUnavailable(StartRefused):
    """The reverse side could not connect to its server (or has none) for a verified
    caller; the caller is told so (HTTP 502 there, see ``RemoteServerUnavailable``)."""

    reason = "no server is configured"  # what the caller is told (no address)


class ConnectionRefusedByRemote(StartRefused):
    """The remote node refused the start and said why, in its start status
    (start_status.py); a reason this node does not know (HTTP 502)."""


class RemoteServerUnavailable(ConnectionRefusedByRemote):
    """The remote node could not connect to its server (it is down or unreachable
    from there), or it serves none (HTTP 502)."""


class RemoteRejectedChain(ConnectionRefusedByRemote):
    """The remote node rejected this node's certificate chain (HTTP 502)."""


class ServiceRefused(StartRefused):
    """The reverse side refused a verified caller by its service policy (services.py);
    the caller is told why in the start status."""


class ServiceNotFound(ServiceRefused):
    """The caller named a service this node does not have (start status reason 4)."""

    http_status = 404


class ServiceForbidden(ServiceRefused):
    """The service's allow list does not hold the caller's NodeId (reason 3)."""

    http_status = 403


class ServiceRevoked(ServiceForbidden):
    """The caller's access was taken away by a reload during its start (reason 5)."""


class RemoteServiceNotFound(ConnectionRefusedByRemote):
    """The remote node has no such service (HTTP 404)."""

    http_status = 404


class RemoteServiceForbidden(ConnectionRefusedByRemote):
    """The remote service's allow list does not hold this node's NodeId (HTTP 403)."""

    http_status = 403


class RemoteServiceRevoked(RemoteServiceForbidden):
    """The remote node took this node's access away while the tunnel started (HTTP 403)."""


class TargetNotAllowed(ProxyError):
    """A CONNECT to a NodeId that this node's ``[forward] allow_targets`` leaves out;
    refused before anything is sent (HTTP 403)."""

    http_status = 403


class BadStartStatus(ConnectionStartError):
    """The remote's start status (start_status.py) was malformed or never came
    (HTTP 502)."""


class ProxyBindError(ProxyError, OSError):
    """The Proxy could not bind one of its sockets: the UDP proxy socket or the
    CONNECT listener; the message names which, with the address."""

    def __init__(self, socket_name: str, address: str, error: OSError) -> None:
        super().__init__(f"cannot bind the {socket_name} to {address}: {error.strerror or error}")
        self.socket_name = socket_name
        self.address = address
        self.errno = error.errno


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
