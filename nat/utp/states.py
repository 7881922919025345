"""Shared definitions of the uTP connection modules: states, constants, records."""

from __future__ import annotations

import enum

MASK16 = 0xFFFF
MASK32 = 0xFFFFFFFF
VERSION = 1
DUP_ACK_THRESHOLD = 3
MAX_PROBE_INTERVAL = 15.0


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
