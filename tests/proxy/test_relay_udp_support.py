"""Shared pieces of the relay transport tests: nodes made of a real UDP endpoint and a
RendezvousService (relay node or not), a uTP + TLS tunnel over a relayed path, and a
marker scan for "the relay never sees plaintext"."""

from __future__ import annotations

import hashlib
import random
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import trio

from nat.endpoint import Endpoint, open_endpoint
from nat.utp.paths import VirtualPath
from proxy.identity.node_id import NodeId
from proxy.identity.tls_config import TLSConfig
from proxy.identity.verification import verify_client_certificate_chain, verify_server_certificate_chain
from proxy.rendezvous.addresses import RelayAddress
from proxy.rendezvous.driver import RendezvousService
from proxy.rendezvous.keys import KeyRing
from proxy.rendezvous.node import RendezvousTimers
from proxy.tls import TLSStream

TUNNEL_ALPN = (b"keynode/1",)
CHUNK = 256 * 1024
FAST = RendezvousTimers(register_retry=0.2)


@dataclass
class UdpNode:
    endpoint: Endpoint
    config: TLSConfig
    service: RendezvousService
    events: list[object] = field(default_factory=list)

    @property
    def node_id(self) -> NodeId:
        return self.config.node_id

    @property
    def keyring(self) -> KeyRing:
        return self.service.keyring

    def relay_address(self, tcp_port: int | None = None) -> RelayAddress:
        host, port = self.endpoint.address[:2]
        return RelayAddress(self.node_id, str(host), int(port), tcp_port)


@asynccontextmanager
async def udp_node(*, serve: bool = False, relays: tuple[RelayAddress, ...] = (),
                   home_relays: dict[NodeId, tuple[RelayAddress, ...]] | None = None,
                   tcp_port: int | None = None, tcp_fallback_after: float | None = None,
                   limits: object = None) -> AsyncIterator[UdpNode]:
    config = TLSConfig.generate()
    async with open_endpoint() as endpoint, trio.open_nursery() as nursery:
        service = RendezvousService(endpoint, KeyRing.from_private_key(config.private_key), relays, serve=serve,
                                    home_relays=home_relays, timers=FAST)
        await nursery.start(service.run)
        await service.configure_relay(config, limits=limits, tcp_port=tcp_port,  # type: ignore[arg-type]
                                      tcp_fallback_after=tcp_fallback_after)
        node = UdpNode(endpoint, config, service)
        service.routes.on_path_event = node.events.append
        yield node
        nursery.cancel_scope.cancel()


async def wait_for(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.01)


def registered_with(node: UdpNode, relay: UdpNode) -> bool:
    core = node.service.core
    state = None if core is None else core.node.relays.get(bytes(relay.node_id))
    return state is not None and state.registered


class MarkerScan:
    """Counts a marker in datagrams (a marker never spans two: it is short)."""

    def __init__(self, marker: bytes) -> None:
        self.marker = marker
        self.hits = 0
        self.bytes = 0

    def __call__(self, datagram: bytes) -> None:
        self.hits += bytes(datagram).count(self.marker)
        self.bytes += len(datagram)


def payload(size: int, seed: int, marker: bytes) -> bytes:
    data = bytearray(random.Random(seed).randbytes(size))
    for offset in range(0, size - len(marker), 16 * 1024):
        data[offset : offset + len(marker)] = marker
    return bytes(data)


async def send_then_eof(stream: TLSStream, data: bytes) -> None:
    view = memoryview(data)
    for start in range(0, len(view), CHUNK):
        await stream.send_all(view[start : start + CHUNK])
    await stream.send_eof()


async def receive_digest(stream: TLSStream) -> tuple[int, str]:
    digest = hashlib.sha256()
    size = 0
    while chunk := await stream.receive_some(CHUNK):
        digest.update(chunk)
        size += len(chunk)
    return size, digest.hexdigest()


async def accept_tunnel_both_ways(endpoint: Endpoint, config: TLSConfig, data: bytes,
                                  results: dict[str, object]) -> None:
    """The accepting side of a uTP + TLS tunnel: sends ``data`` while it reads; puts the
    identity it proved ("b saw"), its path ("b path") and what it read ("at b") in ``results``."""
    utp = await endpoint.accept()
    tls = TLSStream(utp, config, server_side=True, alpn=TUNNEL_ALPN)
    await tls.do_handshake()
    results["b saw"] = verify_client_certificate_chain(tls.peer_certificate_chain)
    results["b path"] = utp.path
    async with trio.open_nursery() as inner:
        inner.start_soon(send_then_eof, tls, data)
        results["at b"] = await receive_digest(tls)
    await tls.aclose()


async def tunnel_both_ways(a: UdpNode, b: UdpNode, path: VirtualPath, a_to_b: bytes, b_to_a: bytes
                           ) -> dict[str, object]:
    """A uTP + TLS tunnel from a to b over ``path``; both payloads sent at once; the
    digests each side received, the identities each side proved, b's path."""
    results: dict[str, object] = {}
    async with trio.open_nursery() as nursery:
        nursery.start_soon(accept_tunnel_both_ways, b.endpoint, b.config, b_to_a, results)
        utp = await a.endpoint.connect(path)
        tls = TLSStream(utp, a.config, server_side=False, alpn=TUNNEL_ALPN)
        await tls.do_handshake()
        results["a saw"] = verify_server_certificate_chain([b.node_id], tls.peer_certificate_chain)
        started = trio.current_time()
        async with trio.open_nursery() as inner:
            inner.start_soon(send_then_eof, tls, a_to_b)
            results["at a"] = await receive_digest(tls)
        await wait_for(lambda: "at b" in results, 60)
        results["seconds"] = trio.current_time() - started
        await tls.aclose()
    return results


def digest(data: bytes) -> tuple[int, str]:
    return len(data), hashlib.sha256(data).hexdigest()
