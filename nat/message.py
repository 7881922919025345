"""Out-of-band messages sharing the uTP UDP socket, and datagram classification.

Wire format (kept exactly as the original system had it): a datagram of exactly
4 bytes holding a big-endian uint32, 0 = PING, 1 = PONG. Such a datagram starts
with 0x00, whose low nibble is 0, so it can never be mistaken for uTP (low nibble
of the first byte is the uTP version, 1).

Keyed messages (the rendezvous family, authenticated by proxy.rendezvous): a
datagram longer than 4 bytes whose first 4 bytes are ``00 00 00 tt`` with tt >= 2.
An original peer reads only the first uint32 of any datagram and drops values
other than 0 and 1, so it ignores them; a longer datagram starting ``00 00 00 00``
or ``00 00 00 01`` would be a ping or pong to it, so those stay junk here. nat
only recognises the family; the crypto lives above (nat does none). Everything
else starting with 0x00 (STUN among it) is junk.
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
    "is_keyed_message",
    "KEYED_HEADER_SIZE",
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

DatagramKind = Literal["utp", "message", "keyed", "junk"]
KEYED_HEADER_SIZE: Final = 4


def classify_datagram(data: bytes | bytearray | memoryview) -> DatagramKind:
    """Say what one received UDP payload is; never raises."""
    if looks_like_utp(data):
        return "utp"
    if is_message(data):
        return "message"
    if is_keyed_message(data):
        return "keyed"
    return "junk"


def is_message(data: bytes | bytearray | memoryview) -> bool:
    """The out-of-band rule: exactly 4 bytes, the first 0 (never uTP's first byte)."""
    return len(data) == MESSAGE_SIZE and data[0] == 0


def is_keyed_message(data: bytes | bytearray | memoryview) -> bool:
    """The keyed-message rule: longer than 4 bytes, ``00 00 00 tt`` with tt >= 2."""
    return len(data) > KEYED_HEADER_SIZE and data[0] == 0 and data[1] == 0 and data[2] == 0 and data[3] >= 2


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
