"""Configuration of the uTP core (``UtpConfig``) and the multiplexer counters."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any


@dataclass
class UtpConfig:
    """Tunables of every connection of one multiplexer. Times are seconds."""

    recv_buffer_size: int = 1 << 20
    send_buffer_size: int = 1 << 20
    # 1402-byte UDP payload ceiling like libutp (IPv4) minus the 20-byte header.
    mtu_payload: int = 1382
    # IPv6 peers: libutp assumes 1232 bytes of UDP payload (Teredo), minus 20.
    mtu_payload_ipv6: int = 1212
    # "ledbat", "tolerant", or a factory (mss, target_delay_us) -> controller.
    congestion: Any = "ledbat"
    target_delay: float = 0.100
    initial_rto: float = 1.0
    min_rto: float = 0.5
    max_rto: float = 30.0
    # Consecutive retransmission timeouts before the connection dies (UtpTimeout).
    max_retransmits: int = 5
    # SYN sends before connect() fails with UtpTimeout (1 + 2 + 4 + 8 s by default).
    syn_retries: int = 4
    # ACK every second data packet, or after this long.
    delayed_ack: float = 0.005
    keepalive_interval: float = 29.0
    # Incoming connections the initiator never completes are reaped after this.
    syn_recv_timeout: float = 60.0
    # Graceful close(): bound on waiting for our FIN to be acknowledged.
    close_timeout: float = 5.0
    # After a clean close the connection id is kept this long to re-ACK a
    # retransmitted FIN (a lost last ACK must not turn into a RESET).
    # Each retransmitted FIN extends it.
    linger_time: float = 10.0
    # First zero-window probe after this, doubling up to 15 s (libutp: 15 s).
    zero_window_probe: float = 1.0
    max_packets_in_flight: int = 1024
    reorder_limit: int = 1024
    max_half_open: int = 1024
    max_connections: int = 8192
    # RESET for packets of unknown connections: one per (address, id) per
    # reset_memory seconds, at most reset_memory_cap remembered.
    reset_memory: float = 10.0
    reset_memory_cap: int = 1000
    # connect() draws no id next to a connection to the same address that ended
    # less than reset_memory seconds ago (its late packets and the RESETs they
    # draw would be taken for the new one's): at most this many remembered.
    retired_id_memory_cap: int = 4096
    # New incoming connections per source IP (a token bucket): a burst of
    # syn_burst SYNs, then syn_rate per second. SYNs over it are dropped
    # silently (no SYN-ACK, no RESET): a spoofed flood reflects a bounded number
    # of datagrams to the address it claims. syn_burst 0: no limit. At most
    # syn_sources addresses are tracked (the least recently seen is forgotten).
    # An address that proved it receives what we send (a connection with it
    # had a packet of ours acknowledged) is not limited for syn_proven_time.
    syn_burst: int = 32
    syn_rate: float = 16.0
    syn_sources: int = 4096
    syn_proven_time: float = 60.0
    # After a connection moves to another path (UtpMultiplexer.move_connection),
    # what still arrives over the old one is taken for this long: datagrams
    # already on their way, and a peer that moves a moment later. Past it they
    # are dropped (never answered with a RESET: see path_mismatch).
    path_grace: float = 5.0

    def __post_init__(self) -> None:
        for mtu in (self.mtu_payload, self.mtu_payload_ipv6):
            if not 150 <= mtu <= 65000:
                raise ValueError("mtu_payload must be within 150..65000")
        largest = max(self.mtu_payload, self.mtu_payload_ipv6)
        if self.recv_buffer_size < largest or self.send_buffer_size < largest:
            raise ValueError("buffers must hold at least one packet")
        if self.path_grace < 0:
            raise ValueError("path_grace must not be negative")
        if self.max_packets_in_flight > 16384 or self.reorder_limit > 16384:
            raise ValueError("windows above 16384 packets break 16-bit sequence arithmetic")


@dataclass
class UtpStats:
    """Counters of one multiplexer (monotonic)."""

    datagrams_received: int = 0
    datagrams_sent: int = 0
    malformed: int = 0
    unknown_connection: int = 0
    resets_sent: int = 0
    resets_suppressed: int = 0
    resets_received: int = 0
    resets_ignored: int = 0  # a RESET whose ack_nr echoes nothing we sent (another connection's)
    syn_received: int = 0
    duplicate_syn: int = 0
    syn_dropped: int = 0
    syn_rate_limited: int = 0  # new-connection SYNs over their source's limit (dropped silently)
    refused: int = 0
    invalid_ack: int = 0
    dropped_packets: int = 0
    retransmits: int = 0
    fast_retransmits: int = 0
    timeouts: int = 0
    reaped_half_open: int = 0
    connections_opened: int = 0
    connections_accepted: int = 0
    path_moves: int = 0  # connections moved to another path (move_connection)
    old_path_received: int = 0  # datagrams taken over a connection's old path, within path_grace
    # datagrams with a live connection's id and sequence numbers over a path it
    # is not on (a spoofed source, a peer that moved before we did, a NAT
    # rebinding not yet confirmed): dropped, nothing moves, no RESET
    path_mismatch: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in fields(cls)]
