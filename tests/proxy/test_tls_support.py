"""Shared helpers of the TLS tests: identities, stream pairs, and checks of them.

(Named test_tls_* to stay inside the TLS tests' files; the helpers' own checks
below make sure the fixtures build what the other tests assume.)
"""

from __future__ import annotations

import datetime
import hashlib
import json
import random
import shutil
import subprocess
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import trio
import trio.testing
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.x509.oid import NameOID

from proxy.identity.certificates import rotate_key
from proxy.identity.tls_config import TLSConfig
from proxy.tls import TLSStream


@dataclass(frozen=True)
class LocalTLSConfig:
    """Key and chain (leaf first), duck-typed like proxy.identity.tls_config.TLSConfig but
    without its checks, to feed TLSStream certificates TLSConfig would refuse."""

    private_key: Ed25519PrivateKey
    certificate_chain: tuple[x509.Certificate, ...]


def _name(key: Ed25519PrivateKey) -> x509.Name:
    digest = hashlib.sha256(key.public_key().public_bytes_raw()).hexdigest()[:32]
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, digest)])


def _certificate(subject_key: Ed25519PrivateKey, issuer_key: Ed25519PrivateKey) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(_name(subject_key))
        .issuer_name(_name(issuer_key))
        .public_key(subject_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=False)
        .sign(issuer_key, None)
    )


def make_tls_config(chain_length: int = 1) -> TLSConfig:
    """A node identity after ``chain_length - 1`` key rotations (proxy.identity.certificates):
    chain[i] is issued and signed by chain[i+1]'s key; the last one self-signed."""
    config = TLSConfig.generate()
    key, chain = config.private_key, list(config.certificate_chain)
    for _ in range(chain_length - 1):
        key, chain = rotate_key(key, chain)
    return TLSConfig(key, tuple(chain))


def make_foreign_tls_config(chain_length: int = 1) -> LocalTLSConfig:
    """Plain Ed25519 certificates that are not Polykey/keynode identities (no NodeId
    CN, no node signature): TLS accepts them, proxy.identity.verification must not."""
    key = Ed25519PrivateKey.generate()
    chain = [_certificate(key, key)]
    for _ in range(chain_length - 1):
        new_key = Ed25519PrivateKey.generate()
        chain.insert(0, _certificate(new_key, key))
        key = new_key
    return LocalTLSConfig(private_key=key, certificate_chain=tuple(chain))


def random_bytes(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


async def handshake_both(client: TLSStream, server: TLSStream) -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(client.do_handshake)
        nursery.start_soon(server.do_handshake)


def memory_tls_pair(
    client_config: object | None = None,
    server_config: object | None = None,
    pair_maker: Callable[[], tuple[trio.abc.Stream, trio.abc.Stream]] = (
        trio.testing.memory_stream_pair
    ),
) -> tuple[TLSStream, TLSStream]:
    client_transport, server_transport = pair_maker()
    client = TLSStream(client_transport, client_config or make_tls_config(), server_side=False)
    server = TLSStream(server_transport, server_config or make_tls_config(), server_side=True)
    return client, server


@asynccontextmanager
async def tcp_transport_pair(host: str = "127.0.0.1") -> AsyncIterator[tuple[trio.SocketStream, trio.SocketStream]]:
    """A connected (client, server) pair of real TCP streams on loopback."""
    listeners = await trio.open_tcp_listeners(0, host=host)
    try:
        port = listeners[0].socket.getsockname()[1]
        client = await trio.open_tcp_stream(host, port)
        server = await listeners[0].accept()
    finally:
        for listener in listeners:
            await listener.aclose()
    try:
        yield client, server
    finally:
        await trio.aclose_forcefully(client)
        await trio.aclose_forcefully(server)


async def send_all_then_eof(stream: TLSStream, data: bytes, chunk: int = 100_000) -> None:
    view = memoryview(data)
    for start in range(0, len(view), chunk):
        await stream.send_all(view[start : start + chunk])
    await stream.send_eof()


async def receive_until_eof(stream: trio.abc.ReceiveStream, limit: int = 64 << 20) -> bytes:
    received = bytearray()
    while True:
        chunk = await stream.receive_some()
        if not chunk:
            return bytes(received)
        received += chunk
        if len(received) > limit:
            raise AssertionError("peer sent more than expected")


# --- checks of the helpers themselves ------------------------------------------------


def test_foreign_chain_links() -> None:
    config = make_foreign_tls_config(3)
    chain = config.certificate_chain
    assert len(chain) == 3
    assert chain[0].public_key().public_bytes_raw() == config.private_key.public_key().public_bytes_raw()
    for child, parent in zip(chain, chain[1:]):
        assert child.issuer == parent.subject
        child.verify_directly_issued_by(parent)
    chain[-1].verify_directly_issued_by(chain[-1])


async def test_tcp_transport_pair_connects() -> None:
    with trio.fail_after(5):
        async with tcp_transport_pair() as (client, server):
            await client.send_all(b"ping")
            assert await server.receive_some(4) == b"ping"


def test_rotated_identity_chain() -> None:
    config = make_tls_config(3)
    assert len(config.certificate_chain) == 3
    for child, parent in zip(config.certificate_chain, config.certificate_chain[1:]):
        child.verify_directly_issued_by(parent)


# --- Node TLS peers (tests/node/tls_echo_peer.js) ------------------------------------

NODE = "/usr/bin/node"
NODE_DIR = Path(__file__).resolve().parent.parent / "node"
NODE_TLS_PEER = NODE_DIR / "tls_echo_peer.js"


def require_node() -> str:
    """Node is a prerequisite: a missing one fails loudly, never skips."""
    node = NODE if Path(NODE).exists() else shutil.which("node")
    if node is None:
        raise AssertionError("Node (/usr/bin/node) is required for the TLS interop tests: run `make`")
    if not (NODE_DIR / "node_modules").is_dir():
        raise AssertionError(f"{NODE_DIR}/node_modules is missing: run `make` (npm ci in tests/node)")
    return node


class NodePeer:
    """A running tls_echo_peer.js; reads its JSON report lines."""

    def __init__(self, process: trio.Process) -> None:
        self.process = process
        self._buffer = bytearray()

    async def next_report(self) -> dict[str, Any]:
        assert self.process.stdout is not None
        while b"\n" not in self._buffer:
            chunk = await self.process.stdout.receive_some()
            if not chunk:
                raise AssertionError(f"the Node peer exited early: {bytes(self._buffer)!r}")
            self._buffer += chunk
        line, _, rest = bytes(self._buffer).partition(b"\n")
        self._buffer = bytearray(rest)
        report = json.loads(line)
        if report.get("event") == "error":
            raise AssertionError(f"the Node peer failed: {report['message']}")
        return report

    async def expect(self, event: str) -> dict[str, Any]:
        report = await self.next_report()
        assert report["event"] == event, report
        return report


@asynccontextmanager
async def node_tls_peer(
    role: str, config: TLSConfig | None, tmp_path: Path, transport: str = "tcp", *args: str
) -> AsyncIterator[NodePeer]:
    """Start the Node peer with ``config`` saved as PEM files (None: no
    certificate); killed on exit."""
    node = require_node()
    if config is None:  # the peer presents no certificate
        key_arg = chain_arg = "-"
    else:
        key_path, chain_path = tmp_path / f"node-{role}.key", tmp_path / f"node-{role}.pem"
        config.save(key_path, chain_path)
        key_arg, chain_arg = str(key_path), str(chain_path)
    command = [node, str(NODE_TLS_PEER), role, key_arg, chain_arg, transport, *args]
    async with trio.open_nursery() as nursery:
        process = await nursery.start(
            partial(trio.run_process, command, stdout=subprocess.PIPE, check=False, cwd=NODE_DIR)
        )
        try:
            yield NodePeer(process)
        finally:
            nursery.cancel_scope.cancel()  # run_process kills the peer


async def echo_through(stream: TLSStream, data: bytes, chunk: int = 64 * 1024) -> bytes:
    """Send ``data`` and close_notify while reading the echo until the peer's
    close_notify; return what came back."""
    echoed: list[bytes] = []

    async def collect() -> None:
        echoed.append(await receive_until_eof(stream, limit=len(data) + 1))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(collect)
        await send_all_then_eof(stream, data, chunk)
    return echoed[0]
