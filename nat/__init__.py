"""keynode data-transfer layer: one UDP socket, uTP (BEP 29), out-of-band messages."""

from nat.endpoint import Endpoint, EndpointStats, open_endpoint
from nat.errors import (
    EndpointClosed,
    MalformedMessage,
    MalformedPacket,
    NatError,
    PathInUse,
    UnknownPath,
    UtpClosed,
    UtpConnectionRefused,
    UtpConnectionReset,
    UtpError,
    UtpTimeout,
)
from nat.message import PING, PONG, MessageType, classify_datagram, decode_message, encode_message
from nat.stream import UtpStream
from nat.utp.paths import VirtualPath

__all__ = [
    "NatError",
    "MalformedPacket",
    "MalformedMessage",
    "UtpError",
    "UtpConnectionRefused",
    "UtpConnectionReset",
    "UtpTimeout",
    "UtpClosed",
    "EndpointClosed",
    "PathInUse",
    "UnknownPath",
    "Endpoint",
    "EndpointStats",
    "open_endpoint",
    "PING",
    "PONG",
    "MessageType",
    "classify_datagram",
    "decode_message",
    "encode_message",
    "UtpStream",
    "VirtualPath",
]
