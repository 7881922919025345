"""The grpc-web bridge's HTTP/2 side (h2, cleartext with prior knowledge): one task per
request stream; request DATA is acknowledged only as the call takes it, response DATA
waits for the client's flow-control window."""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
import trio

from grpc_bridge.h2_goaway import GoAway, GoAwaySplitter, OverlongFrame
from grpc_bridge.web_call import Headers, WebRequest
from grpc_bridge.web_errors import ClientGone

H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
READ_SIZE = 65536
MAX_CONCURRENT_STREAMS = 128

Handler = Callable[[WebRequest, "Http2Downstream"], Awaitable[None]]


class Http2Downstream:
    """One request stream of a client HTTP/2 connection."""

    def __init__(self, connection: _ServerConnection, stream_id: int) -> None:
        self.connection = connection
        self.stream_id = stream_id
        self._send, self._receive = trio.open_memory_channel[tuple[bytes, int]](math.inf)
        self.body_done = False
        self.reset = False

    def feed(self, data: bytes, flow_controlled: int) -> None:
        self._send.send_nowait((data, flow_controlled))

    def end(self) -> None:
        self._send.send_nowait((b"", 0))

    async def receive_body(self) -> bytes:
        while not self.body_done:
            data, flow_controlled = await self._receive.receive()
            if self.reset:
                raise ClientGone("the client reset the stream")
            if not data and not flow_controlled:
                self.body_done = True
                break
            await self.connection.acknowledge(self.stream_id, flow_controlled)
            if data:
                self._look_ahead()
                return data
        return b""

    def _look_ahead(self) -> None:
        """Is the end already queued behind this piece? Then the piece ends the body."""
        if self._receive.statistics().current_buffer_used == 1 and not self.reset:
            data, flow_controlled = self._receive.receive_nowait()
            if data or flow_controlled:  # not the end: put it back in front (it was alone)
                self._send.send_nowait((data, flow_controlled))
            else:
                self.body_done = True

    async def send_head(self, status: int, headers: Headers) -> None:
        await self.connection.send_headers(self.stream_id, [(b":status", str(status).encode()), *headers])

    async def send_body(self, data: bytes) -> None:
        await self.connection.send_data(self.stream_id, data)

    async def flush(self) -> None:
        await self.connection.flush()

    async def finish(self) -> None:
        await self.connection.end_stream(self.stream_id)


class _ServerConnection:
    def __init__(self, stream: trio.abc.Stream, handle: Handler) -> None:
        self.stream = stream
        self.handle = handle
        config = h2.config.H2Configuration(client_side=False, header_encoding=None, validate_inbound_headers=True)
        self.h2 = h2.connection.H2Connection(config)
        self.requests: dict[int, Http2Downstream] = {}
        self._send_lock = trio.Lock()
        self._changed = trio.Event()
        self.closed = False

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def flush(self) -> None:
        data = self.h2.data_to_send()  # before the lock: trio's Lock is FIFO, order is kept
        if not data:
            return
        async with self._send_lock:
            if not self.closed:
                try:
                    await self.stream.send_all(data)
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as error:
                    self.closed = True
                    raise ClientGone(f"client connection broke: {error}") from None

    def _check(self, stream_id: int) -> Http2Downstream:
        request = self.requests.get(stream_id)
        if self.closed or request is None or request.reset:
            raise ClientGone("the client's stream or connection is gone")
        return request

    async def acknowledge(self, stream_id: int, size: int) -> None:
        if size and not self.closed:
            try:
                self.h2.acknowledge_received_data(size, stream_id)
            except h2.exceptions.StreamClosedError:
                return
            await self.flush()

    async def send_headers(self, stream_id: int, headers: Headers) -> None:
        self._check(stream_id)
        self.h2.send_headers(stream_id, headers)

    async def send_data(self, stream_id: int, data: bytes) -> None:
        view = memoryview(data)
        while view:
            self._check(stream_id)
            window = min(self.h2.local_flow_control_window(stream_id), self.h2.max_outbound_frame_size)
            if window <= 0:
                changed = self._changed  # taken before the flush, which may let the update in
                await self.flush()  # the client opens its window only for what it received
                await changed.wait()
                continue
            chunk, view = view[:window], view[window:]
            self.h2.send_data(stream_id, bytes(chunk))

    async def end_stream(self, stream_id: int) -> None:
        self._check(stream_id)
        self.h2.end_stream(stream_id)
        await self.flush()

    async def _serve_request(self, request: WebRequest, downstream: Http2Downstream) -> None:
        try:
            await self.handle(request, downstream)
            if not downstream.body_done and not downstream.reset and not self.closed:
                # Answered without reading the whole body: the rest is not wanted.
                self.h2.reset_stream(downstream.stream_id, h2.errors.ErrorCodes.NO_ERROR)
                await self.flush()
        except (ClientGone, h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            pass
        finally:
            self.requests.pop(downstream.stream_id, None)

    def _start_request(self, nursery: trio.Nursery, event: h2.events.RequestReceived) -> None:
        headers = list(event.headers)
        pseudo = {name: value for name, value in headers if name.startswith(b":")}
        regular = [(name, value) for name, value in headers if not name.startswith(b":")]
        request = WebRequest(pseudo.get(b":method", b""), pseudo.get(b":path", b"/"), pseudo.get(b":authority", b""), regular)
        downstream = Http2Downstream(self, event.stream_id)
        self.requests[event.stream_id] = downstream
        if event.stream_ended is not None:
            downstream.end()
        nursery.start_soon(self._serve_request, request, downstream)

    def _dispatch(self, nursery: trio.Nursery, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.RequestReceived):
            self._start_request(nursery, event)
            return
        stream_id = getattr(event, "stream_id", None)
        request = self.requests.get(stream_id) if stream_id is not None else None
        if isinstance(event, h2.events.DataReceived):
            if request is None:
                try:
                    self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                except h2.exceptions.StreamClosedError:
                    pass
            else:
                request.feed(event.data, event.flow_controlled_length)
        elif isinstance(event, h2.events.StreamEnded) and request is not None:
            request.end()
        elif isinstance(event, h2.events.StreamReset) and request is not None:
            request.reset = True
            request.end()
            self._notify()
        elif isinstance(event, h2.events.ConnectionTerminated):
            self.closed = True
            for pending in self.requests.values():
                pending.reset = True
                pending.end()
            self._notify()
        elif isinstance(event, (h2.events.WindowUpdated, h2.events.RemoteSettingsChanged)):
            self._notify()

    async def run(self, prefix: bytes) -> None:
        self.h2.update_settings({h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: MAX_CONCURRENT_STREAMS})
        self.h2.initiate_connection()
        await self.flush()
        async with trio.open_nursery() as nursery:
            try:
                data = prefix
                # GOAWAY kept from h2 (it would end the streams still answering at once), and
                # frame headers checked on arrival (h2 buffers a whole announced frame first).
                splitter = GoAwaySplitter(preface=len(H2_PREFACE), max_frame_size=self.h2.max_inbound_frame_size)
                client_leaving = False
                while not self.closed:
                    try:
                        for piece in splitter.split(data):
                            if isinstance(piece, GoAway):
                                client_leaving = True
                                continue
                            for event in self.h2.receive_data(piece):
                                self._dispatch(nursery, event)
                    except OverlongFrame:
                        self.h2.close_connection(error_code=h2.errors.ErrorCodes.FRAME_SIZE_ERROR)
                        await self.flush()
                        break
                    except h2.exceptions.ProtocolError:
                        await self.flush()  # h2 queued a GOAWAY
                        break
                    await self.flush()
                    if client_leaving and not self.requests:
                        break
                    try:
                        data = bytes(await self.stream.receive_some(READ_SIZE))
                    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                        break
                    if not data:
                        break
            finally:
                self.closed = True
                for pending in self.requests.values():
                    pending.reset = True
                    pending.end()
                self._notify()
                nursery.cancel_scope.cancel()


async def serve_http2(stream: trio.abc.Stream, prefix: bytes, handle: Handler) -> None:
    await _ServerConnection(stream, handle).run(prefix)
