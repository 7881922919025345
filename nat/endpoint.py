"""The UDP endpoint: one socket shared by uTP connections and out-of-band messages.

Layers: ``UtpMultiplexer`` (sans-IO, nat/utp/) owns every uTP connection on the
socket; this module is its trio driver. ``UdpSocket`` (nat/udp.py) is the socket
side: batched reads that sort each datagram, batched writes, the send backlog.
The endpoint owns the multiplexer, the clock and the timer, turns multiplexer
events into wake-ups of ``UtpStream`` tasks, and hands out-of-band messages
(nat/message.py) to subscribers.

Keyed messages (``00 00 00 tt``, tt >= 2, longer than 4 bytes; nat/message.py)
go, unopened, to the synchronous ``on_keyed_message(data, address)`` handler the
layer above sets (nat does no crypto); its exceptions are contained like every
other handler's (``stats.handler_errors``). Without a handler they are counted
in ``stats.keyed_unhandled`` and dropped. Sending one is ``send_message(bytes,
address)``.

After a batch the receive task runs ``service``: due timers, events, and what
the multiplexer wants to send. A separate task sleeps until the core's timer
(no cancel scope per socket wait). Application tasks (send_all, receive_some)
also service synchronously after acting on a connection, so data goes out
without a task switch.

Paths (nat/utp/paths.py): besides its socket, the endpoint carries uTP over
*virtual paths*, e.g. a relay link, each registered with the callable that
sends a datagram over it::

    endpoint.add_path(path: VirtualPath, send: Callable[[bytes], None]) -> None
    endpoint.remove_path(path: VirtualPath) -> None
    endpoint.receive_from_path(data: bytes, path: VirtualPath) -> None
    endpoint.receive_batch_from_path(datagrams: Iterable[bytes], path: VirtualPath) -> None
    await endpoint.connect(path)              # a connection bound to the path
    endpoint.move_connection(conn, path)      # UtpStream.move_to(path) calls it

The multiplexer's datagrams for a virtual path go to its ``send`` (synchronous:
it must not block, and should queue rather than call back into this endpoint;
one that raises is counted in ``stats.path_send_errors``, logged like other
contained errors, and the datagram is lost, which uTP repairs). What arrives over
the path, its owner injects with ``receive_from_path`` (from a trio task): uTP
datagrams reach the multiplexer as if from ``path``, so an incoming SYN over it
is accepted as a connection bound to it. Anything else is counted
(``path_junk``): a relay link carries its own messages. A path with no sender
(removed, or never added) neither sends nor receives (``path_unrouted``); its
connections stay until moved or timed out.
"""


from __future__ import annotations

import ipaddress
import math
import socket as stdlib_socket
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from contextlib import asynccontextmanager, contextmanager

import trio

from nat.errors import EndpointClosed, NatError, UnknownPath, UtpConnectionRefused
from nat.message import classify_datagram, decode_message, encode_message
from nat.stream import UtpStream
from nat.udp import DEFAULT_SOCKET_BUFFER_SIZE, Address, EndpointStats, UdpSocket, is_ip_literal
from nat.udp import bind_udp_socket as bind_udp_socket  # a module global: tests wrap it
from nat.utp.config import UtpConfig
from nat.utp.connection import UtpConnection
from nat.utp.events import (
    Connected,
    ConnectionClosed,
    DataAvailable,
    EofReceived,
    IncomingConnection,
    SendSpaceAvailable,
)
from nat.utp.multiplexer import UtpMultiplexer
from nat.utp.packet import HEADER_SIZE, UTP_FIRST_BYTE
from nat.utp.paths import Path, VirtualPath

__all__ = ["Endpoint", "EndpointStats", "open_endpoint", "Address", "VirtualPath"]

TIMER_GRANULARITY = 0.0005  # shortest wait for a timer, in seconds
FULL_TIMER_SCAN = 0.25  # seconds between scans of every connection's timer
PUSH_HORIZON = 0.002  # the timer task's wake-up is pushed later only once it is this close
ACCEPT_BACKLOG = 128  # accepted connections waiting for accept()
SUBSCRIBER_BUFFER = 256  # messages buffered per subscriber before dropping


class Endpoint:
    """One UDP socket: uTP connections (accept/connect) plus out-of-band messages.

    Created by ``open_endpoint``; leaving that context aborts every connection
    (RESET), wakes every waiting task with an error and ends the endpoint's tasks.
    """

    def __init__(
        self,
        sock: stdlib_socket.socket,
        multiplexer: UtpMultiplexer,
        *,
        close_timeout: float,
        offload: bool = False,
    ) -> None:
        self._mux = multiplexer
        self.stats = EndpointStats()
        self._udp = udp = UdpSocket(
            sock, self.stats, multiplexer.receive_datagram, self._deliver_message, self._deliver_keyed,
            offload=offload,
        )
        # Set by the layer above: called with each keyed message (see the module docstring).
        self.on_keyed_message: Callable[[bytes, Address], None] | None = None
        self.address: Address = udp.address
        self.close_timeout = close_timeout
        self._streams: dict[int, UtpStream] = {}
        self._accept_send, self._accept_receive = trio.open_memory_channel[UtpStream](ACCEPT_BACKLOG)
        self._subscribers: list[trio.MemorySendChannel[tuple[int, Address]]] = []
        self._timer_deadline = math.inf
        self._full_scan_due = -math.inf  # see _next_deadline
        self._idle_deadline = math.inf  # earliest timer of the last full scan
        self._armed_deadline = math.inf  # the timer task's wake-up (see service)
        self._timer_scope: trio.CancelScope | None = None
        self._closed = False
        self._servicing = False  # inside service (see there)
        self._nursery: trio.Nursery | None = None
        self._multiplexer_accepting = True
        self._mux.accepting = True
        # virtual path -> its sender; once one was added, every flush looks for
        # datagrams to virtual paths (see _flush)
        self._paths: dict[VirtualPath, Callable[[bytes], None]] = {}
        self._routes_paths = False

    # ---- public API -------------------------------------------------------

    @property
    def multiplexer(self) -> UtpMultiplexer:
        return self._mux

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def accepting(self) -> bool:
        return self._multiplexer_accepting

    @accepting.setter
    def accepting(self, value: bool) -> None:
        self._multiplexer_accepting = bool(value)
        self._mux.accepting = bool(value)

    async def connect(self, address: Address | VirtualPath) -> UtpStream:
        """Open a uTP connection to an address, or over a virtual path (UnknownPath
        unless it has a sender); UtpConnectionRefused / UtpTimeout on failure."""
        self._check_open()
        if isinstance(address, VirtualPath):
            self._check_path(address)
            resolved: Path = address
        else:
            resolved = await self._resolve(address)
        self._check_open()
        now = trio.current_time()
        conn = self._mux.connect(resolved, now)
        stream = UtpStream(self, conn, connected=False)
        self._streams[id(conn)] = stream
        self.service(now)
        try:
            await stream.wait_connected()
        except BaseException:
            stream.abort_quietly()
            raise
        return stream

    async def accept(self) -> UtpStream:
        """Wait for the next incoming connection (EndpointClosed once closed)."""
        try:
            return await self._accept_receive.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            raise EndpointClosed("endpoint is closed") from None

    def send_message(self, message: int | bytes, address: Address) -> None:
        """Send one out-of-band datagram now; best effort, never blocks.

        ``message`` is a message value (PING, PONG) or already encoded bytes of a
        non-uTP format. Unreachable or unsendable addresses are counted in
        ``stats.send_errors``, not raised (UDP gives no delivery promise anyway).
        """
        self._check_open()
        if not is_ip_literal(address[0]):
            # sendto would resolve a name synchronously, blocking the event loop.
            raise ValueError(f"send_message needs an IP address, not {address[0]!r}")
        if isinstance(message, int):
            data = encode_message(message)
        else:
            data = bytes(message)
            if classify_datagram(data) == "utp":
                raise ValueError("an out-of-band message must not look like uTP")
        if self._udp.send_one(data, address):
            self.stats.messages_sent += 1

    @contextmanager
    def subscribe_messages(
        self, buffer_size: int = SUBSCRIBER_BUFFER
    ) -> Iterator[trio.MemoryReceiveChannel[tuple[int, Address]]]:
        """Receive every out-of-band message as ``(message, sender_address)``.

        Each subscriber gets every message; a subscriber whose buffer is full
        loses messages (counted in ``stats.messages_dropped``). The channel ends
        (EndOfChannel) when the endpoint closes.
        """
        send, receive = trio.open_memory_channel[tuple[int, Address]](buffer_size)
        self._subscribers.append(send)
        try:
            with receive:
                yield receive
        finally:
            if send in self._subscribers:
                self._subscribers.remove(send)
            send.close()

    @property
    def connection_count(self) -> int:
        return len(self._streams)

    # ---- virtual paths (see the module docstring) ------------------------------

    def add_path(self, path: VirtualPath, send: Callable[[bytes], None]) -> None:
        """Send the datagrams of connections on ``path`` with ``send`` (replacing
        the sender it had, if any)."""
        if type(path) is not VirtualPath:
            raise TypeError(f"a virtual path is a VirtualPath, not {path!r}")
        self._check_open()
        self._paths[path] = send
        self._routes_paths = True

    def remove_path(self, path: VirtualPath) -> None:
        """Forget ``path``'s sender: its connections send nothing (their
        datagrams are counted in ``stats.path_unrouted``) until moved elsewhere."""
        self._paths.pop(path, None)

    @property
    def paths(self) -> frozenset[VirtualPath]:
        """The virtual paths with a sender."""
        return frozenset(self._paths)

    def receive_from_path(self, data: bytes, path: VirtualPath) -> None:
        """A datagram that arrived over ``path``: handled as if the socket had
        read it from there. Call from a trio task; nothing is raised for what
        the datagram holds."""
        self.receive_batch_from_path((data,), path)

    def receive_batch_from_path(self, datagrams: Iterable[bytes], path: VirtualPath) -> None:
        """Several datagrams that arrived over ``path``, in order, then one
        service (as after a batch read from the socket)."""
        if self._closed:
            return
        stats = self.stats
        if path not in self._paths:
            stats.path_unrouted += sum(1 for _ in datagrams)
            return
        now = trio.current_time()
        receive = self._mux.receive_datagram
        utp_first = UTP_FIRST_BYTE
        count = 0
        for data in datagrams:
            count += 1
            if len(data) < HEADER_SIZE or not utp_first[data[0]]:
                stats.path_junk += 1
                continue
            try:
                receive(bytes(data), path, now)
            except NatError:
                stats.malformed_utp += 1
            except Exception as error:  # a defect: drop this datagram only
                self._udp.contain(error, f"handling a uTP datagram over {path!r}", now)
        stats.path_datagrams_received += count
        if count:
            self.service(now)

    def move_connection(self, conn: UtpConnection, path: Address | VirtualPath) -> None:
        """Move a live connection to another path (UtpStream.move_to; see
        UtpMultiplexer.move_connection for what a move does). ``path`` is a
        virtual path with a sender (else UnknownPath) or an IP address of this
        socket's family (else ValueError). PathInUse, UtpClosed as the
        multiplexer's."""
        self._check_open()
        if isinstance(path, VirtualPath):
            self._check_path(path)
            target: Path = path
        else:
            host, port = path[0], path[1]
            if not isinstance(port, int) or not 0 < port < 65536:
                raise ValueError(f"bad port in {path!r}")
            if not is_ip_literal(host):
                raise ValueError(f"a path needs an IP address, not {host!r}")
            self._check_family(host)
            udp = self._udp
            target = udp.user_address(udp.socket_address(tuple(path)))
        now = trio.current_time()
        self._mux.move_connection(conn, target, now)
        self.service(now)

    def _check_path(self, path: VirtualPath) -> None:
        if path not in self._paths:
            raise UnknownPath(f"no sender for {path!r} (Endpoint.add_path)")

    # ---- the driver (UtpStream calls service, service_if_output and forget) ----

    def _check_open(self) -> None:
        if self._closed:
            raise EndpointClosed("endpoint is closed")

    async def _resolve(self, address: Address) -> Address:
        host, port = address[0], address[1]
        if not isinstance(port, int) or not 0 < port < 65536:
            raise ValueError(f"bad port in {address!r}")
        if is_ip_literal(host):
            self._check_family(host)
            udp = self._udp
            return udp.user_address(udp.socket_address((host, port)))
        family = stdlib_socket.AF_UNSPEC if self._udp.dual_stack else self._udp.family
        infos = await trio.socket.getaddrinfo(host, port, family=family, type=stdlib_socket.SOCK_DGRAM)
        if not infos:
            raise UtpConnectionRefused(f"cannot resolve {host!r}")
        return self._udp.user_address(infos[0][4])

    def _check_family(self, host: str) -> None:
        version = ipaddress.ip_address(host.split("%", 1)[0]).version
        udp = self._udp
        if version == 6 and not udp.ipv6:
            raise ValueError(f"{host} is IPv6 but this endpoint is bound to IPv4")
        if version == 4 and udp.ipv6 and not udp.dual_stack:
            raise ValueError(f"{host} is IPv4 but this endpoint is IPv6-only (dual_stack=False)")

    async def _timer_loop(self) -> None:
        """Run the core's timers: sleep until the cached deadline, then service.

        service moves this task's wake-up (earlier at once, later only when it
        is near); a wake-up that comes too early finds nothing due and re-arms
        at the current one.
        """
        current_time = trio.current_time
        while True:
            now = current_time()
            # A deadline the core left in the past must not make this spin.
            deadline = max(self._timer_deadline, now + TIMER_GRANULARITY)
            self._armed_deadline = deadline
            with trio.CancelScope(deadline=deadline) as scope:
                self._timer_scope = scope
                try:
                    await trio.sleep_forever()
                finally:
                    self._timer_scope = None
            now = current_time()
            if self._timer_deadline <= now:
                self.service(now)

    def service(self, now: float) -> None:
        """Run due timers, dispatch events, send what is queued, re-arm the timer.

        Synchronous: called by the receive task after a batch and by stream
        methods after they act on a connection.
        """
        if self._closed:
            return
        if self._servicing:
            # Called from a stream callback that _dispatch_events ran (a relay
            # reading, which may queue a window update): what it queued is sent
            # by the loop below, which goes round again instead of nesting.
            return
        self._servicing = True
        try:
            mux = self._mux
            # The cached deadline is current: every call into the core that can
            # move it earlier is followed by a service.
            if self._timer_deadline <= now:
                mux.handle_timer(now)
            # What the core queued (ACKs above all) leaves before the callbacks
            # run: a relay decrypting and writing a large batch in its callback
            # would otherwise hold back the ACKs that clock the sender.
            self._flush(now)
            while True:
                self._dispatch_events()
                # Round again only for output queued meanwhile (a callback read
                # and reopened the window, say).
                if self._closed or not mux.has_output:
                    break
                self._flush(now)
        finally:
            self._servicing = False
        if self._closed:
            return
        deadline = self._next_deadline(now)
        if deadline != self._timer_deadline:
            self._timer_deadline = deadline
            scope = self._timer_scope
            if scope is not None:
                # Moving a trio deadline costs 2-6 us; a timer wake-up about 60
                # us of CPU (trio delivers it as a Cancelled). So pull the
                # wake-up earlier at once, but push it later (the timer it was
                # for went away, e.g. a delayed ACK that rode on data) only once
                # it is less than PUSH_HORIZON away: request/response traffic
                # then neither wakes the timer task for nothing nor moves its
                # wake-up twice per exchange, and bulk traffic, whose deadlines
                # move on every packet, does not pay for every move.
                armed = self._armed_deadline
                if deadline < armed or (deadline > armed and armed - now < PUSH_HORIZON):
                    scope.deadline = self._armed_deadline = deadline

    def _next_deadline(self, now: float) -> float:
        """The earliest core timer, without scanning every connection each time.

        ``UtpMultiplexer.get_timer`` looks at every connection, including the
        closed ones that linger (``linger_time``, 10 s) to re-acknowledge a late
        FIN: at a few hundred connections a second that is thousands, on every
        packet (a quarter of a busy node's CPU). Their only timer is the end of
        lingering, which may run late. So the full scan runs every
        ``FULL_TIMER_SCAN`` seconds (or once its result is due); in between only
        connections that still have a stream are asked.
        """
        if now >= self._full_scan_due or self._idle_deadline <= now:
            self._full_scan_due = now + FULL_TIMER_SCAN
            timer = self._mux.get_timer()
            self._idle_deadline = math.inf if timer is None else timer
            return self._idle_deadline
        deadline = self._idle_deadline
        for stream in self._streams.values():
            conn_deadline = stream.connection.next_deadline()
            if conn_deadline is not None and conn_deadline < deadline:
                deadline = conn_deadline
        return deadline

    def service_if_output(self) -> None:
        """service, but only if the core has something to send (after a read,
        which queues output only for a window update: most reads do not, and a
        full service costs several microseconds per read)."""
        mux = self._mux
        if mux.has_output and not self._servicing:
            self.service(trio.current_time())

    def forget(self, conn: UtpConnection) -> None:
        """A stream that ended on its own (aborted) leaves the endpoint's table."""
        self._streams.pop(id(conn), None)

    def _flush(self, now: float) -> None:
        datagrams = self._mux.datagrams_to_send(now)
        if datagrams:
            if self._routes_paths:
                datagrams = self._send_over_paths(datagrams, now)
                if not datagrams:
                    return
            self._udp.send(datagrams)

    def _send_over_paths(self, datagrams: list[tuple[bytes, Address]], now: float) -> list[tuple[bytes, Address]]:
        """Hand the datagrams for virtual paths to their senders; the rest (for
        the socket) are returned, in order."""
        direct = []
        paths = self._paths
        stats = self.stats
        for item in datagrams:
            path = item[1]
            if type(path) is not VirtualPath:
                direct.append(item)
                continue
            send = paths.get(path)
            if send is None:
                stats.path_unrouted += 1
                continue
            try:
                send(item[0])
            except Exception as error:  # the sender's defect: this datagram is lost
                stats.path_send_errors += 1
                self._udp.errors.report(error, f"sending over {path!r}", now)
            else:
                stats.path_datagrams_sent += 1
        return direct

    def _dispatch_events(self) -> None:
        next_event = self._mux.next_event
        streams = self._streams
        while (event := next_event()) is not None:
            kind = type(event)
            conn = event.conn
            if kind is IncomingConnection:
                self._on_incoming(conn)
                continue
            stream = streams.get(id(conn))
            if stream is None:
                continue
            if kind is DataAvailable or kind is EofReceived:
                stream.wake_readers()
            elif kind is SendSpaceAvailable:
                stream.wake_senders()
            elif kind is Connected:
                stream.mark_connected()
            elif type(event) is ConnectionClosed:  # (kind, as mypy narrows it)
                del streams[id(conn)]
                stream.mark_finished(event.error)

    def _on_incoming(self, conn: UtpConnection) -> None:
        if not self._multiplexer_accepting:
            conn.abort()
            return
        stream = UtpStream(self, conn, connected=True)
        try:
            self._accept_send.send_nowait(stream)
        except (trio.WouldBlock, trio.ClosedResourceError, trio.BrokenResourceError):
            self.stats.accept_overflow += 1
            conn.abort()
            return
        self._streams[id(conn)] = stream

    def _deliver_message(self, data: bytes, addr: Address) -> None:
        self.stats.messages_received += 1
        message = decode_message(data)
        for subscriber in self._subscribers:
            try:
                subscriber.send_nowait((message, addr))
            except trio.WouldBlock:
                self.stats.messages_dropped += 1
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self.stats.messages_dropped += 1

    def _deliver_keyed(self, data: bytes, addr: Address) -> None:
        self.stats.keyed_received += 1
        handler = self.on_keyed_message
        if handler is None:
            self.stats.keyed_unhandled += 1
            return
        handler(data, addr)

    def _start(self, nursery: trio.Nursery) -> None:
        self._nursery = nursery
        nursery.start_soon(self._udp.receive_loop, self.service)
        nursery.start_soon(self._timer_loop)
        nursery.start_soon(self._udp.backlog_loop, self.service)

    def _close(self) -> None:
        """Abort every connection, wake every waiter, end the endpoint's tasks."""
        if self._closed:
            return
        self.accepting = False
        now = trio.current_time()
        error = EndpointClosed("endpoint is closed")
        for stream in list(self._streams.values()):
            stream.mark_finished(error)  # first: the abort below reports no error
            stream.connection.abort()
        # One last flush so peers get our RESETs.
        self._dispatch_events()
        self._flush(now)
        self._closed = True
        for stream in list(self._streams.values()):
            stream.mark_finished(error)
        self._streams.clear()
        self._accept_send.close()
        # Streams accepted but never taken by accept(): nobody else will close them.
        while True:
            try:
                pending = self._accept_receive.receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                break
            pending.mark_finished(error)
        for subscriber in self._subscribers:
            subscriber.close()
        self._subscribers.clear()
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()


@asynccontextmanager
async def open_endpoint(
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    dual_stack: bool = False,
    config: UtpConfig | None = None,
    socket_buffer_size: int = DEFAULT_SOCKET_BUFFER_SIZE,
    close_timeout: float = 5.0,
    offload: bool = False,
) -> AsyncIterator[Endpoint]:
    """Bind one UDP socket and run a uTP endpoint on it for the block's duration.

    ``dual_stack=True`` binds an IPv6 socket that also serves IPv4 (IPv4 peers
    appear as plain ("a.b.c.d", port)). ``close_timeout`` bounds a stream's
    graceful ``aclose`` before it resets the connection.

    ``offload=True`` uses Linux UDP segmentation offload: runs of full-size
    datagrams to one peer leave in one ``sendmsg`` (UDP_SEGMENT) and arrive
    coalesced (UDP_GRO), several times cheaper per datagram than one syscall
    each. Peers see ordinary datagrams. Off by default because anything that
    judges packets before the kernel splits them (an nftables netdev ingress
    drop rule on a veth, as in tests/natlab) sees a whole run as one packet.
    """
    sock = await bind_udp_socket(host, port, dual_stack, socket_buffer_size)
    body_error: BaseException | None = None
    try:
        endpoint = Endpoint(
            sock, UtpMultiplexer(config), close_timeout=close_timeout, offload=offload
        )
        async with trio.open_nursery() as nursery:
            endpoint._start(nursery)
            try:
                yield endpoint
            except BaseException as exc:
                # Re-raised below, outside the nursery, so callers see their own
                # exception rather than an ExceptionGroup wrapping it.
                body_error = exc
            finally:
                endpoint._close()
    finally:
        sock.close()
    if body_error is not None:
        raise body_error
