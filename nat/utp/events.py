"""Events the uTP multiplexer hands to its driver (``UtpMultiplexer.next_event``).

Events are edge-triggered notifications, not data carriers: data is read with
``conn.read()`` and written with ``conn.send()``.

- ``IncomingConnection``: a SYN arrived and was accepted. The connection can be
  written to at once (our acceptor may speak first; see connection.py).
- ``Connected``: the handshake completed (outgoing: SYN-ACK received; incoming:
  the initiator's first packet after its SYN arrived).
- ``DataAvailable``: the receive buffer went from empty to non-empty. Read until
  ``read()`` returns b"" to re-arm it.
- ``SendSpaceAvailable``: ``send()`` had refused bytes and at least a quarter of
  the send buffer is free again.
- ``EofReceived``: the peer's FIN arrived and every byte before it is in the
  receive buffer (``read()`` returns them, then b""; ``at_eof`` turns True once
  they are all read).
- ``ConnectionClosed``: the connection is finished; ``error`` is None for a clean
  close (or a local abort), else UtpConnectionReset, UtpConnectionRefused or
  UtpTimeout. Already received bytes stay readable.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Generic, TypeVar

from nat.errors import NatError

# The connection type the events carry: UtpConnection (nat.utp.connection, which
# imports this module; UtpEvent there is UtpEventOf[UtpConnection]).
ConnT = TypeVar("ConnT")


@dataclass(frozen=True)
class IncomingConnection(Generic[ConnT]):
    conn: ConnT


@dataclass(frozen=True)
class Connected(Generic[ConnT]):
    conn: ConnT


@dataclass(frozen=True)
class DataAvailable(Generic[ConnT]):
    conn: ConnT


@dataclass(frozen=True)
class SendSpaceAvailable(Generic[ConnT]):
    conn: ConnT


@dataclass(frozen=True)
class EofReceived(Generic[ConnT]):
    conn: ConnT


@dataclass(frozen=True)
class ConnectionClosed(Generic[ConnT]):
    conn: ConnT
    error: NatError | None = None


UtpEventOf = (
    IncomingConnection[ConnT]
    | Connected[ConnT]
    | DataAvailable[ConnT]
    | SendSpaceAvailable[ConnT]
    | EofReceived[ConnT]
    | ConnectionClosed[ConnT]
)

__all__ = [
    "IncomingConnection",
    "Connected",
    "DataAvailable",
    "SendSpaceAvailable",
    "EofReceived",
    "ConnectionClosed",
    "ConnT",
    "UtpEventOf",
]
