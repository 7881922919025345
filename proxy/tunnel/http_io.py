"""Reading HTTP/1.1 messages from a trio stream with h11, for every h11 user in keynode
(the CONNECT edge, the control socket's server and client, `keynode forward`).

h11 does the parsing; this only feeds it. Bounds: the head by the h11.Connection's
``max_incomplete_event_size`` (h11 raises RemoteProtocolError past it), the body by
``max_body_size``, the time by the caller's cancel scope (``trio.fail_after``).

The peer closing its side is ``h11.ConnectionClosed`` wherever it happens: a message
cut short is treated like a peer that went away, not like a malformed one.
"""

from __future__ import annotations

import h11
import trio

READ_SIZE = 16 * 1024

Head = h11.Request | h11.Response


async def receive_event(
    stream: trio.abc.ReceiveStream, connection: h11.Connection, *, read_size: int = READ_SIZE
) -> h11.Event | type[h11.PAUSED]:
    """The next h11 event (never NEED_DATA), reading from ``stream`` as h11 asks.

    Raises h11.RemoteProtocolError for bytes h11 rejects."""
    while True:
        event = connection.next_event()
        if event is not h11.NEED_DATA:
            return event  # type: ignore[return-value]
        data = await stream.receive_some(read_size)
        if not data:
            return h11.ConnectionClosed()
        connection.receive_data(bytes(data))  # h11 is typed for bytes; a head is small


async def receive_head(
    stream: trio.abc.ReceiveStream, connection: h11.Connection, *, read_size: int = READ_SIZE
) -> Head | None:
    """A request head (server) or final response head (client; 1xx are skipped);
    None when the peer closes before one is complete."""
    while True:
        event = await receive_event(stream, connection, read_size=read_size)
        if isinstance(event, (h11.Request, h11.Response)):
            return event
        if isinstance(event, h11.ConnectionClosed):
            return None
        if not isinstance(event, h11.InformationalResponse):
            raise h11.RemoteProtocolError(f"expected a message head, got {type(event).__name__}")


async def receive_body(
    stream: trio.abc.ReceiveStream,
    connection: h11.Connection,
    *,
    max_body_size: int,
    read_size: int = READ_SIZE,
) -> bytes:
    """The body after a head, up to its end. Raises h11.RemoteProtocolError when it
    is larger than ``max_body_size`` or the peer closes before its end."""
    body = bytearray()
    while True:
        event = await receive_event(stream, connection, read_size=read_size)
        if isinstance(event, h11.Data):
            body += event.data
            if len(body) > max_body_size:
                raise h11.RemoteProtocolError(f"body larger than {max_body_size} bytes", error_status_hint=413)
        elif isinstance(event, h11.EndOfMessage):
            return bytes(body)
        else:
            raise h11.RemoteProtocolError("connection closed before the end of the message")


async def receive_message(
    stream: trio.abc.ReceiveStream,
    connection: h11.Connection,
    *,
    max_body_size: int,
    read_size: int = READ_SIZE,
) -> tuple[Head, bytes] | None:
    """One whole message (head and body); None when the peer closes before a head."""
    head = await receive_head(stream, connection, read_size=read_size)
    if head is None:
        return None
    return head, await receive_body(stream, connection, max_body_size=max_body_size, read_size=read_size)
