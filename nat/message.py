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
from nat.utp.packet import looks_like_utp

__all__ = [
    "MESSAGE_SIZE",
    "MessageType",
    "PING",
    "PONG",
    "DatagramKind",
    "classify_datagram",
    "is_message",
    "encode_message",
    "decode_message",
]

MESSAGE_SIZE: Final = 4
_UINT32 = struct.Struct("!I")


class MessageType(enum.IntEnum):
    """Known out-of-band message values of the original 4-byte format."""

    PING = 0
    PONG = 1


PING: Final = MessageType.PING
PONG: Final = MessageType.PONG

DatagramKind = Literal["utp", "message", "junk"]


def classify_datagram(data: bytes | bytearray | memoryview) -> DatagramKind:
    """Say what one received UDP payload is; never raises."""
    if looks_like_utp(data):
        return "utp"
    if is_message(data):
        return "message"
    return "junk"


def is_message(data: bytes | bytearray | memoryview) -> bool:
    """The out-of-band rule: exactly 4 bytes, the first 0 (never uTP's first byte)."""
    return len(data) == MESSAGE_SIZE and data[0] == 0


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
    if not is_message(data):
        raise MalformedMessage(f"not an out-of-band message ({len(data)} bytes)")
    value: int = _UINT32.unpack(data)[0]
    try:
        return MessageType(value)
    except ValueError:
        return value
