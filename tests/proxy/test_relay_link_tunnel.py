"""End to end over the relay: a real uTP + TLS tunnel between two nodes whose
datagrams go only through a relay over TCP + mutual TLS (nat's virtual paths,
proxy.relay.paths), and the relay never sees the tunnel's plaintext."""

from __future__ import annotations

import hashlib
import os
import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio

from nat.endpoint import Endpoint, open_endpoint
from proxy.identity.node_id import NodeId
from proxy.identity.tls_config import TLSConfig
from proxy.identity.verification import verify_server_certificate_chain
from proxy.relay.forwarding import RelayClient
from proxy.relay.limits import RelayLimits
from proxy.relay.link import RelayLink
from proxy.relay.paths import RelayPaths, relay_path
from proxy.relay.serve import RelayServer, serve_relay
from proxy.tls import TLSStream

from .test_relay_udp_support import accept_tunnel_both_ways, receive_digest, send_then_eof

SIZE = 64 * 1024 * 1024
TUNNEL_ALPN = (b"keynode/1",)


class MarkerScan:
    """Counts a marker in a byte stream seen in pieces (across piece boundaries)."""

    def __init__(self, marker: bytes) -> None:
        self.marker = marker
        self.hits = 0
        self.bytes = 0
        self._tail = b""

    def feed(self, data: bytes) -> None:
        window = self._tail + bytes(data)
        self.hits += window.count(self.marker)
        self._tail = window[-(len(self.marker) - 1):]
        self.bytes += len(data)


def payload(seed: int, marker: bytes) -> bytes:
    data = bytearray(random.Random(seed).randbytes(SIZE))
    for offset in range(0, SIZE - len(marker), 64 * 1024):
        data[offset : offset + len(marker)] = marker
    return bytes(data)


@asynccontextmanager
async def relayed_node(nursery: trio.Nursery, endpoint: Endpoint, config: TLSConfig, relay: str
                       ) -> AsyncIterator[RelayPaths]:
    link = RelayLink(config, relay)
    paths = RelayPaths(endpoint, link)
    await nursery.start(link.run)
    with trio.fail_after(10):
        await link.wait_registered()
    try:
        yield paths
    finally:
        link.close()
        paths.close()


async def test_a_utp_tls_tunnel_through_the_tcp_relay_carries_64_mib_each_way_and_the_relay_sees_no_plaintext(
) -> None:
    marker = b"keynode plaintext marker " + os.urandom(8).hex().encode()
    a_to_b, b_to_a = payload(1, marker), payload(2, marker)
    assert MarkerScan(marker).hits == 0 and a_to_b.count(marker) == SIZE // (64 * 1024)  # the scan can find it
    relay_config, a_config, b_config = TLSConfig.generate(), TLSConfig.generate(), TLSConfig.generate()
    limits = RelayLimits(rate=1 << 30, burst=64 << 20, queue_bytes=8 << 20, queue_frames=8192)
    scan = MarkerScan(marker)
    results: dict[str, object] = {}

    with trio.fail_after(240):
        async with trio.open_nursery() as nursery:
            server: RelayServer = await nursery.start(
                lambda task_status: serve_relay(relay_config, host="127.0.0.1", limits=limits, task_status=task_status))
            receive_bytes = server.core.receive_bytes

            def capture(client: RelayClient, data: bytes | bytearray, now: float) -> None:
                scan.feed(data)  # everything a client sent the relay, after the relay link's TLS
                receive_bytes(client, data, now)

            server.core.receive_bytes = capture  # type: ignore[method-assign]
            relay = f"{relay_config.node_id}@127.0.0.1:{server.port}"
            async with open_endpoint() as a_endpoint, open_endpoint() as b_endpoint, \
                    relayed_node(nursery, a_endpoint, a_config, relay) as a_paths, \
                    relayed_node(nursery, b_endpoint, b_config, relay):
                nursery.start_soon(accept_tunnel_both_ways, b_endpoint, b_config, b_to_a, results)
                utp = await a_endpoint.connect(a_paths.path_to(b_config.node_id))
                tls = TLSStream(utp, a_config, server_side=False, alpn=TUNNEL_ALPN)
                await tls.do_handshake()
                results["a saw"] = verify_server_certificate_chain([b_config.node_id], tls.peer_certificate_chain)
                async with trio.open_nursery() as inner:
                    inner.start_soon(send_then_eof, tls, a_to_b)
                    results["at a"] = await receive_digest(tls)
                with trio.fail_after(30):
                    while "at b" not in results:
                        await trio.sleep(0.01)
                await tls.aclose()
                a_stats, b_stats = a_endpoint.stats, b_endpoint.stats
            nursery.cancel_scope.cancel()

    assert results["a saw"] == b_config.node_id and results["b saw"] == a_config.node_id
    assert results["b path"] == relay_path(relay_config.node_id, a_config.node_id)
    assert results["at b"] == (SIZE, hashlib.sha256(a_to_b).hexdigest())
    assert results["at a"] == (SIZE, hashlib.sha256(b_to_a).hexdigest())
    # only through the relay: neither endpoint sent a UDP datagram from its socket
    assert a_stats.datagrams_sent == 0 and b_stats.datagrams_sent == 0
    assert a_stats.path_datagrams_sent > 0 and b_stats.path_datagrams_sent > 0
    # the relay carried both directions in full, and never the plaintext
    assert scan.bytes >= 2 * SIZE
    assert scan.hits == 0
    assert isinstance(results["a saw"], NodeId)
