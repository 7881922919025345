"""A reverse connection: a remote node -> uTP + TLS server -> the local TCP server.

Start sequence (bounded by ``conn_connect_time``) of a connection prepared by
``open_connection_reverse`` (the original's order, an explicit local request that
punches a NAT hole for an expected caller): connect TCP to the server, use the
shared Peer for the remote proxy address (PING every ``conn_punch_interval_time``
until the peer is heard); then, once the uTP connection from that address is
there, run the TLS server handshake (client certificate required) and verify the
client's chain.

An unannounced incoming connection gets no work before it earns it (DESIGN.md,
"nothing works for a stranger"): nothing is sent to its address on our own before
its first bytes show that it receives ours; then the TLS handshake and the chain;
only then the server connection and the punch. Then both pipe and finish
(lifecycle.py).
"""

from __future__ import annotations

import os

import trio

from nat.stream import UtpStream
from proxy.identity.errors import CertificateChainError
from proxy.identity.verification import verify_client_certificate_chain
from proxy.tls import TLSStream
from proxy.tunnel import start_status
from proxy.tunnel.connection import TRANSPORT_ERRORS, presented_identity, start_error, until_peer_dies, verified_chains
from proxy.tunnel.errors import ConnectionVerifyError, ServerUnavailable
from proxy.tunnel.hosts import format_host_port
from proxy.tunnel.lifecycle import Ending, TunnelConnection
from proxy.tunnel.peer import Peer
from proxy.tunnel.records import Direction


def _why(error: OSError) -> str:
    """The OS's reason for a failed connect (trio wraps it: one error per address tried)."""
    for cause in (error, *getattr(error.__cause__, "exceptions", ())):
        if isinstance(cause, OSError) and cause.errno:
            return os.strerror(cause.errno)
    return str(error)


class ConnectionReverse(TunnelConnection):
    """One uTP+TLS tunnel stream from a remote proxy, joined to one TCP connection to the server."""

    direction = Direction.REVERSE
    tcp_role = "server"
    toward = "from"

    prepared_at: float | None = None  # when open_connection_reverse finished preparing it
    _preparing = False

    @property
    def usable(self) -> bool:
        """Prepared (or being prepared) by open_connection_reverse, still waiting for
        its uTP connection: an original forward's SYN leaves before its first PING, so
        its connection may arrive while we still punch; it completes this one."""
        if self.composed or self.ended.is_set() or self.scope.cancel_called:
            return False
        return self._preparing or (self.tcp is not None and self.alive)

    async def prepare(self, deadline: float | None = None) -> None:
        """Connect to the server and punch until the peer is heard (bounded)."""
        if deadline is None:
            deadline = trio.current_time() + self.context.connect_time
        self._preparing = True
        try:
            async with self._starting():
                with trio.fail_at(deadline):
                    await self._open_server()
                    peer = await self._use_peer()
                    await peer.wait_heard()
        finally:
            self._preparing = False
        self.prepared_at = trio.current_time()

    async def _open_server(self) -> None:
        server = self.context.server
        if server is None:
            raise ServerUnavailable(f"{self.what}: no server is configured for reverse connections")
        try:
            self.tcp = await trio.open_tcp_stream(*server)
        except OSError as error:
            unavailable = ServerUnavailable(
                f"{self.what}: cannot connect to the server {format_host_port(*server)}: {_why(error)}"
            )
            unavailable.reason = _why(error)
            raise unavailable from error
        sockname = self.tcp.socket.getsockname()
        self.tcp_address = (sockname[0], sockname[1])

    async def _start_incoming(self, deadline: float) -> None:
        """The start of a connection that arrived unannounced. Its source address
        may be spoofed, so it gets nothing it did not ask for until it shows that
        it receives what we send: its first bytes (the TLS ClientHello) acknowledge
        our SYN-ACK. Until then its Peer is quiet (PINGs answered, none sent).
        Then the TLS handshake and the client chain; only a verified caller gets a
        connection to the server, and the peer punched until heard (it punches us
        too, so that is at once, mostly)."""
        async with self._starting():
            with trio.fail_at(deadline):
                peer = await self._use_peer(quiet=True)
                await self._until_proven(peer)
            await self._complete(deadline)
            with trio.fail_at(deadline):
                try:
                    await self._open_server()
                except ServerUnavailable as error:
                    # The reason only (not the server's address): the caller is verified,
                    # not necessarily entitled to know this node's insides.
                    await self._refuse(start_status.REASON_SERVER_UNAVAILABLE, error.reason)
                    raise
                await peer.wait_heard()
                await self._send_status(start_status.encode_ready())

    async def _until_proven(self, peer: Peer) -> None:
        """Until the caller's first bytes arrive (then the peer is proven) or its
        connection ends (the handshake that follows fails)."""
        utp = self.utp
        assert utp is not None
        arrived = trio.Event()
        utp.on_readable = arrived.set  # called by the endpoint on data, EOF or the end
        try:
            if not utp.bytes_received:
                await arrived.wait()
        finally:
            utp.on_readable = None
        if utp.bytes_received:
            peer.prove()

    async def _abandon(self, *, goodbye: bool = False) -> None:
        utp = self.utp
        if utp is not None and not utp.peer_confirmed:
            # The caller never answered our SYN-ACK, so the address may be anybody's:
            # nothing more goes to it, not even a RESET. The transport drops the
            # half-open connection itself (syn_recv_timeout).
            self.tls = self.utp = None
        await super()._abandon(goodbye=goodbye)

    def attach_utp(self, utp: UtpStream) -> None:
        self.utp = utp
        self._attached.set()

    async def _complete(self, deadline: float) -> None:
        """TLS server handshake and client chain verification, bounded by the deadline."""
        assert self.utp is not None and self.peer is not None
        try:
            with trio.fail_at(deadline):
                self.tls = TLSStream(
                    self.utp, self.context.tls_config(), server_side=True, alpn=(start_status.ALPN,)
                )
                await until_peer_dies(self.peer, self.tls.do_handshake)
            chain = self.tls.peer_certificate_chain
            limit = self.context.max_chain_length
            try:
                self.node_id = await verified_chains.verify_async(
                    "client",
                    chain,
                    lambda chain: verify_client_certificate_chain(chain, max_chain_length=limit),
                    max_length=limit,
                )
            except CertificateChainError as error:
                await self._refuse(start_status.REASON_CHAIN_REJECTED, str(error))
                raise ConnectionVerifyError(
                    f"{self.what}: certificate chain rejected: {error}; the peer presented {presented_identity(chain)}"
                ) from error
            self.certificates = tuple(chain)
        except Exception as error:
            raise start_error(error, self.what) from error

    async def _send_status(self, frame: bytes) -> None:
        """The start status, to a forward side that asked for it (start_status.py)."""
        if self.tls is not None and self.tls.alpn_protocol == start_status.ALPN:
            await self.tls.send_all(frame)

    async def _refuse(self, reason: int, text: str) -> None:
        """Tell the caller why it gets no tunnel (best effort: it may be gone); the
        close_notify and FIN follow as the start's failure ends the connection."""
        with trio.move_on_after(self.context.end_time):
            try:
                await self._send_status(start_status.encode_refusal(reason, text))
            except TRANSPORT_ERRORS:
                pass

    async def run(self, utp: UtpStream | None = None, *, prepared: bool = False) -> None:
        """The whole life of a reverse connection; runs in the proxy's connection nursery.

        ``utp`` given: an incoming connection (start now). ``prepared``: opened by
        open_connection_reverse, wait for an incoming uTP connection.
        """
        await self._live(lambda: self._serve(utp, prepared))

    async def _serve(self, utp: UtpStream | None, prepared: bool) -> Ending:
        if utp is not None:
            self.attach_utp(utp)
        # An incoming connection has conn_connect_time for all of its start;
        # a prepared one gets it afresh when its uTP connection arrives.
        deadline = trio.current_time() + self.context.connect_time
        if not prepared:
            await self._start_incoming(deadline)
        else:
            if not self.composed:
                await self._wait_attached()
                deadline = trio.current_time() + self.context.connect_time
            await self._complete(deadline)
            try:
                with trio.fail_at(deadline):
                    await self._send_status(start_status.encode_ready())
            except Exception as error:
                raise start_error(error, self.what) from error
        self.context.established(self)
        return await self._splice()
