"""Out-of-band messages sharing the uTP UDP socket, and datagram classification.

Wire format (kept exactly as the original system had it): a datagram of exactly
4 bytes holding a big-endian uint32, 0 = PING, 1 = PONG. Such a datagram starts
with 0x00, whose low nibble is 0, so it can never be mistaken for uTP (low nibble
of the first byte is the uTP version, 1).

Reserved for later message types (relay, address discovery): datagrams that start
with 0x00 and are longer than 4 bytes. They are neither uTP nor the original
format, and an original peer drops anything that is not exactly 4 bytes, so they
are safe to add; until a type is defined here they classify as junk.
"""

from __future__ import annotations

import enum
import struct
from typing import Final, Literal

from nat.errors import MalformedMessage

__all__ = [
    "MESSAGE_SIZE",
    "MessageType",
    "PING",
    "PONG",
    "DatagramKind",
    "classify_datagram",
    "encode_message",
    "decode_message",
]

MESSAGE_SIZE: Final = 4
_UINT32 = struct.Struct("!I")

# Same rule as nat.utp.packet.looks_like_utp, repeated here so the hot path is one
# function with no import of the core: version nibble 1, type 0..4, full header.
_UTP_HEADER_SIZE: Final = 20
_UTP_MAX_TYPE: Final = 4


class MessageType(enum.IntEnum):
    """Known out-of-band message values of the original 4-byte format."""

    PING = 0
    PONG = 1


PING: Final = MessageType.PING
PONG: Final = MessageType.PONG

DatagramKind = Literal["utp", "message", "junk"]


def classify_datagram(data: bytes) -> DatagramKind:
    """Say what one received UDP payload is; never raises."""
    size = len(data)
    if size >= _UTP_HEADER_SIZE:
        first = data[0]
        if first & 0x0F == 1 and first >> 4 <= _UTP_MAX_TYPE:
            return "utp"
        return "junk"
    if size == MESSAGE_SIZE and data[0] == 0:
        return "message"
    return "junk"


def encode_message(message: int) -> bytes:
    """Encode a message value (PING, PONG or another uint32 below 2**24).

    Values of 2**24 and above would start with a non-zero byte, which the format
    reserves (a peer could not tell them from junk), so they are refused.
    """
    if isinstance(message, bool) or not isinstance(message, int):
        raise TypeError(f"message must be an int, not {type(message).__name__}")
    if not 0 <= message < 1 << 24:
        raise ValueError(f"message value out of range: {message}")
    return _UINT32.pack(message)


def decode_message(data: bytes) -> int:
    """Decode a 4-byte message; MalformedMessage for anything else.

    Known values come back as MessageType members (equal to their ints); unknown
    values of the 4-byte format come back as plain ints for the caller to ignore.
    """
    if len(data) != MESSAGE_SIZE or data[0] != 0:
        raise MalformedMessage(f"not an out-of-band message ({len(data)} bytes)")
    (value,) = _UINT32.unpack(data)
    try:
        return MessageType(value)
    except ValueError:
        return value
