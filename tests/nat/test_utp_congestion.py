"""Congestion control and RTT estimation: units, and behaviour on a simulated bottleneck."""

from __future__ import annotations

import hashlib
import random

import pytest

from nat.utp.congestion import DelayHistory, LedbatController, LossTolerantController, RateController, make_controller
from nat.utp.multiplexer import UtpConfig, UtpMultiplexer
from nat.utp.rtt import RttEstimator
from nat.utp.sim import AppRunner, LinkProfile, ReceiveBuffer, SimNetwork, StreamApp

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
        peak[0] = max(peak[0], net.queue_delay(A, B))

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


def test_head_retransmission_is_not_held_back_by_a_full_window() -> None:
    # A 64 KiB receive window filled by out-of-order packets behind one hole:
    # the hole's retransmission must go at once (it alone reopens the window).
    config = UtpConfig(congestion="rate", recv_buffer_size=64 << 10)
    net = SimNetwork(3, LinkProfile(delay=0.02, rate=2000))
    a = net.add(A, UtpMultiplexer(config, rng=random.Random(1)))
    b = net.add(B, UtpMultiplexer(config, rng=random.Random(2)))
    dropped: list[int] = []

    def drop_first_two_data(src: tuple, dst: tuple, data: bytes) -> bool:
        # the first DATA packet and its first retransmission
        if src == A and data[0] >> 4 == 0 and len(data) > 100 and len(dropped) < 2:
            seq = int.from_bytes(data[16:18], "big")
            if not dropped or dropped[0] == seq:
                dropped.append(seq)
                return False
        return True

    net.filters.append(drop_first_two_data)
    runner = AppRunner([a, b], make_incoming=lambda conn: StreamApp(conn, b""))
    payload = random.Random(5).randbytes(1 << 20)
    client = runner.add(StreamApp(a.connect(B, net.now), payload))
    net.run(lambda: client.done and all(app.done for app in runner.apps.values()), on_step=runner, max_time=120)
    server = next(app for app in runner.apps.values() if app is not client)
    assert server.received == payload
    assert len(dropped) == 2
    assert a.stats.timeouts == 0  # both losses repaired without the RTO


def test_rate_controller_model() -> None:
    rate = RateController(MSS)
    rate.on_rtt(0.040, 0.0)
    rate.on_rtt(0.055, 0.0)
    assert rate.min_rtt == pytest.approx(0.040)
    # startup: the window grows by what is acknowledged
    rate.on_ack(MSS, 0, rate.cwnd, 0.0)
    start = rate.cwnd
    rate.on_ack(4 * MSS, 0, rate.cwnd, 0.01)
    assert rate.cwnd == start + 4 * MSS
    # a steady 1000 packets/s over many rounds: startup ends, cwnd = gain x rate
    # x the round trip without queue (the smoothed RTT: no queuing delay here;
    # 41.9 ms), plus two packets
    now = 0.01
    for _ in range(400):
        now += 0.01
        rate.on_ack(10 * MSS, 0, rate.cwnd, now)
    assert not rate.startup
    assert rate.bandwidth == pytest.approx(1000 * MSS, rel=0.05)
    assert rate.window_rtt == pytest.approx(0.040 + 0.015 / 8)
    assert rate.cwnd == pytest.approx(rate.cwnd_gain * 1000 * MSS * rate.window_rtt + 2 * MSS, rel=0.05)
    window = rate.cwnd
    rate.on_loss(now)  # random loss on an empty queue: nothing changes
    assert rate.cwnd == window
    rate.on_ack(10 * MSS, 150_000, rate.cwnd, now)  # queue above the target: drain to one BDP
    assert rate.cwnd == pytest.approx(window / rate.cwnd_gain, rel=0.05)
    rate.on_ack(10 * MSS, 60_000, rate.cwnd, now)
    rate.on_loss(now)  # loss with a long queue: congestion
    assert rate.cwnd <= window / rate.cwnd_gain + MSS
    rate.on_timeout(now)
    assert rate.cwnd == rate.min_cwnd
    for _ in range(10):  # regrows by what is acknowledged, not one packet per RTT
        now += 0.01
        rate.on_ack(10 * MSS, 0, rate.cwnd, now)
    assert rate.cwnd == pytest.approx(window, rel=0.15)


def rate_link_run(
    loss: float, seconds: float, second_flow_at: float | None = None, queue_limit: float | None = 0.05
) -> tuple[list[int], float, int]:
    """Bytes received per flow over ``seconds`` of a 4000 packets/s, 40 ms RTT link
    with random loss each way and a tail-drop queue of ``queue_limit`` seconds;
    the peak queue (s) after the first second (startup); the sender's timeouts."""
    net = SimNetwork(7, LinkProfile(delay=0.02, rate=4000, loss=loss))
    config = UtpConfig(congestion="rate")

    def tail_drop(src: tuple, dst: tuple, data: bytes) -> bool:
        return net.queue_delay(src, dst) <= queue_limit

    if queue_limit is not None:
        net.filters.append(tail_drop)
    a = net.add(A, UtpMultiplexer(config, rng=random.Random(1)))
    b = net.add(B, UtpMultiplexer(config, rng=random.Random(2)))
    runner = AppRunner([a, b], make_incoming=lambda conn: StreamApp(conn, b""))
    size = int(4000 * MSS * seconds)
    clients = [runner.add(StreamApp(a.connect(B, net.now), bytes(size)))]
    peak = [0.0]

    def step() -> None:
        if second_flow_at is not None and len(clients) == 1 and net.now >= second_flow_at:
            clients.append(runner.add(StreamApp(a.connect(B, net.now), bytes(size))))
        runner()
        if net.now >= 1.0:
            peak[0] = max(peak[0], net.queue_delay(A, B))

    net.run(lambda: net.now >= seconds, on_step=step, max_time=seconds + 1)
    servers = [app for app in runner.apps.values() if app not in clients]
    return [len(app.received) for app in servers], peak[0], a.stats.timeouts


def test_rate_controller_model_rtt_has_a_floor_on_short_paths() -> None:
    # Loopback/LAN: one idle packet's RTT is ~100 us, but a loaded round takes
    # the hosts' batching and delayed ACKs. A window of gain x rate x 100 us
    # (a couple of packets) starved the tunnel; the model's RTT is floored.
    rate = RateController(MSS)
    rate.on_rtt(0.0001, 0.0)
    assert rate.model_rtt == rate.min_model_rtt
    now = 0.0
    for _ in range(2000):  # 100k packets/s, acknowledged every 0.5 ms
        now += 0.0005
        rate.on_ack(50 * MSS, 0, rate.cwnd, now)
    assert not rate.startup
    assert rate.bandwidth == pytest.approx(100_000 * MSS, rel=0.05)
    assert rate.cwnd == pytest.approx(rate.cwnd_gain * 100_000 * MSS * rate.min_model_rtt, rel=0.05)
    # paths longer than the floor use their own min RTT
    long_path = RateController(MSS)
    long_path.on_rtt(0.040, 0.0)
    assert long_path.model_rtt == pytest.approx(0.040)


def test_rate_controller_keeps_most_of_the_link_under_random_loss() -> None:
    # 1% loss each way with a 50 ms tail-drop queue: most of the link, no timeouts
    link_bytes = 4000 * MSS * 6.0
    (received,), _, timeouts = rate_link_run(0.01, 6.0)
    assert received > 0.6 * link_bytes
    assert timeouts == 0


def test_rate_controller_queue_stays_bounded_without_loss() -> None:
    # No random loss, unbounded queue: startup overshoots within LEDBAT's bound,
    # then the window of gain x BDP keeps the queue near a quarter min RTT (10 ms).
    seconds, peak_queue = bottleneck_transfer("rate", 0.0)
    link_seconds = (3 << 20) / MSS / 2000
    assert seconds < link_seconds * 1.25
    assert peak_queue < 0.25
    (received,), steady_peak, timeouts = rate_link_run(0.0, 6.0, queue_limit=None)
    assert received > 0.9 * 4000 * MSS * 6.0
    assert steady_peak < 0.03
    assert timeouts == 0



def test_selective_acks_cover_the_whole_reorder_buffer() -> None:
    # One early loss on a window of hundreds of packets: the receiver's SACKs
    # name every packet it holds (not just the first 128), so the sender
    # counts them delivered instead of in flight.
    from nat.utp.packet import decode_packet

    config = UtpConfig(congestion="rate")
    net = SimNetwork(4, LinkProfile(delay=0.02, rate=8000))
    a = net.add(A, UtpMultiplexer(config, rng=random.Random(1)))
    b = net.add(B, UtpMultiplexer(config, rng=random.Random(2)))
    longest_sack = [0]
    dropped: list[int] = []

    def watch(src: tuple, dst: tuple, data: bytes) -> bool:
        packet = decode_packet(data)
        if src == B and packet.sack is not None:
            longest_sack[0] = max(longest_sack[0], len(packet.sack))
        # lose one DATA packet once the window is large
        if src == A and packet.type == 0 and not dropped and net.now > 0.4:
            dropped.append(packet.seq_nr)
            return False
        return True

    net.filters.append(watch)
    runner = AppRunner([a, b], make_incoming=lambda conn: StreamApp(conn, b""))
    payload = random.Random(9).randbytes(6 << 20)
    client = runner.add(StreamApp(a.connect(B, net.now), payload))
    net.run(lambda: client.done and all(app.done for app in runner.apps.values()), on_step=runner, max_time=120)
    server = next(app for app in runner.apps.values() if app is not client)
    assert hashlib.sha256(server.received).digest() == hashlib.sha256(payload).digest()
    assert dropped
    assert longest_sack[0] > 16
    assert a.stats.timeouts == 0


def test_rate_controller_shares_with_a_second_flow() -> None:
    received, _, _ = rate_link_run(0.0, 12.0, second_flow_at=2.0)
    first, second = received
    assert min(first, second) > 0.2 * (first + second)
    assert first + second > 0.8 * 4000 * MSS * 12.0


@pytest.mark.parametrize("seed", range(6))
def test_rate_controller_delivers_intact_data_both_ways_under_loss(seed: int) -> None:
    rng = random.Random(500 + seed)
    profile = LinkProfile(
        loss=rng.choice([0.01, 0.05, 0.2]),
        duplicate=rng.choice([0.0, 0.05]),
        reorder=rng.choice([0.0, 0.1]),
        delay=rng.choice([0.005, 0.02]),
        jitter=rng.choice([0.0, 0.01]),
        rate=rng.choice([None, 3000.0]),
    )
    net = SimNetwork(seed, profile)
    config = UtpConfig(congestion="rate")
    a = net.add(A, UtpMultiplexer(config, rng=random.Random(1)))
    b = net.add(B, UtpMultiplexer(config, rng=random.Random(2)))
    forward = rng.randbytes(rng.randrange(200_000, 1_500_000))
    backward = rng.randbytes(rng.randrange(0, 500_000))
    runner = AppRunner([a, b], make_incoming=lambda conn: StreamApp(conn, backward))
    client = runner.add(StreamApp(a.connect(B, net.now), forward))
    net.run(lambda: client.done and all(app.done for app in runner.apps.values()), on_step=runner, max_time=900)
    server = next(app for app in runner.apps.values() if app is not client)
    assert hashlib.sha256(server.received).digest() == hashlib.sha256(forward).digest()
    assert hashlib.sha256(client.received).digest() == hashlib.sha256(backward).digest()


def test_rate_controller_startup_survives_an_application_limited_start() -> None:
    rate = RateController(MSS)
    rate.on_rtt(0.040, 0.0)
    now = 0.0
    for _ in range(200):  # two seconds of a trickle (a handshake, a prompt)
        now += 0.01
        rate.on_ack(MSS, 0, MSS, now)
    assert rate.startup
    for _ in range(30):  # then bulk data: the window doubles per round
        now += 0.01
        rate.on_ack(rate.cwnd // 4, 0, rate.cwnd, now)
    assert rate.startup and rate.cwnd > 200 * MSS



def test_a_run_of_lost_packets_is_repaired_within_a_few_round_trips() -> None:
    # 4 MiB windows over a 100 Mbit/s link with a 50 ms tail-drop queue and 1%
    # loss: the queue overflows once and drops hundreds of packets in a row
    # while only retransmissions of earlier holes get through. Those losses
    # must be found by send time (RACK): the SACK rule sees nothing after
    # them, and each repaired hole restarts the retransmission timer, so they
    # were repaired one per round trip (30 of 96 Mbit/s, a timeout).
    config = UtpConfig(
        congestion="rate",
        recv_buffer_size=4 << 20,
        send_buffer_size=4 << 20,
        reorder_limit=4096,
        max_packets_in_flight=4096,
    )
    net = SimNetwork(1, LinkProfile(delay=0.02, rate=8700, loss=0.01))
    drops = [0]

    def tail_drop(src: tuple, dst: tuple, data: bytes) -> bool:
        if net.queue_delay(src, dst) > 0.05:
            drops[0] += 1
            return False
        return True

    net.filters.append(tail_drop)
    a = net.add(A, UtpMultiplexer(config, rng=random.Random(1)))
    b = net.add(B, UtpMultiplexer(config, rng=random.Random(2)))
    runner = AppRunner([a, b], make_incoming=lambda conn: StreamApp(conn, b""))
    seconds = 8.0
    client = runner.add(StreamApp(a.connect(B, net.now), bytes(int(8700 * 1400 * seconds))))
    net.run(lambda: net.now >= seconds, on_step=runner, max_time=seconds + 1)
    received = sum(len(app.received) for app in runner.apps.values() if app is not client)
    assert drops[0] > 1000  # the queue did overflow
    assert a.stats.timeouts == 0
    assert received > 0.75 * 8700 * MSS * seconds


@pytest.mark.parametrize("congestion", ["ledbat", "rate"])
def test_stale_reordered_acks_are_not_duplicate_acks(congestion: str) -> None:
    # libutp counts as a duplicate ACK only an ST_STATE whose ack_nr is the
    # latest one (snd_una - 1). ACKs overtaken by newer ones (reordered on the
    # path) say nothing new: three of them must not fast-retransmit or shrink
    # the window.
    from nat.utp.packet import ST_STATE, decode_packet, encode_packet

    config = UtpConfig(congestion=congestion)
    a = UtpMultiplexer(config, rng=random.Random(30))
    b = UtpMultiplexer(config, rng=random.Random(130))
    conn = a.connect(B, 0.0)
    for data, _ in a.datagrams_to_send(0.0):
        b.receive_datagram(data, A, 0.0)
    for data, _ in b.datagrams_to_send(0.0):
        a.receive_datagram(data, B, 0.0)
    conn.congestion.cwnd = 64 * MSS
    conn.send(bytes(MSS * 8))
    packets = [decode_packet(data) for data, _ in a.datagrams_to_send(0.01)]
    assert len(packets) == 8
    first = packets[0].seq_nr

    def ack(seq16: int) -> bytes:
        return encode_packet(ST_STATE, conn.recv_id, 0, seq16 & 0xFFFF, wnd_size=1 << 20)

    # the ACKs of the first three packets, in order: snd_una is the fourth
    for index, at in ((0, 0.05), (1, 0.051), (2, 0.052)):
        a.receive_datagram(ack(first + index), B, at)
    a.datagrams_to_send(0.052)
    window = conn.cwnd
    unacked = conn.unacked_packets
    # three late copies of older ACKs (ack_nr below snd_una - 1)
    for seq16, at in ((first, 0.053), (first + 1, 0.054), (first, 0.055)):
        a.receive_datagram(ack(seq16), B, at)
    assert a.datagrams_to_send(0.056) == []  # nothing retransmitted
    assert a.stats.fast_retransmits == 0 and a.stats.retransmits == 0
    assert conn.cwnd == window and conn.unacked_packets == unacked
    # real duplicates of the latest ACK still trigger the fast retransmit
    for at in (0.06, 0.061, 0.062):
        a.receive_datagram(ack(first + 2), B, at)
    (resent,) = [decode_packet(data) for data, _ in a.datagrams_to_send(0.063)]
    assert resent.seq_nr == packets[3].seq_nr
    assert a.stats.fast_retransmits == 1


# ---- a receiver behind a small socket buffer (libutp: 1 MiB window, 208 KiB buffer)


def small_buffer_run(congestion: str, capacity: int, rate: float, batch: int, size: int = 8 << 20):
    """Send ``size`` bytes to a receiver behind a socket buffer of ``capacity``
    datagrams drained ``rate`` datagrams/s in batches (ACKs once per batch,
    SACKs cut to libutp's 4 bytes), over a loopback-like path (0.5 ms each way,
    the sender's datagrams leave at 150k/s). Returns the goodput as a share of
    the drain rate, the sender's connection and stats, and the buffer."""
    net = SimNetwork(1, LinkProfile(delay=0.0005, rate=150_000.0))
    config = UtpConfig(congestion=congestion)
    a = net.add(A, UtpMultiplexer(config, rng=random.Random(1)))
    b = UtpMultiplexer(config, rng=random.Random(2))
    buffer = net.add(B, ReceiveBuffer(b, capacity, rate, batch, sack_bytes=4))
    runner = AppRunner([a, b], make_incoming=lambda conn: StreamApp(conn, b""))
    payload = random.Random(3).randbytes(size)
    client = runner.add(StreamApp(a.connect(B, net.now), payload))
    net.run(lambda: client.done and len(runner.apps) == 2 and all(app.done for app in runner.apps.values()),
            on_step=runner, max_time=120)
    server = next(app for app in runner.apps.values() if app is not client)
    assert bytes(server.received) == payload
    return size / net.now / (rate * MSS), client.conn, a.stats, buffer


@pytest.mark.parametrize(
    ("capacity", "rate", "batch"), [(60, 20_000.0, 16), (90, 20_000.0, 64), (90, 40_000.0, 64), (150, 20_000.0, 64)]
)
def test_rate_controller_keeps_a_receiver_with_a_small_socket_buffer_busy(capacity: int, rate: float, batch: int) -> None:
    # Before: the whole flight (1.25 x rate x 10 ms) landed in the buffer, its
    # tail was dropped, the drops (no queuing delay) were taken for random loss
    # and every retransmission went into the full buffer again; the tail past
    # libutp's 32-packet SACK was only found by the RTO: 1-4% of the drain rate,
    # a dozen timeouts for 8 MiB.
    share, conn, stats, buffer = small_buffer_run("rate", capacity, rate, batch)
    assert buffer.dropped > 0  # the buffer did overflow
    assert share > 0.7
    assert stats.timeouts == 0
    assert conn.congestion.ceiling is not None  # the burst was recognised


def test_ledbat_keeps_a_receiver_with_a_small_socket_buffer_busy() -> None:
    # LEDBAT halves on every loss; what it lacked was the tail: one cell of the
    # grid above lost a third of its time to timeouts
    share, _, stats, _ = small_buffer_run("ledbat", 150, 40_000.0, 16)
    assert share > 0.7
    assert stats.timeouts == 0


def long_path_run(loss: float, queue_limit: float | None, delay: float, seconds: float = 6.0):
    """6 s over a 4000 packets/s link, ``2 x delay`` RTT, random loss each way and
    a tail-drop queue of ``queue_limit`` seconds (None: unbounded): share of
    the link received, the sender's timeouts and its overflow ceiling."""
    net = SimNetwork(7, LinkProfile(delay=delay, rate=4000, loss=loss))
    config = UtpConfig(congestion="rate")
    if queue_limit is not None:
        net.filters.append(lambda src, dst, data: net.queue_delay(src, dst) <= queue_limit)
    a = net.add(A, UtpMultiplexer(config, rng=random.Random(1)))
    b = net.add(B, UtpMultiplexer(config, rng=random.Random(2)))
    runner = AppRunner([a, b], make_incoming=lambda conn: StreamApp(conn, b""))
    link_bytes = 4000 * MSS * seconds
    client = runner.add(StreamApp(a.connect(B, net.now), bytes(int(link_bytes))))
    net.run(lambda: net.now >= seconds, on_step=runner, max_time=seconds + 1)
    received = sum(len(app.received) for app in runner.apps.values() if app is not client)
    return received / link_bytes, a.stats.timeouts, getattr(client.conn.congestion, "ceiling", None)


@pytest.mark.parametrize(
    ("loss", "queue_limit", "delay", "before"),
    [
        # the share of the link each received before the overflow ceiling
        (0.01, 0.05, 0.02, 0.942),
        (0.03, 0.05, 0.02, 0.911),
        (0.03, 0.05, 0.05, 0.545),
        (0.01, None, 0.02, 0.937),
        (0.03, None, 0.05, 0.651),
        (0.10, None, 0.02, 0.807),
        (0.20, None, 0.02, 0.478),
    ],
)
def test_random_loss_on_a_long_path_is_not_taken_for_overflow(
    loss: float, queue_limit: float | None, delay: float, before: float
) -> None:
    # Random loss (up to 20% each way) and a path queue that overflows (it has
    # delay) set no ceiling, and the goodput stays what it was.
    share, _, ceiling = long_path_run(loss, queue_limit, delay)
    assert ceiling is None
    assert share > before * 0.98


def test_overflow_burst_rule() -> None:
    from nat.utp.loss import OVERFLOW_RUN, overflow_burst

    assert OVERFLOW_RUN == 12
    assert overflow_burst(list(range(100, 112)))  # a run of twelve
    assert overflow_burst([100, 101, 103, 104, 105, 106, 108, 109, 110, 112, 114, 115])  # twelve within sixteen
    assert not overflow_burst([100, 101, 103, 104, 105, 106, 108, 109, 110, 112, 114, 116])  # within seventeen
    assert not overflow_burst(list(range(100, 111)))  # eleven
    assert not overflow_burst(list(range(100, 160, 5)))  # random loss: spread out


def test_rate_controller_overflow_ceiling() -> None:
    rate = RateController(MSS)
    rate.on_rtt(0.001, 0.0)
    now = 0.0
    for _ in range(400):  # a steady 10k packets/s on loopback
        now += 0.001
        rate.on_ack(10 * MSS, 500, rate.cwnd, now)
    window = rate.cwnd
    assert rate.ceiling is None and window > 100 * MSS
    # a burst lost with no queue behind it: the window is capped at half the flight
    rate.on_loss(now)
    rate.on_overflow(window, now)
    assert rate.ceiling == window // 2 and rate.cwnd == window // 2
    for _ in range(5):  # the model's window would be larger: the ceiling holds it
        now += 0.001
        rate.on_ack(10 * MSS, 500, rate.cwnd, now)
    assert rate.cwnd == rate.ceiling and window // 2 <= rate.ceiling <= window // 2 * 33 // 32
    # each round (10 ms on loopback) the ceiling held the window it grows by 1/32
    for _ in range(100):
        now += 0.001
        rate.on_ack(10 * MSS, 500, rate.cwnd, now)
    assert window // 2 * 1.2 < rate.ceiling < window // 2 * 1.45
    assert rate.cwnd == rate.ceiling
    # a burst during a loss episode that saw a queue (delay above target/8) is
    # a path queue's overflow: the delay rules handle it
    ceiling = rate.ceiling
    rate.on_loss(now)
    rate.on_ack(10 * MSS, 20_000, rate.cwnd, now)
    rate.on_ack(10 * MSS, 500, rate.cwnd, now)
    rate.on_overflow(rate.cwnd, now)
    assert rate.ceiling == ceiling
    # LEDBAT halves on every loss already (on_loss); the burst changes nothing more
    for other in (LedbatController(MSS), LossTolerantController(MSS)):
        other.cwnd = 100 * MSS
        other.on_overflow(100 * MSS, now)
        assert other.cwnd == 100 * MSS


def test_a_tail_lost_past_libutps_sack_is_probed_and_resent_before_the_timeout() -> None:
    # 40 packets; the receiver (libutp: 4-byte SACKs) got the first two and the
    # last two, a receive buffer dropped the rest. Its ACK says ack_nr = the
    # second, and a SACK with no bit set (what it holds is past its 32-packet
    # range). Then nothing more comes: before, only the RTO (0.5 s after) found
    # the loss. Now two round trips of silence send the oldest packet again
    # (the tail-loss probe), and its ACK, another empty SACK a round trip
    # later, proves the range lost.
    from nat.utp.packet import ST_STATE, decode_packet, encode_packet

    config = UtpConfig(congestion="rate")
    a = UtpMultiplexer(config, rng=random.Random(40))
    b = UtpMultiplexer(config, rng=random.Random(140))
    conn = a.connect(B, 0.0)
    for data, _ in a.datagrams_to_send(0.0):
        b.receive_datagram(data, A, 0.02)
    for data, _ in b.datagrams_to_send(0.02):
        a.receive_datagram(data, B, 0.04)  # a 40 ms round trip
    assert conn.rtt == pytest.approx(0.04)
    conn.congestion.cwnd = 64 * MSS
    conn.send(bytes(MSS * 40))
    packets = [decode_packet(data) for data, _ in a.datagrams_to_send(0.05)]
    assert len(packets) == 40
    first = packets[0].seq_nr

    def ack(seq16: int, at: float) -> None:
        a.receive_datagram(
            encode_packet(ST_STATE, conn.recv_id, 0, seq16 & 0xFFFF, wnd_size=1 << 20, sack=bytes(4)), B, at
        )

    ack(first + 1, 0.09)
    assert a.datagrams_to_send(0.09) == []  # sent a round trip ago: not yet proven lost
    window = conn.cwnd
    probe_at = a.get_timer()
    assert probe_at is not None and 0.17 < probe_at < 0.18  # two round trips and the ACK delay
    a.handle_timer(probe_at)
    (probe,) = [decode_packet(data) for data, _ in a.datagrams_to_send(probe_at)]
    assert probe.seq_nr == packets[2].seq_nr
    assert a.stats.timeouts == 0 and conn.cwnd == window
    # the timeout still runs from the oldest packet's transmission, not from that ACK
    assert a.get_timer() == pytest.approx(0.05 + conn.rto)
    ack(first + 2, probe_at + 0.04)
    resent = [decode_packet(data) for data, _ in a.datagrams_to_send(probe_at + 0.04)]
    # the SACK's range and the packet before it, at once (as many as the
    # window takes: 33 packets lost in a row are a burst, the window is now
    # capped at half the flight)
    assert len(resent) >= 16
    assert [p.seq_nr for p in resent] == [p.seq_nr for p in packets[3 : 3 + len(resent)]]
    assert conn.congestion.ceiling is not None
    assert a.stats.timeouts == 0
