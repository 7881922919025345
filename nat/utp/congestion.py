"""Congestion control policies for uTP, behind one small interface.

A controller owns ``cwnd`` (bytes allowed in flight). The connection calls:

- ``on_ack(acked_bytes, queuing_delay_us, flight_bytes, now)`` for every packet
  that newly acknowledged data (cumulatively or selectively). ``queuing_delay_us``
  is the one-way delay above the base delay (None when the peer has not yet
  echoed a timestamp). ``flight_bytes`` is what was in flight before the ACK.
- ``on_loss(now)`` once per window of data when a loss is detected by duplicate
  ACKs or selective ACKs (fast retransmit).
- ``on_overflow(flight_bytes, now)`` at most once per loss episode, when its
  losses look like a buffer overflowing (loss.overflow_burst: a dense burst);
  ``flight_bytes`` was in flight when the episode began.
- ``on_timeout(now)`` when the retransmission timer fires.
- ``on_rtt(rtt, now)`` for every round-trip sample (packets sent once only,
  Karn's rule); LEDBAT ignores it, the rate controller keeps the minimum.

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

``RateController`` (``congestion="rate"``) does not grow by delay at all: it
estimates the bottleneck rate from delivered bytes and the min RTT, keeps a
window of 1.25 BDPs, ignores random loss, and drains when the queuing delay
passes the target or a loss comes with a long queue; a burst of loss without a
queue (a receiver's small socket buffer overflowing) caps the window at an
overflow ceiling that probes upwards slowly (see the class).

``DelayHistory`` tracks the base (minimum) one-way delay, wrap-aware on the
32-bit microsecond clock, over 13 one-minute buckets as libutp does (clock
skew between peers makes an old minimum wrong).
"""

from __future__ import annotations

from collections.abc import Callable
from math import trunc as _trunc  # int(float), about 60 ns cheaper per call
from typing import Protocol

MAX_CWND_INCREASE_BYTES_PER_RTT = 3000
_MASK32 = 0xFFFFFFFF
_HALF32 = 0x80000000


class CongestionController(Protocol):
    cwnd: int

    def on_ack(self, acked_bytes: int, queuing_delay_us: int | None, flight_bytes: int, now: float) -> None: ...

    def on_loss(self, now: float) -> None: ...

    def on_overflow(self, flight_bytes: int, now: float) -> None: ...

    def on_timeout(self, now: float) -> None: ...

    def on_rtt(self, rtt: float, now: float) -> None: ...


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
                grown: float = cwnd + gain
            else:
                # at most 16 packets per ACK (stretch ACKs after a recovery
                # would otherwise open the window all at once)
                limit = 16 * self.mss
                ss_cwnd = cwnd + (acked_bytes if acked_bytes < limit else limit)
                if ss_cwnd >= self.ssthresh:
                    self.slow_start = False
                grown = ss_cwnd if ss_cwnd > cwnd + gain else cwnd + gain
        else:
            grown = cwnd + gain
        cwnd = _trunc(grown)
        if cwnd < self.min_cwnd:
            cwnd = self.min_cwnd
        elif cwnd > self.max_cwnd:
            cwnd = self.max_cwnd
        self.cwnd = cwnd

    def _gain_per_rtt(self, cwnd: int) -> float:
        return MAX_CWND_INCREASE_BYTES_PER_RTT

    def on_rtt(self, rtt: float, now: float) -> None:
        """Round-trip samples (Karn's rule) are not used by LEDBAT."""

    def on_loss(self, now: float) -> None:
        cwnd = self.cwnd // 2
        self.cwnd = cwnd if cwnd > self.min_cwnd else self.min_cwnd
        self.ssthresh = self.cwnd
        self.slow_start = False

    def on_overflow(self, flight_bytes: int, now: float) -> None:
        """Every loss already halves the window (on_loss)."""

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


class RateController:
    """Model-based, in the spirit of BBR: window from delivery rate x min RTT.

    Every round (one min RTT of ACKs) gives a delivery-rate sample (bytes newly
    acknowledged, cumulatively or selectively, over the time they took,
    averaged over the last ``averaged_rounds``); the bottleneck rate is the
    largest sample of the last ``bandwidth_rounds`` rounds. The window is
    ``cwnd_gain`` times the bandwidth-delay product. Sending is ACK-clocked
    (no pacing), so the window above one BDP is a standing queue: 1.25 keeps it
    near a quarter of the min RTT, headroom for ACK jitter and estimate noise
    (2, as BBR uses with pacing, overflowed a 50 ms bottleneck queue and lost
    a fifth of the goodput to its own drops on the simulated lab link).

    Random loss does not move the window. What keeps the queue bounded is the
    model plus the delay target: a queuing delay above the target shrinks the
    window to one BDP (drain), and a loss while the queue is above half the
    target is congestion (window to one BDP, the rate estimate cut back to the
    latest round's). Startup grows the window by what is acknowledged
    (doubling each round) until the rate stops growing by a quarter over three
    rounds, or the queue passes half the target. A timeout restarts from a few
    packets but regrows by what is acknowledged up to the model's window, so
    one timeout costs a few RTTs, not a slow start from scratch.

    A burst of loss with no queue behind it (``on_overflow``: a dozen packets
    lost within sixteen, and the queuing delay below an eighth of the target
    since the loss episode began) is a buffer too small for the flight: libutp
    advertises a 1 MiB window while its UDP socket buffer (208 KiB by default)
    holds a hundred-odd datagrams, and on loopback or a LAN the whole flight
    lands in it at once. The model cannot see that (the rate is fine, the
    queue is not on the path), and random-loss tolerance kept the flight
    there: every window overflowed again (1 MiB/s to utp-native on loopback,
    a quarter of the datagrams dropped). Such a burst sets ``ceiling`` to half
    the flight the episode began with; the window never exceeds it, and each
    round the ceiling held the window it grows by 1/32 (``ceiling_growth_shift``),
    so it settles under the receiver's capacity and finds more if the receiver
    speeds up. Random loss spreads thinly and a path queue that overflows has
    delay: neither sets it.

    The model never uses an RTT below ``min_model_rtt``: on short paths (a LAN,
    loopback) the lowest RTT sample is one idle packet's, while an ACK-clocked
    round under load takes the hosts' batching and delayed ACKs too, so a window
    of 1.25 x rate x (that sample) starves the flow (28 MiB/s instead of 177 on
    loopback). The floor allows at most ``min_model_rtt`` of standing queue on
    such paths, well inside the delay target; longer paths are not affected.

    The min RTT is the lowest sample of the whole connection (no probing phase:
    a route to a longer RTT makes it conservative, never queue-building). A
    flow that starts behind another's standing queue measures a longer min RTT
    and takes the larger share (about 2:1 in the simulated test).
    """

    name = "rate"
    cwnd_gain = 1.25
    startup_growth = 1.25
    startup_rounds = 3
    bandwidth_rounds = 10
    averaged_rounds = 4
    min_model_rtt = 0.010  # seconds; see the class docstring
    overflow_backoff = 0.5  # the ceiling after an overflow, times the flight
    ceiling_growth_shift = 5  # the ceiling grows by 1/32 per round it held the window

    def __init__(self, mss: int, *, target_delay_us: int = 100_000, max_cwnd: int = 8 << 20) -> None:
        self.mss = mss
        self.target_us = target_delay_us
        self.min_cwnd = 4 * mss
        self.max_cwnd = max_cwnd
        self.cwnd = 4 * mss
        self.startup = True
        self.min_rtt: float | None = None
        self.bandwidth = 0.0  # bytes/s, max of recent round samples
        self.last_delay_us = 0
        self._samples: list[float] = []  # per-round delivery rates, newest last
        self._rounds: list[tuple[int, float]] = []  # (bytes, seconds) of the last rounds
        self._round_start: float | None = None
        self._round_bytes = 0
        self._round_flight = 0  # the most in flight at any ACK of this round
        self._full_bandwidth = 0.0
        self._stalled_rounds = 0
        self._round_len = float("inf")  # model_rtt once min_rtt is known (per-ACK check)
        self._half_target = target_delay_us // 2
        self.ceiling: int | None = None  # the overflow ceiling (bytes; see on_overflow)
        self._peak_delay_us = 0  # the highest queuing delay since the latest loss episode began
        self._ceiling_held = False
        self._quanta = 2 * mss
        self._rtt_avg = 0.0  # smoothed round trip (seconds) and queuing delay (µs): see window_rtt
        self._delay_avg = 0.0

    @property
    def bdp(self) -> float:
        """Estimated bandwidth-delay product in bytes (0 before the first round)."""
        return self.bandwidth * self.model_rtt if self.min_rtt is not None else 0.0

    @property
    def model_rtt(self) -> float:
        """The round length of the model: the min RTT, floored (class docstring)."""
        min_rtt = self.min_rtt
        return min_rtt if min_rtt is not None and min_rtt > self.min_model_rtt else self.min_model_rtt

    @property
    def window_rtt(self) -> float:
        """The round trip the window is sized for: the smoothed RTT less the
        smoothed queuing delay (what the path takes without its queue: the
        propagation, the jitter, the peer's ACK delay), at least the model's RTT
        and at most twice it.

        A window of gain x rate x min RTT limits itself once the round trips
        under load exceed the min RTT by more than the gain: the delivery rate
        is then window / RTT, below the estimate, and the model shrinks round
        after round to its floor. On the lab's 20 +- 5 ms link a tunnel sank so
        to four packets a round trip (1 Mbit/s) and stayed there. A queue is
        still no reason to grow: its delay is taken out.
        """
        model = self._round_len
        length = self._rtt_avg - self._delay_avg * 1e-6
        if length <= model:
            return model
        return length if length < 2 * model else 2 * model

    def on_rtt(self, rtt: float, now: float) -> None:
        min_rtt = self.min_rtt
        if rtt > 0.0 and (min_rtt is None or rtt < min_rtt):
            self.min_rtt = rtt
            self._round_len = rtt if rtt > self.min_model_rtt else self.min_model_rtt
        average = self._rtt_avg
        self._rtt_avg = rtt if average == 0.0 else average + (rtt - average) * 0.125

    def on_ack(self, acked_bytes: int, queuing_delay_us: int | None, flight_bytes: int, now: float) -> None:
        delay = queuing_delay_us if queuing_delay_us is not None else 0
        self.last_delay_us = delay
        self._delay_avg += (delay - self._delay_avg) * 0.125
        if delay > self._peak_delay_us:
            self._peak_delay_us = delay
        # rate sampling: per ACK only a sum; a round ends once per model RTT
        start = self._round_start
        if start is None:
            self._round_start = now
            self._round_bytes = 0
        else:
            self._round_bytes += acked_bytes
            if flight_bytes > self._round_flight:
                self._round_flight = flight_bytes
            if now - start >= self._round_len:
                self._end_round(now - start, now)
        cwnd = self.cwnd
        if self.startup:
            mss = self.mss
            if delay > self._half_target and self.bandwidth > 0.0:
                self.startup = False
            elif flight_bytes + mss >= cwnd // 2:  # not application-limited
                cwnd += acked_bytes if acked_bytes < 16 * mss else 16 * mss
            else:
                # Application-limited: the window stands (in startup it is always
                # within [min_cwnd, max_cwnd]: only on_loss, which ends startup,
                # sets it unclamped).
                return
        if not self.startup:
            gain = self.cwnd_gain if delay <= self.target_us else 1.0
            # (plus two packets: a window of a few packets whose 1.x-fold growth
            # rounds down to a whole packet would never grow at all)
            target = _trunc(gain * (self.bandwidth * self.window_rtt if self.min_rtt is not None else 0.0)) + self._quanta
            if target < self.min_cwnd:
                target = self.min_cwnd
            # Grow towards the model's window by what was delivered (so a window
            # collapsed by a timeout comes back within a few rounds); shrink at once.
            grown = cwnd + acked_bytes
            cwnd = grown if grown < target else target
        ceiling = self.ceiling
        if ceiling is not None and cwnd > ceiling:
            cwnd = ceiling
            self._ceiling_held = True  # the ceiling holds the window (it grows per round)
        if cwnd < self.min_cwnd:
            cwnd = self.min_cwnd
        elif cwnd > self.max_cwnd:
            cwnd = self.max_cwnd
        self.cwnd = cwnd

    def _end_round(self, elapsed: float, now: float) -> None:
        """A round of ACKs is complete: take its delivery-rate sample."""
        rounds = self._rounds
        rounds.append((self._round_bytes, elapsed))
        if len(rounds) > self.averaged_rounds:
            del rounds[0]
        # Averaged over a few rounds: packets a SACK does not name (libutp
        # peers cover 32) are counted only when the cumulative ACK jumps over
        # a repaired hole, and ACKs come in batches; single rounds swing.
        rate = sum(r[0] for r in rounds) / sum(r[1] for r in rounds)
        # application-limited: the window was never half used this round (loss
        # recovery dips the flight at some ACKs; a trickle never fills it)
        limited = self._round_flight + self.mss < self.cwnd // 2
        # An application-limited round only says the link carries at least this.
        if not limited or rate > self.bandwidth:
            samples = self._samples
            samples.append(rate)
            if len(samples) > self.bandwidth_rounds:
                del samples[0]
            self.bandwidth = max(samples)
        self._round_start = now
        self._round_bytes = 0
        self._round_flight = 0
        if self._ceiling_held:
            # The ceiling held the window this round: probe upwards, by
            # 1/32 per round (per ACK it doubled within a dozen loopback
            # round trips, an overflow every few dozen milliseconds).
            self._ceiling_held = False
            ceiling = self.ceiling
            if ceiling is not None:
                self.ceiling = ceiling + (ceiling >> self.ceiling_growth_shift)
        # Only rounds that used the window say the rate stopped growing (a TLS
        # handshake before the bulk data must not end startup).
        if self.startup and not limited:
            if self.bandwidth >= self._full_bandwidth * self.startup_growth:
                self._full_bandwidth = self.bandwidth
                self._stalled_rounds = 0
            else:
                self._stalled_rounds += 1
                if self._stalled_rounds >= self.startup_rounds:
                    self.startup = False

    def on_loss(self, now: float) -> None:
        self._peak_delay_us = self.last_delay_us
        if self.last_delay_us <= self.target_us // 2 or self.bandwidth <= 0.0:
            return  # random loss on a short queue: the model stands
        # Loss with a long queue is congestion: drain to one BDP and forget rate
        # samples taken while the queue was building.
        self.startup = False
        if self._samples:
            self._samples = self._samples[-1:]
            self.bandwidth = self._samples[0]
        bdp = int(self.bdp)
        self.cwnd = bdp if bdp > self.min_cwnd else self.min_cwnd

    def on_overflow(self, flight_bytes: int, now: float) -> None:
        if self._peak_delay_us > self.target_us >> 3:
            # A queue had built up since the loss episode began (a path queue
            # that overflowed has drained by the time the burst is counted):
            # the delay rules' case, not a small buffer's.
            return
        ceiling = _trunc(flight_bytes * self.overflow_backoff)
        if ceiling < self.min_cwnd:
            ceiling = self.min_cwnd
        self.ceiling = ceiling
        if self.cwnd > ceiling:
            self.cwnd = ceiling

    def on_timeout(self, now: float) -> None:
        self.cwnd = self.min_cwnd


ControllerFactory = Callable[[int, int], CongestionController]

CONTROLLERS: dict[str, ControllerFactory] = {
    "ledbat": lambda mss, target_us: LedbatController(mss, target_delay_us=target_us),
    "tolerant": lambda mss, target_us: LossTolerantController(mss, target_delay_us=target_us),
    "rate": lambda mss, target_us: RateController(mss, target_delay_us=target_us),
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
        bucket_end = self._bucket_end
        if bucket_end is None:
            self._bucket_end = now + self._period
        elif now >= bucket_end:
            self._roll(now)
        bucket_min = self._bucket_min
        if bucket_min is None or ((sample_us - bucket_min) & _MASK32) >= _HALF32:
            self._bucket_min = sample_us
        base = self.base
        if base is None:
            self.base = sample_us
            return 0
        above = (sample_us - base) & _MASK32
        if above < _HALF32:
            return above
        self.base = sample_us  # sample below the base: new base
        return 0

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
