"""Errors of the relay: its frame codec, its server and its client link."""

from __future__ import annotations

from proxy.identity.errors import KeynodeError


class RelayError(KeynodeError):
    """The relay (forwarding datagrams between registered nodes)."""

    http_status = 502


# --- the frame codec ---------------------------------------------------------------


class RelayFrameError(RelayError):
    """Bytes that are not a valid relay frame."""


class FrameTooLarge(RelayFrameError):
    """A frame header announces more than the frame size limit. The stream cannot be
    read on (nothing past the header is trusted), so the connection ends."""


class FrameTruncated(RelayFrameError):
    """The stream ended inside a frame (or the bytes given hold only part of one)."""


class UnknownFrameType(RelayFrameError):
    """A whole frame of a type this version does not know; the frame was consumed,
    so the stream is still in step and the reader may go on."""

    def __init__(self, frame_type: int) -> None:
        super().__init__(f"unknown relay frame type 0x{frame_type:02x}")
        self.frame_type = frame_type


class MalformedFrame(RelayFrameError):
    """A frame of a known type whose body has the wrong size or content."""


class DatagramTooLarge(MalformedFrame):
    """A SEND or RECV frame carrying a datagram over the datagram size limit."""


# --- the server and the link -------------------------------------------------------


class RelayProtocolError(RelayError):
    """A peer sent a frame that is valid but not allowed in its role (a client sending
    RECV, a relay sending SEND)."""


class RelayRejected(RelayError):
    """The relay server refused this client (its chain, or a newer connection with the
    same NodeId took its place)."""


class RelayIdentityMismatch(RelayError):
    """The relay at the address did not prove the NodeId it was expected to have."""

    http_status = 526


class RelayAddressInvalid(RelayError, ValueError):
    """A relay address that is not ``<NodeId>@host:port``."""

    http_status = 400


class RelayLinkClosed(RelayError):
    """The relay link was closed by this node."""


class RelayLimitsInvalid(RelayError, ValueError):
    """A relay limit out of its range (named in the message)."""


class RelayFull(RelayRejected):
    """The relay serves as many clients as its limits allow."""


class RelayTimeout(RelayError):
    """The relay link heard nothing from the relay (or got no registration) in time."""

    http_status = 504


def first_error(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The first failure in a nursery's group that is not a cancellation (the one
    that ended the connection; the others are its consequences)."""
    for error in group.exceptions:
        if isinstance(error, BaseExceptionGroup):
            return first_error(error)
        if type(error).__name__ != "Cancelled":
            return error
    return group
