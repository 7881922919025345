"""The one lifecycle of a connection, forward or reverse: start, wait for the
missing end, splice, finish.

A connection starts (a typed error after undoing what it opened, see
``connection.start_error``), is registered, waits for its missing end (the
CONNECT client of a forward connection opened ahead of time, the uTP connection
of a reverse connection prepared ahead of time) unless its peer dies first, splices
its TCP end to TLS over uTP, and finishes. ``close()`` ends it from outside at
any point.

How it finishes says whether the data was complete. The TCP end gets a FIN only
after a clean end of the splice (both directions ended with close_notify and FIN);
a TCP end that was joined to the tunnel and ended any other way (the peer died or
reset, TLS broke, closed or stopped here midway) gets a reset, so truncation is
never silent. The tunnel gets the original's goodbye (close_notify, uTP FIN, the
peer's answer awaited within ``conn_end_time``) unless it broke or our own
direction still had data to carry: then a uTP RESET, so the far side resets its
TCP end too instead of taking a part for the whole.

A connection sees of the Proxy only its ``ConnectionContext``.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import trio
from cryptography import x509

from nat.utp.paths import VirtualPath
from proxy.identity.node_id import NodeId
from proxy.identity.tls_config import TLSConfig
from proxy.tunnel.connection import (
    TRANSPORT_ERRORS,
    as_peer_reset,
    close_streams,
    close_tunnel,
    reset_tcp,
    start_error,
    until_peer_dies,
)
from proxy.tunnel.errors import (
    ConnectionKeepAliveTimeout,
    ConnectionStartError,
    ProxyNotRunning,
    StartRefused,
)
from proxy.tunnel.hosts import format_host_port
from proxy.tunnel.paths import PathPeer, TunnelPath, relay_of
from proxy.tunnel.peer import Address, Peer, PeerRegistry
from proxy.tunnel.ratelimit import RateLimitedLog
from proxy.tunnel.records import ConnectionInfo, ConnectionStatus, Direction, EndReason, Splicer
from proxy.tunnel.services import ServicePolicy
from proxy.tunnel.splice import IDLE_BUFFER, IdleTunnel, PipeOutcome, relay

if TYPE_CHECKING:
    from nat.stream import UtpStream
    from proxy.tls import TLSStream

log = logging.getLogger(__name__)
# Start failures, per remote host: a caller (or a spoofer) must not fill the log.
_start_failures = RateLimitedLog(log)


class UtpConnector(Protocol):
    """The part of nat.Endpoint that forward connections use."""

    async def connect(self, address: tuple[Any, ...]) -> UtpStream: ...


@dataclass(frozen=True)
class ConnectionContext:
    """All that a connection uses of the Proxy running it."""

    endpoint: UtpConnector
    peers: PeerRegistry
    tls_config: Callable[[], TLSConfig]  # read at each handshake: set_tls_config applies to new starts
    connect_time: float  # conn_connect_time: bound of a start
    end_time: float  # conn_end_time: bound of a graceful finish
    local_address: Address  # this proxy's UDP address, for ConnectionInfo
    # The services and allow lists, read at each start (a reload swaps them).
    policy: Callable[[], ServicePolicy]
    max_chain_length: int  # certificates a peer's chain may hold (longer: refused unexamined, 526)
    established: Callable[[TunnelConnection], None]  # the registry's: registered connection established
    ended: Callable[[TunnelConnection], None]  # the registry's: registered connection finished
    # Runs a task in the proxy's connection nursery; ProxyNotRunning once that is gone.
    spawn: Callable[[Callable[[], Awaitable[None]]], None]
    # Per service kind (e.g. "grpc"), the application's pipe between a reverse
    # tunnel and its server, used instead of the byte splice (records.Splicer).
    splicers: Mapping[str, Splicer] = field(default_factory=dict)
    # The path decisions (paths.TunnelPaths): relay fallback, upgrades, moves. None: direct only.
    paths: Any = None


@dataclass(frozen=True)
class Ending:
    """Why a connection ended, and whether its tunnel broke."""

    reason: EndReason = EndReason.CLOSED_LOCALLY  # also when cancelled: closed or stopped here
    error: BaseException | None = None
    broken: bool = False  # reset, broken TLS, a defect: no goodbye is possible


class _FarSideEnded(Exception):
    """The far side of a connection waiting for its missing end went away."""

    def __init__(self, ending: Ending) -> None:
        super().__init__(ending.reason.value)
        self.ending = ending


class TunnelConnection:
    """What a forward and a reverse connection share: the remote peer, the verified
    identity, the streams, the lifetime and the ``ConnectionInfo`` record."""

    direction: ClassVar[Direction]
    tcp_role: ClassVar[str]  # what the TCP end is: "client" (forward) or "server" (reverse)
    toward: ClassVar[str]  # "to" (forward) or "from" (reverse) the remote proxy, in messages

    def __init__(self, context: ConnectionContext, address: Address) -> None:
        self.context = context
        self.address = address  # the remote proxy's UDP address
        self.node_id: NodeId | None = None
        self.certificates: tuple[x509.Certificate, ...] = ()
        # Reverse: the local service reached; forward: the one named ("port N").
        self.service: str | None = None
        self._revoked = False  # closed by a policy reload (end reason "revoked")
        self.peer: Peer | PathPeer | None = None
        # The path its uTP connection started on when that is a relay's (paths.py).
        self.start_path: VirtualPath | None = None
        self.path_tracker: TunnelPath | None = None  # set when its path is followed
        self.path_scope: trio.CancelScope | None = None
        self.utp: UtpStream | None = None
        self.tls: TLSStream | None = None
        self.tcp: trio.SocketStream | None = None
        # The local TCP end: the CONNECT client (forward), our socket to the server (reverse).
        self.tcp_address: Address | None = None
        self.scope = trio.CancelScope()
        self.ended = trio.Event()
        self.end_reason: EndReason | None = None
        self.end_error: BaseException | None = None
        # The missing end arrived: a forward connection's client, a prepared reverse connection's uTP.
        self._attached = trio.Event()
        # The TCP end was promised the tunnel's data (a CONNECT client answered 200,
        # the server connection spliced): from then on only a clean end is a FIN.
        self._joined = False
        self._outcome: PipeOutcome | None = None  # the splice's, once it started
        # While waiting for the missing end, the far side it has (the remote's tunnel,
        # the server) is watched: what it sends first is kept for the splice, and an
        # end sets far_gone, after which the connection is never handed out.
        self._early_from_tunnel = b""
        self._early_from_tcp = bytearray()
        self._far_gone = trio.Event()
        # Told established (registry), and a close asked for before that, held back
        # (see close()).
        self._established = False
        self._close_held = False
        self._finishing = False
        self._exit_stack = AsyncExitStack()

    # --- state ----------------------------------------------------------------------

    @property
    def what(self) -> str:
        host, port = self.address
        if host.startswith("relay:"):
            return f"{self.direction.value} {self.toward} {host[6:]} (relayed)"
        return f"{self.direction.value} {self.toward} {format_host_port(host, port)}"

    @property
    def composed(self) -> bool:
        """Both ends are there."""
        return self._attached.is_set()

    @property
    def alive(self) -> bool:
        """Not ended, not being cancelled, its far side not gone, and its peer not
        fallen silent."""
        return (
            not self.ended.is_set()
            and not self.scope.cancel_called
            and not self._close_held
            and not self._far_gone.is_set()
            and self.peer is not None
            and not self.peer.died.is_set()
        )

    @property
    def usable(self) -> bool:
        """Opened ahead of time and free to take its missing end."""
        raise NotImplementedError

    def info(self) -> ConnectionInfo | None:
        if self.node_id is None:
            return None
        tcp = self.tcp_address
        local_host, local_port = self.context.local_address
        return ConnectionInfo(
            remote_node_id=self.node_id,
            remote_certificates=self.certificates,
            local_host=local_host,
            local_port=local_port,
            remote_host=self.address[0],
            remote_port=self.address[1],
            direction=self.direction,
            tcp_host=tcp[0] if tcp else None,
            tcp_port=tcp[1] if tcp else None,
            service=self.service,
            path=self.path_kind,
            via=relay_of(None if self.utp is None else self.utp.path),
        )

    @property
    def path_kind(self) -> str:
        """"relay" while its datagrams go through a relay node, else "direct"."""
        path = self.start_path if self.utp is None else self.utp.path
        return "relay" if type(path) is VirtualPath else "direct"

    def status(self, established_at: float) -> ConnectionStatus | None:
        info = self.info()
        if info is None:
            return None
        utp = self.utp
        return ConnectionStatus(
            info=info,
            established_at=established_at,
            bytes_sent=0 if utp is None else utp.bytes_sent,
            bytes_received=0 if utp is None else utp.bytes_received,
            rtt=None if utp is None else utp.rtt,
            move_count=0 if self.path_tracker is None else self.path_tracker.move_count,
            moves=() if self.path_tracker is None else tuple(self.path_tracker.moves),
            transport=None if utp is None else utp.connection.transport_snapshot(),
        )

    # --- start ------------------------------------------------------------------------

    async def _use_peer(self, *, quiet: bool = False) -> Peer | PathPeer:
        """The shared Peer of the remote address, held until the connection finishes
        (``quiet``: an unannounced caller's, see PeerRegistry.use); a relayed
        connection's liveness is its path's (paths.PathPeer)."""
        if self.start_path is not None:
            self.peer = PathPeer(None)
            return self.peer
        self.peer = await self._exit_stack.enter_async_context(self.context.peers.use(self.address, quiet=quiet))
        return self.peer

    def _follow_path(self) -> None:
        """From now on the connection's path follows the evidence (paths.py): a
        relayed one upgrades, a direct one falls back to a relay. Only with relay
        routes; without, it stays where it is and its Peer is the original's."""
        paths = self.context.paths
        if paths is None or paths.routes is None or self.node_id is None or self.path_tracker is not None:
            return
        peer = self.peer
        if not isinstance(peer, PathPeer):
            peer = self.peer = PathPeer(peer)
        self.path_tracker = paths.track(self, self.node_id, peer, self.context.spawn)

    @asynccontextmanager
    async def _starting(self) -> AsyncIterator[None]:
        """A start step: on failure undo what was opened and raise the typed error."""
        try:
            yield
        except BaseException as error:
            if not isinstance(error, Exception):
                await self._abandon()
                raise
            mapped = start_error(error, self.what)
            # A rejected chain (or another refusal) ends TLS with close_notify and FIN,
            # as the original did.
            await self._abandon(goodbye=isinstance(mapped, StartRefused))
            raise mapped from error

    async def _abandon(self, *, goodbye: bool = False) -> None:
        """Close what a start opened and release the peer. The tunnel is reset at
        once, or with ``goodbye`` ends with close_notify and FIN in a task of its
        own (the peer's answer is awaited there, up to conn_end_time, so the
        failure is answered at once)."""
        tunnel = self.tls or self.utp
        await close_streams(self.tcp, graceful=False, end_time=0)
        self.tls = self.utp = None
        self.tcp = None
        if goodbye and tunnel is not None:
            exit_stack = self._exit_stack.pop_all()

            async def say_goodbye() -> None:
                with trio.CancelScope(shield=True):
                    await close_tunnel(tunnel, graceful=True, end_time=self.context.end_time)
                    await exit_stack.aclose()

            try:
                self.context.spawn(say_goodbye)
                return
            except ProxyNotRunning:  # stopping: no time for goodbyes
                self._exit_stack.push_async_exit(exit_stack)
        await close_tunnel(tunnel, graceful=False, end_time=0)
        with trio.CancelScope(shield=True):
            await self._exit_stack.aclose()

    # --- life -------------------------------------------------------------------------

    async def _wait_attached(self) -> None:
        """Wait for the missing end, watching the far side meanwhile (the tunnel of a
        forward connection opened ahead of time, the server connection of a prepared
        reverse one). ConnectionKeepAliveTimeout if the peer dies first, _FarSideEnded
        if the far side ends first."""
        if self.composed:
            return
        assert self.peer is not None
        if self.tls is not None and self.tcp is None:
            await until_peer_dies(self.peer, self._watch_tunnel)
        elif self.tcp is not None and self.tls is None and self.utp is None:
            await until_peer_dies(self.peer, self._watch_server)
        else:
            await until_peer_dies(self.peer, self._attached.wait)

    async def _watch_tunnel(self) -> None:
        assert self.tls is not None
        # The watch sets _far_gone itself: from the moment the end is seen, not alive.
        with IdleTunnel(self.tls, ended=self._far_gone) as watch:
            async with trio.open_nursery() as nursery:

                async def far_end() -> None:
                    await watch.ended.wait()
                    nursery.cancel_scope.cancel()

                nursery.start_soon(far_end)
                await self._attached.wait()
                nursery.cancel_scope.cancel()
        self._early_from_tunnel = bytes(watch.early)
        if watch.reason is not None and not self.composed:
            error = None if watch.error is None else as_peer_reset(watch.error, "while idle: ")
            raise _FarSideEnded(Ending(watch.reason, error, broken=error is not None))

    async def _watch_server(self) -> None:
        assert self.tcp is not None
        tcp, early = self.tcp, self._early_from_tcp
        ending: Ending | None = None
        async with trio.open_nursery() as nursery:

            async def read_server() -> None:
                nonlocal ending
                try:
                    while len(early) < IDLE_BUFFER:
                        data = await tcp.receive_some(IDLE_BUFFER - len(early))
                        if not data:
                            ending = Ending(EndReason.CLOSED_LOCALLY)  # the server ended it
                            break
                        early.extend(data)
                    else:
                        return  # full: read on once spliced
                except TRANSPORT_ERRORS as error:
                    ending = Ending(EndReason.RESET, error)
                self._far_gone.set()
                nursery.cancel_scope.cancel()

            nursery.start_soon(read_server)
            await self._attached.wait()
            nursery.cancel_scope.cancel()
        if ending is not None and not self.composed:
            raise _FarSideEnded(ending)

    async def _splice(self, initial_data: bytes = b"") -> Ending:
        assert self.tcp is not None and self.tls is not None and self.peer is not None
        self._joined = True
        self._outcome = outcome = PipeOutcome()
        await relay(
            self.tcp,
            self.tls,
            self.peer,
            initial_data=initial_data + self._early_from_tcp,
            early_data=self._early_from_tunnel,
            outcome=outcome,
        )
        broken = outcome.error is not None and not isinstance(outcome.error, ConnectionKeepAliveTimeout)
        return Ending(outcome.reason, outcome.reported_error, broken=broken)

    async def _live(self, body: Callable[[], Awaitable[Ending]]) -> None:
        """Run ``body`` in the connection's scope, then finish with why it ended.
        Runs in the proxy's connection nursery: nothing raised here may reach it."""
        ending = Ending()
        try:
            with self.scope:
                ending = await body()
        except ConnectionStartError as failure:
            _start_failures.info(self.address[0], "%s", failure)  # a peer can cause these: rate-limited
            # A rejected chain (or another refusal) still gets the goodbye (close_notify and FIN).
            ending = Ending(EndReason.RESET, failure, broken=not isinstance(failure, StartRefused))
        except ConnectionKeepAliveTimeout as death:
            ending = Ending(EndReason.KEEP_ALIVE_TIMEOUT, death)
        except _FarSideEnded as gone:
            ending = gone.ending
        except Exception as bug:  # a defect must end this connection, never the proxy
            log.exception("%s connection failed", self.what)
            ending = Ending(EndReason.RESET, bug, broken=True)
        finally:
            await self.finish(ending)

    # --- end --------------------------------------------------------------------------

    @property
    def _ended_cleanly(self) -> bool:
        """The splice ended with both directions' close_notify and FIN."""
        outcome = self._outcome
        return outcome is not None and outcome.error is None and outcome.local_eof and outcome.peer_eof

    def _may_say_goodbye(self, ending: Ending) -> bool:
        """close_notify says "that was all from me": only when it is true."""
        if ending.broken:
            return False
        if not self._joined:
            return True  # nothing of ours was in flight
        outcome = self._outcome
        return outcome is not None and outcome.local_eof

    async def finish(self, ending: Ending) -> None:
        """End the TCP end (a FIN only after a clean end, else a reset), tell the
        registry, end the tunnel (the goodbye within conn_end_time when it may,
        else a RESET) and release the peer."""
        if self._finishing:
            return
        self._finishing = True
        if self.path_scope is not None:
            self.path_scope.cancel()
        if self._revoked:
            ending = Ending(EndReason.REVOKED, ending.error, ending.broken)
        self.end_reason, self.end_error = ending.reason, ending.error
        with trio.CancelScope(shield=True):
            try:
                if self.tcp is not None:
                    if self._joined and not self._ended_cleanly:
                        await reset_tcp(self.tcp)
                    else:
                        await close_streams(self.tcp, graceful=False, end_time=0)
                # Reported when it ended, not after the goodbye to a peer that may be gone.
                self.context.ended(self)
                await close_tunnel(
                    self.tls or self.utp, graceful=self._may_say_goodbye(ending), end_time=self.context.end_time
                )
                await self._exit_stack.aclose()
            finally:
                self.ended.set()

    async def finish_unstarted(self) -> None:
        """Drop a started connection that was never registered (the proxy is stopping)."""
        self._finishing = True
        if self.path_scope is not None:
            self.path_scope.cancel()
        await self._abandon()
        self.ended.set()

    def close(self) -> None:
        """End the connection from outside. Between a completed TLS handshake and its
        report as established (the chain checked, for a reverse connection its server
        connected), the close waits for the report, so a connection whose peer
        proved itself is always reported established, then lost."""
        tls = self.tls
        if not self._established and tls is not None and tls.handshake_done and not self.ended.is_set():
            self._close_held = True
            return
        self.scope.cancel()

    def revoke(self) -> None:
        """Close it because its NodeId lost access (a reload): ends as ``revoked``."""
        self._revoked = True
        self.close()

    def reported_established(self) -> None:
        """The registry reported it established: a close held back applies now."""
        self._established = True
        if self._close_held:
            self.scope.cancel()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.address} node={self.node_id} {self.tcp_role}={self.tcp_address}>"
