"""A path whose delay jitters: reordering is not loss, and round trips that
exceed the min RTT do not shrink the rate model's window.

The lab's lossy link (20 +- 5 ms each way, a delay queue that reorders)
showed both: most retransmissions were spurious (fifteen times the real loss,
their dense runs read as a receiver overflowing), and the rate controller's
window of 1.25 x rate x min RTT, once the flow was window-limited with round
trips a third above the min RTT, sank to four packets a round trip and stayed.
"""

from __future__ import annotations

import hashlib
import random

import pytest

from nat.utp.congestion import RateController
from nat.utp.loss import DUP_ACK_THRESHOLD, Reordering
from nat.utp.multiplexer import UtpConfig, UtpMultiplexer
from nat.utp.sim import AppRunner, LinkProfile, SimNetwork, StreamApp

A = ("10.0.0.1", 1000)
B = ("10.0.0.2", 2000)
MSS = 1382


def jittery_transfer(size: int, *, loss: float = 0.0, seed: int = 3) -> tuple[StreamApp, StreamApp, bytes]:
    """``size`` random bytes A -> B over 15-25 ms each way (each datagram's delay
    drawn alone, so datagrams a few ms apart arrive out of order)."""
    net = SimNetwork(seed, LinkProfile(delay=0.015, jitter=0.010, loss=loss))
    config = UtpConfig(congestion="rate")
    a = net.add(A, UtpMultiplexer(config, rng=random.Random(1)))
    b = net.add(B, UtpMultiplexer(config, rng=random.Random(2)))
    payload = random.Random(seed).randbytes(size)
    runner = AppRunner([a, b], make_incoming=lambda conn: StreamApp(conn, b""))
    client = runner.add(StreamApp(a.connect(B, net.now), payload))
    net.run(lambda: client.done and all(app.done for app in runner.apps.values()), on_step=runner, max_time=300)
    server = next(app for app in runner.apps.values() if app is not client)
    return client, server, payload


def test_reordering_by_jitter_is_learnt_and_not_taken_for_loss() -> None:
    client, server, payload = jittery_transfer(8 << 20)
    assert hashlib.sha256(server.received).digest() == hashlib.sha256(payload).digest()
    packets = len(payload) // MSS
    snapshot = client.conn.transport_snapshot()
    # nothing is lost on this link: every retransmission is spurious; before the
    # sender learnt reordering they were 2,350 of these 6,069 packets
    assert client.conn.retransmits < packets * 0.01, (client.conn.retransmits, packets, snapshot)
    assert snapshot["reorder_packets"] > DUP_ACK_THRESHOLD
    assert 0.005 < snapshot["reorder_gap"] <= 0.011  # the jitter's spread, in send time


def test_real_loss_on_a_reordering_path_is_still_repaired() -> None:
    client, server, payload = jittery_transfer(4 << 20, loss=0.02)
    assert hashlib.sha256(server.received).digest() == hashlib.sha256(payload).digest()
    packets = len(payload) // MSS
    # 2% of the data lost on the link, and at this rate (~10 MB/s over 40 ms) the
    # receiver's 1 MiB buffer drops a little more while holes wait for repair;
    # before the sender learnt reordering, retransmissions were 869 of these 3,034
    assert client.conn.retransmits < packets * 0.08, (client.conn.retransmits, packets)
    assert client.conn.transport_snapshot()["reorder_packets"] > DUP_ACK_THRESHOLD


def test_reordering_evidence_widens_the_count_threshold_and_rack_window() -> None:
    reordering = Reordering()
    assert reordering.threshold == DUP_ACK_THRESHOLD
    assert reordering.window(0.040) == pytest.approx(0.010)  # a quarter RTT until reordering is seen
    # order 100 delivered after order 140, sent 8 ms later
    reordering.seen(100, 1.000, 140, 1.008)
    assert reordering.threshold == 41
    assert reordering.window(0.040) == pytest.approx(0.010)  # 8 ms x 1.25 is still a quarter RTT
    reordering.seen(200, 2.000, 230, 2.020)
    assert reordering.threshold == 41  # the deepest stays
    assert reordering.window(0.040) == pytest.approx(0.025)
    reordering.seen(300, 3.000, 5000, 3.100)
    assert reordering.threshold == 300  # bounded
    assert reordering.window(0.040) == pytest.approx(0.040)  # never beyond a round trip


def window_limited_rounds(rate: RateController, rounds: int, rtt: float, delay_us: int) -> list[int]:
    """Drive ``rate`` as a flow limited by its own window: each round trip of
    ``rtt`` the whole window is acknowledged (two packets per ACK), RTT samples
    of ``rtt``, queuing delay ``delay_us``. Returns the window after each round."""
    now = 10.0
    windows = []
    for _ in range(rounds):
        cwnd = rate.cwnd
        acks = max(1, cwnd // (2 * MSS))
        for _ in range(acks):
            now += rtt / acks
            rate.on_rtt(rtt, now)
            rate.on_ack(2 * MSS, delay_us, cwnd, now)
        windows.append(rate.cwnd)
    return windows


def test_a_window_limited_flow_with_round_trips_above_the_min_rtt_regrows() -> None:
    rate = RateController(MSS)
    rate.on_rtt(0.032, 0.0)  # the min RTT: one quiet packet's
    rate.startup = False  # the state the lab's tunnel sank to: four packets a round trip
    windows = window_limited_rounds(rate, 200, rtt=0.042, delay_us=5_000)
    assert windows[-1] > 50 * rate.min_cwnd, windows[::20]


def test_a_queue_is_no_reason_to_grow_the_window() -> None:
    # the same round trips, but the 10 ms above the min RTT are queuing delay:
    # the window stays near 1.25 x what it delivers, no runaway
    rate = RateController(MSS)
    rate.on_rtt(0.032, 0.0)
    rate.startup = False
    rate.cwnd = 100 * MSS
    windows = window_limited_rounds(rate, 200, rtt=0.042, delay_us=10_000)
    assert windows[-1] < 100 * MSS, windows[::20]
