"""Round-trip time and retransmission timeout (BEP 29 / RFC 6298 style).

BEP 29: ``timeout = max(rtt + 4 * rtt_var, 500 ms)``, initial 1000 ms, doubled
on each consecutive timeout. libutp uses a 1000 ms floor; we keep BEP 29's
500 ms (configurable) because selective ACKs and fast retransmit repair most
losses and a long floor only hurts tail losses.

``pto`` is the tail-loss probe's timeout (RFC 8985): two smoothed round trips
plus the peer's ACK delay, at most the RTO; kept with every sample (the sender
arms it on every ACK that makes progress).
"""

from __future__ import annotations


class RttEstimator:
    """Smoothed RTT, its variance and the current (backed-off) RTO, in seconds."""

    __slots__ = ("srtt", "rttvar", "rto", "pto", "min_rto", "max_rto", "has_sample", "_ack_delay")

    def __init__(
        self, initial_rto: float = 1.0, min_rto: float = 0.5, max_rto: float = 30.0, ack_delay: float = 0.0
    ) -> None:
        self.srtt = 0.0
        self.rttvar = 0.0
        self.rto = initial_rto
        self.pto = initial_rto  # no probe before the first sample
        self.min_rto = min_rto
        self.max_rto = max_rto
        self.has_sample = False
        self._ack_delay = ack_delay

    def sample(self, rtt: float) -> None:
        """Feed one RTT measurement (only from packets sent once: Karn's rule)."""
        if rtt < 0.0:
            rtt = 0.0
        if self.has_sample:
            srtt = self.srtt
            rttvar = self.rttvar
            delta = srtt - rtt
            if delta < 0.0:
                delta = -delta
            self.rttvar = rttvar = rttvar + (delta - rttvar) * 0.25
            self.srtt = srtt = srtt + (rtt - srtt) * 0.125
        else:
            self.srtt = srtt = rtt
            self.rttvar = rttvar = rtt / 2
            self.has_sample = True
        rto = srtt + 4.0 * rttvar
        if rto < self.min_rto:
            rto = self.min_rto
        elif rto > self.max_rto:
            rto = self.max_rto
        self.rto = rto
        pto = srtt * 2.0 + self._ack_delay
        self.pto = pto if pto < rto else rto

    def restart(self, initial_rto: float) -> None:
        """A new path: no sample of it yet, the timeouts back at ``initial_rto``.
        The old path's smoothed RTT stays as a hint for what reads it before
        the first sample (the reordering allowance), which replaces it whole."""
        self.has_sample = False
        self.rto = self.pto = initial_rto

    def backoff(self) -> None:
        """Double the RTO after a timeout (bounded)."""
        rto = self.rto * 2.0
        self.rto = rto if rto < self.max_rto else self.max_rto
