"""`keynode forward`: a local TCP listener whose connections are tunnelled (like ssh -L).

`run_port_forward` is the command: through the running node's CONNECT port, or,
when no node runs, through one it runs in this process from the same config.

For each accepted connection: open TCP to the local node's forward proxy, send
`CONNECT HOST:PORT?nodeId=<NodeId>` with the auth token (h11 speaks the HTTP), and on
2xx pipe bytes both ways. Each direction ends with a half-close, so a client that
shuts down its sending side still gets the whole reply. A failed tunnel closes only
its own client connection; the listener keeps serving.
"""

from __future__ import annotations

import base64
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import h11
import trio

from proxy.app.errors import PortForwardError
from proxy.identity.errors import NodeIdInvalid
from proxy.identity.node_id import NodeId
from proxy.tunnel.hosts import HostPort, format_host_port, parse_host_port
from proxy.tunnel.http_io import receive_head

if TYPE_CHECKING:
    from proxy.app.config import Config

log = logging.getLogger("keynode.forward")

PIPE_CHUNK = 64 * 1024
MAX_RESPONSE_HEAD = 16 * 1024
DEFAULT_CONNECT_TIMEOUT = 25.0  # longer than the proxy's conn_connect_time (max 20)


@dataclass(frozen=True)
class ForwardTarget:
    """The remote node (its NodeId and proxy address) a tunnel goes to."""

    node_id: NodeId
    host: str
    port: int

    def connect_target(self) -> str:
        """The CONNECT request target of the original: `HOST:PORT?nodeId=...`."""
        return f"{format_host_port(self.host, self.port)}?nodeId={quote(str(self.node_id), safe='')}"

    def __str__(self) -> str:
        return f"{self.node_id}@{format_host_port(self.host, self.port)}"


def parse_forward_target(text: str) -> ForwardTarget:
    """`NODEID@HOST:PORT`; raises ValueError with the reason."""
    node_text, sep, address = text.partition("@")
    if not sep:
        raise ValueError(f"{text!r} is not NODEID@HOST:PORT")
    try:
        node_id = NodeId.decode(node_text)
    except NodeIdInvalid as error:
        raise ValueError(f"{node_text!r} is not a NodeId: {error}") from None
    host_port = parse_host_port(address)
    return ForwardTarget(node_id, host_port.host, host_port.port)


def proxy_authorization(auth_token: str) -> bytes:
    return b"Basic " + base64.b64encode(auth_token.encode())


async def open_tunnel(
    proxy: HostPort, auth_token: str, target: str, *, timeout: float = DEFAULT_CONNECT_TIMEOUT
) -> tuple[trio.SocketStream, bytes]:
    """CONNECT through `proxy` to `target`; returns the tunnel stream and any bytes
    the proxy sent after its response head (they belong to the tunnel)."""
    stream = await _connect_to_proxy(proxy, timeout)
    try:
        with trio.fail_after(timeout):
            leftover = await _connect_handshake(stream, auth_token, target)
    except trio.TooSlowError:
        await stream.aclose()
        raise PortForwardError(f"the forward proxy {proxy} did not answer CONNECT in {timeout} s") from None
    except BaseException:
        await stream.aclose()
        raise
    return stream, leftover


async def _connect_to_proxy(proxy: HostPort, timeout: float, hint: str = "") -> trio.SocketStream:
    try:
        with trio.fail_after(timeout):
            return await trio.open_tcp_stream(proxy.host, proxy.port)
    except trio.TooSlowError:
        raise PortForwardError(f"connecting to the forward proxy {proxy} timed out{hint}") from None
    except OSError as error:
        raise PortForwardError(f"cannot reach the forward proxy {proxy}: {error.strerror or error}{hint}") from None


async def _connect_handshake(stream: trio.SocketStream, auth_token: str, target: str) -> bytes:
    connection = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_RESPONSE_HEAD)
    request = h11.Request(
        method="CONNECT",
        target=target,
        headers=[
            ("Host", target.partition("?")[0]),
            ("Proxy-Authorization", proxy_authorization(auth_token).decode("ascii")),
            ("User-Agent", "keynode-forward"),
        ],
    )
    try:
        await stream.send_all(connection.send(request) + connection.send(h11.EndOfMessage()))
        event = await receive_head(stream, connection, read_size=PIPE_CHUNK)
    except h11.RemoteProtocolError as error:
        raise PortForwardError(f"the forward proxy answered with invalid HTTP: {error}") from None
    except (trio.BrokenResourceError, OSError) as error:
        raise PortForwardError(f"the forward proxy dropped the connection: {error}") from None
    if event is None:
        raise PortForwardError("the forward proxy closed the connection without answering")
    assert isinstance(event, h11.Response)  # h11 gives a client responses only
    if not 200 <= event.status_code < 300:
        reason = event.reason.decode("latin-1", "replace")
        hint = " (check the auth token)" if event.status_code == 407 else ""
        answer = f"{event.status_code} {reason}".strip()
        raise PortForwardError(f"the forward proxy answered {answer}{hint}")
    leftover, _closed = connection.trailing_data
    return bytes(leftover)


async def _copy_then_eof(source: trio.abc.Stream, sink: trio.abc.HalfCloseableStream) -> int:
    copied = 0
    while data := await source.receive_some(PIPE_CHUNK):
        await sink.send_all(data)
        copied += len(data)
    await sink.send_eof()
    return copied


async def pipe_both_ways(a: trio.SocketStream, b: trio.SocketStream) -> tuple[int, int]:
    """Copy a->b and b->a, each direction ending with a half-close; returns bytes
    (a->b, b->a). A broken direction ends both (the peer is gone)."""
    counts = [0, 0]

    async def direction(index: int, source: trio.SocketStream, sink: trio.SocketStream) -> None:
        try:
            counts[index] = await _copy_then_eof(source, sink)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            nursery.cancel_scope.cancel()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(direction, 0, a, b)
        nursery.start_soon(direction, 1, b, a)
    return counts[0], counts[1]


async def serve_port_forward(
    listen: HostPort,
    proxy: HostPort,
    auth_token: str,
    target: ForwardTarget,
    *,
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
    on_tunnel_end: Callable[[str, int, int, str | None], None] | None = None,
    task_status: trio.TaskStatus[list[HostPort]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Listen on `listen` and tunnel every connection to `target`; reports the bound
    addresses through `task_status`. `on_tunnel_end(client, sent, received, error)`
    is called when each tunnel ends (for logs and tests)."""
    try:
        listeners = await trio.open_tcp_listeners(listen.port, host=listen.host)
    except OSError as error:
        raise PortForwardError(
            f"cannot listen on {listen}: {error.strerror or error} (choose another --listen address)"
        ) from None
    bound = [HostPort(*listener.socket.getsockname()[:2]) for listener in listeners]
    connect_target = target.connect_target()

    async def handle(client: trio.SocketStream) -> None:
        peer = client.socket.getpeername()
        client_text = format_host_port(peer[0], peer[1])
        sent = received = 0
        error_text: str | None = None
        try:
            tunnel, leftover = await open_tunnel(
                proxy, auth_token, connect_target, timeout=connect_timeout
            )
        except PortForwardError as error:
            error_text = str(error)
            log.warning("tunnel for %s to %s failed: %s", client_text, target, error)
        else:
            log.info("tunnel open: %s -> %s", client_text, target)
            async with tunnel:
                try:
                    if leftover:
                        await client.send_all(leftover)
                    sent, received = await pipe_both_ways(client, tunnel)
                    received += len(leftover)
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as error:
                    error_text = f"client connection broke: {error}"
            log.info("tunnel closed: %s -> %s (%d bytes out, %d bytes in)", client_text, target, sent, received)
        finally:
            await client.aclose()
            if on_tunnel_end is not None:
                on_tunnel_end(client_text, sent, received, error_text)

    async with trio.open_nursery() as nursery:
        task_status.started(bound)
        await trio.serve_listeners(handle, listeners, handler_nursery=nursery)


async def check_forward_proxy(proxy: HostPort, *, timeout: float = 5.0) -> None:
    """Fail now, not on every client, when nothing listens at the forward proxy."""
    hint = " (start `keynode run`, or leave out --via to run a node in this process)"
    stream = await _connect_to_proxy(proxy, timeout, hint)
    await stream.aclose()


async def run_port_forward(
    config: Config,
    listen: HostPort,
    target: ForwardTarget,
    *,
    via: HostPort | None,
    tls_config: Any = None,
) -> int:
    """`keynode forward` until SIGINT/SIGTERM. ``via``: the running node's CONNECT
    port; None with a ``tls_config``: run the node here (its addresses are printed
    as `keynode run` prints them) and forward through it."""
    from proxy.app.runner import print_addresses, serve_node, setup_logging, stop_signal_receiver, wait_for_signal

    with stop_signal_receiver() as signals:
        stop_node = trio.Event()
        async with trio.open_nursery() as nursery:
            if via is None:
                setup_logging(config.log_level, config.log_format)
                addresses = await nursery.start(serve_node, config, tls_config, stop_node)
                print_addresses(addresses)
                via = parse_host_port(addresses["forward"])
            else:
                await check_forward_proxy(via)
            async with trio.open_nursery() as forwarding:
                bound = await forwarding.start(
                    lambda task_status: serve_port_forward(
                        listen, via, config.auth.value, target, task_status=task_status
                    )
                )
                for address in bound:
                    print(f"listening on {address} -> {target} via {via}", flush=True)
                await wait_for_signal(signals)
                forwarding.cancel_scope.cancel()
            stop_node.set()  # the node (when it runs here) stops gracefully
    return 0
