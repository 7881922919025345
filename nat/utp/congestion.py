"""Congestion control policies for uTP, behind one small interface.

A controller owns ``cwnd`` (bytes allowed in flight). The connection calls:

- ``on_ack(acked_bytes, queuing_delay_us, flight_bytes, now)`` for every packet
  that newly acknowledged data (cumulatively or selectively). ``queuing_delay_us``
  is the one-way delay above the base delay (None when the peer has not yet
  echoed a timestamp). ``flight_bytes`` is what was in flight before the ACK.
- ``on_loss(now)`` once per window of data when a loss is detected by duplicate
  ACKs or selective ACKs (fast retransmit).
- ``on_timeout(now)`` when the retransmission timer fires.

``LedbatController`` follows libutp: target delay 100 ms, gain of at most
3000 bytes per RTT scaled by ``(target - delay) / target`` and by the share of
the window acknowledged, slow start until the delay reaches half the target,
window halved on loss (BEP 29's revised factor 0.5), one packet after a timeout.

``LossTolerantController`` (config ``congestion="tolerant"``) keeps LEDBAT's
delay target but treats loss as congestion only when the queue has grown
(measured delay above a quarter of the target): an isolated random loss on an
uncongested path shrinks the window by an eighth instead of half. Its gain
scales with the window (up to a quarter window per RTT, times LEDBAT's
off-target factor), so a window cut by random loss refills within a few RTTs
while the delay target still bounds the queue. Timeouts still collapse it.

``DelayHistory`` tracks the base (minimum) one-way delay, wrap-aware on the
32-bit microsecond clock, over 13 one-minute buckets as libutp does (clock
skew between peers makes an old minimum wrong).
"""

from __future__ import annotations

from typing import Callable, Protocol

MAX_CWND_INCREASE_BYTES_PER_RTT = 3000
_MASK32 = 0xFFFFFFFF
_HALF32 = 0x80000000


class CongestionController(Protocol):
    cwnd: int

    def on_ack(self, acked_bytes: int, queuing_delay_us: int | None, flight_bytes: int, now: float) -> None: ...

    def on_loss(self, now: float) -> None: ...

    def on_timeout(self, now: float) -> None: ...


class LedbatController:
    """LEDBAT (RFC 6817 as libutp implements it) with slow start."""

    name = "ledbat"

    def __init__(self, mss: int, *, target_delay_us: int = 100_000, max_cwnd: int = 8 << 20) -> None:
        self.mss = mss
        self.target_us = target_delay_us
        self.min_cwnd = 2 * mss
        self.max_cwnd = max_cwnd
        self.cwnd = 4 * mss
        self.ssthresh = max_cwnd
        self.slow_start = True
        self.last_delay_us = 0

    def on_ack(self, acked_bytes: int, queuing_delay_us: int | None, flight_bytes: int, now: float) -> None:
        if queuing_delay_us is None:
            queuing_delay_us = 0
        self.last_delay_us = queuing_delay_us
        cwnd = self.cwnd
        # An application-limited sender must not inflate the window it never uses.
        if flight_bytes + self.mss < cwnd // 2:
            return
        target = self.target_us
        off_target = (target - queuing_delay_us) / target
        if off_target < -1.0:
            off_target = -1.0
        window_factor = acked_bytes / cwnd if acked_bytes < cwnd else 1.0
        gain = self._gain_per_rtt(cwnd) * window_factor * off_target
        if self.slow_start:
            if queuing_delay_us > target // 2:
                self.slow_start = False
                self.ssthresh = cwnd
                cwnd += gain
            else:
                # at most 16 packets per ACK (stretch ACKs after a recovery
                # would otherwise open the window all at once)
                limit = 16 * self.mss
                ss_cwnd = cwnd + (acked_bytes if acked_bytes < limit else limit)
                if ss_cwnd >= self.ssthresh:
                    self.slow_start = False
                cwnd = ss_cwnd if ss_cwnd > cwnd + gain else cwnd + gain
        else:
            cwnd += gain
        cwnd = int(cwnd)
        if cwnd < self.min_cwnd:
            cwnd = self.min_cwnd
        elif cwnd > self.max_cwnd:
            cwnd = self.max_cwnd
        self.cwnd = cwnd

    def _gain_per_rtt(self, cwnd: int) -> float:
        return MAX_CWND_INCREASE_BYTES_PER_RTT

    def on_loss(self, now: float) -> None:
        cwnd = self.cwnd // 2
        self.cwnd = cwnd if cwnd > self.min_cwnd else self.min_cwnd
        self.ssthresh = self.cwnd
        self.slow_start = False

    def on_timeout(self, now: float) -> None:
        half = self.cwnd // 2
        self.ssthresh = half if half > self.min_cwnd else self.min_cwnd
        self.cwnd = self.mss
        self.slow_start = True


class LossTolerantController(LedbatController):
    """Delay-based growth; random loss on an empty queue costs 1/8, not 1/2."""

    name = "tolerant"

    def _gain_per_rtt(self, cwnd: int) -> float:
        # Below the delay target grow by up to a quarter window per RTT (LEDBAT's
        # fixed 3000 bytes cannot refill a window cut by random loss); the same
        # scale applies downwards when the delay is above the target.
        quarter = cwnd >> 2
        return quarter if quarter > MAX_CWND_INCREASE_BYTES_PER_RTT else MAX_CWND_INCREASE_BYTES_PER_RTT

    def on_loss(self, now: float) -> None:
        if self.last_delay_us > self.target_us // 4:
            super().on_loss(now)
            return
        cwnd = self.cwnd - self.cwnd // 8
        self.cwnd = cwnd if cwnd > self.min_cwnd else self.min_cwnd
        # Leave slow start only if the window already reached a useful size.
        if self.cwnd >= 64 * self.mss:
            self.slow_start = False
            self.ssthresh = self.cwnd

    def on_timeout(self, now: float) -> None:
        half = self.cwnd // 2
        self.ssthresh = half if half > self.min_cwnd else self.min_cwnd
        self.cwnd = 2 * self.mss
        self.slow_start = True


ControllerFactory = Callable[[int, int], CongestionController]

CONTROLLERS: dict[str, ControllerFactory] = {
    "ledbat": lambda mss, target_us: LedbatController(mss, target_delay_us=target_us),
    "tolerant": lambda mss, target_us: LossTolerantController(mss, target_delay_us=target_us),
}


def make_controller(kind: str | ControllerFactory, mss: int, target_delay_us: int) -> CongestionController:
    """Build a controller from a registered name or a factory ``(mss, target_us)``."""
    if callable(kind):
        return kind(mss, target_delay_us)
    try:
        factory = CONTROLLERS[kind]
    except KeyError:
        raise ValueError(f"unknown congestion controller {kind!r} (have {sorted(CONTROLLERS)})") from None
    return factory(mss, target_delay_us)


class DelayHistory:
    """Base one-way delay over the last ``buckets`` periods; wrap-aware (u32 µs)."""

    __slots__ = ("base", "_bucket_min", "_history", "_bucket_end", "_period", "_buckets")

    def __init__(self, period: float = 60.0, buckets: int = 13) -> None:
        self.base: int | None = None
        self._bucket_min: int | None = None
        self._history: list[int] = []
        self._bucket_end: float | None = None
        self._period = period
        self._buckets = buckets

    def add(self, sample_us: int, now: float) -> int:
        """Record a raw delay sample; return the queuing delay above the base (µs)."""
        if self._bucket_end is None:
            self._bucket_end = now + self._period
        elif now >= self._bucket_end:
            self._roll(now)
        bucket_min = self._bucket_min
        if bucket_min is None or ((sample_us - bucket_min) & _MASK32) >= _HALF32:
            self._bucket_min = sample_us
        base = self.base
        if base is None:
            self.base = sample_us
            return 0
        above = (sample_us - base) & _MASK32
        if above >= _HALF32:  # sample below the base: new base
            self.base = sample_us
            return 0
        return above

    def _roll(self, now: float) -> None:
        if self._bucket_min is not None:
            self._history.append(self._bucket_min)
            if len(self._history) > self._buckets:
                del self._history[0]
        self._bucket_min = None
        self._bucket_end = now + self._period
        base = None
        for value in self._history:
            if base is None or ((value - base) & _MASK32) >= _HALF32:
                base = value
        self.base = base
