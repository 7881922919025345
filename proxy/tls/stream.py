"""Mutual TLS 1.3 over any trio stream (pyOpenSSL with memory BIOs).

``TLSStream`` wraps a transport stream (TCP, our uTP stream, a memory stream) and
is itself a ``trio.abc.HalfCloseableStream``:

* TLS 1.3 only, Ed25519 (or any key OpenSSL takes) certificates, both sides present
  their chain; the server requires a client certificate. The TLS layer accepts any
  chain (the verify callback says yes): ``proxy.identity.verification`` decides who the peer
  is, from ``peer_certificate_chain`` (leaf first, the full chain as sent).
* Half-close maps onto close_notify: ``send_eof`` sends close_notify (then EOF on the
  transport when it can half-close) and reading goes on; ``receive_some`` returns
  ``b""`` once the peer's close_notify has arrived. TLS 1.3 makes close_notify a
  one-way "no more data from me" (RFC 8446 section 6.1), so this is standard TLS.
* Transport EOF without the peer's close_notify is ``TLSTruncatedError``.
* Every TLS failure is typed: ``TLSHandshakeError`` during the handshake,
  ``TLSProtocolError`` after it; both are ``trio.BrokenResourceError`` too, so
  generic trio code sees a broken stream. Two tasks sending (or receiving) at once
  get ``TLSBusyError`` (a ``trio.BusyResourceError``).

Throughput comes from big records: plaintext goes to ``SSL_write`` in slices of
``SEND_SLICE`` bytes (OpenSSL cuts them into 16 KiB records), the outgoing BIO is
drained in one large read, and ``receive_some`` decrypts as many buffered records as
fit into ``max_bytes`` with one transport read per refill.
"""

from __future__ import annotations

import operator
import weakref
from collections.abc import Callable, Sequence
from typing import Protocol

import trio
from cryptography import x509
from OpenSSL import SSL

from proxy.tls.errors import TLSBusyError, TLSError, TLSHandshakeError, TLSProtocolError, TLSTruncatedError

__all__ = ["TLSStream", "open_tls_stream", "TLSConfigLike"]

# Plaintext handed to one SSL_write call: 8 records of 16 KiB. Bigger slices mean
# fewer transport sends; this bounds the ciphertext buffered per send_all step.
SEND_SLICE = 128 * 1024
# Enough to drain everything one SEND_SLICE produces (records carry 22 bytes of
# overhead each) in a single BIO read.
OUTGOING_DRAIN = SEND_SLICE + 16 * 1024
# Bytes asked of the transport per read; one read usually holds several records.
TRANSPORT_RECEIVE = 256 * 1024
# receive_some(None) returns at most this much plaintext.
DEFAULT_RECEIVE = 64 * 1024
# OpenSSL's SSL_MODE_ENABLE_PARTIAL_WRITE (ssl.h); pyOpenSSL turns it on and has
# no name for it. Off, one SSL_write encrypts a whole slice (all its records)
# instead of returning after each 16 KiB record: 8x fewer calls through cffi.
_MODE_ENABLE_PARTIAL_WRITE = 0x1
# How long aclose / an error path waits to get close_notify or an alert out.
GOODBYE_TIMEOUT = 1.0


class TLSConfigLike(Protocol):
    """What TLSStream needs of ``proxy.identity.tls_config.TLSConfig``."""

    @property
    def private_key(self) -> object: ...

    @property
    def certificate_chain(self) -> Sequence[x509.Certificate]: ...


def _accept_any_chain(
    connection: SSL.Connection, certificate: object, error_number: int, depth: int, ok: int
) -> bool:
    # The TLS layer only proves possession of the leaf key; who the peer is, and
    # whether its chain is acceptable, is decided by proxy.identity.verification.
    return True


_context_cache: weakref.WeakKeyDictionary[object, dict[tuple[bool, tuple[bytes, ...]], SSL.Context]] = (
    weakref.WeakKeyDictionary()
)


def _select_alpn(ours: tuple[bytes, ...]) -> Callable[[SSL.Connection, list[bytes]], object]:
    """The server's ALPN choice: the first of ``ours`` the client offered, else none
    (the handshake goes on without ALPN, as with a server that knows no ALPN)."""

    def select(connection: SSL.Connection, offered: list[bytes]) -> object:
        for protocol in ours:
            if protocol in offered:
                return protocol
        return SSL.NO_OVERLAPPING_PROTOCOLS

    return select


def _accept_any_server_name(connection: SSL.Connection) -> None:
    return None


def _build_context(tls_config: TLSConfigLike, server_side: bool, alpn: tuple[bytes, ...] = ()) -> SSL.Context:
    chain = list(tls_config.certificate_chain)
    if not chain:
        raise TLSError("the TLS config has an empty certificate chain")
    context = SSL.Context(SSL.TLS_METHOD)
    context.clear_mode(_MODE_ENABLE_PARTIAL_WRITE)
    context.set_min_proto_version(SSL.TLS1_3_VERSION)
    context.set_max_proto_version(SSL.TLS1_3_VERSION)
    try:
        context.use_privatekey(tls_config.private_key)  # type: ignore[arg-type]
        context.use_certificate(chain[0])
        for certificate in chain[1:]:
            context.add_extra_chain_cert(certificate)
        context.check_privatekey()
    except SSL.Error as exc:
        raise TLSError(f"unusable key or certificate chain: {exc}") from exc
    mode = SSL.VERIFY_PEER
    if server_side:
        mode |= SSL.VERIFY_FAIL_IF_NO_PEER_CERT
    context.set_verify(mode, _accept_any_chain)
    # No resumption: every connection proves its identity with a full handshake.
    context.set_session_cache_mode(SSL.SESS_CACHE_OFF)
    context.set_options(SSL.OP_NO_TICKET)
    if server_side:
        # With a servername callback OpenSSL keeps the client's SNI for
        # get_servername (TLSStream.server_name); every name is accepted.
        context.set_tlsext_servername_callback(_accept_any_server_name)
    if alpn:
        if server_side:
            context.set_alpn_select_callback(_select_alpn(alpn))  # type: ignore[arg-type]
        else:
            context.set_alpn_protos(list(alpn))
    return context


def _context_for(tls_config: TLSConfigLike, server_side: bool, alpn: tuple[bytes, ...] = ()) -> SSL.Context:
    """A context per (config, role, ALPN protocols), cached: building one costs ~0.3 ms."""
    try:
        per_role = _context_cache.setdefault(tls_config, {})
    except TypeError:  # not weak-referenceable or not hashable: no cache
        return _build_context(tls_config, server_side, alpn)
    key = (server_side, alpn)
    context = per_role.get(key)
    if context is None:
        context = per_role[key] = _build_context(tls_config, server_side, alpn)
    return context


def _describe(exc: SSL.Error) -> str:
    """OpenSSL's error queue as one readable line."""
    parts = []
    for entry in exc.args[0] if exc.args and isinstance(exc.args[0], list) else ():
        parts.append(":".join(str(field) for field in entry if field))
    return "; ".join(parts) or repr(exc)


class _OneTaskAtATime:
    """Raises TLSBusyError when a second task enters (trio's ConflictDetector)."""

    __slots__ = ("_busy", "_message")

    def __init__(self, message: str) -> None:
        self._busy = False
        self._message = message

    def __enter__(self) -> None:
        if self._busy:
            raise TLSBusyError(self._message)
        self._busy = True

    def __exit__(self, *exc_info: object) -> None:
        self._busy = False


class TLSStream(trio.abc.HalfCloseableStream):
    """Mutual TLS 1.3 over ``transport``; see the module docstring."""

    def __init__(
        self,
        transport: trio.abc.Stream,
        tls_config: TLSConfigLike,
        *,
        server_side: bool,
        alpn: Sequence[bytes] = (),
        server_name: bytes | None = None,
    ) -> None:
        """``alpn``: application protocols, in order of preference. A client offers
        them; a server picks the first of its own the client offered. Either way a
        peer without ALPN (or without a match) is served as before, with none
        (``alpn_protocol`` None). ``server_name``: the SNI a client sends (none by
        default); a server reads the client's as ``server_name``."""
        self.transport = transport
        self.server_side = server_side
        self._connection = SSL.Connection(_context_for(tls_config, server_side, tuple(alpn)), None)
        if server_side:
            self._connection.set_accept_state()
        else:
            self._connection.set_connect_state()
            if server_name is not None:
                self._connection.set_tlsext_host_name(server_name)
        self._handshake_lock = trio.Lock()
        self._handshake_done = False
        self._send_guard = _OneTaskAtATime("another task is already sending on this TLS stream")
        self._receive_guard = _OneTaskAtATime(
            "another task is already receiving on this TLS stream"
        )
        self._flushing = False  # a task is moving ciphertext to the transport
        self._closed = False
        self._broken: BaseException | None = None
        self._eof_sent = False
        self._eof_received = False
        self._peer_chain: list[x509.Certificate] | None = None

    # --- public API ------------------------------------------------------------

    @property
    def peer_certificate_chain(self) -> list[x509.Certificate]:
        """The peer's chain as it sent it, leaf first (after the handshake)."""
        if self._peer_chain is None:
            raise TLSError("the peer certificate chain is known only after the handshake")
        return list(self._peer_chain)

    @property
    def handshake_done(self) -> bool:
        return self._handshake_done

    @property
    def alpn_protocol(self) -> bytes | None:
        """The application protocol the handshake agreed on, if any."""
        return self._connection.get_alpn_proto_negotiated() or None

    @property
    def server_name(self) -> bytes | None:
        """The SNI the client sent (server side, after the ClientHello), else ours."""
        return self._connection.get_servername() or None

    @property
    def eof_received(self) -> bool:
        """The peer's close_notify has been read."""
        return self._eof_received

    @property
    def cipher_name(self) -> str | None:
        return self._connection.get_cipher_name()

    @property
    def tls_version(self) -> str:
        return self._connection.get_protocol_version_name()

    async def do_handshake(self) -> None:
        """Run the handshake (once; later calls return at once). Bounded by the
        caller's cancel scope; a cancelled handshake leaves the stream broken."""
        self._check_usable()
        if self._handshake_done:
            await trio.lowlevel.checkpoint()
            return
        async with self._handshake_lock:
            self._check_usable()
            if self._handshake_done:
                return
            try:
                await self._handshake()
            except BaseException as exc:
                self._mark_broken(exc)
                raise

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        with self._send_guard:
            self._check_sendable()
            if not self._handshake_done:
                # (Once done, do_handshake would only add a scheduler pass.)
                await self.do_handshake()
                self._check_sendable()
            view = memoryview(data)
            if view.format != "B" or view.ndim != 1:
                view = view.cast("B")
            if not view:
                await trio.lowlevel.checkpoint()
                return
            # Cancelled here, before anything is encrypted, the stream stays usable.
            await trio.lowlevel.checkpoint_if_cancelled()
            try:
                for start in range(0, len(view), SEND_SLICE):
                    self._write_plaintext(view[start : start + SEND_SLICE])
                    await self._flush()
            except BaseException as exc:
                self._mark_broken(exc)
                raise

    async def send_eof(self) -> None:
        """Send close_notify (then EOF on a half-closeable transport); reading
        goes on until the peer's close_notify. Idempotent."""
        with self._send_guard:
            self._check_usable()
            await self.do_handshake()
            if self._eof_sent:
                return
            self._eof_sent = True
            try:
                self._queue_close_notify()
                await self._flush()
                if isinstance(self.transport, trio.abc.HalfCloseableStream):
                    await self.transport.send_eof()
            except BaseException as exc:
                self._mark_broken(exc)
                raise

    async def wait_send_all_might_not_block(self) -> None:
        with self._send_guard:
            self._check_sendable()
            await self.transport.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        with self._receive_guard:
            if max_bytes is None:
                max_bytes = DEFAULT_RECEIVE
            else:
                max_bytes = operator.index(max_bytes)
                if max_bytes < 1:
                    raise ValueError("max_bytes must be >= 1")
            self._check_usable()
            if not self._handshake_done:
                await self.do_handshake()
                self._check_usable()
            if self._eof_received:
                await trio.lowlevel.checkpoint()
                return b""
            # Cancelled here, before anything is decrypted, loses nothing.
            await trio.lowlevel.checkpoint_if_cancelled()
            try:
                return await self._receive_plaintext(max_bytes)
            except BaseException as exc:
                if not isinstance(exc, trio.Cancelled):  # a cancelled read loses nothing
                    self._mark_broken(exc)
                raise

    async def aclose(self) -> None:
        """Send close_notify if we can do so quickly, then close the transport.
        Does not wait for the peer's close_notify (like trio's SSLStream)."""
        if self._closed:
            await trio.lowlevel.checkpoint()
            return
        say_goodbye = (
            self._handshake_done
            and self._broken is None
            and not self._eof_sent
            and not self._flushing
        )
        self._closed = True
        try:
            if say_goodbye:
                self._eof_sent = True
                with trio.move_on_after(GOODBYE_TIMEOUT):
                    try:
                        self._queue_close_notify()
                        await self._flush()
                    except (TLSError, trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                        pass  # the peer is gone or broken: closing is all that is left
        finally:
            await self.transport.aclose()

    # --- synchronous use (proxy/relay.py) ---------------------------------------------
    #
    # A relay moves records between TLS and a transport it drives itself, without
    # a task switch per chunk. These two calls do the TLS part at once and keep
    # this stream's state (broken, EOF) true, so send_eof and aclose still work.

    def encrypt_nowait(self, data: bytes | bytearray | memoryview) -> bytes:
        """Encrypt ``data`` and return every ciphertext byte TLS has queued (with
        anything queued before, such as session tickets); the caller carries it
        over the transport, in order. Only after the handshake."""
        self._check_sendable()
        if not self._handshake_done:
            raise TLSError("encrypt_nowait before the handshake")
        try:
            self._write_plaintext(memoryview(data))
            ciphertext = self._drain_outgoing()
            if len(ciphertext) < OUTGOING_DRAIN:
                return ciphertext
            parts = [ciphertext]
            while more := self._drain_outgoing():
                parts.append(more)
            return b"".join(parts)
        except BaseException as exc:
            self._mark_broken(exc)
            raise

    def decrypt_nowait(self, ciphertext: bytes | bytearray | None, max_bytes: int) -> bytes | bytearray | None:
        """Take ``ciphertext`` (if any) and return up to ``max_bytes`` of what is
        decrypted: ``b""`` once the peer's close_notify has arrived, ``None`` while
        no whole record is buffered."""
        self._check_usable()
        if self._eof_received:
            return b""
        try:
            if ciphertext:
                try:
                    self._connection.bio_write(ciphertext)
                except SSL.Error as exc:
                    raise TLSProtocolError(f"TLS input refused: {_describe(exc)}") from exc
            return self._read_buffered(max_bytes)
        except BaseException as exc:
            self._mark_broken(exc)
            raise

    # --- internals -----------------------------------------------------------------

    def _check_usable(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError("this TLS stream is closed")
        if self._broken is not None:
            raise trio.BrokenResourceError(
                f"this TLS stream is broken: {self._broken!r}"
            ) from self._broken

    def _check_sendable(self) -> None:
        self._check_usable()
        if self._eof_sent:
            raise trio.ClosedResourceError("send_eof was called: sending is closed")

    def _mark_broken(self, exc: BaseException) -> None:
        if self._broken is None and not self._closed:
            if isinstance(exc, trio.Cancelled):
                # Keep a plain record, not trio's Cancelled (it belongs to its scope).
                exc = TLSError("an operation was cancelled midway; TLS state is unknown")
            self._broken = exc

    def _drain_outgoing(self) -> bytes:
        try:
            return self._connection.bio_read(OUTGOING_DRAIN)
        except SSL.WantReadError:
            return b""

    async def _flush(self) -> None:
        """Move every pending ciphertext byte to the transport, in order."""
        self._flushing = True
        try:
            while True:
                ciphertext = self._drain_outgoing()
                if not ciphertext:
                    return
                await self.transport.send_all(ciphertext)
                if len(ciphertext) < OUTGOING_DRAIN:
                    # That read emptied the BIO. Only the receiving side could
                    # have queued more meanwhile (a KeyUpdate answer): it leaves
                    # ahead of the next data; one more read here would cost a
                    # WantReadError on almost every send.
                    return
        finally:
            self._flushing = False

    async def _flush_alert(self) -> None:
        """Best effort: tell the peer why we stop (an alert OpenSSL queued)."""
        if self._flushing or self._closed:
            return
        with trio.move_on_after(GOODBYE_TIMEOUT):
            try:
                await self._flush()
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                pass  # the alert is a courtesy; the error we raise is what matters

    def _queue_close_notify(self) -> None:
        try:
            self._connection.shutdown()
        except SSL.Error as exc:
            raise TLSProtocolError(f"cannot send close_notify: {_describe(exc)}") from exc

    async def _handshake(self) -> None:
        connection = self._connection
        while True:
            try:
                connection.do_handshake()
                finished = True
            except SSL.WantReadError:
                finished = False
            except SSL.Error as exc:
                await self._flush_alert()
                raise TLSHandshakeError(f"TLS handshake failed: {_describe(exc)}") from exc
            if finished and self.server_side:
                # What the server's last step queued is its session tickets
                # (OpenSSL sends them although we never resume). They leave
                # with the first data or close_notify: a handshake must not wait
                # on a client that does not read.
                break
            try:
                await self._flush()
                if finished:
                    break
                incoming = await self.transport.receive_some(TRANSPORT_RECEIVE)
            except trio.BrokenResourceError as exc:
                raise TLSHandshakeError(f"transport broke during the TLS handshake: {exc!r}") from exc
            if not incoming:
                raise TLSHandshakeError("the peer closed the transport during the TLS handshake")
            connection.bio_write(incoming)
        self._peer_chain = self._read_peer_chain()
        self._handshake_done = True

    def _read_peer_chain(self) -> list[x509.Certificate]:
        leaf = self._connection.get_peer_certificate(as_cryptography=True)
        if leaf is None:
            raise TLSHandshakeError("the peer presented no certificate")
        chain = self._connection.get_peer_cert_chain(as_cryptography=True) or []
        # OpenSSL's peer chain holds the leaf on the client side only
        # (SSL_get_peer_cert_chain(3)); make it leaf-first on both sides.
        if self.server_side:
            return [leaf, *chain]
        if not chain:
            return [leaf]
        return chain

    def _write_plaintext(self, data: memoryview) -> None:
        connection = self._connection
        while data:
            try:
                written = connection.send(data)
            except SSL.Error as exc:
                raise TLSProtocolError(f"TLS write failed: {_describe(exc)}") from exc
            data = data[written:]

    async def _receive_plaintext(self, max_bytes: int) -> bytes | bytearray:
        connection = self._connection
        waited = False
        while True:
            plaintext = self._read_buffered(max_bytes)
            if plaintext is not None:
                if not waited:
                    # Decrypted without waiting: receive_some is still a
                    # checkpoint (trio's contract), one that cannot lose the data.
                    await trio.lowlevel.cancel_shielded_checkpoint()
                return plaintext
            waited = True
            incoming = await self.transport.receive_some(TRANSPORT_RECEIVE)
            if not incoming:
                raise TLSTruncatedError(
                    "the transport ended without the peer's TLS close_notify (truncation)"
                )
            connection.bio_write(incoming)

    def _read_buffered(self, max_bytes: int) -> bytes | bytearray | None:
        """Decrypt what is buffered, up to max_bytes; None if nothing is ready."""
        connection = self._connection
        try:
            first = connection.recv(max_bytes)
        except SSL.WantReadError:
            return None
        except SSL.ZeroReturnError:
            self._eof_received = True
            return b""
        except SSL.Error as exc:
            raise TLSProtocolError(f"TLS read failed: {_describe(exc)}") from exc
        if len(first) == max_bytes:
            return first
        # One SSL_read yields one record; more whole records may be buffered
        # already: hand them over in this call rather than one call per record.
        try:
            second = connection.recv(max_bytes - len(first))
        except SSL.ZeroReturnError:
            self._eof_received = True
            return first
        except SSL.Error:
            # WantRead, or a failure: return the good data now; a failure
            # shows again on the next call (OpenSSL stays failed).
            return first
        gathered = bytearray(max_bytes)
        filled = len(first) + len(second)
        gathered[: len(first)] = first
        gathered[len(first) : filled] = second
        view = memoryview(gathered)
        while filled < max_bytes:
            try:
                filled += connection.recv_into(view[filled:])
            except SSL.ZeroReturnError:
                self._eof_received = True
                break
            except SSL.Error:
                break
        view.release()
        del gathered[filled:]
        return gathered


async def open_tls_stream(
    transport: trio.abc.Stream, tls_config: TLSConfigLike, *, server_side: bool
) -> TLSStream:
    """Wrap ``transport`` and complete the handshake (bounded by the caller's
    cancel scope). On any failure the transport is closed before raising."""
    try:
        stream = TLSStream(transport, tls_config, server_side=server_side)
        await stream.do_handshake()
    except BaseException:
        await trio.aclose_forcefully(transport)
        raise
    return stream
