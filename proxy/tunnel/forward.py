"""A forward connection: local TCP client -> uTP + TLS client -> a remote node.

Start sequence (bounded by ``conn_connect_time``, else ConnectionStartTimeout/504):
use the shared Peer for the remote proxy address (it punches: PING every
``conn_punch_interval_time``), open uTP to it, run the TLS client handshake, wait
until the peer has been heard, then verify the server's chain against the wanted
NodeIds (ConnectionVerifyError/526). A peer whose keep-alive times out meanwhile
ends the start with ConnectionKeepAliveTimeout (524).

After the start the connection waits for its client (a CONNECT that arrives now,
or a later one when opened by ``open_connection_forward``), pipes, and finishes:
closes TLS and uTP within ``conn_end_time``, releases the peer, unregisters and
reports the reason to ``connection_lost_callback``.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, TypeVar

import trio

from nat.errors import NatError
from nat.stream import UtpStream
from proxy.tunnel.connection import (
    TRANSPORT_ERRORS,
    ConnectionEvent,
    TunnelConnection,
    Direction,
    EndReason,
    call_callback,
    close_streams,
    reset_error_for,
    verified_chains,
)
from proxy.identity.errors import CertificateChainError, KeynodeError
from proxy.tunnel.errors import (
    ConnectionKeepAliveTimeout,
    ConnectionStartError,
    ConnectionStartTimeout,
    ConnectionVerifyError,
)
from proxy.identity.node_id import NodeId
from proxy.tunnel.peer import Address, Peer
from proxy.tunnel.splice import relay
from proxy.tls import TLSStream
from proxy.identity.verification import verify_server_certificate_chain

if TYPE_CHECKING:
    from proxy.tunnel.proxy import Proxy

log = logging.getLogger(__name__)

T = TypeVar("T")


async def until_peer_dies(peer: Peer, work: Callable[[], Awaitable[T]]) -> T:
    """Run ``work``; if the peer's keep-alive times out first, raise that instead."""
    results: list[T] = []
    failure: Exception | None = None
    async with trio.open_nursery() as nursery:

        async def watch() -> None:
            await peer.died.wait()
            nursery.cancel_scope.cancel()

        nursery.start_soon(watch)
        try:
            results.append(await work())
        except Exception as error:  # re-raised below, outside the nursery's group
            failure = error
        finally:
            nursery.cancel_scope.cancel()
    if failure is not None:
        raise failure
    if not results:
        raise peer.death or ConnectionKeepAliveTimeout("peer died")
    return results[0]


def start_error(error: BaseException, what: str) -> KeynodeError:
    """Map a failure while starting a connection to its typed error (and HTTP status)."""
    if isinstance(error, (ConnectionStartError, ConnectionKeepAliveTimeout)):
        return error
    if isinstance(error, trio.TooSlowError):
        return ConnectionStartTimeout(f"{what}: start timed out")
    if isinstance(error, CertificateChainError):
        mapped: KeynodeError = ConnectionVerifyError(f"{what}: certificate chain rejected: {error}")
    elif isinstance(error, KeynodeError | NatError | OSError | trio.BrokenResourceError | trio.ClosedResourceError):
        mapped = ConnectionStartError(f"{what}: {type(error).__name__}: {error}")
    else:
        mapped = ConnectionStartError(f"{what}: unexpected {type(error).__name__}: {error}")
    mapped.__cause__ = error
    return mapped


class ConnectionForward(TunnelConnection):
    """One uTP+TLS tunnel stream to a remote proxy, joined to one local client."""

    direction = Direction.FORWARD

    def __init__(self, proxy: Proxy, address: Address, node_ids: tuple[NodeId, ...]) -> None:
        super().__init__(proxy, address)
        self.node_ids = node_ids
        self.utp: UtpStream | None = None
        self.tls: TLSStream | None = None
        self.client: trio.abc.HalfCloseableStream | None = None
        self.client_address: tuple[str, int] | None = None
        self.initial_data = b""
        self._client_ready = trio.Event()
        # Set as soon as a CONNECT picks this connection (before its 200 is sent),
        # so no other CONNECT or open_connection_forward can take it meanwhile.
        self.claimed = False

    @property
    def composed(self) -> bool:
        return self._client_ready.is_set()

    @property
    def usable(self) -> bool:
        """Started, not yet joined to a client, and still alive."""
        return self.node_id is not None and not self.claimed and self.alive

    @property
    def tcp_address(self) -> tuple[str, int] | None:
        return self.client_address

    async def start(self) -> NodeId:
        """Run the start sequence; raise a typed error after cleaning up."""
        proxy = self.proxy
        what = f"forward to {self.address[0]}:{self.address[1]}"
        try:
            with trio.fail_after(proxy.conn_connect_time):
                self.peer = peer = await self._exit_stack.enter_async_context(proxy.peers.use(self.address))

                async def connect_and_handshake() -> None:
                    self.utp = utp = await proxy.endpoint.connect(self.address)
                    self.tls = TLSStream(utp, proxy.tls_config, server_side=False)
                    await self.tls.do_handshake()
                    await peer.wait_heard()

                await until_peer_dies(peer, connect_and_handshake)
            assert self.tls is not None
            chain = self.tls.peer_certificate_chain
            self.node_id = verified_chains.verify(
                ("server", frozenset(self.node_ids)),
                chain,
                lambda chain: verify_server_certificate_chain(self.node_ids, chain),
            )
            self.certificates = tuple(chain)
        except BaseException as error:
            await close_streams(self.tls or self.utp, graceful=False, end_time=0)
            self.tls = self.utp = None
            with trio.CancelScope(shield=True):
                await self._exit_stack.aclose()
            if isinstance(error, Exception):
                raise start_error(error, what) from error
            raise
        return self.node_id

    def attach_client(self, client: trio.abc.HalfCloseableStream, client_address: tuple[str, int], initial_data: bytes) -> None:
        """Hand the (already answered) CONNECT client to this connection's task."""
        self.client = client
        self.client_address = client_address
        self.initial_data = initial_data
        self._client_ready.set()

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Wait for a client, pipe, finish. Runs in the proxy's connection nursery."""
        reason, error = EndReason.CLOSED_LOCALLY, None
        graceful = True
        try:
            with self.scope:
                task_status.started()
                assert self.peer is not None and self.tls is not None
                peer = self.peer
                if not self.composed:
                    try:
                        await until_peer_dies(peer, self._client_ready.wait)
                    except ConnectionKeepAliveTimeout as death:
                        reason, error, graceful = EndReason.KEEP_ALIVE_TIMEOUT, death, False
                        return
                assert self.client is not None
                outcome = await relay(self.client, self.tls, peer, initial_data=self.initial_data)
                reason, error = outcome.reason, reset_error_for(outcome)
                graceful = outcome.error is None
        except Exception as bug:  # a defect must end this connection, never the proxy
            log.exception("forward connection to %s failed", self.address)
            reason, error, graceful = EndReason.RESET, bug, False
        finally:
            await self.finish(reason, error, graceful=graceful)

    async def finish(self, reason: EndReason, error: BaseException | None, *, graceful: bool) -> None:
        if self.ended.is_set():
            return
        self.end_reason, self.end_error = reason, error
        with trio.CancelScope(shield=True):
            await close_streams(self.tls, self.client, graceful=graceful, end_time=self.proxy.conn_end_time)
            await self._exit_stack.aclose()
        self.ended.set()
        self.proxy._connection_ended(self)
        if self.node_id is not None:
            call_callback(
                self.proxy.connection_lost_callback,
                ConnectionEvent(self.node_id, self.address[0], self.address[1], self.direction, reason, error),
            )

    async def finish_unstarted(self) -> None:
        """Drop a started connection that was never registered (the proxy is stopping)."""
        await close_streams(self.tls, graceful=False, end_time=0)
        with trio.CancelScope(shield=True):
            await self._exit_stack.aclose()
        self.ended.set()

    def close(self) -> None:
        self.scope.cancel()

    def __repr__(self) -> str:
        return f"<ConnectionForward {self.address} node={self.node_id} client={self.client_address}>"


__all__ = ["ConnectionForward", "start_error", "until_peer_dies", "TRANSPORT_ERRORS"]
