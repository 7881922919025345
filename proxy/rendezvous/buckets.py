"""Token buckets per key (a NodeId, a source host), bounded: the least recently used
key is forgotten first (it comes back with a full bucket, which a flood of fresh keys
cannot exploit beyond one burst per key it can name)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable


class TokenBuckets:
    def __init__(self, burst: float = 20.0, rate: float = 10.0, limit: int = 16384) -> None:
        self.burst = burst
        self.rate = rate
        self.limit = limit
        self._buckets: OrderedDict[Hashable, tuple[float, float]] = OrderedDict()
        self.refused = 0

    def take(self, key: Hashable, now: float) -> bool:
        """One token for ``key`` if it has one (True), else counted as refused."""
        buckets = self._buckets
        entry = buckets.pop(key, None)
        if entry is None:
            tokens = self.burst
        else:
            tokens, then = entry
            tokens = min(self.burst, tokens + (now - then) * self.rate)
        allowed = tokens >= 1.0
        if allowed:
            tokens -= 1.0
        else:
            self.refused += 1
        buckets[key] = (tokens, now)
        if len(buckets) > self.limit:
            buckets.popitem(last=False)
        return allowed

    def __len__(self) -> int:
        return len(self._buckets)
