"""Sans-IO uTP (BEP 29, wire-compatible with libutp).

See nat/utp/multiplexer.py for the API the trio driver builds on.
"""

from nat.utp.config import UtpConfig, UtpStats
from nat.utp.connection import UtpConnection, UtpEvent, UtpState
from nat.utp.events import (
    Connected,
    ConnectionClosed,
    DataAvailable,
    EofReceived,
    IncomingConnection,
    SendSpaceAvailable,
)
from nat.utp.multiplexer import UtpMultiplexer

__all__ = [
    "UtpMultiplexer",
    "UtpConfig",
    "UtpStats",
    "UtpConnection",
    "UtpState",
    "UtpEvent",
    "IncomingConnection",
    "Connected",
    "DataAvailable",
    "SendSpaceAvailable",
    "EofReceived",
    "ConnectionClosed",
]
