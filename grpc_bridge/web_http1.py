"""The grpc-web bridge's HTTP/1.1 side (h11): keep-alive, chunked or sized request
bodies, chunked responses so messages go out as they arrive."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import h11
import trio

from grpc_bridge.web_call import Headers, WebRequest
from grpc_bridge.web_errors import ClientGone

READ_SIZE = 65536
MAX_HEAD = 64 * 1024  # request line + headers
MAX_DRAIN = 1 << 20
DRAIN_TIMEOUT = 2.0
LINGER_TIMEOUT = 1.0
FLUSH_SIZE = 64 * 1024
HEAD_TIMEOUT = 120.0  # for the next request's head, idle keep-alive included

Handler = Callable[[WebRequest, "Http1Downstream"], Awaitable[None]]


class Http1Downstream:
    """One keep-alive HTTP/1.1 connection, seen as the current call's Downstream."""

    def __init__(self, stream: trio.abc.Stream, prefix: bytes) -> None:
        self.stream = stream
        self.h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
        self.h11.receive_data(prefix)
        self.body_done = False
        self._peeked: object = None
        self._out = bytearray()

    async def next_event(self) -> object:
        while True:
            try:
                event = self.h11.next_event()
            except h11.RemoteProtocolError as error:
                raise ClientGone(f"HTTP/1.1 protocol error from the client: {error}") from None
            if event is not h11.NEED_DATA:
                return event
            try:
                data = await self.stream.receive_some(READ_SIZE)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as error:
                raise ClientGone(f"client connection broke: {error}") from None
            self.h11.receive_data(bytes(data))

    async def receive_body(self) -> bytes:
        if self.h11.they_are_waiting_for_100_continue:  # curl and others ask before a large body
            await self._send(h11.InformationalResponse(status_code=100, headers=[]))
            await self.flush()
        while not self.body_done:
            event, self._peeked = self._peeked or await self.next_event(), None
            if isinstance(event, h11.Data):
                if event.data:
                    self._look_ahead()
                    return bytes(event.data)
            elif isinstance(event, h11.EndOfMessage):
                self.body_done = True
            else:
                raise ClientGone("the client's connection ended inside a request body")
        return b""

    def _look_ahead(self) -> None:
        """Take the next event if it is already buffered, so the body's end is known
        with its last piece."""
        try:
            event = self.h11.next_event()
        except h11.RemoteProtocolError:
            return  # h11 stays in its error state: the next read raises it again
        if isinstance(event, h11.EndOfMessage):
            self.body_done = True
        elif event is not h11.NEED_DATA:
            self._peeked = event

    async def drain_body(self) -> None:
        """Read and drop what is left of a request answered early (a gRPC error can
        come back before the client's last chunk), so the connection stays usable."""
        dropped = 0
        with trio.move_on_after(DRAIN_TIMEOUT):
            while dropped <= MAX_DRAIN:
                try:
                    data = await self.receive_body()
                except ClientGone:
                    return
                if not data:
                    return
                dropped += len(data)

    async def _send(self, event: h11.Event) -> None:
        try:
            self._out += self.h11.send(event) or b""
        except h11.LocalProtocolError as error:
            raise ClientGone(f"cannot answer on this connection: {error}") from None
        if len(self._out) >= FLUSH_SIZE:
            await self.flush()

    async def flush(self) -> None:
        if not self._out:
            return
        data, self._out = bytes(self._out), bytearray()
        try:
            await self.stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as error:
            raise ClientGone(f"client connection broke: {error}") from None

    async def send_head(self, status: int, headers: Headers) -> None:
        await self._send(h11.Response(status_code=status, headers=headers))

    async def send_body(self, data: bytes) -> None:
        await self._send(h11.Data(data=data))

    async def finish(self) -> None:
        await self._send(h11.EndOfMessage())
        await self.flush()

    async def refuse_garbage(self) -> None:
        """A 400 for a request h11 could not parse, if the connection can still carry one."""
        if self.h11.our_state is h11.SEND_RESPONSE or self.h11.our_state is h11.IDLE:
            try:
                await self._send(h11.Response(status_code=400, headers=[(b"content-length", b"0"), (b"connection", b"close")]))
                await self.finish()
            except ClientGone:
                return
        await self.linger()

    async def linger(self) -> None:
        """Half-close and drop what the client still sends for a moment: closing with
        unread bytes makes the kernel reset the connection, and the client could lose
        the answer."""
        if isinstance(self.stream, trio.SocketStream):
            with trio.move_on_after(LINGER_TIMEOUT):
                try:
                    await self.stream.send_eof()
                    dropped = 0
                    while dropped < MAX_DRAIN:
                        data = await self.stream.receive_some(READ_SIZE)
                        if not data:
                            break
                        dropped += len(data)
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                    pass


async def serve_http1(stream: trio.abc.Stream, prefix: bytes, handle: Handler) -> None:
    """Answer requests on one connection until it closes or cannot be reused."""
    downstream = Http1Downstream(stream, prefix)
    while True:
        event: object = None
        try:
            with trio.move_on_after(HEAD_TIMEOUT):  # an idle or trickling client does not hold a connection forever
                event = await downstream.next_event()
        except ClientGone:
            await downstream.refuse_garbage()
            return
        if not isinstance(event, h11.Request):
            return  # ConnectionClosed, or nothing more to read
        authority = b""
        headers = []
        for name, value in event.headers:
            if name == b"host":
                authority = value
            headers.append((name, value))
        request = WebRequest(event.method, event.target, authority, headers)
        downstream.body_done = False
        downstream._peeked = None
        try:
            await handle(request, downstream)
        except ClientGone:
            return
        if downstream.h11.our_state is h11.DONE and downstream.h11.their_state is not h11.DONE:
            await downstream.drain_body()
        # A body still unread (too big, too slow) or an unfinished answer ends the connection.
        if downstream.h11.our_state is not h11.DONE or downstream.h11.their_state is not h11.DONE:
            if downstream.h11.our_state is h11.DONE:
                await downstream.linger()
            return
        try:
            downstream.h11.start_next_cycle()
        except h11.LocalProtocolError:
            return
