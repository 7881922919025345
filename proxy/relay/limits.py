"""The relay server's limits, and the token bucket that enforces its rates."""

from __future__ import annotations

from dataclasses import dataclass, fields

from proxy.identity.node_id import NODE_ID_SIZE
from proxy.relay.errors import RelayLimitsInvalid
from proxy.relay.frames import HEADER_SIZE, MAX_DATAGRAM

# The largest SEND frame: a bucket's burst must hold one, or it could never pass.
LARGEST_SEND = HEADER_SIZE + NODE_ID_SIZE + MAX_DATAGRAM


@dataclass(frozen=True)
class RelayLimits:
    """What one relay server allows. Rates count whole frames (header included)."""

    rate: int = 8 * 1024 * 1024  # bytes per second each NodeId may send through the relay
    burst: int = 1024 * 1024  # bytes a NodeId may send at once after being quiet
    queue_frames: int = 1024  # frames waiting for one client before further ones are dropped
    queue_bytes: int = 2 * 1024 * 1024  # and bytes
    max_clients: int = 10_000  # registered NodeIds at once
    max_handshakes: int = 64  # TLS handshakes under way at once (more wait in the backlog)
    senders_tracked: int = 1024  # per client, NodeIds told PEER_GONE when it leaves
    keepalive: float = 30.0  # seconds between the relay's PINGs to a client
    idle_timeout: float = 75.0  # a client not heard from for this long is closed
    handshake_timeout: float = 10.0  # TLS handshake plus chain verification
    write_timeout: float = 5.0  # a client that takes longer to take a batch is closed
    max_chain_length: int = 32  # certificates a client may present

    def __post_init__(self) -> None:
        for field in fields(self):
            value = getattr(self, field.name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise RelayLimitsInvalid(f"relay limit {field.name} must be a positive number, not {value!r}")
        if self.burst < LARGEST_SEND:
            raise RelayLimitsInvalid(
                f"relay limit burst must be at least {LARGEST_SEND} bytes (one largest SEND frame), not {self.burst}"
            )
        if self.queue_bytes < LARGEST_SEND:
            raise RelayLimitsInvalid(f"relay limit queue_bytes must be at least {LARGEST_SEND}, not {self.queue_bytes}")


class TokenBucket:
    """``burst`` tokens at most, refilled at ``rate`` per second."""

    __slots__ = ("rate", "burst", "tokens", "updated")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = float(burst)
        self.updated = now

    def take(self, amount: int, now: float) -> bool:
        """Take ``amount`` tokens if there are that many (after refilling)."""
        tokens = self.tokens
        if tokens < self.burst:
            tokens = min(self.burst, tokens + (now - self.updated) * self.rate)
        self.updated = now
        if tokens >= amount:
            self.tokens = tokens - amount
            return True
        self.tokens = tokens
        return False

    def full(self, now: float) -> bool:
        return self.tokens + (now - self.updated) * self.rate >= self.burst
