"""Native gRPC toward the target: one client H2Connection per upstream connection, calls
multiplexed on it as HTTP/2 streams.

The connection comes from an injected ``open_upstream() -> trio.abc.Stream`` (a direct
TCP connection, or a tunnel through the node's CONNECT port). Inbound DATA is
acknowledged only when the bridge has passed it on (``UpstreamCall.acknowledge``), so a
slow grpc-web client holds at most a window's worth per call.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
import trio

from grpc_bridge.h2_goaway import GoAway, GoAwaySplitter, OverlongFrame
from grpc_bridge.web_codec import Headers
from grpc_bridge.web_errors import UpstreamUnavailable
from proxy.identity.errors import KeynodeError

OpenUpstream = Callable[[], Awaitable[trio.abc.Stream]]

STREAM_WINDOW = 1 << 20
CONNECTION_WINDOW = 16 << 20
READ_SIZE = 65536
MAX_INBOUND_FRAME = 1 << 20


@dataclass
class ResponseHeaders:
    headers: Headers
    ended: bool  # a trailers-only answer


@dataclass
class ResponseData:
    data: bytes
    flow_controlled: int


@dataclass
class ResponseTrailers:
    trailers: Headers


@dataclass
class StreamReset:
    error_code: int


@dataclass
class ConnectionLost:
    reason: str


@dataclass
class LocalFailure:
    """The bridge ended the call itself (a broken request body)."""

    grpc_status: int
    message: str


ResponseEvent = ResponseHeaders | ResponseData | ResponseTrailers | StreamReset | ConnectionLost | LocalFailure


class UpstreamCall:
    """One gRPC call (an HTTP/2 stream) on an upstream connection."""

    def __init__(self, connection: UpstreamConnection, stream_id: int) -> None:
        self.connection = connection
        self.stream_id = stream_id
        self._send, self._receive = trio.open_memory_channel[ResponseEvent](math.inf)
        self.closed = False

    def deliver(self, event: ResponseEvent) -> None:
        if isinstance(event, (StreamReset, ConnectionLost, ResponseTrailers, LocalFailure)) or (
            isinstance(event, ResponseHeaders) and event.ended
        ):
            self.closed = True
        self._send.send_nowait(event)

    async def next_event(self) -> ResponseEvent:
        return await self._receive.receive()

    async def send_data(self, data: bytes, end_stream: bool = False) -> None:
        await self.connection.send_data(self.stream_id, data, end_stream)

    def has_pending(self) -> bool:
        """Whether more of the answer is already here (so writes can wait to be joined)."""
        return self._receive.statistics().current_buffer_used > 0

    async def acknowledge(self, event: ResponseData) -> None:
        await self.connection.acknowledge(self.stream_id, event.flow_controlled)

    async def cancel(self) -> None:
        """Reset the stream (CANCEL) unless both sides ended it: an answer that ended
        early (an error, a refused body) leaves our half open, and an open stream
        would hold a server worker waiting for the rest of the request."""
        self.closed = True
        await self.connection.reset(self.stream_id)


class UpstreamConnection:
    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        # Outbound headers are built by the bridge from requests h11/h2 already validated.
        config = h2.config.H2Configuration(
            client_side=True, header_encoding=None, validate_outbound_headers=False, normalize_outbound_headers=False
        )
        self.h2 = h2.connection.H2Connection(config)
        self.calls: dict[int, UpstreamCall] = {}
        self.dead: str | None = None
        self.draining = False  # a GOAWAY came: calls in flight finish, new ones go elsewhere
        # GOAWAY handled outside h2, and frame headers checked on arrival (h2 would buffer
        # a whole announced frame, up to 16 MiB, before refusing it).
        self.splitter = GoAwaySplitter(max_frame_size=MAX_INBOUND_FRAME)
        self._send_lock = trio.Lock()
        self._changed = trio.Event()  # windows opened, streams closed, or the connection died

    @property
    def usable(self) -> bool:
        return self.dead is None and not self.draining

    async def start(self) -> None:
        self.h2.local_settings = h2.settings.Settings(
            client=True,
            initial_values={
                h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: STREAM_WINDOW,
                h2.settings.SettingCodes.MAX_FRAME_SIZE: MAX_INBOUND_FRAME,  # fewer, larger DATA frames
            },
        )
        self.h2.initiate_connection()
        # Settings given up front are not "changes" h2 applies on the ACK: set the limit it checks.
        self.h2.max_inbound_frame_size = MAX_INBOUND_FRAME
        self.h2.increment_flow_control_window(CONNECTION_WINDOW - 65535)
        await self.flush()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def flush(self) -> None:
        # Taken before the lock: trio's Lock is FIFO, so writes keep the order taken.
        data = self.h2.data_to_send()
        if not data:
            return
        async with self._send_lock:
            if self.dead is None:
                try:
                    await self.stream.send_all(data)
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as error:
                    self._die(f"upstream connection broke: {error}")

    async def open_call(self, headers: Headers) -> UpstreamCall:
        while True:
            if not self.usable:
                raise UpstreamUnavailable(self.dead or "upstream sent GOAWAY")
            if self.h2.open_outbound_streams < self.h2.remote_settings.max_concurrent_streams:
                break
            await self._changed.wait()
        stream_id = self.h2.get_next_available_stream_id()
        call = UpstreamCall(self, stream_id)
        self.calls[stream_id] = call
        self.h2.send_headers(stream_id, headers)  # goes out with the first DATA (one write per call)
        return call

    async def send_data(self, stream_id: int, data: bytes, end_stream: bool) -> None:
        view = memoryview(data)
        while True:
            if self.dead is not None:
                raise UpstreamUnavailable(self.dead)
            try:
                window = min(self.h2.local_flow_control_window(stream_id), self.h2.max_outbound_frame_size)
                if window <= 0 and view:
                    changed = self._changed  # taken before the flush, which may let the update in
                    await self.flush()
                    await changed.wait()
                    continue
                chunk, view = view[:window], view[window:]
                self.h2.send_data(stream_id, bytes(chunk), end_stream=end_stream and not view)
            except h2.exceptions.StreamClosedError:
                return  # the server answered and closed: the answer says how the call ended
            if not view:
                break
        await self.flush()

    async def acknowledge(self, stream_id: int, size: int) -> None:
        if self.dead is not None or not size:
            return
        try:
            self.h2.acknowledge_received_data(size, stream_id)
        except h2.exceptions.StreamClosedError:
            return
        await self.flush()

    async def reset(self, stream_id: int) -> None:
        stream = self.h2.streams.get(stream_id)
        if self.dead is not None or stream is None or stream.closed:
            self.calls.pop(stream_id, None)
            return
        try:
            self.h2.reset_stream(stream_id, h2.errors.ErrorCodes.CANCEL)
        except h2.exceptions.StreamClosedError:
            return
        self.calls.pop(stream_id, None)
        await self.flush()

    def _die(self, reason: str) -> None:
        if self.dead is None:
            self.dead = reason
            for call in self.calls.values():
                if not call.closed:
                    call.deliver(ConnectionLost(reason))
            self.calls.clear()
            self._notify()

    async def run(self) -> None:
        """Read and dispatch until the connection ends; always tells open calls."""
        try:
            while self.dead is None:
                try:
                    data = await self.stream.receive_some(READ_SIZE)
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as error:
                    self._die(f"upstream connection broke: {error}")
                    break
                if not data:
                    self._die("upstream closed the connection")
                    break
                try:
                    for piece in self.splitter.split(data):
                        if isinstance(piece, GoAway):
                            self._on_goaway(piece.last_stream_id)
                            continue
                        for event in self.h2.receive_data(piece):
                            self._dispatch(event)
                except (h2.exceptions.ProtocolError, OverlongFrame) as error:
                    self._die(f"upstream HTTP/2 protocol error: {error}")
                    break
                await self.flush()
                if self.draining and not self.calls:
                    break  # every call the GOAWAY spared has finished
        finally:
            self._die("upstream connection closed")
            with trio.CancelScope(shield=True):
                await self.stream.aclose()

    def _dispatch(self, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.ResponseReceived):
            self._to_call(event.stream_id, ResponseHeaders(list(event.headers), event.stream_ended is not None))
        elif isinstance(event, h2.events.DataReceived):
            call = self.calls.get(event.stream_id)
            if call is None:  # a call we cancelled: give the window back at once
                if event.flow_controlled_length:
                    try:
                        self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                    except h2.exceptions.StreamClosedError:
                        pass
                return
            call.deliver(ResponseData(event.data, event.flow_controlled_length))
        elif isinstance(event, h2.events.TrailersReceived):
            self._to_call(event.stream_id, ResponseTrailers(list(event.headers)))
        elif isinstance(event, h2.events.StreamReset):
            self._to_call(event.stream_id, StreamReset(int(event.error_code)))
        elif isinstance(event, h2.events.StreamEnded):
            call = self.calls.pop(event.stream_id, None)
            if call is not None and not call.closed:  # ended without trailers: not a gRPC answer
                call.deliver(ResponseTrailers([]))
            self._notify()
        elif isinstance(event, h2.events.ConnectionTerminated):  # only a malformed GOAWAY gets here
            self._die("upstream sent a malformed GOAWAY")
        elif isinstance(event, (h2.events.WindowUpdated, h2.events.RemoteSettingsChanged)):
            self._notify()

    def _on_goaway(self, last_stream_id: int) -> None:
        """A GOAWAY, kept from h2 (which would close the whole connection at once): no new
        calls here; calls above last_stream_id were not seen by the server and end; the
        rest finish (gRPC's graceful shutdown)."""
        self.draining = True
        for stream_id, call in list(self.calls.items()):
            if stream_id > last_stream_id:
                self.calls.pop(stream_id)
                if not call.closed:
                    call.deliver(ConnectionLost("upstream sent GOAWAY before it saw the call"))
        self._notify()

    def _to_call(self, stream_id: int, event: ResponseEvent) -> None:
        call = self.calls.get(stream_id)
        if call is None:
            return
        call.deliver(event)
        if call.closed:
            self.calls.pop(stream_id, None)
            self._notify()

class GrpcUpstream:
    """Keeps one live upstream connection (opened on first use, replaced when it dies)
    and starts calls on it."""

    def __init__(self, open_upstream: OpenUpstream, nursery: trio.Nursery) -> None:
        self.open_upstream = open_upstream
        self.nursery = nursery
        self.connection: UpstreamConnection | None = None
        self._opening = trio.Lock()
        self.connections_opened = 0

    async def _live_connection(self) -> UpstreamConnection:
        connection = self.connection
        if connection is not None and connection.usable:
            return connection  # the usual case, without a checkpoint
        async with self._opening:
            connection = self.connection
            if connection is not None and connection.usable:
                return connection
            try:
                stream = await self.open_upstream()
            except (OSError, trio.BrokenResourceError, KeynodeError) as error:
                raise UpstreamUnavailable(f"cannot reach the gRPC target: {error}") from None
            connection = UpstreamConnection(stream)
            await connection.start()
            self.nursery.start_soon(connection.run)
            self.connection = connection
            self.connections_opened += 1
            return connection

    async def open_call(self, headers: Headers) -> UpstreamCall:
        connection = await self._live_connection()
        return await connection.open_call(headers)
