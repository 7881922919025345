"""Hostile keyed datagrams on loopback: 10^5 random and forged datagrams at a node
during a live transfer through a tunnel found by NodeId, and at a relay node. The
transfer arrives intact, every datagram is dropped and counted by reason, nothing
is sent in answer (counted at the attacker's socket), and everything keeps serving."""

from __future__ import annotations

import hashlib
import os
import random
import socket
import time
from typing import Any

import trio

from proxy.rendezvous import messages as m
from proxy.rendezvous.keys import KeyRing
from proxy.rendezvous.wire import seal

from .test_proxy_support import connect_ok, digest_after_eof, running_node, tcp_server
from .test_rendezvous_proxy import registered, relay_of

FLOOD = 100_000


def hostile_datagrams(victim_id: bytes, impersonated: bytes, genuine: bytes) -> list[bytes]:
    """The mix: random keyed-looking bytes, boxes claiming a known NodeId that do not
    open, well-formed boxes under made-up NodeIds, copies of one genuine message
    (replays), and junk that starts with 0x00 (STUN, long 0000 0000)."""
    rng = random.Random(13)
    wall_ms = int(time.time() * 1000)
    made_up = [seal(KeyRing(rng.randbytes(32)), victim_id, m.PING, m.Ping(rng.randbytes(12)).encode(), wall_ms)
               for _ in range(2000)]
    datagrams = []
    for index in range(FLOOD):
        kind = index % 5
        if kind == 0:
            datagrams.append(bytes((0, 0, 0, rng.randrange(2, 256))) + rng.randbytes(rng.randrange(1, 300)))
        elif kind == 1:
            datagrams.append(bytes((0, 0, 0, rng.randrange(2, 9), 1)) + impersonated + rng.randbytes(24 + 60))
        elif kind == 2:
            datagrams.append(made_up[index % len(made_up)])
        elif kind == 3:
            datagrams.append(genuine)
        else:
            datagrams.append(bytes.fromhex("000100002112a442") + rng.randbytes(12) if index % 2
                             else b"\x00\x00\x00\x00" + rng.randbytes(20))
    return datagrams


async def flood(victim: tuple[str, int], datagrams: list[bytes]) -> int:
    """Send them all from one socket; the datagrams that came back to it."""
    attacker = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    attacker.bind(("127.0.0.1", 0))
    attacker.setblocking(False)
    answers = 0
    with attacker:
        for index, data in enumerate(datagrams):
            while True:
                try:
                    attacker.sendto(data, victim)
                    break
                except BlockingIOError:
                    await trio.sleep(0.001)
            if index % 100 == 0:
                await trio.sleep(0.0005)  # let the victim (same process) drain its socket
        await trio.sleep(0.5)
        while True:
            try:
                attacker.recv(2048)
            except BlockingIOError:
                break
            answers += 1
    return answers


def check_counts(core: Any, stats: Any) -> None:
    """Every keyed datagram that reached the node is accounted for: dropped by reason,
    or accepted (the one genuine message, and authenticated pings under made-up
    NodeIds, which are ignored: nothing answers them)."""
    dropped = core.dropped
    print(f"keyed received {stats.keyed_received}, dropped {dropped}, accepted {core.counters['accepted']}, "
          f"junk {stats.junk_dropped}, datagrams received {stats.datagrams_received}")
    assert core.counters["received"] == stats.keyed_received > FLOOD // 2
    assert sum(dropped.values()) + core.counters["accepted"] + core.counters["unexpected_type"] == stats.keyed_received
    assert core.node.counters["pings_ignored"] > 0 or core.relay is not None  # made-up senders: no answer
    for reason in ("malformed", "unauthenticated", "replayed", "overloaded"):
        assert dropped[reason] > 0, reason
    assert stats.junk_dropped > 0
    assert stats.handler_errors == 0


async def test_a_flood_of_hostile_keyed_datagrams_during_a_transfer_changes_nothing() -> None:
    payload = os.urandom(16 * 1024 * 1024)
    async with tcp_server(digest_after_eof) as server, running_node(relay_serve=True) as relay:
        relays = (relay_of(relay),)
        async with running_node(relay_servers=relays) as caller, \
                running_node(server.port, relay_servers=relays) as target:
            await registered(caller.proxy)
            await registered(target.proxy)
            stream = await connect_ok(caller.proxy, f"{target.node_id}:443")
            caller_ring = KeyRing.from_private_key(caller.tls_config.private_key)
            target_id = bytes(target.node_id)
            genuine = seal(caller_ring, target_id, m.PONG, m.Pong(os.urandom(12), ("127.0.0.1", 1)).encode(),
                           int(time.time() * 1000))
            datagrams = hostile_datagrams(target_id, bytes(relay.node_id), genuine)
            answers: list[int] = []
            victim = ("127.0.0.1", target.proxy.proxy_port)
            with trio.fail_after(120):
                async with trio.open_nursery() as nursery:

                    async def attack() -> None:
                        answers.append(await flood(victim, datagrams))

                    nursery.start_soon(attack)
                    view = memoryview(payload)
                    for offset in range(0, len(payload), 65536):
                        await stream.send_all(view[offset:offset + 65536])
                    await stream.send_eof()
                    digest = b""
                    while chunk := await stream.receive_some(4096):
                        digest += chunk
            assert digest.decode() == hashlib.sha256(payload).hexdigest()
            assert answers == [0]  # not one datagram in answer to a forgery or replay
            service = target.proxy.rendezvous
            assert service is not None and service.core is not None
            check_counts(service.core, target.proxy.endpoint.stats)


async def test_a_flooded_relay_node_keeps_introducing() -> None:
    async with tcp_server() as server, running_node(relay_serve=True) as relay:
        relays = (relay_of(relay),)
        async with running_node(relay_servers=relays) as caller:
            await registered(caller.proxy)
            caller_ring = KeyRing.from_private_key(caller.tls_config.private_key)
            relay_id = bytes(relay.node_id)
            genuine = seal(caller_ring, relay_id, m.PONG, m.Pong(os.urandom(12), ("127.0.0.1", 1)).encode(),
                           int(time.time() * 1000))
            datagrams = hostile_datagrams(relay_id, bytes(caller.node_id), genuine)
            with trio.fail_after(120):
                answers = await flood(("127.0.0.1", relay.proxy.proxy_port), datagrams)
            assert answers == 0
            assert relay.proxy.endpoint.stats.handler_errors == 0
            service = relay.proxy.rendezvous
            assert service is not None and service.core is not None and service.core.relay is not None
            check_counts(service.core, relay.proxy.endpoint.stats)
            assert len(service.core.relay.registrations) <= 2  # only real nodes registered
            await trio.sleep(1.0)  # the new-key budget for loopback refills
            async with running_node(server.port, relay_servers=relays) as target:
                await registered(target.proxy)
                stream = await connect_ok(caller.proxy, f"{target.node_id}:443")
                await stream.send_all(b"after the flood")
                assert await stream.receive_some(100) == b"after the flood"
