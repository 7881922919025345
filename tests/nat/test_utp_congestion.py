"""Congestion control and RTT estimation: units, and behaviour on a simulated bottleneck."""

from __future__ import annotations

import random

import pytest

from nat.utp.congestion import DelayHistory, LedbatController, LossTolerantController, make_controller
from nat.utp.multiplexer import UtpConfig, UtpMultiplexer
from nat.utp.rtt import RttEstimator
from nat.utp.sim import AppRunner, LinkProfile, SimNetwork, StreamApp

A = ("10.0.0.1", 1000)
B = ("10.0.0.2", 2000)
MSS = 1382


def test_rtt_estimator_follows_bep29() -> None:
    rtt = RttEstimator(initial_rto=1.0, min_rto=0.5, max_rto=30.0)
    assert rtt.rto == 1.0
    rtt.sample(0.2)
    assert rtt.srtt == pytest.approx(0.2) and rtt.rttvar == pytest.approx(0.1)
    assert rtt.rto == pytest.approx(0.6)
    for _ in range(50):
        rtt.sample(0.01)
    assert rtt.rto == 0.5  # floor
    rtt.backoff()
    rtt.backoff()
    assert rtt.rto == 2.0
    for _ in range(10):
        rtt.backoff()
    assert rtt.rto == 30.0


def test_delay_history_is_wrap_aware() -> None:
    history = DelayHistory(period=60.0)
    near_wrap = 0xFFFFFFFF - 1000
    assert history.add(near_wrap, 0.0) == 0
    # 3000 µs later on a clock that wrapped: still 3000 µs above the base
    assert history.add((near_wrap + 3000) & 0xFFFFFFFF, 1.0) == 3000
    # a smaller sample (across the wrap) becomes the new base
    assert history.add(near_wrap - 500, 2.0) == 0
    assert history.base == near_wrap - 500


def test_delay_history_forgets_old_minimum() -> None:
    history = DelayHistory(period=60.0, buckets=2)
    history.add(1000, 0.0)
    for minute in range(1, 5):
        history.add(50_000, minute * 60.0 + 1)
    # the 1000 µs minimum (clock skew since) has aged out of the history
    assert history.add(50_000, 301.0) == 0


def test_ledbat_grows_below_target_and_shrinks_above() -> None:
    ledbat = LedbatController(MSS)
    ledbat.slow_start = False
    start = ledbat.cwnd = 100 * MSS
    ledbat.on_ack(MSS * 50, 0, ledbat.cwnd, 0.0)
    assert ledbat.cwnd > start
    grown = ledbat.cwnd
    ledbat.on_ack(MSS * 50, 300_000, ledbat.cwnd, 0.0)
    assert ledbat.cwnd < grown
    ledbat.on_loss(0.0)
    assert ledbat.cwnd == pytest.approx(ledbat.ssthresh)
    ledbat.on_timeout(0.0)
    assert ledbat.cwnd == MSS and ledbat.slow_start


def test_application_limited_sender_does_not_inflate_the_window() -> None:
    ledbat = LedbatController(MSS)
    before = ledbat.cwnd = 100 * MSS
    for _ in range(100):
        ledbat.on_ack(MSS, 0, 2 * MSS, 0.0)
    assert ledbat.cwnd == before


def test_loss_tolerant_controller_ignores_isolated_loss() -> None:
    tolerant = LossTolerantController(MSS)
    tolerant.cwnd = 100 * MSS
    tolerant.on_ack(MSS, 1000, tolerant.cwnd, 0.0)  # empty queue
    before = tolerant.cwnd
    tolerant.on_loss(0.0)
    assert tolerant.cwnd == before - before // 8
    tolerant.on_ack(MSS, 90_000, tolerant.cwnd, 0.0)  # queue built up: real congestion
    before = tolerant.cwnd
    tolerant.on_loss(0.0)
    assert tolerant.cwnd == before // 2


def test_controller_registry() -> None:
    assert isinstance(make_controller("ledbat", MSS, 100_000), LedbatController)
    assert isinstance(make_controller("tolerant", MSS, 100_000), LossTolerantController)
    custom = make_controller(lambda mss, target: LedbatController(mss, target_delay_us=target), MSS, 5)
    assert custom.target_us == 5
    with pytest.raises(ValueError):
        make_controller("cubic", MSS, 100_000)


def bottleneck_transfer(congestion: str, loss: float, size: int = 3 << 20) -> tuple[float, float]:
    """Simulated seconds to move ``size`` bytes over a 2000 packets/s link, and its peak queue."""
    net = SimNetwork(1, LinkProfile(delay=0.02, rate=2000, loss=loss))
    config = UtpConfig(congestion=congestion)
    a = net.add(A, UtpMultiplexer(config, rng=random.Random(1)))
    b = net.add(B, UtpMultiplexer(config, rng=random.Random(2)))
    runner = AppRunner([a, b], make_incoming=lambda conn: StreamApp(conn, b""))
    client = runner.add(StreamApp(a.connect(B, net.now), bytes(size)))
    peak = [0.0]

    def step() -> None:
        runner()
        peak[0] = max(peak[0], net._link_free_at.get((A, B), 0.0) - net.now)

    net.run(lambda: client.done and all(app.done for app in runner.apps.values()), on_step=step, max_time=900)
    return net.now, peak[0]


def test_ledbat_keeps_the_bottleneck_queue_near_its_target() -> None:
    seconds, peak_queue = bottleneck_transfer("ledbat", 0.0)
    link_seconds = (3 << 20) / MSS / 2000
    assert seconds < link_seconds * 1.25  # the link stays busy
    assert peak_queue < 0.25  # 100 ms target, not an ever-growing queue


def test_loss_tolerant_controller_beats_ledbat_under_random_loss() -> None:
    ledbat_seconds, _ = bottleneck_transfer("ledbat", 0.01)
    tolerant_seconds, peak_queue = bottleneck_transfer("tolerant", 0.01)
    assert tolerant_seconds < ledbat_seconds / 2
    assert peak_queue < 0.25
