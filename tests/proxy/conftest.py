"""Fixtures for the proxy tests."""

from __future__ import annotations

import pytest
from trio.testing import MockClock


@pytest.fixture
def virtual_clock() -> MockClock:
    """trio's MockClock, jumping to the next deadline whenever every task waits.

    Timers then fire to the tick and cost no wall time; the clock is frozen
    otherwise (no real time trickles in), so a loop that waits for the clock to
    pass a deadline without sleeping until it would spin forever here: Peer.run
    sleeps until the deadline it then compares with. Compare times with
    ``virtual()`` (test_proxy_support), which allows 1 ms.
    """
    return MockClock(autojump_threshold=0)
