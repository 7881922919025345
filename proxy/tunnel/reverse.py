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

Services (services.py): once the chain is verified, the caller's SNI selects the
service and its allow list decides, before any connection to the service's target;
a refusal is sent in the start status (4 no such service, 3 forbidden). A prepared
connection has connected the default service's target already; a caller that
names another service gets that one instead. The pipe is the byte splice unless
the application gave a splicer for the service's kind (ConnectionContext.splicers).
"""

from __future__ import annotations

import os

import trio
from cryptography.hazmat.primitives.serialization import Encoding

from nat.stream import UtpStream
from proxy.identity.certificates import certificate_node_id
from proxy.identity.errors import CertificateChainError
from proxy.identity.node_id import NodeId
from proxy.identity.verification import verify_client_certificate_chain
from proxy.tls import TLSStream
from proxy.tunnel import start_status
from proxy.tunnel.connection import (
    TRANSPORT_ERRORS,
    as_peer_reset,
    presented_identity,
    start_error,
    until_peer_dies,
    verified_chains,
)
from proxy.tunnel.errors import ConnectionVerifyError, ServerUnavailable, ServiceForbidden, ServiceNotFound, ServiceRevoked
from proxy.tunnel.hosts import format_host_port
from proxy.tunnel.lifecycle import Ending, TunnelConnection
from proxy.tunnel.paths import PathPeer
from proxy.tunnel.peer import Peer
from proxy.tunnel.records import CallerIdentity, Direction, EndReason
from proxy.tunnel.services import Service
from proxy.tunnel.splice import PipeOutcome


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
    chain_node_ids: tuple[NodeId, ...] = ()  # every NodeId the verified chain proves, leaf first
    _target: Service | None = None  # the service whose target self.tcp is connected to

    @property
    def usable(self) -> bool:
        """Prepared (or being prepared) by open_connection_reverse, still waiting for
        its uTP connection: an original forward's SYN leaves before its first PING, so
        its connection may arrive while we still punch; it completes this one."""
        if self.composed or self.ended.is_set() or self.scope.cancel_called:
            return False
        return self._preparing or ((self.tcp is not None or self.prepared_at is not None) and self.alive)

    async def prepare(self, deadline: float | None = None) -> None:
        """Connect to the default service's server and punch until the peer is heard
        (bounded). With [services] but no default service, only punch: the caller's
        service is connected once it is known and authorised."""
        if deadline is None:
            deadline = trio.current_time() + self.context.connect_time
        self._preparing = True
        try:
            async with self._starting():
                with trio.fail_at(deadline):
                    default = self.context.policy().default
                    if default is not None or not self.context.policy().serves:
                        await self._open_server(default)  # none at all: ServerUnavailable
                    peer = await self._use_peer()
                    await peer.wait_heard()
        finally:
            self._preparing = False
        self.prepared_at = trio.current_time()

    async def _open_server(self, service: Service | None) -> None:
        if service is None:
            raise ServerUnavailable(f"{self.what}: no server is configured for reverse connections")
        self._target, server = service, service.target
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
            service = await self._authorise()
            with trio.fail_at(deadline):
                await self._connect_service(service)
                await peer.wait_heard()
                await self._ready()
            self._follow_path()

    async def _authorise(self) -> Service:
        """The service the caller named, if its allow list holds the caller: else the
        refusal (4 no such service, 3 forbidden) and ServiceNotFound/ServiceForbidden."""
        assert self.tls is not None
        policy = self.context.policy()
        try:
            service = policy.select(self.tls.server_name)
            policy.authorise(service, self.chain_node_ids)
        except ServiceNotFound as error:
            await self._refuse(start_status.REASON_NO_SUCH_SERVICE, str(error))
            raise ServiceNotFound(f"{self.what}: {error}") from None
        except ServiceForbidden as error:
            await self._refuse(start_status.REASON_FORBIDDEN, str(error))
            raise ServiceForbidden(f"{self.what}: {error}") from None
        self.service = service.name
        return service

    async def _connect_service(self, service: Service) -> None:
        """Connect the service's target (a prepared connection has the default's:
        kept when that is the one named, unless a splicer will serve it, which must
        see the server from its first byte)."""
        if self.tcp is not None and self._target is service and service.kind not in self.context.splicers:
            return
        if self.tcp is not None:
            tcp, self.tcp, self._early_from_tcp = self.tcp, None, bytearray()
            await tcp.aclose()
        try:
            await self._open_server(service)
        except ServerUnavailable as error:
            # The reason only (not the server's address): the caller is verified,
            # not necessarily entitled to know this node's insides.
            await self._refuse(start_status.REASON_SERVER_UNAVAILABLE, error.reason)
            raise

    async def _ready(self) -> None:
        """Ready, unless a reload took the caller's access away meanwhile (5 revoked)."""
        if not self.context.policy().still_allows(self.service, self.chain_node_ids):
            text = f"service {self.service!r} no longer allows {self.node_id}"
            await self._refuse(start_status.REASON_REVOKED, text)
            raise ServiceRevoked(f"{self.what}: {text}")
        await self._send_status(start_status.encode_ready())

    async def _until_proven(self, peer: Peer | PathPeer) -> None:
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
            self.chain_node_ids = tuple(certificate_node_id(certificate) for certificate in chain)
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
                service = await self._authorise()
                with trio.fail_at(deadline):
                    await self._connect_service(service)
                    await self._ready()
            except Exception as error:
                raise start_error(error, self.what) from error
        self.context.established(self)
        return await self._pipe()

    async def _pipe(self) -> Ending:
        """The byte splice, or the application's splicer for the service's kind."""
        splicer = None if self._target is None else self.context.splicers.get(self._target.kind)
        if splicer is None:
            return await self._splice()
        assert self.tls is not None and self.tcp is not None and self.peer is not None
        assert self.node_id is not None and self.service is not None
        caller = CallerIdentity(
            local_node_id=self.context.tls_config().node_id,
            peer_node_id=self.node_id,
            peer_certificate_der=self.certificates[0].public_bytes(Encoding.DER),
            service=self.service,
        )
        tls, tcp = self.tls, self.tcp
        self._joined = True
        try:
            await until_peer_dies(self.peer, lambda: splicer(tls, tcp, caller))
        except TRANSPORT_ERRORS as error:
            return Ending(EndReason.RESET, as_peer_reset(error), broken=True)
        # Returned: both directions are done, as after a clean byte splice.
        self._outcome = PipeOutcome(local_eof=True, peer_eof=True)
        return Ending(EndReason.CLOSED_LOCALLY)
