"""Fixtures for the proxy tests."""

from __future__ import annotations

import pytest
from trio.testing import MockClock


@pytest.fixture
def virtual_clock() -> MockClock:
    """trio's MockClock, jumping to the next deadline whenever every task waits.

    Timers then fire to the tick and cost no wall time. Real time trickles in at a
    millionth (a second of wall time is a microsecond here) only so that a loop
    waiting for the clock to pass a deadline it computed with float rounding moves
    on: Peer.run re-checks ``now - last_heard >= timeout`` at an instant where the
    difference is one ulp short, and on a frozen clock it would spin there forever.
    Compare times with ``virtual()`` (test_proxy_support), which allows 1 ms.
    """
    return MockClock(rate=1e-6, autojump_threshold=0)
