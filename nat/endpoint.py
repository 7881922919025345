"""The UDP endpoint: one socket shared by uTP connections and out-of-band messages.

Layers: ``UtpMultiplexer`` (sans-IO, nat/utp/) owns every uTP connection on the
socket; this module is its trio driver. It owns the socket, the clock and the
timer, turns multiplexer events into wake-ups of ``UtpStream`` tasks, and hands
out-of-band messages (nat/message.py) to subscribers.

Performance (see notes/performance.md): every awaited trio socket call costs a
scheduler pass, several times the cost of the syscall. So the receive task calls
the plain non-blocking socket in a loop, feeds the multiplexer a batch of
datagrams, then flushes what the multiplexer wants to send. It only awaits
``wait_readable`` when the socket is empty (no cancel scope per wait: a separate
task sleeps until the core's timer), and yields to the scheduler every
``RECEIVE_BATCH`` datagrams. Application tasks (send_all,
receive_some) also flush synchronously after acting on a connection, so data goes
out without a task switch.
"""

from __future__ import annotations

import ipaddress
import math
import socket as stdlib_socket
from collections import deque
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

import trio

from nat.errors import EndpointClosed, NatError, UtpConnectionRefused
from nat.message import classify_datagram, decode_message, encode_message
from nat.utp.events import (
    ConnectionClosed,
    Connected,
    DataAvailable,
    EofReceived,
    IncomingConnection,
    SendSpaceAvailable,
)
from nat.utp.multiplexer import UtpMultiplexer

from nat.stream import UtpStream
from nat.udp import (
    DEFAULT_SOCKET_BUFFER_SIZE,
    GRO_CMSG_SPACE,
    GSO_MAX_BYTES,
    GSO_MAX_SEGMENTS,
    GSO_SIZE,
    SOL_UDP,
    UDP_SEGMENT,
    enable_gro,
    gro_segment_size,
    is_ip_literal,
)
from nat.udp import bind_udp_socket as _bind_socket  # a module global: tests wrap it

if TYPE_CHECKING:
    from nat.utp.connection import UtpConnection
    from nat.utp.config import UtpConfig

__all__ = ["Endpoint", "EndpointStats", "open_endpoint", "Address"]

Address = tuple[Any, ...]

RECEIVE_BATCH = 64  # datagrams drained before yielding to the scheduler
MAX_DATAGRAM_SIZE = 65535
TIMER_GRANULARITY = 0.0005  # shortest wait for a timer, in seconds
FULL_TIMER_SCAN = 0.25  # seconds between scans of every connection's timer
PUSH_HORIZON = 0.002  # the timer task's wake-up is pushed later only once it is this close
SEND_BACKLOG_LIMIT = 4096  # datagrams queued while the socket would block
ACCEPT_BACKLOG = 128  # accepted connections waiting for accept()
SUBSCRIBER_BUFFER = 256  # messages buffered per subscriber before dropping


@dataclass
class EndpointStats:
    """Counters of one endpoint (monotonic, for tests and diagnostics)."""

    datagrams_received: int = 0
    datagrams_sent: int = 0
    utp_datagrams_received: int = 0
    messages_received: int = 0
    messages_sent: int = 0
    junk_dropped: int = 0
    malformed_utp: int = 0  # uTP-looking datagrams the multiplexer rejected
    messages_dropped: int = 0  # a subscriber's buffer was full
    send_errors: int = 0  # sendto failed (unreachable, bad address, ...)
    send_dropped: int = 0  # send backlog full: datagram dropped (uTP resends)
    receive_errors: int = 0
    accept_overflow: int = 0  # incoming connections refused: nobody accepting
    offload_failures: int = 0  # GSO refused by the kernel: fell back to plain sends
    segmented_sends: int = 0  # sendmsg calls that carried a run of datagrams (GSO)

    def as_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


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
        self._sock = sock
        self._mux = multiplexer
        self._receive_buffer = bytearray(MAX_DATAGRAM_SIZE)
        self._receive_view = memoryview(self._receive_buffer)
        self._gso = offload
        self._gro = offload and enable_gro(sock)
        self._family = sock.family
        self._ipv6 = sock.family == stdlib_socket.AF_INET6
        self._dual_stack = self._ipv6 and not sock.getsockopt(
            stdlib_socket.IPPROTO_IPV6, stdlib_socket.IPV6_V6ONLY
        )
        bound = sock.getsockname()
        self.address: Address = (bound[0], bound[1])
        self.stats = EndpointStats()
        self.close_timeout = close_timeout
        self._streams: dict[int, UtpStream] = {}
        self._accept_send, self._accept_receive = trio.open_memory_channel[UtpStream](
            ACCEPT_BACKLOG
        )
        self._subscribers: list[trio.MemorySendChannel[tuple[int, Address]]] = []
        self._send_backlog: deque[tuple[bytes, Address]] = deque()
        self._backlog_waiting = trio.Event()
        self._timer_deadline = math.inf
        self._full_scan_due = -math.inf  # see _next_deadline
        self._idle_deadline = math.inf  # earliest timer of the last full scan
        self._armed_deadline = math.inf  # the timer task's wake-up (see _service)
        self._timer_scope: trio.CancelScope | None = None
        self._closed = False
        self._servicing = False  # inside _service (see there)
        self._nursery: trio.Nursery | None = None
        self._multiplexer_accepting = True
        self._mux.accepting = True

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

    async def connect(self, address: Address) -> UtpStream:
        """Open a uTP connection; UtpConnectionRefused / UtpTimeout on failure."""
        self._check_open()
        resolved = await self._resolve(address)
        self._check_open()
        now = trio.current_time()
        conn = self._mux.connect(resolved, now)
        stream = UtpStream(self, conn, connected=False)
        self._streams[id(conn)] = stream
        self._service(now)
        try:
            await stream._wait_connected()
        except BaseException:
            stream._abort_quietly()
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
        try:
            self._sock.sendto(data, self._socket_address(address))
        except BlockingIOError:
            self.stats.send_dropped += 1
            return
        except OSError:
            self.stats.send_errors += 1
            return
        self.stats.messages_sent += 1
        self.stats.datagrams_sent += 1

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

    # ---- the driver ---------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise EndpointClosed("endpoint is closed")

    async def _resolve(self, address: Address) -> Address:
        host, port = address[0], address[1]
        if not isinstance(port, int) or not 0 < port < 65536:
            raise ValueError(f"bad port in {address!r}")
        if is_ip_literal(host):
            self._check_family(host)
            return self._user_address(self._socket_address((host, port)))
        family = stdlib_socket.AF_UNSPEC if self._dual_stack else self._family
        infos = await trio.socket.getaddrinfo(host, port, family=family, type=stdlib_socket.SOCK_DGRAM)
        if not infos:
            raise UtpConnectionRefused(f"cannot resolve {host!r}")
        return self._user_address(infos[0][4])

    def _check_family(self, host: str) -> None:
        version = ipaddress.ip_address(host.split("%", 1)[0]).version
        if version == 6 and not self._ipv6:
            raise ValueError(f"{host} is IPv6 but this endpoint is bound to IPv4")
        if version == 4 and self._ipv6 and not self._dual_stack:
            raise ValueError(f"{host} is IPv4 but this endpoint is IPv6-only (dual_stack=False)")

    def _user_address(self, sockaddr: Address) -> Address:
        """The address as users see it: (host, port); IPv4-mapped IPv6 unmapped."""
        if not self._ipv6:
            return sockaddr
        host = sockaddr[0]
        if host.startswith("::ffff:") and "." in host:
            return (host[7:], sockaddr[1])
        if len(sockaddr) > 3 and sockaddr[3]:
            return (host, sockaddr[1], sockaddr[2], sockaddr[3])
        return (host, sockaddr[1])

    def _socket_address(self, address: Address) -> Address:
        if self._ipv6 and self._dual_stack and ":" not in address[0]:
            return ("::ffff:" + address[0], address[1])
        return address

    async def _receive_loop(self) -> None:
        sock = self._sock
        current_time = trio.current_time
        drain = self._drain_offloaded if self._gro else self._drain
        wait_readable = trio.lowlevel.wait_readable
        checkpoint = trio.lowlevel.checkpoint
        while True:
            now = current_time()
            would_block, utp, errors = drain(now)
            if utp or errors:
                self._service(now)
            if would_block:
                # No cancel scope per wait (entering and leaving one with a
                # deadline costs more than the syscalls): timers have their
                # own task, _timer_loop.
                await wait_readable(sock)
            else:
                await checkpoint()

    async def _timer_loop(self) -> None:
        """Run the core's timers: sleep until the cached deadline, then service.

        _service moves this task's wake-up (earlier at once, later only when it
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
                self._service(now)

    def _drain(self, now: float) -> tuple[bool, int, int]:
        """Read up to RECEIVE_BATCH datagrams; (socket empty, uTP count, errors)."""
        # recvfrom_into a reused buffer plus one exact-size copy is cheaper than
        # recvfrom(65535), which allocates 64 KiB per datagram and shrinks it.
        buffer = self._receive_buffer
        view = self._receive_view
        recvfrom_into = self._sock.recvfrom_into
        receive_datagram = self._mux.receive_datagram
        user_address = self._user_address if self._ipv6 else None
        received = utp = junk = errors = 0
        would_block = False
        for _ in range(RECEIVE_BATCH):
            try:
                size, addr = recvfrom_into(buffer)
            except BlockingIOError:
                would_block = True
                break
            except OSError:
                # e.g. ICMP errors reported on the socket: not fatal for UDP.
                errors += 1
                continue
            received += 1
            if user_address is not None:
                addr = user_address(addr)
            first = buffer[0] if size else 0xFF
            if size >= 20 and first & 0x0F == 1 and first >> 4 <= 4:
                utp += 1
                try:
                    # A copy: the core may keep slices of what it is given.
                    receive_datagram(bytes(view[:size]), addr, now)
                except NatError:
                    # The core counts malformed input itself; this guards the
                    # driver should a typed error escape anyway.
                    self.stats.malformed_utp += 1
            elif size == 4 and first == 0:
                self._deliver_message(bytes(view[:4]), addr)
            else:
                junk += 1
        self._count_batch(received, utp, junk, errors)
        return would_block, utp, errors

    def _count_batch(self, received: int, utp: int, junk: int, errors: int) -> None:
        stats = self.stats
        stats.datagrams_received += received
        stats.utp_datagrams_received += utp
        stats.junk_dropped += junk
        stats.receive_errors += errors

    def _drain_offloaded(self, now: float) -> tuple[bool, int, int]:
        """Like _drain, on a socket with UDP_GRO: one read may hold several
        datagrams of one sender, all ``gso_size`` long but the last. The
        per-datagram sorting (uTP, message, junk) is written out in both loops on
        purpose: a call per datagram is measurable on the bulk path."""
        buffers = [self._receive_buffer]
        view = self._receive_view
        recvmsg_into = self._sock.recvmsg_into
        receive_datagram = self._mux.receive_datagram
        user_address = self._user_address if self._ipv6 else None
        received = utp = junk = errors = 0
        would_block = False
        while received < RECEIVE_BATCH:
            try:
                size, ancillary, _flags, addr = recvmsg_into(buffers, GRO_CMSG_SPACE)
            except BlockingIOError:
                would_block = True
                break
            except OSError:
                errors += 1
                received += 1
                continue
            if user_address is not None:
                addr = user_address(addr)
            segment = gro_segment_size(ancillary, size) if ancillary else size
            start = 0
            while True:
                end = min(start + segment, size)
                datagram = bytes(view[start:end])
                received += 1
                length = end - start
                first = datagram[0] if length else 0xFF
                if length >= 20 and first & 0x0F == 1 and first >> 4 <= 4:
                    utp += 1
                    try:
                        receive_datagram(datagram, addr, now)
                    except NatError:
                        self.stats.malformed_utp += 1
                elif length == 4 and first == 0:
                    self._deliver_message(datagram, addr)
                else:
                    junk += 1
                start = end
                if start >= size:
                    break
        self._count_batch(received, utp, junk, errors)
        return would_block, utp, errors

    async def _send_backlog_loop(self) -> None:
        """Drain datagrams that met a full socket send buffer."""
        sock = self._sock
        backlog = self._send_backlog
        while True:
            await self._backlog_waiting.wait()
            while backlog:
                await trio.lowlevel.wait_writable(sock)
                while backlog:
                    data, sockaddr = backlog[0]
                    try:
                        sock.sendto(data, sockaddr)
                    except BlockingIOError:
                        break
                    except OSError:
                        self.stats.send_errors += 1
                    else:
                        self.stats.datagrams_sent += 1
                    backlog.popleft()
            self._backlog_waiting = trio.Event()
            self._service(trio.current_time())

    def _service(self, now: float) -> None:
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
            # move it earlier is followed by a _service.
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
            conn_deadline = stream._conn.next_deadline()
            if conn_deadline is not None and conn_deadline < deadline:
                deadline = conn_deadline
        return deadline

    def _service_if_output(self) -> None:
        """_service, but only if the core has something to send (after a read,
        which queues output only for a window update: most reads do not, and a
        full _service costs several microseconds per read)."""
        mux = self._mux
        if mux.has_output and not self._servicing:
            self._service(trio.current_time())

    def _flush(self, now: float) -> None:
        datagrams = self._mux.datagrams_to_send(now)
        if not datagrams:
            return
        if self._send_backlog:
            self._queue_backlog(datagrams, 0)  # keep the order
            return
        if self._gso and len(datagrams) > 1:
            self._send_segmented(datagrams)
        else:
            self._send_each(datagrams, 0)

    def _send_each(self, datagrams: list[tuple[bytes, Address]], start: int) -> None:
        sendto = self._sock.sendto
        to_socket = self._socket_address if self._dual_stack else None
        sent = errors = 0
        for index in range(start, len(datagrams)):
            data, addr = datagrams[index]
            if to_socket is not None:
                addr = to_socket(addr)
            try:
                sendto(data, addr)
            except BlockingIOError:
                self._queue_backlog(datagrams, index)
                break
            except OSError:
                errors += 1
            else:
                sent += 1
        self.stats.datagrams_sent += sent
        self.stats.send_errors += errors

    def _send_segmented(self, datagrams: list[tuple[bytes, Address]]) -> None:
        """UDP GSO: one sendmsg per run of same-destination, same-size datagrams
        (the last of a run may be shorter); the kernel cuts them apart again."""
        sendmsg = self._sock.sendmsg
        to_socket = self._socket_address if self._dual_stack else None
        count = len(datagrams)
        index = 0
        while index < count:
            data, addr = datagrams[index]
            size = len(data)
            limit = min(count, index + min(GSO_MAX_SEGMENTS, GSO_MAX_BYTES // max(size, 1)))
            end = index + 1
            while end < limit:
                other, other_addr = datagrams[end]
                other_size = len(other)
                if other_addr != addr or other_size > size:
                    break
                end += 1
                if other_size < size:
                    break  # a shorter datagram can only end a run
            if end - index == 1:
                self._send_each(datagrams[index:end], 0)
                if self._send_backlog:
                    self._queue_backlog(datagrams, end)
                    return
                index = end
                continue
            payload = b"".join([datagram for datagram, _ in datagrams[index:end]])
            control = [(SOL_UDP, UDP_SEGMENT, GSO_SIZE.pack(size))]
            try:
                sendmsg([payload], control, 0, to_socket(addr) if to_socket else addr)
            except BlockingIOError:
                self._queue_backlog(datagrams, index)
                return
            except OSError:
                # No GSO on this path (EIO, EINVAL, ...): plain sends from now on.
                self._gso = False
                self.stats.offload_failures += 1
                self._send_each(datagrams, index)
                return
            self.stats.datagrams_sent += end - index
            self.stats.segmented_sends += 1
            index = end

    def _queue_backlog(self, datagrams: list[tuple[bytes, Address]], start: int) -> None:
        backlog = self._send_backlog
        to_socket = self._socket_address if self._dual_stack else None
        for data, addr in datagrams[start:]:
            if len(backlog) >= SEND_BACKLOG_LIMIT:
                self.stats.send_dropped += 1
                continue
            backlog.append((data, to_socket(addr) if to_socket else addr))
        self._backlog_waiting.set()

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
                stream._on_readable()
            elif kind is SendSpaceAvailable:
                stream._on_send_space()
            elif kind is Connected:
                stream._on_connected()
            elif kind is ConnectionClosed:
                del streams[id(conn)]
                stream._on_finished(event.error)

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

    def _close(self) -> None:
        """Abort every connection, wake every waiter, end the endpoint's tasks."""
        if self._closed:
            return
        self.accepting = False
        now = trio.current_time()
        error = EndpointClosed("endpoint is closed")
        for stream in list(self._streams.values()):
            stream._on_finished(error)  # first: the abort below reports no error
            stream._conn.abort()
        # One last flush so peers get our RESETs.
        self._dispatch_events()
        self._flush(now)
        self._closed = True
        for stream in list(self._streams.values()):
            stream._on_finished(error)
        self._streams.clear()
        self._accept_send.close()
        # Streams accepted but never taken by accept(): nobody else will close them.
        while True:
            try:
                pending = self._accept_receive.receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                break
            pending._on_finished(error)
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
    sock = await _bind_socket(host, port, dual_stack, socket_buffer_size)
    body_error: BaseException | None = None
    try:
        endpoint = Endpoint(
            sock, UtpMultiplexer(config), close_timeout=close_timeout, offload=offload
        )
        async with trio.open_nursery() as nursery:
            endpoint._nursery = nursery
            nursery.start_soon(endpoint._receive_loop)
            nursery.start_soon(endpoint._timer_loop)
            nursery.start_soon(endpoint._send_backlog_loop)
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
