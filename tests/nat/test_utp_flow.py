"""Flow control, bounded memory, half-close, sequence and timestamp wrap-around."""

from __future__ import annotations

import hashlib
import random

from nat.utp.connection import UtpState
from nat.utp.events import EofReceived, SendSpaceAvailable
from nat.utp.multiplexer import UtpConfig, UtpMultiplexer
from nat.utp.sim import AppRunner, LinkProfile, SimNetwork, StreamApp

from .test_utp_transfer import A, B, run_transfer


def test_slow_reader_stops_the_sender_and_memory_stays_bounded() -> None:
    net = SimNetwork(1, LinkProfile(delay=0.02, loss=0.01))
    a = net.add(A, UtpMultiplexer(rng=random.Random(1)))
    b = net.add(B, UtpMultiplexer(rng=random.Random(2)))
    payload = random.Random(3).randbytes(4 << 20)
    runner = AppRunner([a, b])
    server_apps: list[StreamApp] = []

    def incoming(conn):
        app = StreamApp(conn, b"")
        app.paused = True
        server_apps.append(app)
        return app

    runner.make_incoming = incoming
    client = runner.add(StreamApp(a.connect(B, net.now), payload))
    peak = {"rbuf": 0, "sendbuf": 0}

    def step() -> None:
        runner()
        for app in server_apps:
            conn = app.conn
            peak["rbuf"] = max(peak["rbuf"], conn.receive_buffered)
        conn = client.conn
        peak["sendbuf"] = max(peak["sendbuf"], conn.send_buffered)

    # the reader does not read for 40 simulated seconds
    net.run(lambda: net.now > 40.0, on_step=step, max_time=100)
    server = server_apps[0]
    config = UtpConfig()
    assert peak["rbuf"] <= config.recv_buffer_size + config.mtu_payload
    assert peak["sendbuf"] <= config.send_buffer_size
    assert client.conn.bytes_sent <= config.recv_buffer_size + 8 * config.mtu_payload
    assert not client.conn.is_closed  # zero-window probes keep it alive, no timeout
    assert client.conn.peer_window < config.mtu_payload
    # then it reads again: everything arrives
    server.paused = False
    net.run(lambda: client.done and server.done, on_step=step, max_time=300)
    assert hashlib.sha256(server.received).digest() == hashlib.sha256(payload).digest()
    assert any(isinstance(e, SendSpaceAvailable) for e in client.events)


def test_small_receive_buffer_throttles_without_loss() -> None:
    config = UtpConfig(recv_buffer_size=16 * 1382, send_buffer_size=64 * 1024)
    client, server, net = run_transfer(2, LinkProfile(delay=0.01), 2_000_000, 10_000, config=config)
    assert client.conn.retransmits == 0


def test_half_close_reading_continues_after_send_eof() -> None:
    net = SimNetwork(4, LinkProfile(delay=0.01, loss=0.05, reorder=0.1))
    a = net.add(A, UtpMultiplexer(rng=random.Random(1)))
    b = net.add(B, UtpMultiplexer(rng=random.Random(2)))
    request = b"GET /big\r\n" * 100
    response = random.Random(5).randbytes(600_000)
    runner = AppRunner([a, b])
    servers: list[StreamApp] = []

    def incoming(conn):
        app = StreamApp(conn, b"", send_eof=False)
        servers.append(app)
        return app

    runner.make_incoming = incoming
    client = runner.add(StreamApp(a.connect(B, net.now), request))  # request, then EOF
    net.run(lambda: bool(servers) and servers[0].conn.at_eof, on_step=runner, max_time=60)
    server = servers[0]
    assert bytes(server.received) == request
    assert any(isinstance(e, EofReceived) for e in server.events)
    assert client.conn.state is UtpState.CONNECTED  # half-closed, not closed
    # the server answers after the client's EOF; the client still reads
    server.outgoing = memoryview(response)
    server.want_eof = True
    net.run(lambda: client.done and server.done, on_step=runner, max_time=120)
    assert hashlib.sha256(client.received).digest() == hashlib.sha256(response).digest()
    assert client.conn.error is None and server.conn.error is None


class _WrapRandom(random.Random):
    """Picks sequence numbers just below the 16-bit wrap."""

    def randrange(self, *args, **kwargs):  # type: ignore[override]
        value = super().randrange(*args, **kwargs)
        return 0xFFFF - 40 + value % 8 if args == (0x10000,) else value


def test_sequence_numbers_wrap() -> None:
    net_rng = _WrapRandom(1)
    client, server, net = run_transfer(
        6, LinkProfile(delay=0.005, loss=0.05, reorder=0.1), 400_000, 300_000, rng_a=net_rng
    )
    assert client.conn.initial_seq > 0xFFFF - 41
    assert client.conn.next_seq > 0x10000  # crossed the wrap


def test_sequence_numbers_wrap_on_the_acceptor() -> None:
    net = SimNetwork(7, LinkProfile(delay=0.005, loss=0.05, duplicate=0.05))
    a = net.add(A, UtpMultiplexer(rng=random.Random(1)))
    b = net.add(B, UtpMultiplexer(rng=_WrapRandom(2)))
    payload = random.Random(8).randbytes(300_000)
    runner = AppRunner([a, b], make_incoming=lambda conn: StreamApp(conn, payload))
    client = runner.add(StreamApp(a.connect(B, net.now), b"hi"))
    net.run(lambda: client.done and all(app.done for app in runner.apps.values()), on_step=runner)
    assert bytes(client.received) == payload


def test_timestamps_wrap() -> None:
    # the 32-bit microsecond clock wraps at 4294.967296 s: start just before it
    client, server, net = run_transfer(
        9, LinkProfile(delay=0.03, jitter=0.01, loss=0.02), 800_000, 200_000, start_time=4294.5
    )
    assert net.now > 4294.967296
    assert 0.03 < client.conn.rtt < 0.2
    # LEDBAT saw sane delays across the wrap: the window was not collapsed by a bogus huge delay
    assert client.conn.congestion.last_delay_us < 1_000_000


def test_reading_sends_a_window_update() -> None:
    config = UtpConfig(recv_buffer_size=8 * 1382)
    a = UtpMultiplexer(config, rng=random.Random(1))
    b = UtpMultiplexer(config, rng=random.Random(2))

    def pump(src, dst, src_addr, now):
        for data, _ in src.datagrams_to_send(now):
            dst.receive_datagram(data, src_addr, now)

    conn = a.connect(B, 0.0)
    pump(a, b, A, 0.0)
    pump(b, a, B, 0.0)
    server = b.connections[0]
    conn.congestion.cwnd = 64 * 1382
    conn.send(bytes(20 * 1382))
    for step in range(5):
        pump(a, b, A, 0.01 * step)
        pump(b, a, B, 0.01 * step)
    assert conn.peer_window < 1382  # the receiver is full; the sender waits
    sent_before = conn.bytes_sent
    assert server.read(1382) and not b.datagrams_to_send(1.0)  # one packet of room: no update
    server.read(1382)  # two packets of room: tell the sender at once
    updates = b.datagrams_to_send(1.0)
    assert len(updates) == 1
    for data, _ in updates:
        a.receive_datagram(data, B, 1.0)
    assert conn.peer_window >= 2 * 1382
    a.datagrams_to_send(1.0)
    assert conn.bytes_sent > sent_before
