"""Upstream openers for the grpc-web bridge: a direct TCP connection to a local gRPC
server, or a tunnel through a keynode forward proxy's HTTP CONNECT port (so the remote
node's reverse side still sees, and vouches for, this node as the caller)."""

from __future__ import annotations

import base64

import h11
import trio

from grpc_bridge.web_errors import UpstreamUnavailable
from grpc_bridge.web_upstream import OpenUpstream

MAX_CONNECT_ANSWER = 16 * 1024


def direct_upstream(host: str, port: int) -> OpenUpstream:
    async def open_upstream() -> trio.abc.Stream:
        return await trio.open_tcp_stream(host, port)

    return open_upstream


def tunnel_upstream(forward_host: str, forward_port: int, target: str, auth_token: str | None) -> OpenUpstream:
    """CONNECT ``target`` (``NodeId:port`` or ``host:port?nodeId=...``) through the
    forward proxy at forward_host:forward_port."""

    async def open_upstream() -> trio.abc.Stream:
        stream = await trio.open_tcp_stream(forward_host, forward_port)
        try:
            return await _connect(stream, target, auth_token)
        except BaseException:
            with trio.CancelScope(shield=True):
                await stream.aclose()
            raise

    return open_upstream


async def _connect(stream: trio.SocketStream, target: str, auth_token: str | None) -> trio.abc.Stream:
    client = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_CONNECT_ANSWER)
    headers = [("Host", target)]
    if auth_token is not None:
        headers.append(("Proxy-Authorization", "Basic " + base64.b64encode(auth_token.encode()).decode()))
    await stream.send_all(client.send(h11.Request(method="CONNECT", target=target, headers=headers)))
    while True:
        try:
            event = client.next_event()
        except h11.RemoteProtocolError as error:
            raise UpstreamUnavailable(f"the forward proxy's CONNECT answer is not HTTP: {error}") from None
        if event is h11.NEED_DATA:
            client.receive_data(await stream.receive_some(65536))
            continue
        if not isinstance(event, h11.Response):
            raise UpstreamUnavailable("the forward proxy closed without answering CONNECT")
        if event.status_code != 200:
            reason = event.reason.decode("latin-1", "replace")
            raise UpstreamUnavailable(f"the forward proxy refused CONNECT {target}: {event.status_code} {reason}")
        leftover = bytes(client.trailing_data[0])
        # An HTTP/2 server may send its SETTINGS at once: they can come with the 200.
        return PrefixedStream(stream, leftover) if leftover else stream


class PrefixedStream(trio.abc.Stream):
    """A stream whose first received bytes were already read (with the CONNECT answer)."""

    def __init__(self, stream: trio.abc.Stream, prefix: bytes) -> None:
        self.stream = stream
        self.prefix = prefix

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self.prefix:
            size = len(self.prefix) if max_bytes is None else max_bytes
            data, self.prefix = self.prefix[:size], self.prefix[size:]
            return data
        return bytes(await self.stream.receive_some(max_bytes))

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.stream.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        await self.stream.aclose()
