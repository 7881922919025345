"""Sans-IO HTTP/2 relay that re-originates every request with added headers.

Two h2 connections, because HPACK state belongs to one connection and cannot be
spliced: ``tunnel`` (we are the server; the remote caller's HTTP/2 arrives here)
and ``server`` (we are the client of the local, unmodified gRPC server). Bytes go
in with ``receive_from_tunnel`` / ``receive_from_server``; bytes to write come out
of ``take_for_tunnel`` / ``take_for_server``. No I/O, no clock.

What crosses, and how:
- Requests: every header whose name starts with ``x-keynode-`` (any case, any
  suffix such as ``-bin``, every duplicate) is removed from request headers and
  request trailers, then the ``injected`` headers are appended to the headers.
  Responses pass unchanged (they come from the local server, which is trusted).
- DATA, with flow control carried across: inbound DATA is acknowledged to its
  sender only when it has been handed to the other connection, which itself sends
  only what the receiver's window allows and only while less than
  ``outbound_high_water`` bytes wait to be written. So the bytes held here are
  bounded by the window we advertise plus the high-water mark, per direction, and
  a slow receiver slows the sender end to end (``buffered_bytes`` counts them).
- Trailers go strictly after the stream's buffered DATA; END_STREAM likewise.
- RST_STREAM both ways, with its error code; a server's RST_STREAM(NO_ERROR)
  after a complete response is sent after that response (RFC 9113 8.1).
- GOAWAY both ways, handled here rather than by h2 (h2_goaway.py: h2 would close
  the whole connection at the first one): a server's GOAWAY reaches the caller in
  its stream numbers, the streams past the server's last are refused
  (REFUSED_STREAM) and so are new ones, the spared ones finish; a graceful
  shutdown's first GOAWAY (last stream 2^31-1) passes as it is. The caller's
  GOAWAY is passed to the server, and its later streams are refused.
- PING and SETTINGS are per connection (RFC 9113 6.5, 6.7): each connection
  answers its own (h2 does), which is also what the flow-control windows they
  measure are. Of the server's settings, MAX_CONCURRENT_STREAMS and
  MAX_HEADER_LIST_SIZE are carried to the caller (capped by ours), so the caller
  does not open streams the server would refuse.

Anything the tunnel side does wrong (not HTTP/2, a protocol or flow-control
violation, a frame or a header list over the limits, more than
``max_resets_in_a_row`` streams reset with none completing: "rapid reset") raises
``TunnelProtocolError`` after queueing a GOAWAY for it and one for the server;
the driver writes what is queued and closes. The server's faults likewise raise
``ServerProtocolError``.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
import hyperframe.frame
from h2.errors import ErrorCodes
from h2.settings import SettingCodes

from grpc_bridge.h2_errors import ServerProtocolError, TunnelProtocolError
from grpc_bridge.h2_goaway import CLIENT_PREFACE, GoAway, GoAwaySplitter, OverlongFrame, goaway_frame

Header = tuple[bytes, bytes]

KEYNODE_HEADER_PREFIX = b"x-keynode-"

DEFAULT_STREAM_WINDOW = 1 << 20
DEFAULT_CONNECTION_WINDOW = 4 << 20
DEFAULT_OUTBOUND_HIGH_WATER = 256 << 10
DEFAULT_MAX_CONCURRENT_STREAMS = 1000
DEFAULT_MAX_HEADER_LIST_SIZE = 64 << 10
DEFAULT_MAX_RESETS_IN_A_ROW = 1000
H2_DEFAULT_WINDOW = 65535
MAX_INBOUND_FRAME_SIZE = 1 << 20
MAX_STREAM_ID = 2**31 - 1


def _short_data_repr(data: bytes | None) -> str:
    """hyperframe's text for a frame's payload in a repr, from its first 11 bytes.

    h2 (4.x) builds ``repr(frame)`` of every frame it receives for a trace log
    line, whether or not anything logs, and hyperframe's repr hexlifies the whole
    payload before keeping 20 hex digits of it: a full copy of every DATA frame,
    about a third of the relay's CPU per streamed MiB. Same text, bounded work."""
    if not data:
        return "None"
    text = bytes(data[:11]).hex()
    return "<hex:" + (text[:20] + "..." if len(text) > 20 else text) + ">"


hyperframe.frame._raw_data_repr = _short_data_repr


def strip_keynode_headers(headers: Iterable[tuple[bytes, bytes]]) -> list[Header]:
    """``headers`` without any whose name starts with ``x-keynode-``, in any case."""
    return [(bytes(name), bytes(value)) for name, value in headers if not bytes(name).lower().startswith(KEYNODE_HEADER_PREFIX)]


@dataclass
class _Outbox:
    """What waits to be sent on one stream of one connection, in order:
    DATA chunks, then trailers or END_STREAM, then maybe a RST_STREAM."""

    source: _Side
    source_stream: int
    chunks: deque[bytes] = field(default_factory=deque)
    size: int = 0
    trailers: list[Header] | None = None
    end: bool = False
    reset_after: int | None = None


@dataclass
class _Pair:
    tunnel_stream: int
    server_stream: int
    request_finishing: bool = False  # trailers or END_STREAM queued toward the server
    response_finishing: bool = False  # ... toward the caller
    request_done: bool = False  # ... and sent
    response_done: bool = False


class _Side:
    """One H2Connection and the bytes it produced that are not yet taken."""

    def __init__(self, name: str, connection: h2.connection.H2Connection, splitter: GoAwaySplitter) -> None:
        self.name = name
        self.connection = connection
        self.splitter = splitter
        self.out = bytearray()
        self.outboxes: dict[int, _Outbox] = {}

    def collect(self) -> None:
        self.out += self.connection.data_to_send()

    def send_goaway(self, last_stream_id: int, error_code: int) -> None:
        """GOAWAY, in order after what h2 queued, without closing h2's state (h2_goaway.py)."""
        self.collect()
        self.out += goaway_frame(last_stream_id, error_code)


class H2IdentityRelay:
    """One relayed HTTP/2 connection (see the module docstring)."""

    def __init__(
        self,
        injected: Sequence[Header],
        *,
        stream_window: int = DEFAULT_STREAM_WINDOW,
        connection_window: int = DEFAULT_CONNECTION_WINDOW,
        outbound_high_water: int = DEFAULT_OUTBOUND_HIGH_WATER,
        max_concurrent_streams: int = DEFAULT_MAX_CONCURRENT_STREAMS,
        max_header_list_size: int = DEFAULT_MAX_HEADER_LIST_SIZE,
        max_resets_in_a_row: int = DEFAULT_MAX_RESETS_IN_A_ROW,
    ) -> None:
        for name, _ in injected:
            if not name.startswith(KEYNODE_HEADER_PREFIX) or name != name.lower():
                raise ValueError(f"an injected header must be a lower-case x-keynode-* name: {name!r}")
        self.injected = list(injected)
        self.stream_window = stream_window
        self.connection_window = connection_window
        self.outbound_high_water = outbound_high_water
        self.max_concurrent_streams = max_concurrent_streams
        self.max_header_list_size = max_header_list_size
        self.max_resets_in_a_row = max_resets_in_a_row
        self._resets_in_a_row = 0  # streams the caller reset before their end, since one completed
        # Headers from the caller are checked (h2's inbound validation: it is untrusted);
        # what we send on is what a checked peer or the local server sent, so the
        # outbound checks, and the inbound ones of the trusted server, are skipped:
        # they are a large part of h2's cost per call.
        tunnel = h2.connection.H2Connection(
            h2.config.H2Configuration(
                client_side=False, header_encoding=None, validate_outbound_headers=False, normalize_outbound_headers=False
            )
        )
        server = h2.connection.H2Connection(
            h2.config.H2Configuration(
                client_side=True,
                header_encoding=None,
                validate_outbound_headers=False,
                normalize_outbound_headers=False,
                validate_inbound_headers=False,
                normalize_inbound_headers=False,
            )
        )
        self.tunnel = _Side("tunnel", tunnel, GoAwaySplitter(preface=len(CLIENT_PREFACE), max_frame_size=MAX_INBOUND_FRAME_SIZE))
        self.server = _Side("server", server, GoAwaySplitter(max_frame_size=MAX_INBOUND_FRAME_SIZE))
        self._pairs_by_tunnel: dict[int, _Pair] = {}
        self._pairs_by_server: dict[int, _Pair] = {}
        self._refusing_new = False  # the server sent GOAWAY
        self.ended = False  # a side is gone or broke the protocol: nothing more is relayed
        self.requests_relayed = 0
        self._held_data = 0  # DATA bytes in outboxes, both directions
        self.peak_buffered_bytes = 0

    # --- the driver's interface ----------------------------------------------------------

    def start(self) -> None:
        """Queue both connection prefaces with our settings and windows."""
        # Set as initial values (not updates), so the first SETTINGS frame carries them.
        common = {
            SettingCodes.INITIAL_WINDOW_SIZE: self.stream_window,
            SettingCodes.MAX_HEADER_LIST_SIZE: self.max_header_list_size,
            # Larger DATA frames from the peers: fewer frames, and per-frame work is most of the cost.
            SettingCodes.MAX_FRAME_SIZE: MAX_INBOUND_FRAME_SIZE,
        }
        self.tunnel.connection.local_settings = h2.settings.Settings(
            client=False, initial_values={**common, SettingCodes.MAX_CONCURRENT_STREAMS: self.max_concurrent_streams}
        )
        self.server.connection.local_settings = h2.settings.Settings(
            client=True, initial_values={**common, SettingCodes.ENABLE_PUSH: 0}
        )
        for side in (self.tunnel, self.server):
            # h2 read these from the settings replaced above: ours apply from the start.
            side.connection.max_inbound_frame_size = MAX_INBOUND_FRAME_SIZE
            side.connection.decoder.max_header_list_size = self.max_header_list_size
            side.connection.initiate_connection()
            if self.connection_window > H2_DEFAULT_WINDOW:
                side.connection.increment_flow_control_window(self.connection_window - H2_DEFAULT_WINDOW)
            side.collect()

    def receive_from_tunnel(self, data: bytes | bytearray) -> None:
        if self.ended:
            return
        try:
            pieces = self.tunnel.splitter.split(data)
        except OverlongFrame as error:
            self._end_overlong(self.tunnel)
            raise TunnelProtocolError(f"the caller broke HTTP/2: {error}") from error
        for piece in pieces:
            if self.ended:
                return
            if isinstance(piece, GoAway):
                # The caller is leaving: the open streams may finish, no new one reaches the server.
                self._refusing_new = True
                self.server.send_goaway(0, piece.error_code)
                continue
            try:
                events = self.tunnel.connection.receive_data(piece)
            except h2.exceptions.ProtocolError as error:
                self._end_broken(self.tunnel)
                raise TunnelProtocolError(f"the caller broke HTTP/2: {error}") from error
            for event in events:
                self._on_tunnel_event(event)
        self._collect()

    def receive_from_server(self, data: bytes | bytearray) -> None:
        if self.ended:
            return
        try:
            pieces = self.server.splitter.split(data)
        except OverlongFrame as error:
            self._end_overlong(self.server)
            raise ServerProtocolError(f"the server broke HTTP/2: {error}") from error
        for piece in pieces:
            if self.ended:
                return
            if isinstance(piece, GoAway):
                self._server_going_away(piece)
                continue
            try:
                events = self.server.connection.receive_data(piece)
            except h2.exceptions.ProtocolError as error:
                self._end_broken(self.server)
                raise ServerProtocolError(f"the server broke HTTP/2: {error}") from error
            for event in events:
                self._on_server_event(event)
        self._collect()

    def take_for_tunnel(self, limit: int) -> bytes:
        return self._take(self.tunnel, limit)

    def take_for_server(self, limit: int) -> bytes:
        return self._take(self.server, limit)

    def tunnel_closed(self) -> None:
        """The caller's transport ended: tell the server we are gone (GOAWAY)."""
        if not self.ended:
            self.ended = True
            self._drop_all()
            self.server.send_goaway(0, ErrorCodes.NO_ERROR)
            self._collect()

    def server_closed(self) -> None:
        """The server's transport ended: GOAWAY to the caller, an error if streams were open."""
        if not self.ended:
            self.ended = True
            open_streams = bool(self._pairs_by_tunnel)
            last = max(self._pairs_by_tunnel, default=self.tunnel.connection.highest_inbound_stream_id)
            self._drop_all()
            code = ErrorCodes.INTERNAL_ERROR if open_streams else ErrorCodes.NO_ERROR
            self.tunnel.send_goaway(last, code)
            self._collect()

    @property
    def pending_for_tunnel(self) -> int:
        return len(self.tunnel.out)

    @property
    def pending_for_server(self) -> int:
        return len(self.server.out)

    @property
    def buffered_bytes(self) -> int:
        """Every byte held here: DATA waiting for a window plus output not yet taken."""
        return len(self.tunnel.out) + len(self.server.out) + self._held_data

    @property
    def open_streams(self) -> int:
        return len(self._pairs_by_tunnel)

    # --- tunnel -> server ----------------------------------------------------------------

    def _on_tunnel_event(self, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.RequestReceived):
            self._open_request(event.stream_id, event.headers or [], ended=event.stream_ended is not None)
        elif isinstance(event, h2.events.DataReceived):
            pair = self._pairs_by_tunnel.get(event.stream_id)
            target = None if pair is None else pair.server_stream
            self._relay_data(self.tunnel, event.stream_id, self.server, target, event)
        elif isinstance(event, h2.events.TrailersReceived | h2.events.StreamEnded):
            # Trailers end the stream: their StreamEnded that follows finds it finishing.
            pair = self._pairs_by_tunnel.get(event.stream_id)
            if pair is not None and not pair.request_finishing:
                pair.request_finishing = True
                trailers = None
                if isinstance(event, h2.events.TrailersReceived):
                    # Trailers of nothing but x-keynode-* headers end the stream bare.
                    trailers = strip_keynode_headers(event.headers or []) or None
                self._finish(self.server, pair.server_stream, self.tunnel, event.stream_id, trailers)
        elif isinstance(event, h2.events.StreamReset):
            pair = self._pairs_by_tunnel.get(event.stream_id)
            if pair is not None:
                self._reset_pair(pair, to=self.server, code=event.error_code)
                self._count_reset()
        elif isinstance(event, h2.events.WindowUpdated | h2.events.RemoteSettingsChanged):
            self._flush_side(self.tunnel, None if isinstance(event, h2.events.RemoteSettingsChanged) else event.stream_id)

    def _count_reset(self) -> None:
        """Opening and resetting streams costs the server a stream each and the
        caller next to nothing (the "rapid reset" attack, CVE-2023-44487): a caller
        that resets too many in a row, none completing between, is sent away."""
        self._resets_in_a_row += 1
        if self._resets_in_a_row > self.max_resets_in_a_row:
            self.ended = True
            self._drop_all()
            self.tunnel.send_goaway(self.tunnel.connection.highest_inbound_stream_id, ErrorCodes.ENHANCE_YOUR_CALM)
            self.server.send_goaway(0, ErrorCodes.NO_ERROR)
            self._collect()
            raise TunnelProtocolError(f"the caller reset {self._resets_in_a_row} streams in a row")

    def _open_request(self, tunnel_stream: int, headers: list[tuple[bytes, bytes]], *, ended: bool) -> None:
        if self._refusing_new:
            self.tunnel.connection.reset_stream(tunnel_stream, ErrorCodes.REFUSED_STREAM)
            return
        server_stream = self.server.connection.get_next_available_stream_id()
        try:
            headers = [*strip_keynode_headers(headers), *self.injected]
            self.server.connection.send_headers(server_stream, headers, end_stream=ended)
        except h2.exceptions.ProtocolError:  # too many streams at the server, or it is going away
            self.tunnel.connection.reset_stream(tunnel_stream, ErrorCodes.REFUSED_STREAM)
            return
        # A request that is all headers ends with them (its StreamEnded finds it finishing).
        pair = _Pair(tunnel_stream, server_stream, request_finishing=ended, request_done=ended)
        self._pairs_by_tunnel[tunnel_stream] = pair
        self._pairs_by_server[server_stream] = pair
        self.requests_relayed += 1

    # --- server -> tunnel ----------------------------------------------------------------

    def _on_server_event(self, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.ResponseReceived | h2.events.InformationalResponseReceived):
            pair = self._pairs_by_server.get(event.stream_id)
            if pair is not None:
                ended = isinstance(event, h2.events.ResponseReceived) and event.stream_ended is not None
                self._send_headers_or_reset(pair, list(event.headers or []), ended=ended)
        elif isinstance(event, h2.events.DataReceived):
            pair = self._pairs_by_server.get(event.stream_id)
            target = None if pair is None else pair.tunnel_stream
            self._relay_data(self.server, event.stream_id, self.tunnel, target, event)
        elif isinstance(event, h2.events.TrailersReceived | h2.events.StreamEnded):
            pair = self._pairs_by_server.get(event.stream_id)
            if pair is not None and not pair.response_finishing:
                pair.response_finishing = True
                trailers = list(event.headers or []) if isinstance(event, h2.events.TrailersReceived) else None
                self._finish(self.tunnel, pair.tunnel_stream, self.server, event.stream_id, trailers)
        elif isinstance(event, h2.events.StreamReset):
            pair = self._pairs_by_server.get(event.stream_id)
            if pair is not None:
                outbox = self.tunnel.outboxes.get(pair.tunnel_stream)
                if event.error_code == ErrorCodes.NO_ERROR and outbox is not None and (outbox.end or outbox.trailers):
                    outbox.reset_after = ErrorCodes.NO_ERROR  # the complete response goes first
                    self._drop_outbox(self.server, pair.server_stream)
                else:
                    self._reset_pair(pair, to=self.tunnel, code=event.error_code)
        elif isinstance(event, h2.events.WindowUpdated):
            self._flush_side(self.server, event.stream_id)
        elif isinstance(event, h2.events.RemoteSettingsChanged):
            self._carry_settings(event)
            self._flush_side(self.server, None)

    def _carry_settings(self, event: h2.events.RemoteSettingsChanged) -> None:
        carried: dict[SettingCodes | int, int] = {}
        streams = event.changed_settings.get(SettingCodes.MAX_CONCURRENT_STREAMS)
        if streams is not None:
            carried[SettingCodes.MAX_CONCURRENT_STREAMS] = min(streams.new_value, self.max_concurrent_streams)
        header_list = event.changed_settings.get(SettingCodes.MAX_HEADER_LIST_SIZE)
        if header_list is not None:
            carried[SettingCodes.MAX_HEADER_LIST_SIZE] = min(header_list.new_value, self.max_header_list_size)
        if carried:
            self.tunnel.connection.update_settings(carried)

    def _server_going_away(self, goaway: GoAway) -> None:
        """The server's GOAWAY, in the caller's stream numbers. The first of a graceful
        shutdown (last stream 2^31-1: "soon") passes as it is; otherwise the streams
        past the server's last are refused, and so is every new one."""
        if goaway.last_stream_id == MAX_STREAM_ID:
            self.tunnel.send_goaway(MAX_STREAM_ID, goaway.error_code)
            return
        self._refusing_new = True
        last_tunnel = 0
        for pair in list(self._pairs_by_server.values()):
            if pair.server_stream > goaway.last_stream_id:
                self._reset_pair(pair, to=self.tunnel, code=ErrorCodes.REFUSED_STREAM)
            else:
                last_tunnel = max(last_tunnel, pair.tunnel_stream)
        self.tunnel.send_goaway(last_tunnel, goaway.error_code)

    # --- shared ------------------------------------------------------------------------------

    def _relay_data(
        self, source: _Side, source_stream: int, target: _Side, target_stream: int | None, event: h2.events.DataReceived
    ) -> None:
        data = bytes(event.data or b"")
        flow = event.flow_controlled_length or 0
        padding = flow - len(data)
        if target_stream is None:  # a stream we refused or reset: give the window back
            self._acknowledge(source, source_stream, flow)
            return
        if padding:
            self._acknowledge(source, source_stream, padding)
        outbox = self._outbox(target, target_stream, source, source_stream)
        if data:
            outbox.chunks.append(data)
            outbox.size += len(data)
            self._held_data += len(data)
        self._flush(target, target_stream)

    def _finish(
        self, target: _Side, target_stream: int, source: _Side, source_stream: int, trailers: list[Header] | None
    ) -> None:
        outbox = self._outbox(target, target_stream, source, source_stream)
        if trailers is not None:
            outbox.trailers = trailers
        outbox.end = True
        self._flush(target, target_stream)

    def _outbox(self, target: _Side, target_stream: int, source: _Side, source_stream: int) -> _Outbox:
        outbox = target.outboxes.get(target_stream)
        if outbox is None:
            outbox = target.outboxes[target_stream] = _Outbox(source, source_stream)
        return outbox

    def _flush_side(self, side: _Side, stream: int | None) -> None:
        streams = list(side.outboxes) if not stream else [stream]
        for target_stream in streams:
            if len(side.out) >= self.outbound_high_water:
                break
            self._flush(side, target_stream)

    def _flush(self, side: _Side, stream: int) -> None:
        """Send what the windows and the high-water mark allow of one stream's outbox."""
        outbox = side.outboxes.get(stream)
        if outbox is None:
            return
        connection = side.connection
        try:
            while outbox.chunks and len(side.out) < self.outbound_high_water:
                window = connection.local_flow_control_window(stream)
                size = min(len(outbox.chunks[0]), window, connection.max_outbound_frame_size)
                if size <= 0:
                    break
                chunk = outbox.chunks.popleft()
                if size < len(chunk):
                    outbox.chunks.appendleft(chunk[size:])
                connection.send_data(stream, chunk[:size])
                outbox.size -= size
                self._held_data -= size
                self._acknowledge(outbox.source, outbox.source_stream, size)
                side.collect()
            if outbox.chunks or not outbox.end:
                return
            if outbox.trailers is not None:
                connection.send_headers(stream, outbox.trailers, end_stream=True)
            else:
                connection.end_stream(stream)
            if outbox.reset_after is not None:
                connection.reset_stream(stream, outbox.reset_after)
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            pass  # the receiver closed or reset the stream meanwhile: nothing more goes to it
        self._drop_outbox(side, stream)
        side.collect()
        self._stream_side_done(side, stream)

    def _stream_side_done(self, side: _Side, stream: int) -> None:
        pair = (self._pairs_by_server if side is self.server else self._pairs_by_tunnel).get(stream)
        if pair is None:
            return
        if side is self.server:
            pair.request_done = True
        else:
            pair.response_done = True
        if pair.request_done and pair.response_done:
            self._resets_in_a_row = 0
            self._forget(pair)

    def _drop_outbox(self, side: _Side, stream: int) -> None:
        """Discard a stream's unsent DATA, giving its window back to the sender."""
        outbox = side.outboxes.pop(stream, None)
        if outbox is not None and outbox.size:
            self._held_data -= outbox.size
            self._acknowledge(outbox.source, outbox.source_stream, outbox.size)

    def _reset_pair(self, pair: _Pair, *, to: _Side, code: int) -> None:
        """The stream was reset on one side: reset it on the other (``to``), drop both outboxes."""
        self._drop_outbox(self.server, pair.server_stream)
        self._drop_outbox(self.tunnel, pair.tunnel_stream)
        stream = pair.server_stream if to is self.server else pair.tunnel_stream
        try:
            to.connection.reset_stream(stream, code)
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            pass  # already closed there
        self._forget(pair)

    def _send_headers_or_reset(self, pair: _Pair, headers: list[Header], *, ended: bool) -> None:
        """Response headers to the caller (a trailers-only response ends with them,
        as gRPC errors do); if its stream is gone, cancel the server's."""
        try:
            self.tunnel.connection.send_headers(pair.tunnel_stream, headers, end_stream=ended)
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            self._reset_pair(pair, to=self.server, code=ErrorCodes.CANCEL)
            return
        if ended:
            pair.response_finishing = True
            self.tunnel.collect()
            self._stream_side_done(self.tunnel, pair.tunnel_stream)

    def _forget(self, pair: _Pair) -> None:
        self._pairs_by_tunnel.pop(pair.tunnel_stream, None)
        self._pairs_by_server.pop(pair.server_stream, None)

    def _acknowledge(self, side: _Side, stream: int, size: int) -> None:
        if size > 0 and not self.ended:
            side.connection.acknowledge_received_data(size, stream)
            side.collect()

    def _drop_all(self) -> None:
        for side in (self.tunnel, self.server):
            side.outboxes.clear()
        self._held_data = 0
        self._pairs_by_tunnel.clear()
        self._pairs_by_server.clear()

    def _end_overlong(self, side: _Side) -> None:
        """``side`` announced a frame over the limit: GOAWAY(FRAME_SIZE_ERROR) to it, end."""
        highest = side.connection.highest_inbound_stream_id
        self._end_broken(side)
        side.send_goaway(highest, ErrorCodes.FRAME_SIZE_ERROR)
        self._collect()

    def _end_broken(self, side: _Side) -> None:
        """``side`` broke the protocol (h2 queued its GOAWAY): end the other side too."""
        other = self.server if side is self.tunnel else self.tunnel
        self.ended = True
        self._drop_all()
        code = ErrorCodes.NO_ERROR if other is self.server else ErrorCodes.INTERNAL_ERROR
        other.send_goaway(0, code)
        self._collect()

    def _collect(self) -> None:
        self.tunnel.collect()
        self.server.collect()
        self.peak_buffered_bytes = max(self.peak_buffered_bytes, self.buffered_bytes)

    def _take(self, side: _Side, limit: int) -> bytes:
        if not self.ended:
            self._flush_side(side, None)  # the writer drained: room under the high-water mark
            self._collect()
        data = bytes(side.out[:limit])
        del side.out[:limit]
        return data
