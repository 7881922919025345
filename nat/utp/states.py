"""Shared definitions of the uTP connection modules: states, constants, records."""

from __future__ import annotations

import enum
from typing import Any

MASK16 = 0xFFFF
MASK32 = 0xFFFFFFFF
DUP_ACK_THRESHOLD = 3
MAX_PROBE_INTERVAL = 15.0

# A peer's address: an opaque hashable tuple, (host, port) or an IPv6 4-tuple.
Address = tuple[Any, ...]
# One datagram to send, or one received: its bytes and the peer's address.
Datagram = tuple[bytes, Address]


class UtpState(enum.Enum):
    SYN_SENT = "SYN_SENT"
    SYN_RECV = "SYN_RECV"
    CONNECTED = "CONNECTED"
    CLOSED = "CLOSED"
    RESET = "RESET"


SYN_SENT = UtpState.SYN_SENT
SYN_RECV = UtpState.SYN_RECV
CONNECTED = UtpState.CONNECTED
CLOSED = UtpState.CLOSED
RESET = UtpState.RESET


class OutgoingPacket:
    """A packet that consumed a sequence number and awaits its ACK."""

    __slots__ = ("seq", "ptype", "payload", "sent_at", "transmissions", "in_flight", "order")

    def __init__(
        self,
        seq: int,
        ptype: int,
        payload: bytes,
        sent_at: float = 0.0,
        transmissions: int = 0,
        in_flight: bool = False,
        order: int = 0,
    ) -> None:
        self.seq = seq
        self.ptype = ptype
        self.payload = payload
        self.sent_at = sent_at
        self.transmissions = transmissions
        self.in_flight = in_flight
        # transmission order within the connection (a later send has a larger
        # number, even within one batch sent at the same ``now``)
        self.order = order


_new_record = OutgoingPacket.__new__


def new_data_record(seq: int, ptype: int, payload: bytes, now: float, order: int) -> OutgoingPacket:
    """The record of a packet sent for the first time now, fields set directly
    (cheaper than __init__: the bulk send loop makes one per packet)."""
    rec = _new_record(OutgoingPacket)
    rec.seq = seq
    rec.ptype = ptype
    rec.payload = payload
    rec.sent_at = now
    rec.transmissions = 1
    rec.in_flight = True
    rec.order = order
    return rec
