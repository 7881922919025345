"""Hostile packets thrown at live connections (Hypothesis).

Off-path attackers (other addresses) and junk from the peer's own address must
change nothing in a transfer. Forged packets from the peer's address with the
right connection id can end a connection (uTP has no authentication; TLS above
it detects tampering), but must never raise, break the memory bounds, or end it
with anything but a typed error.
"""

from __future__ import annotations

import hashlib
import random

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nat.errors import NatError
from nat.utp.multiplexer import UtpConfig, UtpMultiplexer
from nat.utp.packet import ST_SYN, encode_packet
from nat.utp.sim import AppRunner, LinkProfile, SimNetwork, StreamApp

A = ("10.0.0.1", 1000)
B = ("10.0.0.2", 2000)
EVIL = ("10.6.6.6", 666)

forged_fields = st.fixed_dictionaries(
    {
        "type": st.integers(0, 4),
        "seq": st.integers(0, 0xFFFF),
        "ack": st.integers(0, 0xFFFF),
        "ts": st.integers(0, 0xFFFFFFFF),
        "ts_diff": st.integers(0, 0xFFFFFFFF),
        "wnd": st.integers(0, 0xFFFFFFFF),
        "sack": st.none() | st.binary(min_size=1, max_size=40),
        "payload": st.binary(max_size=3000),
        "id_delta": st.sampled_from([0, 1, -1, 2, 1000]),
        "to_client": st.booleans(),
        "at": st.floats(0.0, 3.0),
    }
)


def _setup(seed: int):
    net = SimNetwork(seed, LinkProfile(delay=0.01, loss=0.02, reorder=0.05))
    a = net.add(A, UtpMultiplexer(rng=random.Random(seed)))
    b = net.add(B, UtpMultiplexer(rng=random.Random(seed + 1)))
    data = random.Random(seed)
    up, down = data.randbytes(60_000), data.randbytes(40_000)
    runner = AppRunner([a, b], make_incoming=lambda conn: StreamApp(conn, down))
    client = runner.add(StreamApp(a.connect(B, net.now), up))
    return net, a, b, runner, client, up, down


def _forge(fields: dict, client_conn) -> tuple[tuple, bytes]:
    target_is_client = fields["to_client"]
    base_id = client_conn.recv_id if target_is_client else client_conn.send_id
    datagram = encode_packet(
        fields["type"],
        base_id + fields["id_delta"],
        fields["seq"],
        fields["ack"],
        timestamp_us=fields["ts"],
        timestamp_diff_us=fields["ts_diff"],
        wnd_size=fields["wnd"],
        sack=fields["sack"],
        payload=fields["payload"],
    )
    return (A if not target_is_client else B), datagram


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.integers(0, 1000),
    st.lists(st.tuples(forged_fields, st.binary(max_size=200)), min_size=1, max_size=30),
)
def test_off_path_and_junk_change_nothing(seed: int, attacks: list) -> None:
    net, a, b, runner, client, up, down = _setup(seed)
    net.run(lambda: len(runner.apps) == 2, on_step=runner, max_time=10)
    server = next(app for app in runner.apps.values() if app is not client)
    for fields, junk in attacks:
        dst, forged = _forge(fields, client.conn)
        # the right connection ids, but from an address that is not the peer
        net.inject(EVIL, dst, forged, fields["at"])
        # junk from the peer's own address: malformed, or for another connection id
        net.inject(B if dst == A else A, dst, b"\x7f" + junk, fields["at"])
        if fields["type"] != ST_SYN:
            stray = encode_packet(fields["type"], (client.conn.recv_id + 7777) & 0xFFFF, 1, 2)
            net.inject(B if dst == A else A, dst, stray, fields["at"])
    # (a forged SYN from EVIL opens a connection of its own there: not ours to finish)
    net.run(lambda: client.done and server.done, on_step=runner, max_time=120)
    assert hashlib.sha256(server.received).digest() == hashlib.sha256(up).digest()
    assert hashlib.sha256(client.received).digest() == hashlib.sha256(down).digest()


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, 1000), st.lists(forged_fields, min_size=1, max_size=40))
def test_forged_in_path_packets_are_handled(seed: int, attacks: list) -> None:
    net, a, b, runner, client, up, down = _setup(seed)
    net.run(lambda: len(runner.apps) == 2, on_step=runner, max_time=10)
    apps = list(runner.apps.values())
    for fields in attacks:
        dst, forged = _forge(fields, client.conn)
        net.inject(B if dst == A else A, dst, forged, fields["at"])
    config = UtpConfig()

    def finished() -> bool:
        for app in apps:
            conn = app.conn
            assert conn.receive_buffered <= config.recv_buffer_size + config.mtu_payload
            assert conn.send_buffered <= config.send_buffer_size
            assert conn.unacked_packets <= config.max_packets_in_flight + 1
            assert conn.reorder_count <= config.reorder_limit
        return all(app.done or app.conn.is_closed for app in apps)

    net.run(finished, on_step=runner, max_time=300)
    for app in apps:
        assert app.conn.error is None or isinstance(app.conn.error, NatError)
    if all(app.conn.error is None for app in apps) and client.done:
        # a forged packet may be accepted as data (no authentication in uTP), but
        # lengths never go wrong: every byte position is filled exactly once
        server = next(app for app in apps if app is not client)
        assert len(server.received) <= len(up) + 40 * 3000
