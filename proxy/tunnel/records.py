"""What the Proxy reports about its connections: their records, events and end
reasons. Plain data, no behaviour; the application may import it."""

from __future__ import annotations

import enum
import hashlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import trio
from cryptography import x509

from proxy.identity.node_id import NodeId


class Direction(str, enum.Enum):
    FORWARD = "forward"
    REVERSE = "reverse"


class EndReason(str, enum.Enum):
    """Why a connection ended (given to ``connection_lost_callback``)."""

    CLOSED_LOCALLY = "closed_locally"  # local TCP side ended first, or closed/stopped here
    CLOSED_BY_PEER = "closed_by_peer"  # the remote node ended the tunnel first
    RESET = "reset"  # an error on either side (reset, broken TLS, broken TCP)
    KEEP_ALIVE_TIMEOUT = "keep_alive_timeout"  # the remote peer fell silent
    REVOKED = "revoked"  # a policy reload took its NodeId's access away (services.py)


@dataclass(frozen=True)
class PathMove:
    """One move of a live tunnel between paths (paths.py)."""

    at: float  # unix time
    from_path: str  # "direct" or "relay"
    to_path: str
    reason: str  # e.g. "direct path proven by authenticated ping/pong", "direct path silent"
    address: str | None = None  # the direct address moved to
    via: str | None = None  # the relay NodeId moved to

    def as_dict(self) -> dict[str, Any]:
        return {"at": self.at, "from": self.from_path, "to": self.to_path, "reason": self.reason,
                "address": self.address, "via": self.via}


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
    # reverse: the local service it reached; forward: the service it named ("port N"),
    # None for none (the remote's default service)
    service: str | None = None
    path: str = "direct"  # where the tunnel's datagrams go: "direct" or "relay" (paths.py)
    via: NodeId | None = None  # the relay node, when relayed


@dataclass(frozen=True)
class ConnectionStatus:
    """One established connection as ``Proxy.connections()`` reports it."""

    info: ConnectionInfo
    established_at: float  # trio.current_time() when it was established
    bytes_sent: int  # uTP payload bytes (TLS records, so a little above the TCP bytes)
    bytes_received: int
    rtt: float | None  # smoothed uTP round-trip time, seconds
    move_count: int = 0  # path moves of the live tunnel (paths.py)
    moves: tuple[PathMove, ...] = ()  # the last few, oldest first
    transport: dict[str, object] | None = None  # uTP window, flight and model (UtpConnection.transport_snapshot)


@dataclass(frozen=True)
class PreparedReverse:
    """A reverse connection ``open_connection_reverse`` prepared (server connected,
    peer punched) whose peer has not connected yet: no NodeId, no bytes."""

    remote_host: str  # the remote proxy (UDP) address expected to connect
    remote_port: int
    prepared_at: float  # trio.current_time() when it was prepared


@dataclass(frozen=True)
class ConnectionEvent:
    """Argument of the established and lost callbacks."""

    remote_node_id: NodeId
    remote_host: str
    remote_port: int
    direction: Direction
    reason: EndReason | None = None  # None for "established"
    error: BaseException | None = None
    service: str | None = None  # as ConnectionInfo.service
    path: str = "direct"  # as ConnectionInfo.path, when the event happened
    via: NodeId | None = None
    move: PathMove | None = None  # for the path_changed callback: the move


ConnectionCallback = Callable[[ConnectionEvent], Any]


@dataclass(frozen=True)
class CallerIdentity:
    """Who a reverse connection's caller is, as verified: what a service's splicer
    (``Splicer``) is given beside its two streams."""

    local_node_id: NodeId  # this node
    peer_node_id: NodeId  # the NodeId the caller's chain proves (verification.py)
    peer_certificate_der: bytes  # the caller's leaf certificate, DER
    service: str  # the local service it reached

    @property
    def peer_certificate_sha256(self) -> str:
        """Hex SHA-256 of the leaf certificate's DER (XFCC's Hash)."""
        return hashlib.sha256(self.peer_certificate_der).hexdigest()


# A service kind's byte pipe, supplied by the application (e.g. the gRPC bridge for
# kind "grpc"): (tunnel stream, server stream, caller) -> None once both are done.
Splicer = Callable[[trio.abc.Stream, trio.abc.Stream, CallerIdentity], Awaitable[None]]
