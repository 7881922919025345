"""The caller's verified NodeId in every gRPC request, for unmodified servers.

For a service of kind ``"grpc"`` the reverse side hands both ends of a verified
tunnel connection to ``relay_with_identity`` (the per-service splicer), which
runs an ``H2IdentityRelay`` (h2_relay.py) between them: every request reaches
the server with the headers below, after every client-supplied ``x-keynode-*``
header (headers and trailers, any case, ``-bin`` too, every duplicate) is gone.

Header contract (ASCII, so any gRPC stack reads it as plain metadata):
- ``x-keynode-node-id: <peer NodeId>`` (``v`` + 52 base32hex characters)
- ``x-keynode-peer: By=<own NodeId>;NodeId=<peer NodeId>;Hash=<sha256 hex>``,
  shaped like Envoy's x-forwarded-client-cert: ``By`` is this node (the proxy
  that verified the caller), ``Hash`` the SHA-256 of the DER of the caller's leaf
  certificate (the one its TLS handshake presented first).

A grpcio servicer reads them with ``dict(context.invocation_metadata())``.

This module is the thin trio driver: two readers feed the sans-IO relay, two
writers drain it; a reader waits while output it would add to is above the
relay's high-water mark, so a side that does not read stops the other's reading
instead of growing buffers.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from typing import Protocol

import trio

from grpc_bridge.h2_errors import H2RelayError
from grpc_bridge.h2_relay import H2IdentityRelay, Header
from proxy.identity.node_id import NodeId

log = logging.getLogger(__name__)

NODE_ID_HEADER = b"x-keynode-node-id"
PEER_HEADER = b"x-keynode-peer"
READ_SIZE = 256 << 10
WRITE_SIZE = 256 << 10
DRAIN_TIME = 5.0  # after the relay ends, how long its last bytes (GOAWAY) may take to go out

_TRANSPORT_ERRORS = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)


class CallerIdentity(Protocol):
    """What the splicer reads of the reverse side's caller record
    (``proxy.tunnel.records.CallerIdentity``): this node, the verified caller and
    the caller's leaf certificate."""

    @property
    def local_node_id(self) -> NodeId: ...

    @property
    def peer_node_id(self) -> NodeId: ...

    @property
    def peer_certificate_der(self) -> bytes: ...


def certificate_sha256(der: bytes) -> bytes:
    """The ``Hash`` of ``x-keynode-peer``: SHA-256 of a certificate's DER."""
    return hashlib.sha256(der).digest()


def identity_headers(local_node_id: NodeId, peer_node_id: NodeId, peer_certificate_sha256: bytes) -> list[Header]:
    """The headers added to every request (see the module docstring)."""
    if len(peer_certificate_sha256) != 32:
        raise ValueError("peer_certificate_sha256 is a 32-byte SHA-256 digest")
    peer = peer_node_id.encode()
    xfcc = f"By={local_node_id.encode()};NodeId={peer};Hash={peer_certificate_sha256.hex()}"
    return [(NODE_ID_HEADER, peer.encode("ascii")), (PEER_HEADER, xfcc.encode("ascii"))]


def parse_peer_header(value: str) -> dict[str, str]:
    """``x-keynode-peer``'s ``key=value;...`` as a dict with lower-case keys."""
    fields: dict[str, str] = {}
    for element in value.split(";"):
        key, separator, item = element.partition("=")
        if separator:
            fields[key.strip().lower()] = item.strip()
    return fields


def identity_relay(caller: CallerIdentity, **options: int) -> H2IdentityRelay:
    """A sans-IO relay that adds ``caller``'s headers (``options``: H2IdentityRelay's)."""
    sha256 = certificate_sha256(caller.peer_certificate_der)
    return H2IdentityRelay(identity_headers(caller.local_node_id, caller.peer_node_id, sha256), **options)


async def relay_with_identity(tunnel_stream: trio.abc.Stream, server_stream: trio.abc.Stream, caller: CallerIdentity) -> None:
    """The splicer for services of kind ``"grpc"``: relay HTTP/2 until either side
    ends, injecting ``caller``'s identity. A side that breaks HTTP/2 ends this
    connection (logged), never anything else."""
    await run_relay(identity_relay(caller), tunnel_stream, server_stream)


class _Sender:
    """Writes one side's output. Whichever task finds output for a side and the
    side not being written writes it, until nothing is left (a task that finds
    it being written leaves the new output to the writer, which takes it on its
    next turn: no output waits for a wake-up, no task waits for another's write)."""

    def __init__(
        self,
        stream: trio.abc.SendStream,
        take: Callable[[int], bytes],
        pending: Callable[[], int],
        limit: int,
        gone: Callable[[], None],
    ) -> None:
        self.stream = stream
        self.take = take
        self.pending = pending
        self.limit = limit
        self.gone = gone
        self.sending = False
        self.idle = trio.Event()

    async def flush(self) -> None:
        while self.sending:
            if self.pending() < self.limit:
                return  # the writer will take it
            await self.idle.wait()  # too much waits: the caller stops producing (reading) meanwhile
        self.sending = True
        self.idle = trio.Event()
        try:
            while data := self.take(WRITE_SIZE):
                await self.stream.send_all(data)
        except _TRANSPORT_ERRORS:
            self.gone()  # that side went away: the relay ends
        finally:
            self.sending = False
            self.idle.set()


async def run_relay(relay: H2IdentityRelay, tunnel_stream: trio.abc.Stream, server_stream: trio.abc.Stream) -> None:
    """Drive ``relay`` between the two streams until one ends or breaks HTTP/2.
    Logs (once) and returns on a protocol error; transport errors end it quietly.

    Each side has one reader task; after every read it writes what the read
    produced. A side that does not read blocks the writes toward it, so the
    task that would add more stops reading: memory stays bounded by the relay's
    windows and high-water mark."""
    relay.start()
    limit = relay.outbound_high_water
    to_tunnel = _Sender(tunnel_stream, relay.take_for_tunnel, lambda: relay.pending_for_tunnel, limit, relay.tunnel_closed)
    to_server = _Sender(server_stream, relay.take_for_server, lambda: relay.pending_for_server, limit, relay.server_closed)

    async def flush() -> None:
        await to_server.flush()
        await to_tunnel.flush()

    async def read(
        stream: trio.abc.ReceiveStream, receive: Callable[[bytes | bytearray], None], closed: Callable[[], None]
    ) -> None:
        try:
            while not relay.ended:
                await flush()
                if relay.ended:
                    break
                try:
                    data = await stream.receive_some(READ_SIZE)
                except _TRANSPORT_ERRORS:
                    data = b""
                if not data:
                    closed()
                    break
                receive(data)
        except H2RelayError as error:
            log.info("grpc relay: %s", error)
        with trio.move_on_after(DRAIN_TIME):  # the last words (GOAWAY) to whoever is still there
            await flush()
        nursery.cancel_scope.cancel()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(read, tunnel_stream, relay.receive_from_tunnel, relay.tunnel_closed)
        nursery.start_soon(read, server_stream, relay.receive_from_server, relay.server_closed)
