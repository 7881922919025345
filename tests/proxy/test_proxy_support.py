"""Helpers for the Proxy tests: CONNECT client (h11), TCP servers, raw uTP peers, proxy pairs.

No tests here; the module name keeps it inside the proxy tests' files.
"""

from __future__ import annotations

import base64
import hashlib
import os
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import h11
import pytest
import trio

from nat import PING, PONG, open_endpoint
from nat.errors import NatError
from proxy.errors import KeynodeError
from proxy.identity.node_id import NodeId
from proxy.identity.tls_config import TLSConfig
from proxy.tls import TLSStream
from proxy.tunnel.connection import ConnectionEvent
from proxy.tunnel.proxy import Proxy, open_proxy

TOKEN = "s3cret-token"
FAST = dict(
    conn_connect_time=2.0,
    conn_end_time=0.5,
    conn_punch_interval_time=0.02,
    conn_keep_alive_interval_time=0.2,
    conn_keep_alive_timeout_time=5.0,
)


# Virtual times (the ``virtual_clock`` fixture) compare to the millisecond.
VIRTUAL_TOLERANCE = 1e-3


def virtual(expected: Any) -> Any:
    """``expected`` in virtual time, to VIRTUAL_TOLERANCE."""
    return pytest.approx(expected, abs=VIRTUAL_TOLERANCE)


def target_for(proxy: Proxy, node_id: NodeId, host: str = "127.0.0.1") -> str:
    h = f"[{host}]" if ":" in host else host
    return f"{h}:{proxy.proxy_port}?nodeId={node_id}"


@dataclass
class ConnectReply:
    status: int
    headers: dict[bytes, bytes]
    stream: trio.SocketStream
    leftover: bytes  # tunnel bytes that arrived with the response


async def http_connect(
    proxy: Proxy,
    target: str,
    *,
    token: str | None = TOKEN,
    early_data: bytes = b"",
    method: str = "CONNECT",
) -> ConnectReply:
    """Send one CONNECT (plus optional bytes right after it) and read the response with h11."""
    stream = await trio.open_tcp_stream(proxy.forward_host, proxy.forward_port)
    client = h11.Connection(h11.CLIENT)
    headers = [("Host", target)]
    if token is not None:
        headers.append(("Proxy-Authorization", "Basic " + base64.b64encode(token.encode()).decode()))
    await stream.send_all(client.send(h11.Request(method=method, target=target, headers=headers)) + early_data)
    if method != "CONNECT":
        await stream.send_all(client.send(h11.EndOfMessage()))
    while True:
        event = client.next_event()
        if event is h11.NEED_DATA:
            data = await stream.receive_some(65536)
            client.receive_data(data)
            continue
        assert isinstance(event, h11.Response), event
        leftover = b""
        if event.status_code == 200:
            leftover = bytes(client.trailing_data[0])
        return ConnectReply(event.status_code, dict(event.headers), stream, leftover)


async def connect_reading_refusal(
    host: str, port: int, target: str, token: str = TOKEN
) -> tuple[int, bytes, trio.SocketStream]:
    """One CONNECT to the forward port at ``host``:``port``: its status, a refusal's body
    (read to the end of the answer) and the stream (on 200, the tunnel; the caller closes it)."""
    stream = await trio.open_tcp_stream(host, port)
    client = h11.Connection(h11.CLIENT)
    auth = "Basic " + base64.b64encode(token.encode()).decode()
    request = h11.Request(method="CONNECT", target=target, headers=[("Host", target), ("Proxy-Authorization", auth)])
    try:
        await stream.send_all(client.send(request) + client.send(h11.EndOfMessage()))
        status, body = 0, b""
        while True:
            event = client.next_event()
            if event is h11.NEED_DATA:
                client.receive_data(await stream.receive_some(65536))
            elif isinstance(event, h11.Response):
                status = event.status_code
                if status == 200:
                    return status, b"", stream
            elif isinstance(event, h11.Data):
                body += event.data
            else:
                return status, body, stream
    except BaseException:
        await trio.aclose_forcefully(stream)
        raise


async def connect_ok(proxy: Proxy, target: str, **kwargs: Any) -> trio.SocketStream:
    reply = await http_connect(proxy, target, **kwargs)
    assert reply.status == 200, reply.status
    assert reply.leftover == b""
    return reply.stream


async def echo_round(stream: trio.SocketStream, payload: bytes) -> None:
    """Send ``payload`` through an echoing tunnel and check exactly it comes back."""
    await stream.send_all(payload)
    received = b""
    while len(received) < len(payload):
        chunk = await stream.receive_some(65536)
        assert chunk
        received += chunk
    assert received == payload


async def receive_all(stream: trio.abc.ReceiveStream, limit: int = 1 << 30) -> bytes:
    data = bytearray()
    while chunk := await stream.receive_some(1 << 16):
        data += chunk
        assert len(data) <= limit
    return bytes(data)


async def connection_ended(stream: trio.abc.ReceiveStream) -> bool:
    """True when the stream reaches EOF or breaks (its data is discarded)."""
    try:
        while await stream.receive_some(1 << 16):
            pass
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        pass
    return True


@dataclass
class Server:
    """A TCP server on loopback: echo (default) or a custom handler; records peers."""

    port: int = 0
    host: str = "127.0.0.1"
    peers: list[tuple[str, int]] = field(default_factory=list)
    streams: list[trio.SocketStream] = field(default_factory=list)
    accepted: trio.Event = field(default_factory=trio.Event)


async def echo(stream: trio.SocketStream) -> None:
    """Echo until EOF, then half-close back (keeps half-close semantics visible)."""
    while data := await stream.receive_some(1 << 16):
        await stream.send_all(data)
    await stream.send_eof()


async def digest_after_eof(stream: trio.SocketStream) -> None:
    """Read to EOF, then send sha256 of everything received and close."""
    digest = hashlib.sha256()
    while data := await stream.receive_some(1 << 16):
        digest.update(data)
    await stream.send_all(digest.hexdigest().encode())


@asynccontextmanager
async def tcp_server(handler: Any = echo, host: str = "127.0.0.1") -> AsyncIterator[Server]:
    server = Server(host=host)

    async def serve(stream: trio.SocketStream) -> None:
        peer = stream.socket.getpeername()
        server.peers.append((peer[0], peer[1]))
        server.streams.append(stream)
        server.accepted.set()
        try:
            async with stream:
                await handler(stream)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            lambda task_status: trio.serve_tcp(serve, 0, host=host, task_status=task_status)
        )
        server.port = listeners[0].socket.getsockname()[1]
        yield server
        nursery.cancel_scope.cancel()


@dataclass
class Events:
    established: list[ConnectionEvent] = field(default_factory=list)
    lost: list[ConnectionEvent] = field(default_factory=list)
    lost_at: list[float] = field(default_factory=list)  # trio.current_time() of each lost event
    changed: trio.Event = field(default_factory=trio.Event)

    def on_established(self, event: ConnectionEvent) -> None:
        self.established.append(event)
        self.changed.set()
        self.changed = trio.Event()

    def on_lost(self, event: ConnectionEvent) -> None:
        self.lost.append(event)
        self.lost_at.append(trio.current_time())
        self.changed.set()
        self.changed = trio.Event()

    async def wait_lost(self, count: int = 1) -> list[ConnectionEvent]:
        while len(self.lost) < count:
            await self.changed.wait()
        return self.lost


@dataclass
class Node:
    proxy: Proxy
    tls_config: TLSConfig
    events: Events

    @property
    def node_id(self) -> NodeId:
        return self.tls_config.node_id


@asynccontextmanager
async def running_node(
    server_port: int | None = None, *, proxy_host: str = "127.0.0.1", **options: Any
) -> AsyncIterator[Node]:
    tls_config = options.pop("tls_config", None) or TLSConfig.generate()
    events = Events()
    server_host = options.pop("server_host", "127.0.0.1")
    settings = {**FAST, "auth_token": TOKEN, **options}
    async with open_proxy(
        tls_config=tls_config,
        proxy_host=proxy_host,
        server_host=server_host,
        server_port=server_port,
        connection_established_callback=events.on_established,
        connection_lost_callback=events.on_lost,
        **settings,
    ) as proxy:
        yield Node(proxy, tls_config, events)


# --- raw uTP peers that are not proxies (to misbehave on purpose) ---------------------


@dataclass
class RawPeer:
    """A bare endpoint: answers pings only while ``responsive``; keeps accepted streams."""

    endpoint: Any
    responsive: bool = True
    streams: list[Any] = field(default_factory=list)
    accepted: trio.Event = field(default_factory=trio.Event)
    errors: list[BaseException] = field(default_factory=list)

    @property
    def port(self) -> int:
        return int(self.endpoint.address[1])


@asynccontextmanager
async def raw_peer(handler: Any = None, *, responsive: bool = True, ping_first: bool = True) -> AsyncIterator[RawPeer]:
    """``handler(peer, utp_stream)`` runs per accepted uTP connection."""
    async with open_endpoint("127.0.0.1", 0) as endpoint:
        peer = RawPeer(endpoint, responsive)
        async with trio.open_nursery() as nursery:

            async def answer_messages(task_status: trio.TaskStatus[None]) -> None:
                with endpoint.subscribe_messages() as messages:
                    task_status.started()
                    async for message, address in messages:
                        if not peer.responsive:
                            continue
                        if message == PING:
                            endpoint.send_message(PONG, address)
                            if ping_first:
                                endpoint.send_message(PING, address)

            async def accept() -> None:
                while True:
                    stream = await endpoint.accept()
                    peer.streams.append(stream)
                    peer.accepted.set()
                    if handler is not None:
                        nursery.start_soon(handler, peer, stream)

            await nursery.start(answer_messages)
            nursery.start_soon(accept)
            yield peer
            nursery.cancel_scope.cancel()


async def tls_server_handler(peer: RawPeer, stream: Any, tls_config: TLSConfig | None = None) -> None:
    """Accept TLS as a proper node would (then echo), but never run a proxy."""
    tls = TLSStream(stream, tls_config or TLSConfig.generate(), server_side=True)
    try:
        await tls.do_handshake()
        while data := await tls.receive_some(65536):
            await tls.send_all(data)
    except (KeynodeError, NatError, trio.BrokenResourceError, trio.ClosedResourceError) as error:
        peer.errors.append(error)


def stdlib_tls_context(server_side: bool) -> ssl.SSLContext:
    """A TLS context with no certificate at all (the "missing certificates" cases)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server_side else ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    if not server_side:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def random_payload(size: int) -> bytes:
    return os.urandom(size)


# --- a UDP middlebox that can black-hole the path ------------------------------------------


UTP_RESET = b"\x31"


@dataclass
class UdpRelay:
    """Forwards datagrams between one local peer and a remote address; ``drop`` cuts the path."""

    port: int = 0
    back_port: int = 0  # where the remote sees the relayed datagrams come from
    drop: bool = False
    forwarded: int = 0
    dropped: int = 0
    resets: int = 0  # uTP RESET datagrams seen, either way (first byte 0x31: type 3, version 1)
    rate: float | None = None  # datagrams/s forwarded toward the remote (None: as fast as they come)


@asynccontextmanager
async def udp_relay(remote: tuple[str, int]) -> AsyncIterator[UdpRelay]:
    relay = UdpRelay()
    front = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM)
    back = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM)
    with front, back:
        await front.bind(("127.0.0.1", 0))
        await back.bind(("127.0.0.1", 0))
        relay.port = front.getsockname()[1]
        relay.back_port = back.getsockname()[1]
        local: list[Any] = []

        async def front_to_back() -> None:
            while True:
                data, address = await front.recvfrom(65536)
                relay.resets += data[:1] == UTP_RESET
                if not local:
                    local.append(address)
                if relay.drop:
                    relay.dropped += 1
                    continue
                relay.forwarded += 1
                if relay.rate is not None:  # a slow path: what waits queues in the socket
                    await trio.sleep(1 / relay.rate)
                await back.sendto(data, remote)

        async def back_to_front() -> None:
            while True:
                data, _ = await back.recvfrom(65536)
                relay.resets += data[:1] == UTP_RESET
                if relay.drop or not local:
                    relay.dropped += 1
                    continue
                relay.forwarded += 1
                await front.sendto(data, local[0])

        async with trio.open_nursery() as nursery:
            nursery.start_soon(front_to_back)
            nursery.start_soon(back_to_front)
            yield relay
            nursery.cancel_scope.cancel()
