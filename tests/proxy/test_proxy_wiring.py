"""The Proxy's options and helpers wired to the rest of keynode: the shared host rule
for targets, the certificate chain limit, prepared reverse connections."""

from __future__ import annotations

import base64
import logging
import threading

import pytest
import trio
from cryptography import x509

from proxy.errors import CertChainTooLong, ConnectionStartError
from proxy.identity.certificates import generate_certificate, rotate_key
from proxy.identity.keys import generate_key_pair
from proxy.identity.node_id import NodeId
from proxy.identity.tls_config import TLSConfig
from proxy.identity.verification import verify_client_certificate_chain
from proxy.tunnel.connection import THREAD_ABOVE, VerifiedChains
from proxy.tunnel.proxy import Proxy
from tests.proxy.test_proxy_support import (
    TOKEN,
    connection_ended,
    http_connect,
    running_node,
    target_for,
    tcp_server,
)


async def refused_connect(proxy: Proxy, target: str) -> tuple[int, str]:
    """A CONNECT the proxy refuses: its status and its whole body (read to EOF)."""
    stream = await trio.open_tcp_stream(proxy.forward_host, proxy.forward_port)
    credentials = base64.b64encode(TOKEN.encode()).decode()
    request = f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\nProxy-Authorization: Basic {credentials}\r\n\r\n"
    async with stream:
        await stream.send_all(request.encode())
        response = bytearray()
        while chunk := await stream.receive_some(65536):
            response += chunk
    head, _, body = bytes(response).partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), body.decode()


async def test_targets_follow_the_shared_host_rule() -> None:
    with trio.fail_after(10):
        async with tcp_server() as server, running_node(server.port) as remote, running_node() as local:
            port = remote.proxy.proxy_port
            # Not a host at all: refused by the rule, with its reason, before any lookup.
            with pytest.raises(ConnectionStartError, match=r"cannot connect to 'no such host!'.*neither"):
                await local.proxy.open_connection_forward(remote.node_id, "no such host!", port)
            # "0" is a name getaddrinfo turns into 0.0.0.0, which Linux connects to this
            # host: a wildcard is never a host to connect to, however it is spelled.
            with pytest.raises(ConnectionStartError, match="wildcard"):
                await local.proxy.open_connection_forward(remote.node_id, "0", port)
            with pytest.raises(ConnectionStartError, match="wildcard"):
                await local.proxy.open_connection_reverse("::", port)
            assert local.proxy.connection_forward_count == 0
            assert remote.proxy.connection_reverse_count == 0
            assert server.peers == []
            # A name in another spelling is the same host.
            node_id = await local.proxy.open_connection_forward(remote.node_id, "LOCALHOST.", port)
            assert node_id == remote.node_id


def rotated(rotations: int) -> TLSConfig:
    """A node's TLS config after ``rotations`` key rotations: a chain of rotations + 1."""
    key = generate_key_pair()
    chain = [generate_certificate(key)]
    for _ in range(rotations):
        key, chain = rotate_key(key, chain)
    return TLSConfig(key, tuple(chain))


async def test_max_chain_length_refuses_a_longer_server_chain_with_526() -> None:
    three = rotated(2)
    with trio.fail_after(15):
        async with (
            tcp_server() as server,
            running_node(server.port, tls_config=three) as remote,
            running_node(max_chain_length=2) as strict,
            running_node() as lenient,
        ):
            status, body = await refused_connect(strict.proxy, target_for(remote.proxy, remote.node_id))
            assert status == 526
            assert "3 certificates; at most 2" in body
            assert strict.proxy.connection_forward_count == 0
            # The default limit (32) takes it.
            reply = await http_connect(lenient.proxy, target_for(remote.proxy, remote.node_id))
            assert reply.status == 200


async def test_max_chain_length_refuses_a_longer_client_chain(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    with trio.fail_after(15):
        async with (
            tcp_server() as server,
            running_node(server.port, max_chain_length=2) as strict,
            running_node(tls_config=rotated(2)) as caller,
        ):
            # TLS 1.3: the client's handshake is over before the server checks its
            # chain, so the caller gets its 200 and then the end of the tunnel.
            reply = await http_connect(caller.proxy, target_for(strict.proxy, strict.node_id))
            assert await connection_ended(reply.stream)
            assert strict.proxy.connection_reverse_count == 0
            assert not strict.events.established
            assert "3 certificates; at most 2" in caplog.text


def test_the_chain_limit_is_part_of_the_cache_key() -> None:
    chain = list(rotated(2).certificate_chain)
    cache = VerifiedChains()

    def verify(limit: int):  # type: ignore[no-untyped-def]
        return lambda c: verify_client_certificate_chain(c, max_chain_length=limit)

    node_id = cache.verify("client", chain, verify(32), max_length=32)
    assert node_id == NodeId.from_public_key(chain[0].public_key())
    # The same chain under a lower limit is not a hit: it is refused.
    with pytest.raises(CertChainTooLong):
        cache.verify("client", chain, verify(2), max_length=2)
    assert cache.hits == 0


def test_a_chain_over_the_limit_is_never_encoded_for_the_cache() -> None:
    class Opaque:
        def public_bytes(self, encoding: object) -> bytes:
            raise AssertionError("a chain over the limit was DER-encoded")

    refused = []

    def verify(chain: list[x509.Certificate]) -> NodeId:
        refused.append(len(chain))
        raise CertChainTooLong("too long")

    with pytest.raises(CertChainTooLong):
        VerifiedChains().verify("client", [Opaque()] * 3, verify, max_length=2)  # type: ignore[list-item]
    assert refused == [3]


async def test_long_chains_are_verified_off_the_event_loop() -> None:
    loop_thread = threading.current_thread()
    threads: list[threading.Thread] = []

    def verify(chain: list[x509.Certificate]) -> NodeId:
        threads.append(threading.current_thread())
        return verify_client_certificate_chain(chain)

    cache = VerifiedChains()
    short = list(rotated(THREAD_ABOVE - 1).certificate_chain)
    long = list(rotated(THREAD_ABOVE).certificate_chain)
    await cache.verify_async("client", short, verify)
    await cache.verify_async("client", long, verify)
    assert threads[0] is loop_thread and threads[1] is not loop_thread
    # The cache still applies: a hit verifies nothing.
    await cache.verify_async("client", long, verify)
    assert len(threads) == 2 and cache.hits == 1


async def test_prepared_reverse_connections_until_the_peer_connects() -> None:
    with trio.fail_after(15):
        async with tcp_server() as server, running_node(server.port) as remote, running_node() as local:
            assert remote.proxy.prepared_reverse_connections() == []
            before = trio.current_time()
            await remote.proxy.open_connection_reverse("127.0.0.1", local.proxy.proxy_port)
            [prepared] = remote.proxy.prepared_reverse_connections()
            assert (prepared.remote_host, prepared.remote_port) == ("127.0.0.1", local.proxy.proxy_port)
            assert before <= prepared.prepared_at <= trio.current_time()
            assert remote.proxy.connections() == []  # not established: no NodeId yet
            reply = await http_connect(local.proxy, target_for(remote.proxy, remote.node_id))
            assert reply.status == 200
            while not remote.events.established:
                await remote.events.changed.wait()
            assert remote.proxy.prepared_reverse_connections() == []
            assert len(remote.proxy.connections()) == 1
            await reply.stream.aclose()
