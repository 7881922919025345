"""Errors of TLS over a trio stream."""

from __future__ import annotations

import trio

from proxy.identity.errors import KeynodeError

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
