"""Typed errors of the data-transfer layer (uTP, the endpoint, messages)."""

from __future__ import annotations


class NatError(Exception):
    """Base of every error the nat package raises on purpose."""


class MalformedPacket(NatError, ValueError):
    """A datagram that is not a valid uTP packet."""


class MalformedMessage(NatError, ValueError):
    """A datagram that is not a valid out-of-band message."""


class UtpError(NatError):
    """A uTP connection failed."""


class UtpConnectionRefused(UtpError, ConnectionRefusedError):
    """The peer answered our SYN with RESET, or the endpoint refuses connections."""


class UtpConnectionReset(UtpError, ConnectionResetError):
    """The peer reset an established connection."""


class UtpTimeout(UtpError, TimeoutError):
    """Retransmissions were exhausted (connect or data)."""


class UtpClosed(UtpError):
    """Use of a connection or stream that is already closed."""


class PathInUse(UtpError):
    """A connection cannot move to a path where another connection already has
    its connection id (the peer would not know which of the two it reached)."""


class UnknownPath(NatError, ValueError):
    """A virtual path with no sender registered (Endpoint.add_path)."""


class EndpointClosed(NatError):
    """The endpoint (its UDP socket) is closed."""
