"""The in-process grpc-web bridge: a listener that takes grpc-web (HTTP/1.1 via h11, or
HTTP/2 with prior knowledge via h2) and calls a native gRPC target over HTTP/2.

Per request: OPTIONS with Access-Control-Request-Method is a CORS preflight; POST with
a grpc-web content type is a call (web_call.bridge_call); anything else is a plain HTTP
error. The target's connection comes from the injected ``open_upstream``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import trio

from grpc_bridge import web_codec as codec
from grpc_bridge.web_call import CallSettings, Downstream, WebRequest, bridge_call
from grpc_bridge.web_cors import CorsPolicy
from grpc_bridge.web_errors import ClientGone
from grpc_bridge.web_http1 import serve_http1
from grpc_bridge.web_http2 import H2_PREFACE, serve_http2
from grpc_bridge.web_upstream import GrpcUpstream, OpenUpstream

DEFAULT_MAX_REQUEST_MESSAGE = 4 << 20  # grpcio's own default receive limit
PREFACE_TIMEOUT = 30.0


@dataclass(frozen=True)
class WebBridgeSettings:
    host: str
    port: int
    allow_origins: Sequence[str]
    authority: str  # :authority of the upstream calls (the target as configured)
    max_request_message: int = DEFAULT_MAX_REQUEST_MESSAGE


class GrpcWebBridge:
    def __init__(self, settings: WebBridgeSettings, upstream: GrpcUpstream) -> None:
        self.settings = settings
        self.upstream = upstream
        self.cors = CorsPolicy(settings.allow_origins)
        self.call_settings = CallSettings(self.cors, settings.max_request_message, settings.authority.encode())
        self.calls = 0

    async def handle(self, request: WebRequest, downstream: Downstream) -> None:
        origin = request.header(b"origin")
        if request.method == b"OPTIONS" and request.header(b"access-control-request-method") is not None:
            headers = self.cors.preflight(origin, request.header(b"access-control-request-headers"))
            if headers is None:
                await plain_answer(downstream, 403, "origin not allowed")
            else:
                await _drain(downstream)
                await downstream.send_head(204, headers)
                await downstream.finish()
            return
        if request.method != b"POST":
            await plain_answer(downstream, 405, "grpc-web calls are POST", [(b"allow", b"POST, OPTIONS")])
            return
        web_format = codec.request_format(request.header(b"content-type"))
        if web_format is None:
            await plain_answer(downstream, 415, "not a grpc-web content type")
            return
        if not self.cors.allows(origin):
            await plain_answer(downstream, 403, "origin not allowed")
            return
        self.calls += 1
        await bridge_call(request, web_format, downstream, self.upstream, self.call_settings)

    async def serve_connection(self, stream: trio.abc.Stream) -> None:
        try:
            prefix = b""
            with trio.move_on_after(PREFACE_TIMEOUT):
                while len(prefix) < len(H2_PREFACE) and H2_PREFACE.startswith(prefix):
                    data = await stream.receive_some(len(H2_PREFACE) - len(prefix))
                    if not data:
                        break
                    prefix += data
            if not prefix:
                return
            if prefix == H2_PREFACE:
                await serve_http2(stream, prefix, self.handle)
            else:
                await serve_http1(stream, prefix, self.handle)
        except (ClientGone, trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        finally:
            with trio.CancelScope(shield=True):
                await stream.aclose()


async def _drain(downstream: Downstream) -> None:
    while await downstream.receive_body():
        pass


async def plain_answer(downstream: Downstream, status: int, text: str, extra: codec.Headers | None = None) -> None:
    """A non-gRPC HTTP answer. The request body is left unread: HTTP/1.1 then closes."""
    body = (text + "\n").encode()
    headers = [(b"content-type", b"text/plain; charset=utf-8"), (b"content-length", str(len(body)).encode())]
    await downstream.send_head(status, headers + (extra or []))
    await downstream.send_body(body)
    await downstream.finish()


async def serve_web_bridge(
    settings: WebBridgeSettings,
    open_upstream: OpenUpstream,
    *,
    task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Listen on settings.host:port (0 = any free port) until cancelled; reports the bound
    (host, port) through task_status."""
    async with trio.open_nursery() as nursery:
        upstream = GrpcUpstream(open_upstream, nursery)
        bridge = GrpcWebBridge(settings, upstream)
        listeners = await trio.open_tcp_listeners(settings.port, host=settings.host)
        address = listeners[0].socket.getsockname()
        nursery.start_soon(trio.serve_listeners, bridge.serve_connection, listeners)
        task_status.started((str(address[0]), int(address[1])))
