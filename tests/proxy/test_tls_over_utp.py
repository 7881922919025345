"""TLSStream over our uTP (nat.UtpStream): the exact stack of the original system.

Ours against ours, and against Node's `tls` over utp-native (libutp) in both roles:
Node presents our certificates and requires ours; each side sees the other's full
chain; we verify Node's with proxy.identity.verification. Data is echoed, half-closed with
close_notify (then uTP FIN), and compared by sha256.
"""

from __future__ import annotations

import base64
import hashlib
from pathlib import Path

import pytest
import trio
import trio.testing
from cryptography.hazmat.primitives.serialization import Encoding

from nat import open_endpoint
from proxy.errors import TLSHandshakeError
from proxy.identity.verification import verify_client_certificate_chain, verify_server_certificate_chain
from proxy.tls import TLSStream
from tests.proxy.test_tls_support import (
    echo_through,
    handshake_both,
    make_tls_config,
    node_tls_peer,
    random_bytes,
    receive_until_eof,
    send_all_then_eof,
)

SIZE = 2 * 1024 * 1024


def der_list(chain: object) -> list[bytes]:
    return [certificate.public_bytes(Encoding.DER) for certificate in chain]  # type: ignore[attr-defined]


async def test_ours_over_our_utp_bulk_and_half_close() -> None:
    client_config, server_config = make_tls_config(2), make_tls_config(1)
    upload, download = random_bytes(SIZE, seed=21), random_bytes(SIZE // 2, seed=22)
    received: dict[str, bytes] = {}
    with trio.fail_after(60):
        async with open_endpoint() as client_end, open_endpoint() as server_end:
            async with trio.open_nursery() as nursery:

                async def accept() -> None:
                    received["transport"] = await server_end.accept()  # type: ignore[assignment]

                nursery.start_soon(accept)
                client_transport = await client_end.connect(server_end.address)
            server_transport = received.pop("transport")
            client = TLSStream(client_transport, client_config, server_side=False)
            server = TLSStream(server_transport, server_config, server_side=True)  # type: ignore[arg-type]
            await handshake_both(client, server)
            assert verify_client_certificate_chain(server.peer_certificate_chain) == client_config.node_id
            wanted = [server_config.node_id]
            assert verify_server_certificate_chain(wanted, client.peer_certificate_chain) == server_config.node_id

            async def collect(name: str, stream: TLSStream) -> None:
                received[name] = await receive_until_eof(stream)

            # Client uploads and half-closes first; the server keeps sending after
            # the client's close_notify, then half-closes too.
            async with trio.open_nursery() as nursery:
                nursery.start_soon(collect, "server", server)
                nursery.start_soon(collect, "client", client)
                await send_all_then_eof(client, upload)
                await send_all_then_eof(server, download)
            await client.aclose()
            await server.aclose()
    assert hashlib.sha256(received["server"]).digest() == hashlib.sha256(upload).digest()
    assert hashlib.sha256(received["client"]).digest() == hashlib.sha256(download).digest()


async def test_our_utp_client_against_node_tls_over_utp_native(tmp_path: Path) -> None:
    ours, node = make_tls_config(2), make_tls_config(3)
    data = random_bytes(SIZE, seed=23)
    with trio.fail_after(60):
        async with node_tls_peer("server", node, tmp_path, "utp") as peer:
            port = (await peer.expect("listening"))["port"]
            async with open_endpoint() as endpoint:
                transport = await endpoint.connect(("127.0.0.1", port))
                async with TLSStream(transport, ours, server_side=False) as stream:
                    await stream.do_handshake()
                    assert verify_server_certificate_chain([node.node_id], stream.peer_certificate_chain) == node.node_id
                    assert der_list(stream.peer_certificate_chain) == der_list(node.certificate_chain)
                    echoed = await echo_through(stream, data)
                    secure = await peer.expect("secure")
                    done = await peer.expect("done")
    assert secure["protocol"] == "TLSv1.3"
    assert [base64.b64decode(c) for c in secure["chain"]] == der_list(ours.certificate_chain)
    assert done["sha256"] == hashlib.sha256(data).hexdigest()
    assert hashlib.sha256(echoed).digest() == hashlib.sha256(data).digest()


async def test_node_tls_over_utp_native_client_against_our_utp_server(tmp_path: Path) -> None:
    ours, node = make_tls_config(1), make_tls_config(2)
    data = random_bytes(SIZE, seed=24)
    with trio.fail_after(60):
        async with open_endpoint() as endpoint:
            port = endpoint.address[1]
            async with node_tls_peer("client", node, tmp_path, "utp", "127.0.0.1", str(port)) as peer:
                transport = await endpoint.accept()
                async with TLSStream(transport, ours, server_side=True) as stream:
                    await stream.do_handshake()
                    assert verify_client_certificate_chain(stream.peer_certificate_chain) == node.node_id
                    assert der_list(stream.peer_certificate_chain) == der_list(node.certificate_chain)
                    echoed = await echo_through(stream, data)
                    secure = await peer.expect("secure")
                    done = await peer.expect("done")
    assert [base64.b64decode(c) for c in secure["chain"]] == der_list(ours.certificate_chain)
    assert done["sha256"] == hashlib.sha256(data).hexdigest()
    assert hashlib.sha256(echoed).digest() == hashlib.sha256(data).digest()


async def test_check_half_closeable_stream_over_utp() -> None:
    client_config, server_config = make_tls_config(), make_tls_config()
    with trio.fail_after(120):
        async with open_endpoint() as client_end, open_endpoint() as server_end:

            async def utp_tls_maker() -> tuple[TLSStream, TLSStream]:
                accepted: list[trio.abc.Stream] = []
                async with trio.open_nursery() as nursery:

                    async def accept() -> None:
                        accepted.append(await server_end.accept())

                    nursery.start_soon(accept)
                    client_transport = await client_end.connect(server_end.address)
                client = TLSStream(client_transport, client_config, server_side=False)
                server = TLSStream(accepted[0], server_config, server_side=True)
                await handshake_both(client, server)
                return client, server

            await trio.testing.check_half_closeable_stream(utp_tls_maker, None)


@pytest.mark.parametrize("role", ["client", "server"])
async def test_utp_tls_handshake_against_garbage_peer_is_typed(role: str) -> None:
    """A uTP peer that speaks uTP correctly but not TLS."""
    with trio.fail_after(20):
        async with open_endpoint() as ours_end, open_endpoint() as theirs_end:
            accepted: list[trio.abc.Stream] = []
            async with trio.open_nursery() as nursery:

                async def accept() -> None:
                    accepted.append(await theirs_end.accept())

                nursery.start_soon(accept)
                transport = await ours_end.connect(theirs_end.address)
            theirs = accepted[0]
            stream = TLSStream(transport, make_tls_config(), server_side=role == "server")
            async with trio.open_nursery() as nursery:

                async def babble() -> None:
                    if role == "client":
                        await theirs.receive_some()
                    await theirs.send_all(random_bytes(3000, seed=25))

                nursery.start_soon(babble)
                with pytest.raises(TLSHandshakeError):
                    await stream.do_handshake()
            await stream.aclose()
            await theirs.aclose()
