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


# UtpConnection's instance attributes as slots: past 30 attributes an instance
# dict loses CPython 3.11's fast attribute access (about a third slower per
# access, and the hot paths make over a hundred per round trip). Instances
# still have a __dict__ (the mixins declare no slots) for anything else.
CONNECTION_SLOTS = (
    "_ack_deadline", "_ack_due", "_cc", "_close_deadline", "_close_requested", "_config",
    "_consecutive_timeouts", "_created", "_delay", "_delayed_ack", "_dup_acks", "_eof_reached",
    "_eof_requested", "_eof_seq", "_fin_acked", "_fin_sent", "_flight", "_isn", "_keepalive_interval",
    "_last_adv_wnd", "_last_recv", "_last_send", "_latest_delivered_order", "_linger_until", "_max_packets",
    "_mss", "_mux", "_outstanding", "_outstanding_bytes", "_peer_wnd", "_probe_deadline", "_probe_interval",
    "_probe_ok", "_rack_checked", "_rack_sent_at", "_rbuf", "_rcv_nxt", "_readable_event",
    "_readable_signalled", "_recovery_seq", "_recv_buffer_size", "_reorder", "_reorder_bytes", "_reply_micro",
    "_resend", "_reset_due", "_rto_deadline", "_rto_force", "_rtt", "_sack_seen_base", "_sack_seen_bits",
    "_sack_skipped", "_send_blocked", "_send_buffer_size", "_sendbuf", "_snd_nxt", "_snd_una",
    "_syn_fast_resends", "_syn_last_sent", "_syn_seq", "_synack_due", "_unacked", "_xmit_count",
    "_zero_window_probe", "bytes_received", "bytes_sent", "error", "recv_id", "remote_address", "retransmits",
    "send_id", "state",
)
