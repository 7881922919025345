"""What forward and reverse connections share: their record, events and lifetime.

A *connection* is one uTP connection wrapped in one TLS session, joined to one TCP
connection (the CONNECT client on the forward side, the server on the reverse
side) by the relay (proxy/relay.py).
"""

from __future__ import annotations

import datetime
import enum
import logging
import math
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import trio
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from nat.errors import NatError
from proxy.identity.errors import KeynodeError
from proxy.tunnel.errors import ConnectionKeepAliveTimeout, ConnectionResetByPeer
from proxy.identity.node_id import NodeId
from proxy.tunnel.peer import Peer

if TYPE_CHECKING:
    from proxy.tunnel.splice import PipeOutcome

log = logging.getLogger(__name__)

# Errors that mean "the other end or the path went away", not a bug.
TRANSPORT_ERRORS: tuple[type[BaseException], ...] = (
    trio.BrokenResourceError,
    trio.ClosedResourceError,
    OSError,
    NatError,
    KeynodeError,
)


class Direction(str, enum.Enum):
    FORWARD = "forward"
    REVERSE = "reverse"


class EndReason(str, enum.Enum):
    """Why a connection ended (given to ``connection_lost_callback``)."""

    CLOSED_LOCALLY = "closed_locally"  # local TCP side ended first, or closed/stopped here
    CLOSED_BY_PEER = "closed_by_peer"  # the remote node ended the tunnel first
    RESET = "reset"  # an error on either side (reset, broken TLS, broken TCP)
    KEEP_ALIVE_TIMEOUT = "keep_alive_timeout"  # the remote peer fell silent


@dataclass(frozen=True)
class ConnectionInfo:
    """What is known about one live connection (the original's ConnectionInfo)."""

    remote_node_id: NodeId
    remote_certificates: tuple[x509.Certificate, ...]
    local_host: str  # local proxy (UDP) address
    local_port: int
    remote_host: str  # remote proxy (UDP) address
    remote_port: int
    direction: Direction
    tcp_host: str | None = None  # forward: the CONNECT client; reverse: our socket to the server
    tcp_port: int | None = None


class TunnelConnection:
    """What a forward and a reverse connection share: the remote peer, the verified
    identity, the streams, the lifetime and the ``ConnectionInfo`` record."""

    direction: Direction

    def __init__(self, proxy: Any, address: tuple[str, int]) -> None:
        self.proxy = proxy
        self.address = address  # the remote proxy's UDP address
        self.node_id: NodeId | None = None
        self.certificates: tuple[x509.Certificate, ...] = ()
        self.utp: Any = None  # UtpStream
        self.tls: Any = None  # TLSStream
        self.peer: Peer | None = None
        self.scope = trio.CancelScope()
        self.ended = trio.Event()
        self.end_reason: EndReason | None = None
        self.end_error: BaseException | None = None
        self._exit_stack = AsyncExitStack()

    @property
    def alive(self) -> bool:
        """Not ended, not being cancelled, and its peer not fallen silent."""
        return (
            not self.ended.is_set()
            and not self.scope.cancel_called
            and self.peer is not None
            and not self.peer.died.is_set()
        )

    @property
    def tcp_address(self) -> tuple[str, int] | None:
        """The local TCP end: the CONNECT client (forward), our socket to the server (reverse)."""
        raise NotImplementedError

    def info(self) -> ConnectionInfo | None:
        if self.node_id is None:
            return None
        tcp = self.tcp_address
        return ConnectionInfo(
            remote_node_id=self.node_id,
            remote_certificates=self.certificates,
            local_host=self.proxy.proxy_host,
            local_port=self.proxy.proxy_port,
            remote_host=self.address[0],
            remote_port=self.address[1],
            direction=self.direction,
            tcp_host=tcp[0] if tcp else None,
            tcp_port=tcp[1] if tcp else None,
        )


@dataclass(frozen=True)
class ConnectionStatus:
    """One established connection as ``Proxy.connections()`` reports it."""

    info: ConnectionInfo
    established_at: float  # trio.current_time() when it was established
    bytes_sent: int  # uTP payload bytes (TLS records, so a little above the TCP bytes)
    bytes_received: int
    rtt: float | None  # smoothed uTP round-trip time, seconds


@dataclass(frozen=True)
class ConnectionEvent:
    """Argument of the established and lost callbacks."""

    remote_node_id: NodeId
    remote_host: str
    remote_port: int
    direction: Direction
    reason: EndReason | None = None  # None for "established"
    error: BaseException | None = None


ConnectionCallback = Callable[[ConnectionEvent], Any]


def call_callback(callback: ConnectionCallback | None, event: ConnectionEvent) -> None:
    """Run a user callback; its failure is logged, never breaks a connection."""
    if callback is None:
        return
    try:
        callback(event)
    except Exception:  # a user callback is foreign code: contain it, say so
        log.exception("connection callback failed for %s", event)


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


def reset_error_for(outcome: PipeOutcome) -> BaseException | None:
    """The error given to connection_lost_callback: the keep-alive timeout as is,
    anything else as ConnectionResetByPeer caused by the underlying error."""
    error = outcome.error
    if error is None or isinstance(error, ConnectionKeepAliveTimeout | ConnectionResetByPeer):
        return error
    wrapped = ConnectionResetByPeer(f"{type(error).__name__}: {error}")
    wrapped.__cause__ = error
    return wrapped


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
        self._entries: OrderedDict[tuple[Hashable, tuple[bytes, ...]], tuple[NodeId, datetime.datetime, datetime.datetime]] = (
            OrderedDict()
        )
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
        now = datetime.datetime.now(datetime.timezone.utc)
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


def remaining(deadline: float) -> float:
    return max(0.0, deadline - trio.current_time()) if math.isfinite(deadline) else math.inf
