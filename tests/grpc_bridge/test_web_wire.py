"""Raw grpc-web clients and a scripted HTTP/2 upstream for the bridge's wire tests:
every byte the tests send and every answer they read is visible here."""

from __future__ import annotations

import base64
import struct
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import h2.config
import h2.connection
import h2.events
import h11
import trio

from grpc_bridge import web_codec as codec

BINARY = b"application/grpc-web+proto"
TEXT = b"application/grpc-web-text"


def frame(payload: bytes, flags: int = 0) -> bytes:
    return struct.pack(">BI", flags, len(payload)) + payload


@dataclass
class WebAnswer:
    status: int
    headers: dict[bytes, bytes]
    body: bytes

    def parse(self) -> tuple[list[bytes], dict[bytes, bytes]]:
        """(messages, trailers) of a grpc-web body (text mode by the content type)."""
        data = self.body
        if self.headers.get(b"content-type", b"").startswith(b"application/grpc-web-text"):
            decoder = codec.Base64Decoder()
            data = decoder.feed(data)
            decoder.finish()
        messages, trailers, position = [], {}, 0
        while position < len(data):
            flags, length = struct.unpack(">BI", data[position : position + 5])
            payload = data[position + 5 : position + 5 + length]
            assert len(payload) == length, "frame cut short"
            position += 5 + length
            if flags & 0x80:
                assert position == len(data), "trailers frame is not last"
                for line in payload.split(b"\r\n"):
                    if line:
                        name, _, value = line.partition(b":")
                        trailers[name] = value
            else:
                messages.append(payload)
        return messages, trailers


async def read_answer(stream: trio.SocketStream, client: h11.Connection) -> WebAnswer:
    status, headers, body = 0, {}, bytearray()
    while True:
        event = client.next_event()
        if event is h11.NEED_DATA:
            client.receive_data(await stream.receive_some(65536))
            continue
        if isinstance(event, h11.Response):
            status, headers = event.status_code, dict(event.headers)
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage):
            return WebAnswer(status, headers, bytes(body))
        else:
            raise AssertionError(f"unexpected {event!r}")


async def post(
    address: tuple[str, int],
    path: str,
    chunks: list[bytes],
    *,
    content_type: bytes = BINARY,
    headers: list[tuple[bytes, bytes]] | None = None,
    method: bytes = b"POST",
) -> WebAnswer:
    """One request over HTTP/1.1 with a chunked body sent piece by piece."""
    stream = await trio.open_tcp_stream(*address)
    async with stream:
        client = h11.Connection(h11.CLIENT)
        request_headers = [(b"host", b"bridge"), (b"content-type", content_type), (b"transfer-encoding", b"chunked")]
        request = h11.Request(method=method, target=path, headers=request_headers + (headers or []))
        await stream.send_all(client.send(request))
        for chunk in chunks:
            await stream.send_all(client.send(h11.Data(data=chunk)))
        await stream.send_all(client.send(h11.EndOfMessage()))
        return await read_answer(stream, client)


def text_chunks(body: bytes, size: int) -> list[bytes]:
    """base64 of each ``size``-byte piece on its own: padding mid-stream, as clients may."""
    return [base64.b64encode(body[i : i + size]) for i in range(0, len(body), size)]


# --- a scripted HTTP/2 upstream -------------------------------------------------------

Script = Callable[[h2.connection.H2Connection, int], Any]


@dataclass
class ScriptedUpstream:
    port: int
    requests: list[list[tuple[bytes, bytes]]]


@asynccontextmanager
async def scripted_upstream(script: Script) -> AsyncIterator[ScriptedUpstream]:
    """An HTTP/2 server that answers each request's headers with ``script(conn, stream_id)``;
    a script returning "close" drops the connection."""
    requests: list[list[tuple[bytes, bytes]]] = []

    async def serve(stream: trio.SocketStream) -> None:
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding=None))
        conn.initiate_connection()
        await stream.send_all(conn.data_to_send())
        while True:
            data = await stream.receive_some(65536)
            if not data:
                return
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.RequestReceived):
                    requests.append(list(event.headers))
                    if script(conn, event.stream_id) == "close":
                        await stream.aclose()
                        return
            await stream.send_all(conn.data_to_send())

    async with trio.open_nursery() as nursery:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        nursery.start_soon(trio.serve_listeners, serve, listeners)
        yield ScriptedUpstream(listeners[0].socket.getsockname()[1], requests)
        nursery.cancel_scope.cancel()
