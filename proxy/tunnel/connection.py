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
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Hashable, Sequence
from typing import TypeVar

import trio
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from nat.errors import NatError
from proxy.identity.errors import CertificateChainError, KeynodeError
from proxy.identity.node_id import NodeId
from proxy.tunnel.errors import (
    ConnectionKeepAliveTimeout,
    ConnectionStartError,
    ConnectionStartTimeout,
    ConnectionVerifyError,
)
from proxy.tunnel.peer import Peer
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
    "until_peer_dies",
    "start_error",
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

# Errors that mean "the other end or the path went away", not a bug.
TRANSPORT_ERRORS: tuple[type[BaseException], ...] = (
    trio.BrokenResourceError,
    trio.ClosedResourceError,
    OSError,
    NatError,
    KeynodeError,
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


async def until_peer_dies(peer: Peer, work: Callable[[], Awaitable[T]]) -> T:
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


ChainKey = tuple[Hashable, tuple[bytes, ...]]  # (the question asked, the chain's DER bytes)
ChainVerdict = tuple[NodeId, datetime.datetime, datetime.datetime]  # NodeId, valid from, valid until


class VerifiedChains:
    """Certificate chains that passed verification, by their exact DER bytes.

    Verifying a chain (two Ed25519 signatures per certificate plus parsing) costs
    0.6-0.8 ms here, on the critical path of every connection start; a node
    mostly meets the same peers' chains again. The verdict is a pure function of
    the chain's bytes, the question asked (``what``: the wanted NodeIds, or the
    client rule) and the time, so a hit is reused only while every certificate
    of the chain is in date. Failures are never cached. The TLS handshake proves
    possession of the leaf key every time; only the chain check is reused.
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
    ) -> NodeId:
        chain = list(chain)
        key = (what, tuple(certificate.public_bytes(Encoding.DER) for certificate in chain))
        now = datetime.datetime.now(datetime.UTC)
        entry = self._entries.get(key)
        if entry is not None:
            node_id, valid_from, valid_until = entry
            if valid_from <= now <= valid_until:
                self._entries.move_to_end(key)
                self.hits += 1
                return node_id
            del self._entries[key]
        self.misses += 1
        node_id = verify(chain)
        valid_from = max(certificate.not_valid_before_utc for certificate in chain)
        valid_until = min(certificate.not_valid_after_utc for certificate in chain)
        self._entries[key] = (node_id, valid_from, valid_until)
        if len(self._entries) > self.capacity:
            self._entries.popitem(last=False)
        return node_id


verified_chains = VerifiedChains()  # one per process: verdicts do not depend on the proxy
