"""Interoperability with Node's `tls` (OpenSSL inside Node 20) over TCP loopback.

Node presents our certificates (saved as PEM by TLSConfig), requires a client
certificate when it is the server, accepts any chain (rejectUnauthorized: false);
our side verifies Node's chain with proxy.identity.verification. Node echoes; we send, half-
close with close_notify, read the echo to Node's close_notify, and compare sha256.
"""

from __future__ import annotations

import base64
import hashlib
from pathlib import Path

import pytest
import trio
from cryptography.hazmat.primitives.serialization import Encoding

from proxy.errors import TLSHandshakeError
from proxy.identity.verification import verify_client_certificate_chain, verify_server_certificate_chain
from proxy.tls import TLSStream
from tests.proxy.test_tls_support import echo_through, make_tls_config, node_tls_peer, random_bytes

SIZE = 3 * 1024 * 1024


def der_list(chain: object) -> list[bytes]:
    return [certificate.public_bytes(Encoding.DER) for certificate in chain]  # type: ignore[attr-defined]


@pytest.mark.parametrize("chain_length", [1, 3])
async def test_our_client_against_node_server(tmp_path: Path, chain_length: int) -> None:
    ours = make_tls_config(chain_length)
    node = make_tls_config(chain_length)
    data = random_bytes(SIZE, seed=11)
    with trio.fail_after(30):
        async with node_tls_peer("server", node, tmp_path) as peer:
            port = (await peer.expect("listening"))["port"]
            transport = await trio.open_tcp_stream("127.0.0.1", port)
            async with TLSStream(transport, ours, server_side=False) as stream:
                await stream.do_handshake()
                assert stream.tls_version == "TLSv1.3"
                # We verify Node's chain the way the forward proxy does.
                assert verify_server_certificate_chain([node.node_id], stream.peer_certificate_chain) == node.node_id
                assert der_list(stream.peer_certificate_chain) == der_list(node.certificate_chain)
                echoed = await echo_through(stream, data)
                secure = await peer.expect("secure")
                done = await peer.expect("done")
    assert secure["protocol"] == "TLSv1.3"
    # Node saw our whole chain, leaf first.
    assert [base64.b64decode(c) for c in secure["chain"]] == der_list(ours.certificate_chain)
    assert done["bytes"] == SIZE
    assert done["sha256"] == hashlib.sha256(data).hexdigest()
    assert hashlib.sha256(echoed).digest() == hashlib.sha256(data).digest()


@pytest.mark.parametrize("chain_length", [1, 3])
async def test_node_client_against_our_server(tmp_path: Path, chain_length: int) -> None:
    ours = make_tls_config(chain_length)
    node = make_tls_config(chain_length)
    data = random_bytes(SIZE, seed=12)
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    try:
        with trio.fail_after(30):
            async with node_tls_peer("client", node, tmp_path, "tcp", "127.0.0.1", str(port)) as peer:
                transport = await listeners[0].accept()
                async with TLSStream(transport, ours, server_side=True) as stream:
                    await stream.do_handshake()
                    # Node sent its client certificate chain; we verify it as the
                    # reverse proxy does.
                    assert verify_client_certificate_chain(stream.peer_certificate_chain) == node.node_id
                    assert der_list(stream.peer_certificate_chain) == der_list(node.certificate_chain)
                    echoed = await echo_through(stream, data)
                    secure = await peer.expect("secure")
                    done = await peer.expect("done")
    finally:
        for listener in listeners:
            await listener.aclose()
    assert secure["protocol"] == "TLSv1.3"
    assert [base64.b64decode(c) for c in secure["chain"]] == der_list(ours.certificate_chain)
    assert done["sha256"] == hashlib.sha256(data).hexdigest()
    assert hashlib.sha256(echoed).digest() == hashlib.sha256(data).digest()


async def test_node_client_without_certificate_is_refused(tmp_path: Path) -> None:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    try:
        with trio.fail_after(30):
            async with node_tls_peer("client", None, tmp_path, "tcp", "127.0.0.1", str(port)) as peer:
                transport = await listeners[0].accept()
                stream = TLSStream(transport, make_tls_config(), server_side=True)
                with pytest.raises(TLSHandshakeError, match="(?i)certificate"):
                    await stream.do_handshake()
                await stream.aclose()
                # Node's side learns it from our alert.
                with pytest.raises(AssertionError, match="(?i)certificate required"):
                    while True:
                        await peer.next_report()
    finally:
        for listener in listeners:
            await listener.aclose()
