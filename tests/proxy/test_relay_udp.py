"""Relay forwarding over UDP (keyed messages 16..31) between nodes registered with a
relay node: real UDP on loopback, a real uTP + TLS tunnel over the relayed path, and
an attacker's view (unregistered, unauthenticated, forged tags, replays, floods)."""

from __future__ import annotations

import os

import trio

from nat.utp.paths import VirtualPath
from proxy.relay.forwarding import RelayCore
from proxy.relay.frames import HEADER_SIZE
from proxy.relay.limits import LARGEST_SEND, RelayLimits
from proxy.rendezvous.keys import KeyRing
from proxy.rendezvous.node import choose_home
from proxy.rendezvous.relay_udp import (
    GONE_NOT_REGISTERED,
    RELAY_GONE,
    RELAY_RECV,
    RELAY_SEND,
    UdpRelayFront,
    relay_opener,
    seal_relay,
)
from proxy.rendezvous.routes import relay_path

from .test_relay_udp_support import (
    MarkerScan,
    UdpNode,
    digest,
    payload,
    registered_with,
    tunnel_both_ways,
    udp_node,
    wait_for,
)

SIZE = 8 * 1024 * 1024


def wall_ms() -> int:
    import time

    return int(time.time() * 1000)


async def send_raw(data: bytes, address: tuple[str, int], times: int = 1) -> None:
    with trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM) as sock:
        for _ in range(times):
            await sock.sendto(data, address)


def forwarded(relay: UdpNode) -> int:
    core = relay.service.relay_core
    assert core is not None
    return core.stats.frames_forwarded


async def test_a_tunnel_over_the_udp_relay_carries_data_both_ways_and_the_relay_sees_no_plaintext() -> None:
    marker = b"keynode relay marker " + os.urandom(6).hex().encode()
    a_to_b, b_to_a = payload(SIZE, 1, marker), payload(SIZE, 2, marker)
    with trio.fail_after(120):
        async with udp_node(serve=True) as relay:
            scan = MarkerScan(marker)
            assert relay.service.relay_core is not None
            relay.service.relay_core.capture = scan
            relays = (relay.relay_address(),)
            async with udp_node(relays=relays) as a, udp_node(relays=relays) as b:
                await wait_for(lambda: registered_with(a, relay) and registered_with(b, relay))
                assert a.service.routes.home_relay == relay.node_id
                assert a.service.routes.relay_for(b.node_id) == relay.node_id
                path = a.service.routes.path_to(b.node_id)
                assert path == relay_path(relay.node_id, b.node_id)
                results = await tunnel_both_ways(a, b, path, a_to_b, b_to_a)
                # liveness of the relayed path, end to end and authenticated, both ways
                assert await a.service.routes.ping(b.node_id) > 0
                assert await b.service.routes.ping(a.node_id) > 0
                a_stats, b_stats = a.endpoint.stats, b.endpoint.stats
    print(f"relayed over UDP: {2 * SIZE / results['seconds'] / 2**20:.1f} MiB/s (both directions together)")
    assert results["a saw"] == b.node_id and results["b saw"] == a.node_id
    assert results["b path"] == relay_path(relay.node_id, a.node_id)
    assert results["at b"] == digest(a_to_b) and results["at a"] == digest(b_to_a)
    # every uTP datagram went through the relay: no uTP straight between the nodes
    assert a_stats.utp_datagrams_received == 0 and b_stats.utp_datagrams_received == 0
    assert a_stats.path_datagrams_sent > 0 and b_stats.path_datagrams_sent > 0
    assert scan.bytes >= 2 * SIZE and scan.hits == 0
    # b saw the relayed path appear (a's SYN) and was told nothing went away
    kinds = [(event.kind, event.peer, event.relay) for event in b.events]  # type: ignore[attr-defined]
    assert ("appeared", a.node_id, relay.node_id) in kinds


async def test_an_unregistered_or_unauthenticated_sender_gets_nothing_forwarded() -> None:
    async with udp_node(serve=True) as relay:
        relays = (relay.relay_address(),)
        async with udp_node(relays=relays) as b, udp_node() as stranger:
            await wait_for(lambda: registered_with(b, relay))
            relay_at = relay.endpoint.address[:2]
            front = relay.service.relay_front
            assert front is not None
            # a valid key, a valid box for the relay, but never registered
            for _ in range(50):
                data = seal_relay(stranger.keyring, bytes(relay.node_id), RELAY_SEND,
                                  bytes(b.node_id) + b"\x01not registered", wall_ms())
                stranger.endpoint.send_message(data, relay_at)
            # garbage in a relay message's clothes, and a box the relay cannot open
            junk = b"\x00\x00\x00\x10\x01" + os.urandom(32 + 24 + 100)
            await send_raw(junk, relay_at, 50)
            core = relay.service.core
            assert core is not None
            # (a burst of new sender keys from one host is partly refused before any crypto)
            await wait_for(lambda: front.counters["unregistered"] == 50
                           and core.dropped["unauthenticated"] + core.dropped["overloaded"] >= 50)
            assert forwarded(relay) == 0
            assert b.service.routes.counters["delivered"] == 0
            assert b.service.routes.counters["received"] == 0  # nothing reached b at all


async def test_forged_sender_tags_and_replays_are_refused() -> None:
    async with udp_node(serve=True) as relay:
        relays = (relay.relay_address(),)
        async with udp_node(relays=relays) as a, udp_node(relays=relays) as b, udp_node(relays=relays) as mallory:
            await wait_for(lambda: all(registered_with(node, relay) for node in (a, b, mallory)))
            relay_at = relay.endpoint.address[:2]
            b_at = b.endpoint.address[:2]
            core = relay.service.core
            assert core is not None
            # Mallory (registered) claims to be a: a's NodeId in the header, her own box
            forged = bytearray(seal_relay(mallory.keyring, bytes(relay.node_id), RELAY_SEND,
                                          bytes(b.node_id) + b"\x01from a, honest", wall_ms()))
            forged[5:37] = bytes(a.node_id)
            await send_raw(bytes(forged), relay_at, 10)
            # ... and sends b a RELAY_RECV tagged "from a" herself, as if she were the relay
            for _ in range(10):
                fake_recv = seal_relay(mallory.keyring, bytes(b.node_id), RELAY_RECV,
                                       bytes(a.node_id) + b"\x01injected", wall_ms())
                await send_raw(fake_recv, b_at)
            # one genuine message from a, captured and replayed 20 times
            genuine = seal_relay(a.keyring, bytes(relay.node_id), RELAY_SEND,
                                 bytes(b.node_id) + b"\x01genuine", wall_ms())
            await send_raw(genuine, relay_at, 21)
            await wait_for(lambda: core.dropped["replayed"] >= 20 and core.dropped["unauthenticated"] >= 10
                           and b.service.routes.counters["not_from_relay"] >= 10
                           and b.service.routes.counters["delivered"] >= 1)
            await trio.sleep(0.2)  # anything else in flight would arrive now
            assert forwarded(relay) == 1
            assert b.service.routes.counters["delivered"] == 1  # the genuine one, tagged a by the relay
            assert b.service.routes.relay_for(a.node_id) == relay.node_id
            assert [event.peer for event in b.events] == [a.node_id]  # type: ignore[attr-defined]


async def test_a_flood_from_one_node_is_held_to_its_rate_and_another_node_still_gets_through() -> None:
    rate, burst = 200_000, LARGEST_SEND
    datagram_size = 1000
    frame = HEADER_SIZE + 32 + datagram_size  # what the bucket counts per datagram
    limits = RelayLimits(rate=rate, burst=burst)
    async with udp_node(serve=True, limits=limits) as relay:
        relays = (relay.relay_address(),)
        seen: dict[bytes, int] = {b"F": 0, b"D": 0}

        def capture(datagram: bytes) -> None:
            seen[bytes(datagram[:1])] += 1

        assert relay.service.relay_core is not None
        relay.service.relay_core.capture = capture
        async with udp_node(relays=relays) as flooder, udp_node(relays=relays) as decent, \
                udp_node(relays=relays) as b:
            await wait_for(lambda: all(registered_with(node, relay) for node in (flooder, decent, b)))
            flood_path = flooder.service.routes.path_to(b.node_id)
            decent_path = decent.service.routes.path_to(b.node_id)
            assert isinstance(flood_path, VirtualPath) and isinstance(decent_path, VirtualPath)
            started = trio.current_time()
            sent = 0
            while trio.current_time() - started < 1.0:
                for _ in range(50):
                    flooder.service.routes.send(b.node_id, b"F" + bytes(datagram_size - 1))
                    sent += 1
                if sent % 500 == 0:
                    decent.service.routes.send(b.node_id, b"D" + bytes(99))
                await trio.sleep(0.005)
            elapsed = trio.current_time() - started
            await trio.sleep(0.3)
            core = relay.service.relay_core
            allowed = (burst + rate * (elapsed + 0.3)) / frame
            print(f"flood: sent {sent}, forwarded {seen[b'F']} (bound {allowed:.0f}), "
                  f"rate_limited {core.stats.drops['rate_limited']}, decent {seen[b'D']}")
            assert sent > 3 * allowed  # it was a flood
            assert 0 < seen[b"F"] <= allowed
            assert core.stats.drops["rate_limited"] >= sent - seen[b"F"] - sent // 10  # the rest: refused (UDP may lose a few)
            assert seen[b"D"] >= (sent // 500) * 0.9  # the decent node's own bucket was untouched


def test_the_home_relay_moves_only_for_a_clearly_better_one() -> None:
    r1, r2, r3 = b"1" * 32, b"2" * 32, b"3" * 32
    assert choose_home(None, {r1: 0.050, r2: 0.040}) == r2
    assert choose_home(r1, {r1: 0.050, r2: 0.041}) == r1  # 9 ms better: stay
    assert choose_home(r1, {r1: 0.050, r2: 0.034}) == r1  # 16 ms better but not below 2/3 (33.3 ms)
    assert choose_home(r1, {r1: 0.050, r2: 0.033}) == r2  # both: move
    assert choose_home(r1, {r1: 0.012, r2: 0.001}) == r2
    assert choose_home(r1, {r1: 0.009, r2: 0.001}) == r1  # under 10 ms gain: stay
    assert choose_home(r3, {r1: 0.010, r2: 0.020}) == r1  # the old home answers no more
    assert choose_home(r1, {}) == r1


async def test_the_address_record_names_the_home_relay_first() -> None:
    async with udp_node(serve=True) as r1, udp_node(serve=True) as r2:
        async with udp_node(relays=(r1.relay_address(), r2.relay_address(tcp_port=4443))) as node:
            await wait_for(lambda: registered_with(node, r1) and registered_with(node, r2))
            home = node.service.routes.home_relay
            assert home in (r1.node_id, r2.node_id)
            record = node.service.address_record()
            relays_listed = [address for address in record.understood() if hasattr(address, "node_id")]
            assert [address.node_id for address in relays_listed][0] == home  # type: ignore[union-attr]
            assert f"relay:{r2.node_id}@127.0.0.1:{r2.endpoint.address[1]}:tcp=4443" in record.addresses
            # a caller learning that record reaches the node through its home relay
            async with udp_node(relays=(r1.relay_address(),)) as caller:
                caller.service.routes.learn(bytes(node.node_id), record.to_bytes())
                assert caller.service.routes.relay_for(node.node_id) == home


def test_the_udp_front_refuses_past_max_clients_and_forgets_expired_registrations() -> None:
    """Sans-IO: the front over a core that holds one client; registrations are a dict."""
    rings = [KeyRing(os.urandom(32)) for _ in range(3)]
    relay, a, b = rings
    registrations: dict[bytes, tuple[str, int]] = {a.node_id_bytes: ("127.0.0.1", 1000),
                                                   b.node_id_bytes: ("127.0.0.1", 2000)}
    core = RelayCore(RelayLimits(max_clients=1))
    front = UdpRelayFront(relay, core, lambda key, now: registrations.get(key))
    now, ms = 1.0, wall_ms()
    front.receive(seal_relay(a, relay.node_id_bytes, RELAY_SEND, b.node_id_bytes + b"\x01x", ms), ("127.0.0.1", 1000),
                  now, ms)
    # a is the one client; b cannot be admitted: dropped and counted, nothing raised
    assert front.counters["full"] == 1 and core.stats.refused_full == 1
    assert core.stats.drops["no_such_peer"] == 1 and front.take_output() == []
    # a's registration expires: the front lets its client go
    del registrations[a.node_id_bytes]
    front.expire(now + 1)
    assert core.client_count == 0 and front.clients == {}
    # now b fits, and a (unregistered) gets nothing through
    front.receive(seal_relay(a, relay.node_id_bytes, RELAY_SEND, b.node_id_bytes + b"\x01y", ms + 1),
                  ("127.0.0.1", 1000), now + 2, ms + 1)
    assert front.counters["unregistered"] == 1
    (hint, to), = front.take_output()  # a alone is told it is not registered (so it registers again)
    assert to == ("127.0.0.1", 1000) and len(hint) < 200
    opened = relay_opener(a).open(hint, ms + 1)
    assert opened.message_type == RELAY_GONE and opened.body == a.node_id_bytes + bytes((GONE_NOT_REGISTERED,))
    front.receive(seal_relay(b, relay.node_id_bytes, RELAY_SEND, a.node_id_bytes + b"\x01z", ms + 2),
                  ("127.0.0.1", 2000), now + 3, ms + 2)
    assert core.stats.drops["no_such_peer"] == 2 and core.stats.frames_forwarded == 0


async def test_a_relay_that_forgot_a_node_makes_it_register_again_at_once() -> None:
    async with udp_node(serve=True) as relay:
        relays = (relay.relay_address(),)
        async with udp_node(relays=relays) as a, udp_node(relays=relays) as b:
            await wait_for(lambda: registered_with(a, relay) and registered_with(b, relay))
            registrations = relay.service.core.relay.registrations  # type: ignore[union-attr]
            registrations.clear()  # as after a restart of the relay node
            assert relay.service.relay_front is not None
            relay.service.relay_front.expire(trio.current_time())
            started = trio.current_time()
            # a and b keep sending (as uTP resends); both are told and register again
            while not (bytes(a.node_id) in registrations and bytes(b.node_id) in registrations):
                a.service.routes.send(b.node_id, b"\x01a")
                b.service.routes.send(a.node_id, b"\x01b")
                await trio.sleep(0.05)
                assert trio.current_time() - started < 5  # the refresh interval is 20 s
            before = forwarded(relay)
            a.service.routes.send(b.node_id, b"\x01after")
            await wait_for(lambda: forwarded(relay) > before)
            assert a.service.routes.counters["registered_again"] >= 1
