"""One grpc-web call bridged to one native gRPC stream, whatever HTTP version the
browser side speaks (the ``Downstream`` of web_http1 / web_http2).

Two tasks per call: the request body goes up as it arrives (decoded and checked frame
by frame), the answer comes down as it arrives (each message forwarded at once, so
server streaming is incremental), ending with one trailers frame in every case: normal
trailers, a trailers-only answer, a non-gRPC answer, a reset, a lost connection or a
request the bridge refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import h2.errors
import trio

from grpc_bridge import web_codec as codec
from grpc_bridge.web_cors import CorsPolicy
from grpc_bridge.web_errors import GrpcWebError, UpstreamUnavailable
from grpc_bridge.web_upstream import (
    ConnectionLost,
    GrpcUpstream,
    LocalFailure,
    ResponseData,
    ResponseHeaders,
    ResponseTrailers,
    StreamReset,
    UpstreamCall,
)

Headers = codec.Headers

# HTTP/2 RST_STREAM codes -> gRPC status (grpc/grpc doc/PROTOCOL-HTTP2.md "Errors").
RESET_STATUS = {
    h2.errors.ErrorCodes.NO_ERROR: codec.INTERNAL,
    h2.errors.ErrorCodes.REFUSED_STREAM: codec.UNAVAILABLE,
    h2.errors.ErrorCodes.CANCEL: codec.CANCELLED,
    h2.errors.ErrorCodes.ENHANCE_YOUR_CALM: codec.RESOURCE_EXHAUSTED,
    h2.errors.ErrorCodes.INADEQUATE_SECURITY: codec.PERMISSION_DENIED,
}


class Downstream(Protocol):
    """The browser side of one call. Sends are buffered until ``flush`` or ``finish``
    (or a buffer fills), so an answer that arrives at once leaves in one write."""

    body_done: bool  # the request body's end has been seen (possibly with the last piece)

    async def receive_body(self) -> bytes:
        """The next piece of the request body; b"" at its end."""

    async def send_head(self, status: int, headers: Headers) -> None: ...

    async def send_body(self, data: bytes) -> None: ...

    async def flush(self) -> None: ...

    async def finish(self) -> None:
        """End the answer and write everything out."""


@dataclass(frozen=True)
class WebRequest:
    method: bytes
    path: bytes
    authority: bytes
    headers: Headers  # names lower-case

    def header(self, name: bytes) -> bytes | None:
        return codec.header_value(self.headers, name)


@dataclass
class CallSettings:
    cors: CorsPolicy
    max_request_message: int
    authority: bytes  # :authority sent upstream


class _Answer:
    """The response side: head once, frames (re-encoded in text mode), one trailers frame."""

    def __init__(self, downstream: Downstream, request: WebRequest, web_format: codec.WebFormat, cors: CorsPolicy) -> None:
        self.downstream = downstream
        self.origin = request.header(b"origin")
        self.cors = cors
        self.encoder = codec.TextEncoder() if web_format is codec.WebFormat.TEXT else None
        self.web_format = web_format
        self.head_sent = False
        self.done = False

    async def head(self, metadata: Headers) -> None:
        headers = codec.web_response_headers(metadata, self.web_format)
        headers += self.cors.response_headers(self.origin, [name for name, _ in headers])
        await self.downstream.send_head(200, headers)
        self.head_sent = True

    async def body(self, data: bytes) -> None:
        if self.encoder is not None:
            data = self.encoder.feed(data)
        if data:
            await self.downstream.send_body(data)

    async def trailers(self, trailers: Headers) -> None:
        if not self.head_sent:
            await self.head([])
        if self.encoder is not None:
            cut = self.encoder.finish()  # a frame the upstream cut short
            if cut:
                await self.downstream.send_body(cut)
        await self.body(codec.trailers_frame(trailers))
        await self.downstream.finish()
        self.done = True

    async def status(self, code: int, message: str) -> None:
        await self.trailers(codec.status_trailers(code, message))


async def bridge_call(
    request: WebRequest, web_format: codec.WebFormat, downstream: Downstream, upstream: GrpcUpstream, settings: CallSettings
) -> None:
    answer = _Answer(downstream, request, web_format, settings.cors)
    pump = _RequestPump(downstream, web_format, settings.max_request_message)
    try:
        # The first piece is checked before anything goes upstream: a request broken
        # from its start never opens a stream on the server.
        first = await pump.read()
    except GrpcWebError as error:
        await answer.status(error.grpc_status, f"bad grpc-web request: {error}")
        return
    headers = codec.upstream_request_headers(request.method, request.path, settings.authority, request.headers)
    try:
        call = await upstream.open_call(headers)
    except UpstreamUnavailable as error:
        await answer.status(error.grpc_status, str(error))
        return
    try:
        if await pump.forward(call, first):  # the whole body came at once (unary grpc-web): no second task
            await _forward_answer(call, answer)
        else:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(pump.run, call)
                await _forward_answer(call, answer)
                nursery.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True):
            await call.cancel()


class _RequestPump:
    """The request body upstream as it arrives, decoded (text mode) and its framing checked."""

    def __init__(self, downstream: Downstream, web_format: codec.WebFormat, max_message: int) -> None:
        self.downstream = downstream
        self.decoder = codec.Base64Decoder() if web_format is codec.WebFormat.TEXT else None
        self.frames = codec.RequestFrames(max_message)
        self.ended = False

    async def read(self) -> bytes:
        """The next checked piece of the gRPC body; sets ``ended`` with the last one."""
        data = await self.downstream.receive_body()
        self.ended = self.downstream.body_done  # often known with the last piece: one DATA frame ends the stream
        if self.decoder is not None:
            data = self.decoder.feed(data)
            if self.ended:
                self.decoder.finish()
        self.frames.feed(data)
        if self.ended:
            self.frames.finish()
        return data

    async def forward(self, call: UpstreamCall, data: bytes) -> bool:
        """Send a checked piece; True once the body has ended."""
        if data or self.ended:
            await call.send_data(data, end_stream=self.ended)
        return self.ended

    async def run(self, call: UpstreamCall) -> None:
        try:
            while not await self.forward(call, await self.read()):
                pass
        except GrpcWebError as error:
            call.deliver(LocalFailure(error.grpc_status, f"bad grpc-web request: {error}"))


async def _forward_answer(call: UpstreamCall, answer: _Answer) -> None:
    while True:
        if answer.head_sent and not call.has_pending():
            await answer.downstream.flush()  # each message leaves as soon as nothing else is here
        event = await call.next_event()
        if isinstance(event, ResponseHeaders):
            status_text = codec.header_value(event.headers, b":status") or b"0"
            status = int(status_text) if status_text.isdigit() else 0
            content_type = codec.header_value(event.headers, b"content-type")
            if not codec.is_grpc_answer(status, content_type):
                body = b"" if event.ended else await _collect_error_body(call)
                await answer.trailers(codec.non_grpc_answer(status, content_type, body))
                return
            if event.ended:  # trailers-only: the status goes in the trailers frame all the same
                await answer.trailers(codec.trailer_metadata(event.headers))
                return
            await answer.head(event.headers)
        elif isinstance(event, ResponseData):
            await answer.body(event.data)
            await call.acknowledge(event)
        elif isinstance(event, ResponseTrailers):
            trailers = codec.trailer_metadata(event.trailers)
            if codec.header_value(trailers, b"grpc-status") is None:
                trailers += codec.status_trailers(codec.INTERNAL, "upstream ended the call without a grpc-status")
            await answer.trailers(trailers)
            return
        elif isinstance(event, StreamReset):
            code = RESET_STATUS.get(event.error_code, codec.INTERNAL)  # type: ignore[call-overload]
            await answer.status(code, f"upstream reset the stream (HTTP/2 error {event.error_code})")
            return
        elif isinstance(event, ConnectionLost):
            await answer.status(codec.UNAVAILABLE, event.reason)
            return
        else:
            await answer.status(event.grpc_status, event.message)
            return


async def _collect_error_body(call: UpstreamCall) -> bytes:
    body = bytearray()
    while True:
        event = await call.next_event()
        if isinstance(event, ResponseData):
            if len(body) < codec.MAX_GRPC_MESSAGE:
                body += event.data[: codec.MAX_GRPC_MESSAGE - len(body)]
            await call.acknowledge(event)
        else:
            return bytes(body)
