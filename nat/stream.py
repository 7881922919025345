"""UtpStream: one uTP connection as a trio HalfCloseableStream.

The stream holds no data of its own: bytes live in the sans-IO connection's
bounded send and receive buffers (nat/utp/connection.py), which is what gives
backpressure end to end (a full receive buffer closes the advertised window, the
peer stops, its send buffer fills, its ``send_all`` blocks). Tasks park on
trio ParkingLots and are woken by the endpoint when the multiplexer reports
DataAvailable / SendSpaceAvailable / EofReceived / ConnectionClosed.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any, Protocol

import trio
from trio.lowlevel import ParkingLot, cancel_shielded_checkpoint, checkpoint, checkpoint_if_cancelled

from nat.errors import NatError, UtpConnectionReset
from nat.utp.connection import UtpConnection
from nat.utp.states import SYN_RECV

__all__ = ["UtpStream", "StreamDriver", "DEFAULT_RECEIVE_SIZE"]

DEFAULT_RECEIVE_SIZE = 65536
# send() is given at most this much at a time so a huge send_all does not copy
# the whole buffer into a bytes object first.
_SEND_CHUNK = 256 * 1024
# Unread bytes discarded per event once the application closed the stream.
_DISCARD_CHUNK = 1 << 20


class StreamDriver(Protocol):
    """What a stream needs of its endpoint (``nat.endpoint.Endpoint``)."""

    @property
    def address(self) -> tuple[Any, ...]: ...

    @property
    def closed(self) -> bool: ...

    @property
    def close_timeout(self) -> float: ...

    def service(self, now: float) -> None:
        """Run the core: timers, events, and send what it queued."""

    def service_if_output(self) -> None:
        """service(), only if the core queued something (a window update)."""

    def forget(self, conn: UtpConnection) -> None:
        """The stream of ``conn`` ended by itself: drop it from the endpoint."""

    def move_connection(self, conn: UtpConnection, path: tuple[Any, ...]) -> None:
        """Send ``conn``'s datagrams over ``path`` from now on."""


class UtpStream(trio.abc.HalfCloseableStream):
    """A reliable, ordered byte stream over uTP. Made by ``Endpoint.connect/accept``."""

    def __init__(self, endpoint: StreamDriver, conn: UtpConnection, *, connected: bool) -> None:
        self._endpoint = endpoint
        self._conn = conn
        self._receive_lot = ParkingLot()
        self._send_lot = ParkingLot()
        self._state_lot = ParkingLot()  # connect and close waiters
        self._connected = connected
        self._receiving = False
        self._sending = False
        self._send_full = False  # the last send() refused bytes; cleared by SendSpaceAvailable
        self._closed = False  # aclose() was called
        self._eof_sent = False
        self._finished = False  # the connection is gone (ConnectionClosed or endpoint closed)
        self._error: NatError | None = None
        # Set by a consumer that reads with receive_nowait (proxy/relay.py):
        # called synchronously, from the endpoint, whenever data or EOF arrives
        # or the connection ends. It must not raise and must not block.
        self.on_readable: Callable[[], None] | None = None

    # ---- properties -----------------------------------------------------------

    @property
    def remote_address(self) -> tuple[Any, ...]:
        return self._conn.remote_address

    @property
    def path(self) -> tuple[Any, ...]:
        """Where the connection's datagrams go now: the peer's address, or a
        ``VirtualPath`` (nat/utp/paths.py). Same as ``remote_address``."""
        return self._conn.remote_address

    @property
    def path_moves(self) -> int:
        """How many times ``move_to`` moved the connection."""
        return self._conn.path_moves

    def move_to(self, path: tuple[Any, ...]) -> None:
        """Move the live connection to ``path`` (a direct address or a virtual
        path with a sender): same connection, nothing lost, reordered or
        repeated for either application (UtpMultiplexer.move_connection). The
        peer's side moves only when its own caller moves it. UnknownPath,
        PathInUse; UtpClosed once the connection is gone."""
        self._endpoint.move_connection(self._conn, path)

    @property
    def local_address(self) -> tuple[Any, ...]:
        return self._endpoint.address

    @property
    def rtt(self) -> float:
        return self._conn.rtt

    @property
    def bytes_sent(self) -> int:
        return self._conn.bytes_sent

    @property
    def bytes_received(self) -> int:
        return self._conn.bytes_received

    @property
    def peer_confirmed(self) -> bool:
        """False while an accepted connection is half-open: the peer has not answered
        our SYN-ACK, so its address may be anybody's (a spoofed SYN)."""
        return self._conn.state is not SYN_RECV

    @property
    def connection(self) -> UtpConnection:
        """The sans-IO connection (for diagnostics; do not drive it directly)."""
        return self._conn

    def __repr__(self) -> str:
        return f"<UtpStream {self.local_address} -> {self.remote_address} recv_id={self._conn.recv_id}>"

    # ---- receiving ------------------------------------------------------------

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if max_bytes is None:
            max_bytes = DEFAULT_RECEIVE_SIZE
        else:
            max_bytes = operator.index(max_bytes)
            if max_bytes < 1:
                raise ValueError("max_bytes must be >= 1")
        if self._receiving:
            raise trio.BusyResourceError("another task is already receiving on this stream")
        self._receiving = True
        try:
            await checkpoint_if_cancelled()
            conn = self._conn
            blocked = False
            while True:
                if self._closed:
                    raise trio.ClosedResourceError("stream was closed")
                data = conn.read(max_bytes)
                if data:
                    # Reading may reopen the advertised window: if the core wants
                    # to say so (a window update), send it now.
                    self._endpoint.service_if_output()
                    break
                if conn.at_eof:
                    break
                if self._finished:
                    if self._error is not None:
                        raise trio.BrokenResourceError(str(self._error)) from self._error
                    break  # closed cleanly without more data: EOF
                blocked = True
                await self._receive_lot.park()
            if not blocked:
                await cancel_shielded_checkpoint()
            return data
        finally:
            self._receiving = False

    def receive_nowait(self, max_bytes: int) -> bytes | None:
        """What has arrived, without waiting: up to ``max_bytes``; ``b""`` at EOF;
        ``None`` when nothing is there yet (``on_readable`` says when to retry).

        For consumers that run inside the endpoint's callbacks: it does not send
        the window update a read may call for; the endpoint does that after the
        callback returns, otherwise call ``flush()``.
        """
        if self._closed:
            raise trio.ClosedResourceError("stream was closed")
        data = self._conn.read(max_bytes)
        if data:
            return data
        if self._conn.at_eof:
            return b""
        if self._finished:
            if self._error is not None:
                raise trio.BrokenResourceError(str(self._error)) from self._error
            return b""
        return None

    def flush(self) -> None:
        """Send what the core queued (a window update after receive_nowait)."""
        self._endpoint.service_if_output()

    # ---- sending --------------------------------------------------------------

    def send_nowait(self, data: bytes | bytearray | memoryview) -> int:
        """Queue as much of ``data`` as the send buffer takes and send it; return
        how much was taken. Less than all: ``wait_send_all_might_not_block``
        waits for space."""
        self._check_sendable()
        try:
            taken = self._conn.send(data)
        except NatError as exc:
            raise trio.BrokenResourceError(str(exc)) from exc
        if taken:
            self._endpoint.service(trio.current_time())
        if taken < len(data):
            self._send_full = True
        return taken

    def _check_sendable(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError("stream was closed")
        if self._eof_sent:
            raise trio.ClosedResourceError("send_eof() was called")
        if self._finished:
            error = self._error or UtpConnectionReset("connection is closed")
            raise trio.BrokenResourceError(str(error)) from error

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self._sending:
            raise trio.BusyResourceError("another task is already sending on this stream")
        self._sending = True
        try:
            await checkpoint_if_cancelled()
            self._check_sendable()
            view = memoryview(data).cast("B") if not isinstance(data, bytes) else data
            total = len(view)
            offset = 0
            blocked = False
            conn = self._conn
            service = self._endpoint.service
            while offset < total:
                end = offset + _SEND_CHUNK
                chunk = view[offset:end] if (offset or end < total) else view
                try:
                    taken = conn.send(chunk)
                except NatError as exc:
                    raise trio.BrokenResourceError(str(exc)) from exc
                if taken:
                    offset += taken
                    service(trio.current_time())
                if offset < total and taken < len(chunk):
                    self._send_full = True
                    blocked = True
                    while self._send_full:
                        await self._send_lot.park()
                        self._check_sendable()
            if not blocked:
                await cancel_shielded_checkpoint()
        finally:
            self._sending = False

    async def wait_send_all_might_not_block(self) -> None:
        if self._sending:
            raise trio.BusyResourceError("another task is already sending on this stream")
        self._sending = True
        try:
            await checkpoint_if_cancelled()
            blocked = False
            conn = self._conn
            while True:
                if self._closed:
                    raise trio.ClosedResourceError("stream was closed")
                if self._finished or self._eof_sent:
                    break  # send_all would not block (it would raise at once)
                if not self._send_full:
                    if conn.send_buffer_free:
                        break
                    # Full without a refused send yet: a send() that takes
                    # nothing (free is 0) arms SendSpaceAvailable.
                    self._send_full = conn.send(b"\x00") == 0
                    if not self._send_full:
                        raise AssertionError("send() took a byte from a full buffer")
                blocked = True
                await self._send_lot.park()
            if not blocked:
                await cancel_shielded_checkpoint()
        finally:
            self._sending = False

    async def send_eof(self) -> None:
        if self._sending:
            raise trio.BusyResourceError("another task is already sending on this stream")
        await checkpoint_if_cancelled()
        if self._closed:
            raise trio.ClosedResourceError("stream was closed")
        if not self._eof_sent and not self._finished:
            self._eof_sent = True
            self._conn.send_eof()
            self._endpoint.service(trio.current_time())
        self._eof_sent = True
        self._send_lot.unpark_all()
        await cancel_shielded_checkpoint()

    # ---- closing --------------------------------------------------------------

    async def aclose(self) -> None:
        """Close gracefully (FIN, wait for the close) within the endpoint's
        ``close_timeout``, then reset. Cancelled: reset at once."""
        if self._closed:
            await checkpoint()
            return
        self._closed = True
        self._receive_lot.unpark_all()
        self._send_lot.unpark_all()
        if self._finished:
            await checkpoint()
            return
        self._discard_unread()
        conn = self._conn
        if conn.fin_acked and conn.all_data_acked:
            # Our FIN is already acknowledged: the graceful part is done. The core
            # would now wait (close_timeout) for an acknowledgement that never
            # comes; end it now. The RESET tells a peer still sending that nobody
            # reads any more (what TCP does for data arriving after close()).
            self.abort_quietly()
            await checkpoint()
            return
        try:
            conn.close()
            self._endpoint.service(trio.current_time())
            with trio.move_on_after(self._endpoint.close_timeout):
                while not self._finished:
                    await self._state_lot.park()
            if not self._finished:
                self.abort_quietly()
            await checkpoint()
        except BaseException:
            self.abort_quietly()
            raise

    def abort_quietly(self) -> None:
        """RESET the connection now (used on cancellation and timeouts)."""
        if self._finished:
            return
        self._closed = True
        self._conn.abort()
        if not self._endpoint.closed:
            self._endpoint.service(trio.current_time())
        # The multiplexer reports ConnectionClosed for an abort; mark the stream
        # finished regardless so nothing waits on it.
        if not self._finished:
            self._endpoint.forget(self._conn)
            self.mark_finished(None)

    # ---- connecting -----------------------------------------------------------

    async def wait_connected(self) -> None:
        """Until the handshake completes (the error that ended it otherwise)."""
        while not self._connected:
            if self._finished:
                error = self._error or UtpConnectionReset("connection closed while connecting")
                raise error
            await self._state_lot.park()

    # ---- endpoint side (synchronous, from Endpoint.service) ---------------------

    def _discard_unread(self) -> None:
        while self._conn.read(_DISCARD_CHUNK):
            pass

    def wake_readers(self) -> None:
        """Data or the peer's EOF arrived, or the connection ended."""
        if self._closed:
            # Nobody will read again: drop the bytes so the peer's FIN can land.
            self._discard_unread()
            return
        if self.on_readable is not None:
            self.on_readable()
        if self._receive_lot:
            self._receive_lot.unpark_all()

    def wake_senders(self) -> None:
        """Send-buffer space opened after a refused send."""
        self._send_full = False
        self._send_lot.unpark_all()

    def mark_connected(self) -> None:
        """The handshake completed."""
        self._connected = True
        self._state_lot.unpark_all()

    def mark_finished(self, error: NatError | None) -> None:
        """The connection is gone (``error`` None: a clean end or an abort)."""
        self._finished = True
        if self._error is None:
            self._error = error
        self._receive_lot.unpark_all()
        self._send_lot.unpark_all()
        self._state_lot.unpark_all()
        if self.on_readable is not None:
            self.on_readable()
