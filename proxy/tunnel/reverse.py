"""A reverse connection: a remote node -> uTP + TLS server -> the local TCP server.

Start sequence (bounded by ``conn_connect_time``): connect TCP to the server, use
the shared Peer for the remote proxy address (PING every
``conn_punch_interval_time`` until the peer is heard), and, once the uTP
connection is there, run the TLS server handshake (client certificate required)
and verify the client's chain. For an unannounced incoming connection the
handshake runs at the same time as the first two steps. ``open_connection_reverse`` runs the first part
ahead of time (punching a NAT hole for an expected caller); the next uTP
connection from that address then completes it.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import trio

from proxy.tunnel.forward import start_error, until_peer_dies
from proxy.tunnel.connection import (
    ConnectionEvent,
    TunnelConnection,
    Direction,
    EndReason,
    call_callback,
    close_streams,
    reset_error_for,
    verified_chains,
)
from proxy.tunnel.errors import ConnectionKeepAliveTimeout, ConnectionStartError
from proxy.tunnel.peer import Address
from proxy.tunnel.splice import relay
from proxy.tls import TLSStream
from proxy.identity.verification import verify_client_certificate_chain

if TYPE_CHECKING:
    from nat.stream import UtpStream
    from proxy.tunnel.proxy import Proxy

log = logging.getLogger(__name__)


class ConnectionReverse(TunnelConnection):
    """One uTP+TLS tunnel stream from a remote proxy, joined to one TCP connection to the server."""

    direction = Direction.REVERSE

    def __init__(self, proxy: Proxy, address: Address) -> None:
        super().__init__(proxy, address)
        self.server: trio.SocketStream | None = None
        self.server_local_address: tuple[str, int] | None = None
        self.utp: UtpStream | None = None
        self.tls: TLSStream | None = None
        self._utp_ready = trio.Event()

    @property
    def composed(self) -> bool:
        return self._utp_ready.is_set()

    @property
    def usable(self) -> bool:
        """Prepared by open_connection_reverse, still waiting for its uTP connection."""
        return self.server is not None and not self.composed and self.alive

    @property
    def tcp_address(self) -> tuple[str, int] | None:
        return self.server_local_address

    async def prepare(self, deadline: float | None = None) -> None:
        """Connect to the server and punch until the peer is heard (bounded)."""
        proxy = self.proxy
        what = f"reverse from {self.address[0]}:{self.address[1]}"
        if deadline is None:
            deadline = trio.current_time() + proxy.conn_connect_time
        try:
            with trio.fail_at(deadline):
                await self._open_server()
                self.peer = peer = await self._exit_stack.enter_async_context(proxy.peers.use(self.address))
                await peer.wait_heard()
        except BaseException as error:
            await self._abandon()
            if isinstance(error, Exception):
                raise start_error(error, what) from error
            raise

    async def _open_server(self) -> None:
        proxy = self.proxy
        if proxy.server_port is None or proxy.server_host is None:
            raise ConnectionStartError("no server configured for reverse connections")
        self.server = await trio.open_tcp_stream(proxy.server_host, proxy.server_port)
        sockname = self.server.socket.getsockname()
        self.server_local_address = (sockname[0], sockname[1])

    async def _start_incoming(self, deadline: float) -> None:
        """prepare() and _complete() at once, for a connection that arrived
        unannounced: the TLS handshake runs while the server connection opens and
        the peer is punched, so the client's handshake waits for neither (a TCP
        connect and a round trip, both on the critical path of CONNECT-to-200)."""
        what = f"reverse from {self.address[0]}:{self.address[1]}"
        failures: list[Exception] = []
        try:
            with trio.fail_at(deadline):
                self.peer = peer = await self._exit_stack.enter_async_context(self.proxy.peers.use(self.address))
                async with trio.open_nursery() as nursery:

                    async def part(work: Callable[[], Awaitable[None]]) -> None:
                        try:
                            await work()
                        except Exception as error:  # the first failure ends the start
                            failures.append(error)
                            nursery.cancel_scope.cancel()

                    async def open_and_punch() -> None:
                        await self._open_server()
                        await peer.wait_heard()

                    nursery.start_soon(part, open_and_punch)
                    nursery.start_soon(part, lambda: self._complete(deadline))
                if failures:
                    raise failures[0]
        except BaseException as error:
            await self._abandon()
            if isinstance(error, Exception):
                raise start_error(error, what) from error
            raise

    async def _abandon(self) -> None:
        await close_streams(self.tls or self.utp, self.server, graceful=False, end_time=0)
        self.tls = None
        self.server = None
        with trio.CancelScope(shield=True):
            await self._exit_stack.aclose()

    def attach_utp(self, utp: UtpStream) -> None:
        self.utp = utp
        self._utp_ready.set()

    async def _complete(self, deadline: float) -> None:
        """TLS server handshake and client chain verification, bounded by the deadline."""
        what = f"reverse from {self.address[0]}:{self.address[1]}"
        assert self.utp is not None and self.peer is not None
        try:
            with trio.fail_at(deadline):
                self.tls = TLSStream(self.utp, self.proxy.tls_config, server_side=True)
                await until_peer_dies(self.peer, self.tls.do_handshake)
            chain = self.tls.peer_certificate_chain
            self.node_id = verified_chains.verify("client", chain, verify_client_certificate_chain)
            self.certificates = tuple(chain)
        except Exception as error:
            raise start_error(error, what) from error

    async def run(self, utp: UtpStream | None = None, *, prepared: bool = False) -> None:
        """The whole life of a reverse connection; runs in the proxy's connection nursery.

        ``utp`` given: an incoming connection (start now). ``prepared``: opened by
        open_connection_reverse, wait for an incoming uTP connection.
        """
        reason, error, graceful = EndReason.CLOSED_LOCALLY, None, True
        established = False
        try:
            with self.scope:
                if utp is not None:
                    self.attach_utp(utp)
                # An incoming connection has conn_connect_time for all of its start;
                # a prepared one gets it afresh when its uTP connection arrives.
                deadline = trio.current_time() + self.proxy.conn_connect_time
                if not prepared:
                    await self._start_incoming(deadline)
                else:
                    assert self.peer is not None
                    if not self.composed:
                        try:
                            await until_peer_dies(self.peer, self._utp_ready.wait)
                        except ConnectionKeepAliveTimeout as death:
                            reason, error, graceful = EndReason.KEEP_ALIVE_TIMEOUT, death, False
                            return
                        deadline = trio.current_time() + self.proxy.conn_connect_time
                    await self._complete(deadline)
                assert self.node_id is not None and self.tls is not None and self.server is not None
                established = True
                self.proxy._connection_established(self)
                outcome = await relay(self.server, self.tls, self.peer)
                reason, error = outcome.reason, reset_error_for(outcome)
                graceful = outcome.error is None
        except ConnectionStartError as start_failure:
            log.info("%s", start_failure)
            reason, error, graceful = EndReason.RESET, start_failure, False
        except ConnectionKeepAliveTimeout as death:
            reason, error, graceful = EndReason.KEEP_ALIVE_TIMEOUT, death, False
        except Exception as bug:  # a defect must end this connection, never the proxy
            log.exception("reverse connection from %s failed", self.address)
            reason, error, graceful = EndReason.RESET, bug, False
        finally:
            await self.finish(reason, error, graceful=graceful, established=established)

    async def finish(self, reason: EndReason, error: BaseException | None, *, graceful: bool, established: bool) -> None:
        if self.ended.is_set():
            return
        self.end_reason, self.end_error = reason, error
        with trio.CancelScope(shield=True):
            await close_streams(self.tls or self.utp, self.server, graceful=graceful, end_time=self.proxy.conn_end_time)
            await self._exit_stack.aclose()
        self.ended.set()
        self.proxy._connection_ended(self)
        if established and self.node_id is not None:
            call_callback(
                self.proxy.connection_lost_callback,
                ConnectionEvent(self.node_id, self.address[0], self.address[1], self.direction, reason, error),
            )

    async def finish_unstarted(self) -> None:
        """Drop a prepared connection that was never registered (the proxy is stopping)."""
        await self._abandon()
        self.ended.set()

    def close(self) -> None:
        self.scope.cancel()

    def __repr__(self) -> str:
        return f"<ConnectionReverse {self.address} node={self.node_id} server={self.server_local_address}>"
