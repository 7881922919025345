"""The splice (the relay): the data path of every tunnel, one TCP connection <-> TLS over uTP.

It copies both ways, carries half-close (EOF on one side becomes ``send_eof`` on
the other while the other direction keeps flowing), and ends when both
directions reached EOF, on the first error, when the peer's keep-alive times out,
or when cancelled (the connection closed locally). What happened is returned as a
``PipeOutcome``, never raised.

Why not two tasks copying between trio streams (what this replaced): each chunk
crossed three stream layers and two or three scheduler passes per node, and the
tunnel added 0.6 ms to a gRPC unary call. Here a hop costs one wake-up:

* tunnel -> TCP runs inside the endpoint. When uTP data arrives, the stream's
  ``on_readable`` callback (``_Relay.pump``) decrypts the whole records and
  writes them to the TCP socket with a non-blocking write. Only when the socket
  is full does a task take over (waiting until it drains); meanwhile nothing is
  read from uTP, so its receive window closes: backpressure end to end.
* TCP -> tunnel is one task: read the socket without blocking, encrypt, hand the
  records to uTP (``send_nowait`` sends at once). It sleeps only when the socket
  is empty or the uTP send buffer is full.

Memory per connection stays bounded: at most one chunk of records waiting for
uTP send space and one chunk of plaintext waiting for the TCP socket, plus the
transports' own bounded buffers; the socket read buffer is shared.
"""

from __future__ import annotations

import enum
import logging
import os
import threading
from dataclasses import dataclass, field

import trio
from trio.lowlevel import ParkingLot, checkpoint, wait_readable, wait_writable

from nat.stream import UtpStream
from proxy.tls import SEND_SLICE, TLSStream
from proxy.tls.errors import TLSTruncatedError
from proxy.tunnel.connection import TRANSPORT_ERRORS, as_peer_reset
from proxy.tunnel.errors import ConnectionKeepAliveTimeout
from proxy.tunnel.peer import Liveness
from proxy.tunnel.records import EndReason

log = logging.getLogger(__name__)

# Plaintext read from the TCP socket at once: one SSL_write, one BIO read.
READ_CHUNK = SEND_SLICE
# Ciphertext taken from the uTP stream at once, and plaintext decrypted at once.
TUNNEL_READ = 256 * 1024
DECRYPT_CHUNK = 256 * 1024
# Socket reads in a row that found data before the reading task yields anyway,
# so a client that never pauses cannot starve the other tasks.
READS_BEFORE_YIELD = 16
# What an idle connection keeps of what its far side sends before the splice
# starts (a server that speaks first); past it, reading stops (backpressure).
IDLE_BUFFER = 256 * 1024


@dataclass
class PipeOutcome:
    first_eof: str | None = None  # "local" or "peer": which side ended its sending first
    error: BaseException | None = None
    local_eof: bool = False
    peer_eof: bool = False
    bytes_to_peer: int = 0
    bytes_from_peer: int = 0
    failed: trio.Event = field(default_factory=trio.Event)

    @property
    def reason(self) -> EndReason:
        if isinstance(self.error, ConnectionKeepAliveTimeout):
            return EndReason.KEEP_ALIVE_TIMEOUT
        if self.error is not None:
            return EndReason.RESET
        return EndReason.CLOSED_BY_PEER if self.first_eof == "peer" else EndReason.CLOSED_LOCALLY

    @property
    def reported_error(self) -> BaseException | None:
        """The error given to connection_lost_callback (connection.as_peer_reset)."""
        return None if self.error is None else as_peer_reset(self.error)


_buffers = threading.local()


def _read_buffer() -> bytearray:
    """One socket read buffer per thread, shared by every relay in it: a relay
    fills it and encrypts it before it can yield, so a buffer per connection
    (128 KiB each, a thousand idle tunnels 128 MiB) would buy nothing."""
    buffer = getattr(_buffers, "read", None)
    if buffer is None:
        buffer = _buffers.read = bytearray(READ_CHUNK)
    return buffer


class _ToLocal(enum.Enum):
    FLOWING = "flowing"  # pump writes straight to the socket
    BLOCKED = "blocked"  # the socket is full: the to_local task drains `pending`
    EOF = "eof"  # the peer's close_notify arrived: the to_local task sends EOF
    STOPPED = "stopped"  # failed


class IdleTunnel:
    """Watches the tunnel of a connection that has no TCP end yet (opened ahead of
    a CONNECT), so that its end is noticed: what arrives is decrypted into
    ``early`` (at most IDLE_BUFFER; the splice hands it on first), and ``ended``
    is set on the peer's close_notify, a uTP end without it, or any failure.
    Runs inside the endpoint, like the relay's pump. ``ended``: the event to set
    (the caller's own, so the end shows at once, before any task runs)."""

    def __init__(self, tls: TLSStream, ended: trio.Event | None = None) -> None:
        if not isinstance(tls.transport, UtpStream):
            raise TypeError("IdleTunnel watches a TLSStream over a UtpStream")
        self.tls = tls
        self.utp: UtpStream = tls.transport
        self.early = bytearray()
        self.ended = ended if ended is not None else trio.Event()
        self.reason: EndReason | None = None
        self.error: BaseException | None = None

    def __enter__(self) -> IdleTunnel:
        self.utp.on_readable = self._pump
        self._pump()  # what came with the handshake, or before
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.utp.on_readable = None

    def _end(self, reason: EndReason, error: BaseException | None) -> None:
        self.reason, self.error = reason, error
        self.utp.on_readable = None
        self.ended.set()

    def _pump(self) -> None:
        tls, utp = self.tls, self.utp
        try:
            read = False
            while (room := IDLE_BUFFER - len(self.early)) > 0:
                plaintext = tls.decrypt_nowait(None, room)
                if plaintext is None:
                    ciphertext = utp.receive_nowait(TUNNEL_READ)
                    if ciphertext is None:
                        break
                    if not ciphertext:
                        raise TLSTruncatedError("the tunnel ended without the peer's TLS close_notify")
                    read = True
                    plaintext = tls.decrypt_nowait(ciphertext, room)
                    if plaintext is None:
                        continue
                if not plaintext:
                    self._end(EndReason.CLOSED_BY_PEER, None)
                    return
                self.early += plaintext
            if read:
                utp.flush()  # reading may have reopened the receive window
        except TRANSPORT_ERRORS as error:
            self._end(EndReason.RESET, error)
        except Exception as bug:  # raising here would break the endpoint: contain it
            log.exception("watching an idle tunnel failed")
            self._end(EndReason.RESET, bug)


class _Relay:
    def __init__(self, local: trio.SocketStream, tls: TLSStream, outcome: PipeOutcome) -> None:
        if not isinstance(local, trio.SocketStream) or not isinstance(tls.transport, UtpStream):
            raise TypeError("relay joins a trio.SocketStream to a TLSStream over a UtpStream")
        self.local = local
        self.tls = tls
        self.utp: UtpStream = tls.transport
        self.fd = local.socket.fileno()
        self.outcome = outcome
        self.state = _ToLocal.FLOWING
        self.pending: memoryview | None = None  # plaintext the socket did not take yet
        self.tls_buffered = True  # TLS may hold whole records not yet decrypted
        self.lot = ParkingLot()  # the to_local task waits here for a state change
        self.pumping = False
        self.pump_again = False

    def fail(self, error: BaseException) -> None:
        if self.outcome.error is None:
            self.outcome.error = error
        self.state = _ToLocal.STOPPED
        self.lot.unpark_all()
        self.outcome.failed.set()

    # ---- tunnel -> local ----------------------------------------------------------

    def pump(self) -> None:
        """Move every decryptable byte to the socket. Runs from the endpoint (the
        stream's on_readable) and from the to_local task; never raises."""
        if self.pumping:  # reached again through a flush: loop instead of nesting
            self.pump_again = True
            return
        self.pumping = True
        try:
            while True:
                self.pump_again = False
                if self._pump():
                    self.utp.flush()  # reading may have reopened the receive window
                if not self.pump_again:
                    break
        except TRANSPORT_ERRORS as error:
            self.fail(error)
        except Exception as bug:  # raising here would break the endpoint: contain it
            log.exception("relay failed")
            self.fail(bug)
        finally:
            self.pumping = False

    def _pump(self) -> bool:
        """The loop of pump; True if it read from uTP."""
        tls, utp = self.tls, self.utp
        read = False
        while self.state is _ToLocal.FLOWING:
            if self.tls_buffered:
                plaintext = tls.decrypt_nowait(None, DECRYPT_CHUNK)
            else:
                ciphertext = utp.receive_nowait(TUNNEL_READ)
                if ciphertext is None:
                    return read
                if not ciphertext:
                    raise TLSTruncatedError("the tunnel ended without the peer's TLS close_notify (truncation)")
                read = True
                plaintext = tls.decrypt_nowait(ciphertext, DECRYPT_CHUNK)
            if plaintext is None:
                self.tls_buffered = False  # no whole record left in TLS
                continue
            # A short read emptied TLS of whole records (see TLSStream._read_buffered);
            # a close_notify read with the data shows on the next call.
            self.tls_buffered = len(plaintext) >= DECRYPT_CHUNK or tls.eof_received
            if not plaintext:
                self.state = _ToLocal.EOF
                self.lot.unpark_all()
                return read
            self._write(plaintext)
        return read

    def _write(self, plaintext: bytes | bytearray) -> None:
        try:
            sent = os.write(self.fd, plaintext)
        except BlockingIOError:
            sent = 0
        self.outcome.bytes_from_peer += sent
        if sent < len(plaintext):
            self.pending = memoryview(plaintext)[sent:]
            self.state = _ToLocal.BLOCKED
            self.lot.unpark_all()

    async def to_local(self) -> None:
        """Wait while pump does the work; take over when the socket is full or at EOF."""
        outcome = self.outcome
        try:
            self.utp.on_readable = self.pump
            self.pump()  # records that came with the handshake, or before we started
            while True:
                state = self.state
                if state is _ToLocal.FLOWING:
                    await self.lot.park()
                elif state is _ToLocal.BLOCKED:
                    await self._drain_pending()
                    self.state = _ToLocal.FLOWING
                    self.pump()
                elif state is _ToLocal.EOF:
                    if outcome.first_eof is None:
                        outcome.first_eof = "peer"
                    outcome.peer_eof = True
                    await self.local.send_eof()
                    return
                else:
                    return
        except TRANSPORT_ERRORS as error:
            self.fail(error)
        finally:
            self.utp.on_readable = None

    async def _drain_pending(self) -> None:
        fd = self.fd
        while self.pending:
            await wait_writable(fd)
            try:
                sent = os.write(fd, self.pending)
            except BlockingIOError:
                continue
            self.outcome.bytes_from_peer += sent
            self.pending = self.pending[sent:]
        self.pending = None

    # ---- local -> tunnel ----------------------------------------------------------

    async def to_tunnel(self, initial_data: bytes) -> None:
        outcome = self.outcome
        tls, fd = self.tls, self.fd
        buffer = _read_buffer()
        view = memoryview(buffer)
        try:
            if initial_data:
                await self._send(tls.encrypt_nowait(initial_data))
                outcome.bytes_to_peer += len(initial_data)
            reads = 0
            while True:
                try:
                    size = os.readv(fd, [buffer])
                except BlockingIOError:
                    reads = 0
                    await wait_readable(fd)
                    continue
                if not size:
                    break
                # (encrypt_nowait copies: the shared buffer is free again
                # before anything can yield.)
                await self._send(tls.encrypt_nowait(view[:size]))
                outcome.bytes_to_peer += size
                if size < READ_CHUNK:
                    # A TCP read returns all that is queued, up to the buffer: a
                    # short one emptied the socket. Wait now rather than pay for
                    # a read that would only say EAGAIN.
                    reads = 0
                    await wait_readable(fd)
                    continue
                reads += 1
                if reads >= READS_BEFORE_YIELD:
                    reads = 0
                    await checkpoint()
            if outcome.first_eof is None:
                outcome.first_eof = "local"
            outcome.local_eof = True
            await tls.send_eof()
        except TRANSPORT_ERRORS as error:
            self.fail(error)

    async def _send(self, ciphertext: bytes) -> None:
        utp = self.utp
        taken = utp.send_nowait(ciphertext)
        if taken == len(ciphertext):
            return
        rest = memoryview(ciphertext)[taken:]
        while rest:
            await utp.wait_send_all_might_not_block()
            rest = rest[utp.send_nowait(rest) :]


async def relay(
    local: trio.SocketStream,
    tls: TLSStream,
    peer: Liveness,
    *,
    initial_data: bytes = b"",
    early_data: bytes = b"",
    outcome: PipeOutcome | None = None,
) -> PipeOutcome:
    """Relay local <-> tls (over uTP) until both directions ended or one failed.

    Cancellation (close locally) propagates to the caller; errors are returned in
    the outcome so the caller can report a reason. ``initial_data`` goes to the
    tunnel first, ``early_data`` (what the tunnel carried before, see
    IdleTunnel) to ``local`` first. ``outcome``: the record to fill, which the
    caller keeps when cancelled (which directions had ended).
    """
    if outcome is None:
        outcome = PipeOutcome()
    state = _Relay(local, tls, outcome)
    if early_data:
        state.pending = memoryview(early_data)
        state.state = _ToLocal.BLOCKED  # to_local writes it before anything newer

    async def watch_peer() -> None:
        await peer.died.wait()
        if outcome.error is None:
            outcome.error = peer.death or ConnectionKeepAliveTimeout("peer died")
        outcome.failed.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch_peer)
        async with trio.open_nursery() as copies:

            async def stop_on_failure() -> None:
                await outcome.failed.wait()
                copies.cancel_scope.cancel()

            copies.start_soon(stop_on_failure)
            async with trio.open_nursery() as both:
                both.start_soon(state.to_tunnel, initial_data)
                both.start_soon(state.to_local)
            copies.cancel_scope.cancel()
        nursery.cancel_scope.cancel()
    return outcome
