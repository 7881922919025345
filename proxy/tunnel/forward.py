"""A forward connection: local TCP client -> uTP + TLS client -> a remote node.

Start sequence (bounded by ``conn_connect_time``, else ConnectionStartTimeout/504,
whose text names the step it was in and the likely causes): use the shared Peer for
the remote proxy address (it punches: PING every ``conn_punch_interval_time``), open
uTP to it, run the TLS client handshake (offering start_status.ALPN, and the SNI
naming the remote's service, services.py), wait until the
peer has been heard, then verify the server's chain against the wanted NodeIds
(ConnectionVerifyError/526, naming the NodeId the peer presented). With a keynode
peer (ALPN agreed), wait for its start status: ready, or its refusal
(RemoteServerUnavailable and the like, 502). A peer whose keep-alive times out
meanwhile ends the start with ConnectionKeepAliveTimeout (524).

After the start the connection waits for its client (a CONNECT that arrives now,
or a later one when opened by ``open_connection_forward``), pipes, and finishes
(lifecycle.py).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import trio
from cryptography import x509

from nat.utp.paths import VirtualPath
from proxy.identity.errors import CertificateChainError
from proxy.identity.node_id import NodeId
from proxy.identity.verification import verify_server_certificate_chain
from proxy.tls import TLSStream
from proxy.tunnel import start_status
from proxy.tunnel.connection import presented_identity, until_peer_dies, verified_chains
from proxy.tunnel.errors import ConnectionStartTimeout, ConnectionVerifyError
from proxy.tunnel.lifecycle import ConnectionContext, Ending, TunnelConnection
from proxy.tunnel.peer import Address
from proxy.tunnel.records import Direction
from proxy.tunnel.services import requested_service


class ConnectionForward(TunnelConnection):
    """One uTP+TLS tunnel stream to a remote proxy, joined to one local client."""

    direction = Direction.FORWARD
    tcp_role = "client"
    toward = "to"

    def __init__(
        self,
        context: ConnectionContext,
        address: Address,
        node_ids: tuple[NodeId, ...],
        server_name: bytes | None = None,
        *,
        start_path: VirtualPath | None = None,
        follow_path: bool = False,
    ) -> None:
        super().__init__(context, address)
        # A relay's path to start on (paths.py); ``follow_path``: found by NodeId, so
        # its path follows the evidence once it runs (upgrade, fall back).
        self.start_path = start_path
        self.follow_path = follow_path or start_path is not None
        self.node_ids = node_ids
        # The SNI naming the remote's service (services.py); None: its default.
        self.server_name = server_name
        self.service = requested_service(server_name)
        self.initial_data = b""
        # Set as soon as a CONNECT picks this connection (before its 200 is sent),
        # so no other CONNECT or open_connection_forward can take it meanwhile.
        self.claimed = False

    @property
    def usable(self) -> bool:
        """Started, not yet joined to a client, and still alive."""
        return self.node_id is not None and not self.claimed and self.alive

    async def start(self) -> NodeId:
        """Run the start sequence; raise a typed error after cleaning up."""
        context = self.context
        deadline = trio.current_time() + context.connect_time
        async with self._starting():
            with self._in_time(deadline):
                self._stage = "waiting to use the peer"
                peer = await self._use_peer()

                async def connect_and_handshake() -> None:
                    self._stage = "opening uTP (no answer to its SYN)"
                    self.utp = utp = await context.endpoint.connect(self.start_path or self.address)
                    self._stage = "in the TLS handshake"
                    self.tls = TLSStream(
                        utp, context.tls_config(), server_side=False, alpn=(start_status.ALPN,),
                        server_name=self.server_name,
                    )
                    await self.tls.do_handshake()
                    self._stage = "waiting for a PING or PONG from the peer"
                    await peer.wait_heard()

                await until_peer_dies(peer, connect_and_handshake)
            tls = self.tls
            assert tls is not None
            chain = tls.peer_certificate_chain
            node_id = await self._verify(chain)
            if tls.alpn_protocol == start_status.ALPN:
                with self._in_time(deadline):
                    self._stage = "waiting for the remote's start status (its server connection)"
                    status = await until_peer_dies(peer, lambda: start_status.receive_start_status(tls))
                if not status.ready:
                    raise start_status.refusal_error(status, self.what)
            self.node_id = node_id
            self.certificates = tuple(chain)
        return node_id

    _stage = "starting"

    @contextmanager
    def _in_time(self, deadline: float) -> Iterator[None]:
        """fail_at(deadline), but the timeout is ConnectionStartTimeout saying what to do."""
        try:
            with trio.fail_at(deadline):
                yield
        except trio.TooSlowError:
            raise ConnectionStartTimeout(
                f"{self.what}: not started within conn_connect_time ({self.context.connect_time:g} s), "
                f"{self._stage}. Likely: the peer is not running at that address; or it is behind a NAT "
                "that lets nothing in until it opens the way (`keynode open-reverse` toward this node "
                "on the peer) or a relay; or both nodes are behind symmetric NATs (needs a relay)"
            ) from None

    async def _verify(self, chain: list[x509.Certificate]) -> NodeId:
        limit = self.context.max_chain_length
        try:
            return await verified_chains.verify_async(
                ("server", frozenset(self.node_ids)),
                chain,
                lambda chain: verify_server_certificate_chain(self.node_ids, chain, max_chain_length=limit),
                max_length=limit,
            )
        except CertificateChainError as error:
            wanted = ", ".join(str(node_id) for node_id in self.node_ids)
            raise ConnectionVerifyError(
                f"{self.what}: certificate chain rejected: {error}; "
                f"the peer presented {presented_identity(chain)}, wanted {wanted}"
            ) from error

    def attach_client(self, client: trio.SocketStream, client_address: Address, initial_data: bytes) -> None:
        """Hand the (already answered) CONNECT client to this connection's task."""
        self.tcp = client
        self.tcp_address = client_address
        self.initial_data = initial_data
        self._joined = True  # it was answered 200: from now on only a clean end is a FIN
        self._attached.set()

    async def run(self) -> None:
        """Wait for a client, pipe, finish. Runs in the proxy's connection nursery."""
        if self.follow_path:
            self._follow_path()
        await self._live(self._serve)

    async def _serve(self) -> Ending:
        await self._wait_attached()
        return await self._splice(self.initial_data)
