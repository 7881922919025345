"""What forward and reverse connections share below their lifecycle: the failure
helpers both start sequences use, closing streams within ``conn_end_time``, and the
cache of verified chains.

A *connection* is one uTP connection wrapped in one TLS session, joined to one TCP
connection (the CONNECT client on the forward side, the server on the reverse
side) by the splice (splice.py). Its lifecycle is ``lifecycle.TunnelConnection``.
This module imports no other part of the tunnel but its errors, peers and records,
so every other module can import it. The records (``ConnectionInfo``,
``ConnectionEvent``, ``EndReason``, ...) live in records.py and are importable from
here too, where callers found them before.
"""

from __future__ import annotations

import datetime
import logging
import socket
import struct
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Hashable, Sequence
from typing import TypeVar

import trio
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from nat.errors import NatError
from nat.stream import UtpStream
from proxy.identity.certificates import certificate_node_id
from proxy.identity.errors import CertificateChainError, KeynodeError
from proxy.identity.node_id import NodeId
from proxy.identity.verification import DEFAULT_MAX_CHAIN_LENGTH
from proxy.tls import TLSStream
from proxy.tunnel.errors import (
    ConnectionKeepAliveTimeout,
    ConnectionResetByPeer,
    ConnectionStartError,
    ConnectionStartTimeout,
    ConnectionVerifyError,
)
from proxy.tunnel.peer import Liveness
from proxy.tunnel.records import (
    ConnectionCallback,
    ConnectionEvent,
    ConnectionInfo,
    ConnectionStatus,
    Direction,
    EndReason,
)

__all__ = [
    "TRANSPORT_ERRORS",
    "close_streams",
    "close_tunnel",
    "reset_tcp",
    "until_peer_dies",
    "start_error",
    "presented_identity",
    "VerifiedChains",
    "verified_chains",
    # records.py's, for importers from before it
    "ConnectionCallback",
    "ConnectionEvent",
    "ConnectionInfo",
    "ConnectionStatus",
    "Direction",
    "EndReason",
]

log = logging.getLogger(__name__)

T = TypeVar("T")

# Errors that mean "the other end or the path went away", not a bug. Not
# KeynodeError: keynode's own errors are local (a TLS error that means the
# transport broke is a trio.BrokenResourceError too), and a defect must be
# reported as one, not as a peer reset.
TRANSPORT_ERRORS: tuple[type[BaseException], ...] = (
    trio.BrokenResourceError,
    trio.ClosedResourceError,
    OSError,
    NatError,
)


async def close_streams(*streams: trio.abc.AsyncResource | None, graceful: bool, end_time: float) -> None:
    """Close streams, gracefully within ``end_time`` if asked, else at once."""
    with trio.CancelScope(shield=True):
        with trio.move_on_after(end_time if graceful else 0):
            for stream in streams:
                if stream is not None:
                    try:
                        await stream.aclose()
                    except TRANSPORT_ERRORS as error:
                        log.debug("closing %r: %s", stream, error)
        # Past the deadline (or not graceful): aclose under a cancelled scope is
        # the forceful close trio streams promise. One scope per stream: the
        # Cancelled that ends one aclose must not skip the next stream.
        for stream in streams:
            if stream is None:
                continue
            with trio.CancelScope() as forced:
                forced.cancel()
                try:
                    await stream.aclose()
                except TRANSPORT_ERRORS as error:
                    log.debug("force-closing %r: %s", stream, error)


# SO_LINGER on, zero seconds: close() sends RST and drops what was not sent.
_LINGER_ZERO = struct.pack("ii", 1, 0)
# What the goodbye reads at once while it waits for the peer's close_notify and FIN.
_GOODBYE_READ = 64 * 1024


async def reset_tcp(stream: trio.SocketStream) -> None:
    """Close a TCP connection with a reset (RST), never a FIN: the other end sees
    ECONNRESET, not an end of data that could pass for a complete transfer."""
    try:
        stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_ZERO)
    except OSError as error:  # already gone: the close below is all there is
        log.debug("SO_LINGER on %r: %s", stream, error)
    await close_streams(stream, graceful=False, end_time=0)


async def _goodbye(tunnel: TLSStream | UtpStream) -> None:
    """close_notify (if not sent yet) and uTP FIN, then read and drop what the peer
    still sends until its close_notify and its FIN, then close the uTP connection."""
    if isinstance(tunnel, TLSStream):
        await tunnel.send_eof()
        while await tunnel.receive_some(_GOODBYE_READ):
            pass
        transport = tunnel.transport
    else:
        await tunnel.send_eof()
        transport = tunnel
    # The FIN follows the close_notify; reading it before closing means our close
    # does not answer it with a RESET (a uTP connection closed while the peer
    # still sends gets one, as a TCP socket does).
    while await transport.receive_some(_GOODBYE_READ):
        pass
    await tunnel.aclose()


async def close_tunnel(tunnel: TLSStream | UtpStream | None, *, graceful: bool, end_time: float) -> None:
    """End the tunnel side of a connection.

    Graceful: first what our side already handed to uTP crosses (``_drain``: as
    long as the peer keeps acknowledging it, ``end_time`` running from its latest
    progress), then TLS close_notify and uTP FIN and the wait for the peer's
    close_notify and FIN, within ``end_time`` (the original's goodbye; a peer's
    answering close_notify is read, never answered with a RESET). Not graceful,
    past those bounds or on any failure meanwhile: uTP RESET at once, which the
    peer reports as a reset, never as a clean end.
    """
    if tunnel is None:
        return
    if graceful:
        with trio.CancelScope(shield=True):
            await _drain(tunnel, end_time)
            with trio.move_on_after(end_time):
                try:
                    await _goodbye(tunnel)
                except TRANSPORT_ERRORS as error:
                    log.debug("goodbye on %r: %s", tunnel, error)
    await close_streams(tunnel, graceful=False, end_time=0)


# How often a drain looks at what is still unacknowledged (only while one closes).
_DRAIN_CHECK = 0.01


async def _drain(tunnel: TLSStream | UtpStream, stall_time: float) -> None:
    """Wait while our data already in uTP's send buffer still crosses, and the peer
    acknowledges some of it at least every ``stall_time`` plus four smoothed round
    trips (a lost tail is repaired by the retransmission timeout, about that long
    on a slow or jittery path; the backed-off RTO is not used, so a dead path still
    ends within about ``stall_time``).

    A local end that closed after its last send_all has handed everything over, as
    a TCP socket's close() does; the kernel goes on delivering such data, and so
    must we: bounding the whole goodbye by conn_end_time reset a tunnel whose path
    needed longer than that for the last megabyte, cutting the far side's copy
    short. A peer that stops acknowledging still ends it after ``stall_time``.
    """
    utp = tunnel.transport if isinstance(tunnel, TLSStream) else tunnel
    if not isinstance(utp, UtpStream):
        return
    connection = utp.connection
    left = connection.send_buffered
    progress_at = trio.current_time()
    while left and not connection.is_closed:
        await trio.sleep(_DRAIN_CHECK)
        now_left = connection.send_buffered
        if now_left < left:
            left, progress_at = now_left, trio.current_time()
        elif trio.current_time() - progress_at >= stall_time + 4 * connection.rtt:
            return


async def until_peer_dies(peer: Liveness, work: Callable[[], Awaitable[T]]) -> T:
    """Run ``work``; if the peer's keep-alive times out first, raise that instead."""
    results: list[T] = []
    failure: Exception | None = None
    async with trio.open_nursery() as nursery:

        async def watch() -> None:
            await peer.died.wait()
            nursery.cancel_scope.cancel()

        nursery.start_soon(watch)
        try:
            results.append(await work())
        except Exception as error:  # re-raised below, outside the nursery's group
            failure = error
        finally:
            nursery.cancel_scope.cancel()
    if failure is not None:
        raise failure
    if not results:
        raise peer.death or ConnectionKeepAliveTimeout("peer died")
    return results[0]


def presented_identity(chain: Sequence[x509.Certificate]) -> str:
    """Who a peer's chain says it is, for messages: the NodeId of its leaf key (what
    the TLS handshake proved it holds), and the CN's claim when that differs."""
    if not chain:
        return "no certificate"
    leaf = chain[0]
    try:
        node_id = str(NodeId.from_public_key(leaf.public_key()))  # type: ignore[arg-type]
    except (KeynodeError, ValueError, TypeError):
        return "a leaf certificate whose key is not an Ed25519 key (no NodeId)"
    try:
        claimed = str(certificate_node_id(leaf))
    except (KeynodeError, ValueError):
        claimed = None
    if claimed is not None and claimed != node_id:
        return f"NodeId {node_id} (its certificate claims {claimed})"
    return f"NodeId {node_id}"


def as_peer_reset(error: BaseException, prefix: str = "") -> BaseException:
    """How an error that ended a connection is reported: a transport failure as
    ConnectionResetByPeer caused by it; a keep-alive timeout, an error already so
    reported, or a fault of this node (logged where it happened) as itself, so that
    a bug is never told as a peer reset."""
    if isinstance(error, ConnectionKeepAliveTimeout | ConnectionResetByPeer) or not isinstance(error, TRANSPORT_ERRORS):
        return error
    wrapped = ConnectionResetByPeer(f"{prefix}{type(error).__name__}: {error}")
    wrapped.__cause__ = error
    return wrapped


def start_error(error: BaseException, what: str) -> KeynodeError:
    """Map a failure while starting a connection to its typed error (and HTTP status)."""
    if isinstance(error, (ConnectionStartError, ConnectionKeepAliveTimeout)):
        return error
    if isinstance(error, trio.TooSlowError):
        return ConnectionStartTimeout(f"{what}: start timed out")
    if isinstance(error, CertificateChainError):
        mapped: KeynodeError = ConnectionVerifyError(f"{what}: certificate chain rejected: {error}")
    elif isinstance(error, KeynodeError | NatError | OSError | trio.BrokenResourceError | trio.ClosedResourceError):
        mapped = ConnectionStartError(f"{what}: {type(error).__name__}: {error}")
    else:
        mapped = ConnectionStartError(f"{what}: unexpected {type(error).__name__}: {error}")
    mapped.__cause__ = error
    return mapped


ChainKey = tuple[Hashable, int, tuple[bytes, ...]]  # (the question asked, the length limit, the chain's DER bytes)
ChainVerdict = tuple[NodeId, datetime.datetime, datetime.datetime]  # NodeId, valid from, valid until

# Chains longer than this are verified in a worker thread. A certificate costs about
# 0.5 ms (two Ed25519 signatures plus parsing): a 32-certificate chain (the default
# limit) held the event loop 18-40 ms, every other connection waiting; in a thread
# the loop keeps running (Python switches threads every 5 ms). Short chains, the
# common case, stay inline: a thread hop costs more than verifying them.
THREAD_ABOVE = 4


class VerifiedChains:
    """Certificate chains that passed verification, by their exact DER bytes.

    Verifying a chain (two Ed25519 signatures per certificate plus parsing) costs
    0.6-0.8 ms here, on the critical path of every connection start; a node
    mostly meets the same peers' chains again. The verdict is a pure function of
    the chain's bytes, the question asked (``what``: the wanted NodeIds, or the
    client rule), the length limit and the time, so a hit is reused only while
    every certificate of the chain is in date. Failures are never cached. The TLS
    handshake proves possession of the leaf key every time; only the chain check
    is reused. A chain over ``max_length`` is handed straight to ``verify`` (which
    refuses it before examining anything): it is never encoded, looked up or kept.
    """

    def __init__(self, capacity: int = 512) -> None:
        self.capacity = capacity
        self._entries: OrderedDict[ChainKey, ChainVerdict] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def verify(
        self,
        what: Hashable,
        chain: Sequence[x509.Certificate],
        verify: Callable[[list[x509.Certificate]], NodeId],
        *,
        max_length: int = DEFAULT_MAX_CHAIN_LENGTH,
    ) -> NodeId:
        """The verdict, from the cache or from ``verify(chain)`` here and now."""
        chain = list(chain)
        if len(chain) > max_length:
            return verify(chain)
        key, node_id = self._lookup(what, chain, max_length)
        if node_id is None:
            node_id = verify(chain)
            self._store(key, chain, node_id)
        return node_id

    async def verify_async(
        self,
        what: Hashable,
        chain: Sequence[x509.Certificate],
        verify: Callable[[list[x509.Certificate]], NodeId],
        *,
        max_length: int = DEFAULT_MAX_CHAIN_LENGTH,
    ) -> NodeId:
        """As ``verify``, but a chain longer than THREAD_ABOVE is verified in a worker
        thread. The cache itself is only touched from the event loop."""
        chain = list(chain)
        if len(chain) > max_length:
            return verify(chain)
        key, node_id = self._lookup(what, chain, max_length)
        if node_id is None:
            if len(chain) > THREAD_ABOVE:
                node_id = await trio.to_thread.run_sync(verify, chain)
            else:
                node_id = verify(chain)
            self._store(key, chain, node_id)
        return node_id

    def _lookup(
        self, what: Hashable, chain: list[x509.Certificate], max_length: int
    ) -> tuple[ChainKey, NodeId | None]:
        key = (what, max_length, tuple(certificate.public_bytes(Encoding.DER) for certificate in chain))
        now = datetime.datetime.now(datetime.UTC)
        entry = self._entries.get(key)
        if entry is not None:
            node_id, valid_from, valid_until = entry
            if valid_from <= now <= valid_until:
                self._entries.move_to_end(key)
                self.hits += 1
                return key, node_id
            del self._entries[key]
        self.misses += 1
        return key, None

    def _store(self, key: ChainKey, chain: list[x509.Certificate], node_id: NodeId) -> None:
        valid_from = max(certificate.not_valid_before_utc for certificate in chain)
        valid_until = min(certificate.not_valid_after_utc for certificate in chain)
        self._entries[key] = (node_id, valid_from, valid_until)
        if len(self._entries) > self.capacity:
            self._entries.popitem(last=False)


verified_chains = VerifiedChains()  # one per process: verdicts do not depend on the proxy
