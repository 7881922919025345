"""The endpoint's socket side: set-up, batched reads and writes, the send backlog.

``bind_udp_socket`` binds the one UDP socket (kernel buffers sized). ``UdpSocket``
does everything that touches it after that: it drains datagrams in batches,
sorts each one (uTP to the multiplexer, 4-byte out-of-band messages and keyed
messages to the endpoint, the rest counted as junk), sends what the multiplexer
queued (one syscall per run of datagrams with segmentation offload), and keeps
the datagrams that met a full send buffer until the socket is writable. It maps
addresses between the socket's form and the users' (an IPv4 peer of a dual-stack
socket is ("a.b.c.d", port) to users).

Performance (see notes/performance.md): every awaited trio socket call costs a
scheduler pass, several times the cost of the syscall. So the receive task calls
the plain non-blocking socket in a loop and hands the endpoint a batch; it only
awaits ``wait_readable`` when the socket is empty, and yields to the scheduler
every ``RECEIVE_BATCH`` datagrams.

Linux UDP segmentation offload: a sender may hand the kernel one buffer holding a
run of equal-size datagrams (the last may be shorter) with a UDP_SEGMENT control
message; the kernel sends them as separate datagrams. A receiver that enables
UDP_GRO may get such a run in one read, with a UDP_GRO control message giving the
segment size. One syscall then carries up to 64 datagrams.

An unexpected exception while one datagram is handled (a defect in the core, or
in a subscriber) is contained: counted in ``EndpointStats.handler_errors``,
logged (the first few with their traceback, then one line per minute with the
count), the datagram dropped; the receive loop, the endpoint and every other
connection carry on. Likewise for the service that follows a batch.
"""

from __future__ import annotations

import functools
import ipaddress
import logging
import socket as stdlib_socket
import struct
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

import trio

from nat.errors import NatError
from nat.message import is_keyed_message, is_message
from nat.utp.packet import HEADER_SIZE, UTP_FIRST_BYTE

__all__ = [
    "DEFAULT_SOCKET_BUFFER_SIZE",
    "GSO_MAX_SEGMENTS",
    "GSO_MAX_BYTES",
    "RECEIVE_BATCH",
    "SEND_BACKLOG_LIMIT",
    "Address",
    "EndpointStats",
    "UdpSocket",
    "bind_udp_socket",
    "enable_gro",
    "gro_segment_size",
    "is_ip_literal",
]

Address = tuple[Any, ...]

log = logging.getLogger(__name__)

RECEIVE_BATCH = 64  # datagrams drained before yielding to the scheduler
MAX_DATAGRAM_SIZE = 65535
SEND_BACKLOG_LIMIT = 4096  # datagrams queued while the socket would block

# Large kernel buffers: the original lost most of its throughput to receive
# buffer overflow (208 KiB default). The kernel caps these at rmem_max/wmem_max
# unless we are privileged (SO_RCVBUFFORCE), which we try first.
DEFAULT_SOCKET_BUFFER_SIZE = 8 * 1024 * 1024

# UDP segmentation offload (Linux >= 4.18 GSO, 5.0 GRO): see open_endpoint(offload=).
SOL_UDP = 17
UDP_SEGMENT = 103
UDP_GRO = 104
GSO_MAX_SEGMENTS = 64  # the kernel's UDP_MAX_SEGMENTS
GSO_MAX_BYTES = 65000  # one GSO send stays below the 64 KiB IP datagram limit
GSO_SIZE = struct.Struct("=H")
_CMSG_INT = struct.Struct("=i")
GRO_CMSG_SPACE = stdlib_socket.CMSG_SPACE(_CMSG_INT.size)
_SO_RCVBUFFORCE = getattr(stdlib_socket, "SO_RCVBUFFORCE", 33)
_SO_SNDBUFFORCE = getattr(stdlib_socket, "SO_SNDBUFFORCE", 32)


def _set_buffer(sock: stdlib_socket.socket, forced: int, normal: int, size: int) -> None:
    try:
        sock.setsockopt(stdlib_socket.SOL_SOCKET, forced, size)
    except OSError:
        # Unprivileged: the kernel silently caps at net.core.[rw]mem_max.
        sock.setsockopt(stdlib_socket.SOL_SOCKET, normal, size)


async def bind_udp_socket(
    host: str, port: int, dual_stack: bool, buffer_size: int
) -> stdlib_socket.socket:
    if dual_stack:
        if host in ("", "0.0.0.0", "::"):
            host = "::"
        elif ipaddress.ip_address(host).version != 6:
            raise ValueError(f"dual_stack needs an IPv6 (or wildcard) host, not {host!r}")
    infos = await trio.socket.getaddrinfo(
        host, port, type=stdlib_socket.SOCK_DGRAM, flags=stdlib_socket.AI_PASSIVE
    )
    family, _, _, _, sockaddr = infos[0]
    sock = stdlib_socket.socket(family, stdlib_socket.SOCK_DGRAM)
    try:
        if family == stdlib_socket.AF_INET6:
            sock.setsockopt(stdlib_socket.IPPROTO_IPV6, stdlib_socket.IPV6_V6ONLY, not dual_stack)
        _set_buffer(sock, _SO_RCVBUFFORCE, stdlib_socket.SO_RCVBUF, buffer_size)
        _set_buffer(sock, _SO_SNDBUFFORCE, stdlib_socket.SO_SNDBUF, buffer_size)
        sock.bind(sockaddr)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def enable_gro(sock: stdlib_socket.socket) -> bool:
    try:
        sock.setsockopt(SOL_UDP, UDP_GRO, 1)
    except OSError:
        return False  # an old kernel: receive datagram by datagram
    return True


@functools.lru_cache(maxsize=4096)
def is_ip_literal(host: str) -> bool:
    # Cached: a relay node checks the address of every datagram it sends on, and the
    # parse cost ~11% of its CPU; peers' addresses repeat, so the cache is bounded.
    try:
        ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    return True


def gro_segment_size(ancillary: list[tuple[int, int, bytes]], size: int) -> int:
    """The segment size a UDP_GRO read reports (``size`` itself if none)."""
    for level, kind, value in ancillary:
        if level == SOL_UDP and kind == UDP_GRO and len(value) >= _CMSG_INT.size:
            return _CMSG_INT.unpack_from(value)[0] or size
    return size


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
    handler_errors: int = 0  # unexpected exceptions handling a datagram (dropped) or after a batch
    # virtual paths (Endpoint.add_path): datagrams handed to their senders,
    # injected from them, dropped because their path had no sender (removed, or
    # never added), that raised in the sender (dropped), and injected ones that
    # were not uTP
    path_datagrams_sent: int = 0
    path_datagrams_received: int = 0
    path_unrouted: int = 0
    path_send_errors: int = 0
    path_junk: int = 0
    keyed_received: int = 0  # keyed messages (00 00 00 tt, tt >= 2, longer than 4 bytes) received
    keyed_unhandled: int = 0  # keyed messages dropped because no handler is set

    def as_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


class ErrorReport:
    """Logs unexpected exceptions without flooding the log: the first ``first``
    with their traceback, then at most one line per ``interval`` seconds saying
    how many came meanwhile (with the latest)."""

    def __init__(self, first: int = 5, interval: float = 60.0) -> None:
        self.first = first
        self.interval = interval
        self.count = 0
        self._unlogged = 0
        self._next_line = -float("inf")

    def report(self, error: BaseException, what: str, now: float) -> None:
        self.count += 1
        if self.count <= self.first:
            log.error("unexpected error %s (contained: dropped, the endpoint carries on)", what, exc_info=error)
            if self.count == self.first:
                self._next_line = now + self.interval
            return
        self._unlogged += 1
        if now >= self._next_line:
            log.error(
                "%d more unexpected errors handling datagrams (contained), the latest %s: %s: %s",
                self._unlogged, what, type(error).__name__, error,
            )
            self._unlogged = 0
            self._next_line = now + self.interval


class UdpSocket:
    """The endpoint's one UDP socket, read and written in batches.

    ``receive_utp(datagram, address, now)`` takes every uTP datagram (the
    multiplexer's ``receive_datagram``), ``receive_message(datagram, address)``
    every 4-byte out-of-band message, ``receive_keyed(datagram, address)`` every
    keyed message. Counters go to ``stats`` (the endpoint's).
    """

    def __init__(
        self,
        sock: stdlib_socket.socket,
        stats: EndpointStats,
        receive_utp: Callable[[bytes, Address, float], None],
        receive_message: Callable[[bytes, Address], None],
        receive_keyed: Callable[[bytes, Address], None] | None = None,
        *,
        offload: bool = False,
    ) -> None:
        self.sock = sock
        self.stats = stats
        self._receive_utp = receive_utp
        self._receive_message = receive_message
        self._receive_keyed = receive_keyed
        self._receive_buffer = bytearray(MAX_DATAGRAM_SIZE)
        self._receive_view = memoryview(self._receive_buffer)
        self._gso = offload
        self._gro = offload and enable_gro(sock)
        self.family = sock.family
        self.ipv6 = sock.family == stdlib_socket.AF_INET6
        self.dual_stack = self.ipv6 and not sock.getsockopt(stdlib_socket.IPPROTO_IPV6, stdlib_socket.IPV6_V6ONLY)
        bound = sock.getsockname()
        self.address: Address = (bound[0], bound[1])
        self._send_backlog: deque[tuple[bytes, Address]] = deque()
        self._backlog_waiting = trio.Event()
        self.errors = ErrorReport()

    # ---- addresses

    def user_address(self, sockaddr: Address) -> Address:
        """The address as users see it: (host, port); IPv4-mapped IPv6 unmapped."""
        if not self.ipv6:
            return sockaddr
        host = sockaddr[0]
        if host.startswith("::ffff:") and "." in host:
            return (host[7:], sockaddr[1])
        if len(sockaddr) > 3 and sockaddr[3]:
            return (host, sockaddr[1], sockaddr[2], sockaddr[3])
        return (host, sockaddr[1])

    def socket_address(self, address: Address) -> Address:
        if self.ipv6 and self.dual_stack and ":" not in address[0]:
            return ("::ffff:" + address[0], address[1])
        return address

    # ---- receiving

    async def receive_loop(self, after_batch: Callable[[float], None]) -> None:
        """Drain the socket forever; ``after_batch(now)`` after every batch that
        held uTP datagrams or errors."""
        sock = self.sock
        current_time = trio.current_time
        wait_readable = trio.lowlevel.wait_readable
        checkpoint = trio.lowlevel.checkpoint
        while True:
            now = current_time()
            would_block, utp, errors = self.drain(now)
            if utp or errors:
                try:
                    after_batch(now)
                except Exception as error:  # a defect: it must not end the endpoint
                    self.contain(error, "after a batch of datagrams", now)
            if would_block:
                # No cancel scope per wait (entering and leaving one with a
                # deadline costs more than the syscalls): the endpoint's timers
                # have their own task.
                await wait_readable(sock)
            else:
                await checkpoint()

    def drain(self, now: float) -> tuple[bool, int, int]:
        """Read up to RECEIVE_BATCH datagrams and hand each on; (socket empty, uTP
        count, errors). With UDP_GRO one read may hold several datagrams of one
        sender, all ``gso_size`` long but the last."""
        # recv*_into a reused buffer plus one exact-size copy is cheaper than
        # recvfrom(65535), which allocates 64 KiB per datagram and shrinks it.
        buffer = self._receive_buffer
        view = self._receive_view
        gro = self._gro
        buffers = [buffer]
        recvmsg_into = self.sock.recvmsg_into
        recvfrom_into = self.sock.recvfrom_into
        receive_utp = self._receive_utp
        utp_first = UTP_FIRST_BYTE
        user_address = self.user_address if self.ipv6 else None
        count = utp = junk = errors = 0
        ancillary: list[tuple[int, int, bytes]] = []
        would_block = False
        while count + errors < RECEIVE_BATCH:
            try:
                if gro:
                    size, ancillary, _flags, addr = recvmsg_into(buffers, GRO_CMSG_SPACE)
                else:
                    size, addr = recvfrom_into(buffer)
            except BlockingIOError:
                would_block = True
                break
            except OSError:
                # e.g. ICMP errors reported on the socket: not fatal for UDP.
                errors += 1
                continue
            if user_address is not None:
                addr = user_address(addr)
            segment = gro_segment_size(ancillary, size) if ancillary else size
            start = 0
            while True:  # once, unless a GRO read coalesced a run
                end = start + segment
                if end > size:
                    end = size
                count += 1
                # A copy: the core may keep slices of what it is given.
                datagram = bytes(view[start:end])
                # nat.utp.packet.looks_like_utp, its table indexed here (a call
                # less per datagram)
                if end - start >= HEADER_SIZE and utp_first[datagram[0]]:
                    utp += 1
                    try:
                        receive_utp(datagram, addr, now)
                    except NatError:
                        # The core counts malformed input itself; this guards
                        # the driver should a typed error escape anyway.
                        self.stats.malformed_utp += 1
                    except Exception as error:  # a defect: drop this datagram only
                        self.contain(error, f"handling a uTP datagram from {addr!r}", now)
                elif is_message(datagram):
                    try:
                        self._receive_message(datagram, addr)
                    except Exception as error:
                        self.contain(error, f"handling a message from {addr!r}", now)
                elif is_keyed_message(datagram) and self._receive_keyed is not None:
                    try:
                        self._receive_keyed(datagram, addr)
                    except Exception as error:
                        self.contain(error, f"handling a keyed message from {addr!r}", now)
                else:
                    junk += 1
                start = end
                if start >= size:
                    break
        stats = self.stats
        # (a failed GRO read counts as a datagram received, as it always has)
        stats.datagrams_received += count + errors if gro else count
        stats.utp_datagrams_received += utp
        stats.junk_dropped += junk
        stats.receive_errors += errors
        return would_block, utp, errors

    def contain(self, error: Exception, what: str, now: float) -> None:
        """An unexpected exception: counted and logged (rate-limited), not raised."""
        self.stats.handler_errors += 1
        self.errors.report(error, what, now)

    # ---- sending

    def send_one(self, data: bytes, address: Address) -> bool:
        """Send one datagram now if the socket takes it (counted either way)."""
        try:
            self.sock.sendto(data, self.socket_address(address))
        except BlockingIOError:
            self.stats.send_dropped += 1
            return False
        except OSError:
            self.stats.send_errors += 1
            return False
        self.stats.datagrams_sent += 1
        return True

    def send(self, datagrams: list[tuple[bytes, Address]]) -> None:
        """Send the multiplexer's datagrams, in order; what meets a full socket
        buffer waits in the backlog."""
        if self._send_backlog:
            self._queue_backlog(datagrams, 0)  # keep the order
        elif self._gso and len(datagrams) > 1:
            self._send_segmented(datagrams)
        else:
            self._send_each(datagrams, 0)

    async def backlog_loop(self, after_drain: Callable[[float], None]) -> None:
        """Drain datagrams that met a full socket send buffer; ``after_drain(now)``
        each time the backlog emptied."""
        sock = self.sock
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
            after_drain(trio.current_time())

    def _send_each(self, datagrams: list[tuple[bytes, Address]], start: int) -> None:
        sendto = self.sock.sendto
        to_socket = self.socket_address if self.dual_stack else None
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
        sendmsg = self.sock.sendmsg
        to_socket = self.socket_address if self.dual_stack else None
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
        to_socket = self.socket_address if self.dual_stack else None
        for data, addr in datagrams[start:]:
            if len(backlog) >= SEND_BACKLOG_LIMIT:
                self.stats.send_dropped += 1
                continue
            backlog.append((data, to_socket(addr) if to_socket else addr))
        self._backlog_waiting.set()
