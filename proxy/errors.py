"""Typed errors of the appliance layer, one class per distinct failure.

Each class carries ``http_status``: the status the HTTP CONNECT edge answers with
when this failure ends a CONNECT (DESIGN.md, "The Proxy").
"""

from __future__ import annotations

import trio


class KeynodeError(Exception):
    """Base of every error keynode raises on purpose."""

    http_status = 500


# --- identity -----------------------------------------------------------------


class IdentityError(KeynodeError):
    """Keys, NodeIds and certificates."""


class NodeIdInvalid(IdentityError, ValueError):
    """Text or bytes that are not exactly one 32-byte NodeId."""

    http_status = 400


class KeyFileError(IdentityError):
    """A key or certificate file is missing, unreadable or malformed."""


class CertificateChainError(IdentityError):
    """A peer's certificate chain was rejected (HTTP 526)."""

    http_status = 526


class CertChainEmpty(CertificateChainError):
    """The peer presented no certificate at all."""


class CertChainNoNodeIds(CertificateChainError):
    """Server-side verification was asked with no wanted NodeIds."""


class CertChainUnclaimed(CertificateChainError):
    """No certificate in the chain claims any of the wanted NodeIds."""


class CertChainBrokenLink(CertificateChainError):
    """chain[i] is not issued by, or not signed by, chain[i+1]."""


class CertChainDateInvalid(CertificateChainError):
    """A certificate is expired or not yet valid."""


class CertChainNameInvalid(CertificateChainError):
    """A certificate's subject CN is missing or is not an encoded NodeId."""


class CertChainKeyInvalid(CertificateChainError):
    """A certificate's key is not Ed25519, or its CN NodeId is not its own key."""


class CertChainSignatureInvalid(CertificateChainError):
    """A node signature (or a certificate's own signature) does not verify."""


class CertChainMalformed(CertificateChainError):
    """A certificate's fields cannot be parsed (bad version, extensions, encodings)."""


# --- TLS ------------------------------------------------------------------------


class TLSError(KeynodeError):
    """TLS over a trio stream."""

    http_status = 502


class TLSHandshakeError(TLSError, trio.BrokenResourceError):
    """The TLS handshake failed (bad peer data, no client certificate, ...)."""


class TLSProtocolError(TLSError, trio.BrokenResourceError):
    """The peer sent bytes that are not valid TLS after the handshake."""


class TLSBusyError(TLSError, trio.BusyResourceError, RuntimeError):
    """Two tasks used one TLS stream direction at once."""


class TLSTruncatedError(TLSProtocolError):
    """The transport ended without the peer's close_notify (possible truncation)."""


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


# --- config, CLI, control socket, port forwarding (owner: cli) ---------------------


class ConfigError(KeynodeError):
    """A config file is unreadable, not TOML, or has an unknown or invalid key."""

    def __init__(self, path: str, key: str, reason: str) -> None:
        super().__init__(f"{path}: {key}: {reason}")
        self.path = path
        self.key = key
        self.reason = reason


class NodeDirectoryError(KeynodeError):
    """The node directory has no identity, or keygen would overwrite one."""


class ControlError(KeynodeError):
    """The control socket is unreachable or answered with an error."""


class ControlUnreachable(ControlError):
    """No node answers on the control socket (is `keynode run` running?)."""


class ControlRequestFailed(ControlError):
    """The node refused or failed a control request."""

    def __init__(self, status: int, error: str, message: str) -> None:
        super().__init__(f"{error}: {message}")
        self.status = status
        self.error = error
        self.message = message


class PortForwardError(KeynodeError):
    """A tunnelled connection of `keynode forward` could not be set up."""
