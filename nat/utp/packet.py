"""uTP (BEP 29) packet codec, wire-compatible with libutp.

Header (20 bytes, big-endian)::

    type<<4 | version(1) : u8     extension : u8     connection_id : u16
    timestamp_microseconds : u32
    timestamp_difference_microseconds : u32
    wnd_size : u32
    seq_nr : u16                  ack_nr : u16

followed by a chain of extensions (``next_extension : u8, length : u8, data``),
then the payload.  Extension 1 is the selective ACK: a bitmask whose bit ``i``
stands for ``ack_nr + 2 + i``.  Bits are numbered least-significant first within
each byte (``mask[i >> 3] & (1 << (i & 7))``), which is how libutp reads and
writes it; BEP 29's prose reads as the reverse order but libutp decides
interoperability.  libutp always sends exactly 4 bytes and accepts any length;
we do the same (BEP 29 asks for a multiple of 4, libtorrent sends 1-32 bytes, so
being lenient on input matters).  Any other extension is skipped.

Two decoders share one parser: :func:`decode_packet` (the contract: returns a
:class:`Packet`) and :func:`parse_datagram` (the hot path used by the
multiplexer: returns a plain tuple, no object allocation beyond the payload).

This module is also the one place for the two rules every layer needs:

- the header layout: :func:`pack_header` packs it (``HEADER`` is its struct, for
  the DATA paths of ``Sender.flush`` that call it directly, per packet);
- what a uTP datagram is, as opposed to the out-of-band messages sharing the
  socket (DESIGN.md): at least a header long, and a first byte of version 1 with a
  known type. :func:`looks_like_utp` applies it; ``UTP_FIRST_BYTE`` is the same
  rule as a 256-entry table for the per-datagram paths that index it.
"""

from __future__ import annotations

import struct
from typing import Final

from nat.errors import MalformedPacket

ST_DATA = 0
ST_FIN = 1
ST_STATE = 2
ST_RESET = 3
ST_SYN = 4

VERSION = 1
HEADER_SIZE = 20
EXTENSION_SELECTIVE_ACK = 1

TYPE_NAMES = {ST_DATA: "DATA", ST_FIN: "FIN", ST_STATE: "STATE", ST_RESET: "RESET", ST_SYN: "SYN"}

HEADER: Final = struct.Struct(">BBHIIIHH")
_pack = HEADER.pack
_unpack_from = HEADER.unpack_from
_MASK16 = 0xFFFF
_MASK32 = 0xFFFFFFFF

# The uTP rule on the first byte (version 1 in the low nibble, type DATA..SYN in
# the high one) as a table: UTP_FIRST_BYTE[first] is 1 when it holds, else 0.
UTP_FIRST_BYTE: Final = bytes(int(first & 0x0F == VERSION and first >> 4 <= ST_SYN) for first in range(256))

__all__ = [
    "ST_DATA",
    "ST_FIN",
    "ST_STATE",
    "ST_RESET",
    "ST_SYN",
    "VERSION",
    "HEADER_SIZE",
    "EXTENSION_SELECTIVE_ACK",
    "HEADER",
    "UTP_FIRST_BYTE",
    "Packet",
    "pack_header",
    "type_byte",
    "decode_packet",
    "encode_packet",
    "parse_datagram",
    "looks_like_utp",
    "sack_bits",
    "build_sack",
]


class Packet:
    """One decoded uTP packet (plain value object)."""

    __slots__ = (
        "type",
        "connection_id",
        "timestamp_us",
        "timestamp_diff_us",
        "wnd_size",
        "seq_nr",
        "ack_nr",
        "sack",
        "payload",
    )

    def __init__(
        self,
        type: int,
        connection_id: int,
        seq_nr: int,
        ack_nr: int,
        *,
        timestamp_us: int = 0,
        timestamp_diff_us: int = 0,
        wnd_size: int = 0,
        sack: bytes | None = None,
        payload: bytes = b"",
    ) -> None:
        self.type = type
        self.connection_id = connection_id
        self.timestamp_us = timestamp_us
        self.timestamp_diff_us = timestamp_diff_us
        self.wnd_size = wnd_size
        self.seq_nr = seq_nr
        self.ack_nr = ack_nr
        self.sack = sack
        self.payload = payload

    def _key(self) -> tuple[object, ...]:
        return tuple(getattr(self, name) for name in self.__slots__)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Packet):
            return NotImplemented
        return self._key() == other._key()

    __hash__ = None  # type: ignore[assignment]  # mutable value object

    def __repr__(self) -> str:
        name = TYPE_NAMES.get(self.type, str(self.type))
        sack = f" sack={self.sack.hex()}" if self.sack is not None else ""
        return (
            f"Packet({name} id={self.connection_id} seq={self.seq_nr} ack={self.ack_nr}"
            f" wnd={self.wnd_size} ts={self.timestamp_us} tsdiff={self.timestamp_diff_us}"
            f"{sack} len={len(self.payload)})"
        )

    def encode(self) -> bytes:
        return encode_packet(
            self.type,
            self.connection_id,
            self.seq_nr,
            self.ack_nr,
            timestamp_us=self.timestamp_us,
            timestamp_diff_us=self.timestamp_diff_us,
            wnd_size=self.wnd_size,
            sack=self.sack,
            payload=self.payload,
        )


def type_byte(ptype: int) -> int:
    """The header's first byte for packet type ``ptype``: type and version."""
    return (ptype << 4) | VERSION


def pack_header(
    ptype: int,
    connection_id: int,
    timestamp_us: int,
    timestamp_diff_us: int,
    wnd_size: int,
    seq_nr: int,
    ack_nr: int,
    extension: int = 0,
) -> bytes:
    """The 20-byte header. Sequence and ACK numbers are taken modulo 2**16 (the
    core counts them unbounded); every other field must already fit."""
    return _pack(
        (ptype << 4) | VERSION,
        extension,
        connection_id,
        timestamp_us,
        timestamp_diff_us,
        wnd_size,
        seq_nr & _MASK16,
        ack_nr & _MASK16,
    )


def looks_like_utp(data: bytes | bytearray | memoryview) -> bool:
    """The uTP rule: at least a header long, version 1 and a known type."""
    return len(data) >= HEADER_SIZE and UTP_FIRST_BYTE[data[0]] == 1


def _not_utp(first: int) -> str:
    """Why a first byte fails the rule (for the error message)."""
    if first & 0x0F != VERSION:
        return f"uTP version {first & 0x0F} is not 1"
    return f"unknown uTP packet type {first >> 4}"


def parse_datagram(data: bytes) -> tuple[int, int, int, int, int, int, int, bytes | None, int]:
    """Validate and split a datagram without building a Packet.

    Returns ``(type, connection_id, timestamp_us, timestamp_diff_us, wnd_size,
    seq_nr, ack_nr, sack, payload_offset)``; the payload is ``data[payload_offset:]``.
    Raises MalformedPacket.
    """
    size = len(data)
    if size < HEADER_SIZE:
        raise MalformedPacket(f"datagram of {size} bytes is shorter than the uTP header")
    first, extension, conn_id, ts, ts_diff, wnd, seq, ack = _unpack_from(data)
    if not UTP_FIRST_BYTE[first]:
        raise MalformedPacket(_not_utp(first))
    ptype = first >> 4
    sack = None
    offset = HEADER_SIZE
    hops = 0
    while extension:
        if offset + 2 > size:
            raise MalformedPacket("truncated extension header")
        next_extension = data[offset]
        length = data[offset + 1]
        offset += 2
        if offset + length > size:
            raise MalformedPacket("extension runs past the end of the datagram")
        if extension == EXTENSION_SELECTIVE_ACK:
            if length == 0:
                raise MalformedPacket("empty selective-ACK extension")
            if sack is None:  # the first one wins; duplicates are ignored
                sack = bytes(data[offset : offset + length])
        offset += length
        extension = next_extension
        hops += 1
        if hops > 64:  # 2 + 255 bytes each: a datagram cannot legitimately chain more
            raise MalformedPacket("too many extensions")
    return ptype, conn_id, ts, ts_diff, wnd, seq, ack, sack, offset


def decode_packet(data: bytes) -> Packet:
    """Decode one datagram; raises :class:`nat.errors.MalformedPacket`."""
    ptype, conn_id, ts, ts_diff, wnd, seq, ack, sack, offset = parse_datagram(data)
    return Packet(
        ptype,
        conn_id,
        seq,
        ack,
        timestamp_us=ts,
        timestamp_diff_us=ts_diff,
        wnd_size=wnd,
        sack=sack,
        payload=bytes(data[offset:]),
    )


def encode_packet(
    type: int,
    connection_id: int,
    seq_nr: int,
    ack_nr: int,
    *,
    timestamp_us: int = 0,
    timestamp_diff_us: int = 0,
    wnd_size: int = 0,
    sack: bytes | None = None,
    payload: bytes = b"",
) -> bytes:
    """Encode one packet. Field values are masked to their wire widths."""
    if not 0 <= type <= ST_SYN:
        raise ValueError(f"unknown uTP packet type {type}")
    if sack is not None and not 1 <= len(sack) <= 255:
        raise ValueError("selective-ACK bitmask must be 1..255 bytes")
    header = pack_header(
        type,
        connection_id & _MASK16,
        timestamp_us & _MASK32,
        timestamp_diff_us & _MASK32,
        wnd_size & _MASK32,
        seq_nr,
        ack_nr,
        EXTENSION_SELECTIVE_ACK if sack is not None else 0,
    )
    if sack is not None:
        return header + bytes((0, len(sack))) + sack + payload
    return header + payload


def sack_bits(sack: bytes) -> list[int]:
    """Offsets ``i`` (from ack_nr + 2) whose bit is set, libutp bit order."""
    found = []
    for byte_index, byte in enumerate(sack):
        if byte:
            base = byte_index * 8
            for bit in range(8):
                if byte & (1 << bit):
                    found.append(base + bit)
    return found


def build_sack(offsets: list[int] | set[int], size: int = 4) -> bytes:
    """Bitmask of ``size`` bytes with the given offsets (from ack_nr + 2) set."""
    mask = bytearray(size)
    limit = size * 8
    for offset in offsets:
        if 0 <= offset < limit:
            mask[offset >> 3] |= 1 << (offset & 7)
    return bytes(mask)
