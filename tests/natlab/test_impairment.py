"""Loss, delay/jitter/reordering and rate on a direct veth pair, measured end to end.

Figures are checked functionally (counts, orderings, lower bounds on delay),
never as upper bounds on time.
"""

from __future__ import annotations

import math
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from tests.natlab import Host, Impairment, Link, open_lab, start_reflector
from tests.natlab.reflection import parse_reply

REFLECTOR_PORT = 4000


@dataclass
class Pair:
    client: Host
    server: Host
    link: Link  # a = client end

    @property
    def target(self) -> tuple[str, int]:
        return (self.server.address, REFLECTOR_PORT)


@pytest.fixture(scope="module")
def pair() -> Iterator[Pair]:
    with open_lab() as lab:
        client, server = lab.add_host_pair("client", "server")
        start_reflector(server, [(server.address, REFLECTOR_PORT)])
        assert client.uplink is not None
        yield Pair(client, server, client.uplink)


@pytest.fixture
def sock(pair: Pair) -> Iterator[socket.socket]:
    sock = pair.client.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * 1024 * 1024)
    sock.bind((pair.client.address, 0))
    yield sock
    sock.close()
    pair.link.clear()
    pair.link.restore()


def _exchange(sock: socket.socket, target: tuple[str, int], count: int, *, size: int = 64,
              batch: int = 100, settle: float = 0.3) -> dict[int, float]:
    """Send `count` numbered datagrams in paced batches; return {number: rtt} of replies.

    Batches stay below the veth backlog (1000 packets) so only the lab drops packets.
    """
    rtts: dict[int, float] = {}
    sent_at: dict[int, float] = {}

    def drain(wait: float) -> None:
        deadline = time.monotonic() + wait
        while len(rtts) < len(sent_at) and (left := deadline - time.monotonic()) > 0:
            sock.settimeout(left)
            try:
                data, _ = sock.recvfrom(65535)
            except TimeoutError:
                return
            _, payload = parse_reply(data)
            number = int(payload[:8])
            rtts.setdefault(number, time.monotonic() - sent_at[number])

    for start in range(0, count, batch):
        for number in range(start, min(count, start + batch)):
            sent_at[number] = time.monotonic()
            sock.sendto(b"%08d" % number + b"x" * (size - 8), target)
        drain(0.02)
    drain(settle)
    return rtts


@pytest.mark.netns
def test_loss_rule_drops_the_configured_fraction(pair: Pair, sock: socket.socket) -> None:
    count, loss = 2000, 0.10
    assert len(_exchange(sock, pair.target, 200)) == 200, "control: a clean link loses nothing"
    pair.link.impair(Impairment(loss=loss), b_to_a=False)
    delivered = len(_exchange(sock, pair.target, count))
    # Binomial(2000, 0.9): mean 1800, sd 13.4; six sd either side is a sane bound.
    sd = math.sqrt(count * loss * (1 - loss))
    print(f"10% loss: {delivered}/{count} delivered")
    assert abs(delivered - count * (1 - loss)) < 6 * sd
    pair.link.clear()
    assert len(_exchange(sock, pair.target, 200)) == 200, "clearing the impairment restores the link"


@pytest.mark.netns
def test_delay_daemon_delays_each_direction(pair: Pair, sock: socket.socket) -> None:
    pair.link.impair(Impairment(delay=0.040), b_to_a=False)
    pair.link.impair(Impairment(delay=0.020), a_to_b=False)
    rtts: dict[int, float] = {}
    for number in range(20):  # one at a time: a pure latency measurement
        for rtt in _exchange(sock, pair.target, 1, settle=1.0).values():
            rtts[number] = rtt
    print(f"delay 40+20 ms: rtt min {min(rtts.values()) * 1000:.1f} ms, "
          f"max {max(rtts.values()) * 1000:.1f} ms")
    assert len(rtts) == 20, "the delay daemon lost packets"
    assert min(rtts.values()) >= 0.060


@pytest.mark.netns
def test_jitter_reorders_but_delivers_everything(pair: Pair, sock: socket.socket) -> None:
    pair.link.impair(Impairment(delay=0.030, jitter=0.025, seed=7), b_to_a=False)
    count = 300
    arrival: list[int] = []
    sent_at: dict[int, float] = {}
    rtts: list[float] = []
    for number in range(count):
        sent_at[number] = time.monotonic()
        sock.sendto(b"%08d" % number, pair.target)
        time.sleep(0.001)  # plain sync test code: spaces packets closer than the jitter
    deadline = time.monotonic() + 3.0
    while len(arrival) < count and (left := deadline - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            data, _ = sock.recvfrom(65535)
        except TimeoutError:
            break
        number = int(parse_reply(data)[1])
        arrival.append(number)
        rtts.append(time.monotonic() - sent_at[number])
    inversions = sum(1 for before, after in zip(arrival, arrival[1:]) if after < before)
    print(f"delay 30 ms jitter 25 ms: {len(arrival)}/{count} delivered, {inversions} "
          f"out-of-order arrivals, rtt {min(rtts) * 1000:.1f}..{max(rtts) * 1000:.1f} ms")
    assert sorted(arrival) == list(range(count)), "every packet arrives exactly once"
    assert inversions > 0, "jitter larger than the packet spacing must reorder"
    assert min(rtts) >= 0.005


@pytest.mark.netns
def test_rate_limit_queues_and_drops_a_burst(pair: Pair, sock: socket.socket) -> None:
    burst = 300  # 300 x 1200 bytes = 2.9 Mbit at once into a 2 Mbit/s bucket of ~16 packets
    pair.link.impair(Impairment(rate_bit=2_000_000), b_to_a=False)
    shown = pair.client.run(["tc", "qdisc", "show", "dev", "up0"]).stdout
    assert "tbf" in shown
    limited = len(_exchange(sock, pair.target, burst, size=1200, batch=burst, settle=2.0))
    pair.link.clear()
    assert "tbf" not in pair.client.run(["tc", "qdisc", "show", "dev", "up0"]).stdout
    clean = len(_exchange(sock, pair.target, burst, size=1200, batch=100, settle=1.0))
    print(f"2 Mbit/s tbf: {limited}/{burst} of a burst delivered, {clean}/{burst} without it")
    assert 0 < limited < burst
    assert clean == burst


@pytest.mark.netns
def test_a_dead_delay_daemon_lets_packets_bypass(pair: Pair, sock: socket.socket) -> None:
    pair.link.impair(Impairment(delay=0.050), b_to_a=False)
    daemon = pair.link.a_to_b.delay_daemon
    assert daemon is not None
    pair.client.lab.stop_process(daemon)  # the NFQUEUE rule stays, nobody serves the queue
    rules = pair.server.run(["iptables", "-t", "mangle", "-S", "PREROUTING"]).stdout
    assert "--queue-bypass" in rules
    assert len(_exchange(sock, pair.target, 50)) == 50, "queued packets were black-holed"
