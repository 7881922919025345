"""A forward connection: local TCP client -> uTP + TLS client -> a remote node.

Start sequence (bounded by ``conn_connect_time``, else ConnectionStartTimeout/504):
use the shared Peer for the remote proxy address (it punches: PING every
``conn_punch_interval_time``), open uTP to it, run the TLS client handshake, wait
until the peer has been heard, then verify the server's chain against the wanted
NodeIds (ConnectionVerifyError/526). A peer whose keep-alive times out meanwhile
ends the start with ConnectionKeepAliveTimeout (524).

After the start the connection waits for its client (a CONNECT that arrives now,
or a later one when opened by ``open_connection_forward``), pipes, and finishes
(lifecycle.py).
"""

from __future__ import annotations

import trio

from proxy.identity.node_id import NodeId
from proxy.identity.verification import verify_server_certificate_chain
from proxy.tls import TLSStream
from proxy.tunnel.connection import until_peer_dies, verified_chains
from proxy.tunnel.lifecycle import ConnectionContext, Ending, TunnelConnection
from proxy.tunnel.peer import Address
from proxy.tunnel.records import Direction


class ConnectionForward(TunnelConnection):
    """One uTP+TLS tunnel stream to a remote proxy, joined to one local client."""

    direction = Direction.FORWARD
    tcp_role = "client"
    toward = "to"

    def __init__(self, context: ConnectionContext, address: Address, node_ids: tuple[NodeId, ...]) -> None:
        super().__init__(context, address)
        self.node_ids = node_ids
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
        async with self._starting():
            with trio.fail_after(context.connect_time):
                peer = await self._use_peer()

                async def connect_and_handshake() -> None:
                    self.utp = utp = await context.endpoint.connect(self.address)
                    self.tls = TLSStream(utp, context.tls_config(), server_side=False)
                    await self.tls.do_handshake()
                    await peer.wait_heard()

                await until_peer_dies(peer, connect_and_handshake)
            assert self.tls is not None
            chain = self.tls.peer_certificate_chain
            limit = context.max_chain_length
            node_id = await verified_chains.verify_async(
                ("server", frozenset(self.node_ids)),
                chain,
                lambda chain: verify_server_certificate_chain(self.node_ids, chain, max_chain_length=limit),
                max_length=limit,
            )
            self.node_id = node_id
            self.certificates = tuple(chain)
        return node_id

    def attach_client(self, client: trio.SocketStream, client_address: Address, initial_data: bytes) -> None:
        """Hand the (already answered) CONNECT client to this connection's task."""
        self.tcp = client
        self.tcp_address = client_address
        self.initial_data = initial_data
        self._joined = True  # it was answered 200: from now on only a clean end is a FIN
        self._attached.set()

    async def run(self) -> None:
        """Wait for a client, pipe, finish. Runs in the proxy's connection nursery."""
        await self._live(self._serve)

    async def _serve(self) -> Ending:
        await self._wait_attached()
        return await self._splice(self.initial_data)
