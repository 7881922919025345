"""The Proxy: HTTP CONNECT forward proxy + reverse proxy over one UDP endpoint.

``open_proxy(...)`` binds the UDP endpoint (uTP + out-of-band messages) and the
CONNECT listener, runs everything in one nursery, and yields the running Proxy.
Leaving the block (or ``await proxy.stop()``) stops it: new CONNECTs get 503,
incoming uTP connections are refused, every connection ends within
``conn_end_time``, and no task is left.

Task tree::

    open_proxy nursery
      Proxy._run (service scope)
        PeerRegistry.run            one message subscription, every Peer's ping task
        RendezvousService.run       keyed messages: registrations, lookups, punching
        TunnelPaths.run             path punches in the background (paths.py)
        ConnectFrontEnd.accept      CONNECT listener -> one task per TCP client (connect_front.py)
        _accept_reverse             endpoint.accept() -> ConnectionReverse.run
        connection nursery          every ConnectionForward/Reverse.run and client handler

Connections see of the Proxy only a ``ConnectionContext`` (lifecycle.py); the
``ConnectionRegistry`` (registry.py) holds them and calls the user's callbacks.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import AsyncIterator, Iterable, Mapping
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import trio

from nat.endpoint import open_endpoint
from nat.errors import EndpointClosed, NatError
from nat.utp.config import UtpConfig
from nat.utp.paths import VirtualPath
from proxy.identity.node_id import NodeId
from proxy.identity.tls_config import TLSConfig
from proxy.identity.verification import DEFAULT_MAX_CHAIN_LENGTH
from proxy.rendezvous.addresses import RelayAddress
from proxy.rendezvous.driver import RendezvousService
from proxy.rendezvous.node import RendezvousTimers
from proxy.tunnel.address_book import AddressBook
from proxy.tunnel.addressing import RendezvousOptions, find_path, resolve_address, start_rendezvous
from proxy.tunnel.connect_front import ConnectFrontEnd
from proxy.tunnel.connection import close_streams
from proxy.tunnel.defaults import DEFAULT_CONGESTION, MAX_CONN_CONNECT_TIME, check_timing_options  # noqa: F401
from proxy.tunnel.errors import ConnectionStartError, ProxyBindError, ProxyNotRunning
from proxy.tunnel.forward import ConnectionForward
from proxy.tunnel.hosts import format_host_port
from proxy.tunnel.lifecycle import ConnectionContext
from proxy.tunnel.paths import PathTimers, RelayRoutes, TunnelPaths, relay_sender, relayed_address
from proxy.tunnel.peer import Address, PeerRegistry, PeerTimers, normalize_address
from proxy.tunnel.records import (
    ConnectionCallback,
    ConnectionEvent,
    ConnectionInfo,
    ConnectionStatus,
    PathMove,
    PreparedReverse,
    Splicer,
)
from proxy.tunnel.registry import END_MARGIN, ConnectionRegistry
from proxy.tunnel.reverse import ConnectionReverse
from proxy.tunnel.services import ServicePolicy

log = logging.getLogger(__name__)



class Proxy:
    """A running proxy; create it with ``open_proxy``."""

    def __init__(
        self,
        *,
        tls_config: TLSConfig,
        auth_token: str | None = None,
        address_book: Mapping[NodeId, tuple[str, int]] | None = None,
        server_host: str | None = None,
        server_port: int | None = None,
        conn_connect_time: float = 2.0,
        conn_keep_alive_timeout_time: float = 20.0,
        conn_end_time: float = 1.0,
        conn_punch_interval_time: float = 0.05,
        conn_keep_alive_interval_time: float = 1.0,
        connection_established_callback: ConnectionCallback | None = None,
        connection_lost_callback: ConnectionCallback | None = None,
        max_chain_length: int = DEFAULT_MAX_CHAIN_LENGTH,
        relay_servers: Iterable[RelayAddress] = (),
        relay_serve: bool = False,
        peer_relays: Mapping[NodeId, tuple[RelayAddress, ...]] | None = None,
        rendezvous_timers: RendezvousTimers | None = None,
        policy: ServicePolicy | None = None,
        splicers: Mapping[str, Splicer] | None = None,
        relay_routes: RelayRoutes | None = None,
        punch_window: float = PathTimers.punch_window,
        path_timers: PathTimers | None = None,
        path_changed_callback: ConnectionCallback | None = None,
    ) -> None:
        check_timing_options(
            max_chain_length=max_chain_length,
            conn_connect_time=conn_connect_time,
            conn_keep_alive_timeout_time=conn_keep_alive_timeout_time,
            conn_end_time=conn_end_time,
            conn_punch_interval_time=conn_punch_interval_time,
            conn_keep_alive_interval_time=conn_keep_alive_interval_time,
        )
        self.tls_config = tls_config
        self.auth_token = auth_token
        self.address_book: Mapping[NodeId, tuple[str, int]] = (
            address_book if address_book is not None else AddressBook()
        )
        self.server_host = server_host
        self.server_port = server_port
        # Services and allow lists (services.py); without: server_host/port, open to all.
        server = None if server_host is None or server_port is None else (server_host, server_port)
        self.policy = policy if policy is not None else ServicePolicy.single(server)
        self.splicers = dict(splicers or {})  # per service kind, instead of the byte splice
        self.conn_connect_time = conn_connect_time
        self.conn_keep_alive_timeout_time = conn_keep_alive_timeout_time
        self.conn_end_time = conn_end_time
        self.conn_punch_interval_time = conn_punch_interval_time
        self.conn_keep_alive_interval_time = conn_keep_alive_interval_time
        # Longer peer chains are refused (526) before any certificate is examined.
        self.max_chain_length = max_chain_length
        # ``rendezvous`` (observed addresses, NAT mapping, signed record) runs while the Proxy does.
        self.rendezvous_options = RendezvousOptions(tuple(relay_servers), relay_serve, peer_relays or {},
                                                    rendezvous_timers)
        self.rendezvous: RendezvousService | None = None
        # The relay transport as paths (paths.RelayRoutes), and how tunnels use it.
        self.relay_routes = relay_routes
        self.path_timers = path_timers or PathTimers(punch_window=punch_window)
        self.path_changed_callback = path_changed_callback
        self.paths: TunnelPaths | None = None
        self._registry = ConnectionRegistry(
            end_time=conn_end_time,
            established_callback=connection_established_callback,
            lost_callback=connection_lost_callback,
        )
        # Set when running:
        self.endpoint: Any = None
        self.peers: PeerRegistry = None  # type: ignore[assignment]
        self._forward_address: tuple[str, int] | None = None
        self._proxy_address: tuple[str, int] | None = None
        self._context: ConnectionContext | None = None
        self._starting: set[trio.CancelScope] = set()
        self._front = ConnectFrontEnd(  # the CONNECT listeners (connect_front.py)
            self, spawn=self._spawn, resolve=self._resolve, connect_forward=self._connect_forward,
            connect_by_node_id=self._connect_by_node_id, starting=self._starting)
        # open_connection_forward calls under way, by address: a second one waits for the first
        self._opening_forward: dict[Address, trio.Event] = {}
        self._connection_nursery: trio.Nursery | None = None
        self._service_scope = trio.CancelScope()
        self._stopping = False
        self._started = False
        self._running = False
        self._done = trio.Event()

    # --- lifecycle ------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._running and not self._stopping

    def _bound(self, address: tuple[str, int] | None) -> tuple[str, int]:
        if not self._running or address is None:
            raise ProxyNotRunning("proxy is not running: it has no bound address")
        return address

    @property
    def forward_host(self) -> str:
        """The CONNECT listener's host (ProxyNotRunning unless running or stopping)."""
        return self._bound(self._forward_address)[0]

    @property
    def forward_port(self) -> int:
        return self._bound(self._forward_address)[1]

    @property
    def proxy_host(self) -> str:
        """The UDP endpoint's host (ProxyNotRunning unless running or stopping)."""
        return self._bound(self._proxy_address)[0]

    @property
    def proxy_port(self) -> int:
        return self._bound(self._proxy_address)[1]

    @property
    def connection_established_callback(self) -> ConnectionCallback | None:
        return self._registry.established_callback

    @connection_established_callback.setter
    def connection_established_callback(self, callback: ConnectionCallback | None) -> None:
        self._registry.established_callback = callback

    @property
    def connection_lost_callback(self) -> ConnectionCallback | None:
        return self._registry.lost_callback

    @connection_lost_callback.setter
    def connection_lost_callback(self, callback: ConnectionCallback | None) -> None:
        self._registry.lost_callback = callback

    async def _run(
        self,
        endpoint: Any,
        listeners: list[trio.SocketListener],
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        if self._started or self._stopping:
            raise ProxyNotRunning("a Proxy runs once")
        self._started = True
        try:
            with self._service_scope:
                async with trio.open_nursery() as services:
                    self.endpoint = endpoint
                    self._proxy_address = proxy_address = (endpoint.address[0], endpoint.address[1])
                    self.peers = PeerRegistry(
                        endpoint,
                        PeerTimers(
                            self.conn_punch_interval_time,
                            self.conn_keep_alive_interval_time,
                            self.conn_keep_alive_timeout_time,
                        ),
                    )
                    await services.start(self.peers.run)
                    self.rendezvous = await start_rendezvous(services, endpoint, self.tls_config,
                                                             self.rendezvous_options)
                    if self.relay_routes is None:  # the rendezvous's relayed paths, when it has them
                        self.relay_routes = getattr(self.rendezvous, "routes", None)
                    self.paths = TunnelPaths(self.peers, self.rendezvous, self.relay_routes, self.address_book,
                                             self.path_timers, self._path_changed)
                    await services.start(self.paths.run)
                    self._context = ConnectionContext(
                        endpoint=endpoint,
                        peers=self.peers,
                        tls_config=lambda: self.tls_config,
                        connect_time=self.conn_connect_time,
                        end_time=self.conn_end_time,
                        local_address=proxy_address,
                        policy=lambda: self.policy,
                        splicers=self.splicers,
                        max_chain_length=self.max_chain_length,
                        established=self._registry.established,
                        ended=self._registry.ended,
                        spawn=self._spawn,
                        paths=self.paths,
                    )
                    sockname = listeners[0].socket.getsockname()
                    self._forward_address = (sockname[0], sockname[1])
                    self._connection_nursery = await services.start(self._run_connection_nursery)
                    self._registry.spawn = self._spawn  # async callbacks run in the connection nursery
                    for listener in listeners:
                        services.start_soon(self._front.accept, listener)
                    services.start_soon(self._accept_reverse)
                    endpoint.accepting = self.policy.serves
                    self._running = True
                    task_status.started()
        finally:
            self._running = False
            self._connection_nursery = None
            self._done.set()

    async def _run_connection_nursery(self, task_status: trio.TaskStatus[trio.Nursery]) -> None:
        async with trio.open_nursery() as nursery:
            task_status.started(nursery)
            await trio.sleep_forever()

    async def stop(self) -> None:
        """New CONNECTs get 503, uTP refused, connections end within conn_end_time, tasks end.
        A Proxy that never started is only marked stopped."""
        if not self._started:
            self._stopping = True
            self._done.set()
        if self._done.is_set():
            return
        if not self._stopping:
            self._stopping = True
            if self.endpoint is not None:
                self.endpoint.accepting = False
            for scope in list(self._starting):
                scope.cancel()
            connections = self._registry.all()
            for connection in connections:
                connection.close()
            with trio.move_on_after(self.conn_end_time + END_MARGIN):
                for connection in connections:
                    await connection.ended.wait()
                await self._front.wait_answered()
                await self._registry.callbacks_done()
            self._service_scope.cancel()
        await self._done.wait()

    # --- registry -------------------------------------------------------------------

    def _spawn(self, fn: Any, *args: Any) -> None:
        if self._connection_nursery is None:
            raise ProxyNotRunning("proxy is not running")
        self._connection_nursery.start_soon(fn, *args)

    def _connection_context(self) -> ConnectionContext:
        if self._context is None:
            raise ProxyNotRunning("proxy is not running")
        return self._context

    def connections(self) -> list[ConnectionStatus]:
        """Every established connection, forward then reverse, with its counters."""
        return self._registry.statuses()

    @property
    def connection_forward_count(self) -> int:
        return len(self._registry.forward)

    @property
    def connection_reverse_count(self) -> int:
        return len(self._registry.reverse)

    def set_policy(self, policy: ServicePolicy) -> int:
        """Use new services and allow lists from now on; live connections whose NodeId
        lost access end as ``revoked`` (returns how many)."""
        self.policy = policy
        if self._running and not self._stopping:
            self.endpoint.accepting = policy.serves
        return self._registry.revoke(policy)

    def set_tls_config(self, tls_config: TLSConfig) -> None:
        """Use a new key/chain for connections started from now on."""
        self.tls_config = tls_config

    # --- forward ----------------------------------------------------------------------

    async def _resolve(self, host: str, port: int) -> Address:
        return await resolve_address(host, port, self.proxy_host)

    async def _connect_by_node_id(
        self, node_id: NodeId, *, claim: bool, server_name: bytes | None = None
    ) -> ConnectionForward:
        """A connection to ``node_id`` found by the relay nodes: direct when a punch
        succeeds within the punch window, else over a relay (paths.py)."""
        assert self.paths is not None
        live = self._registry.address_of(node_id)
        if live is not None:  # beside a live direct tunnel: its path, no lookup or punch
            return await self._connect_forward((node_id,), live, claim=claim, server_name=server_name,
                                               follow_path=node_id not in self.address_book)
        route = await self.paths.route(node_id, self.find_path)
        if isinstance(route, VirtualPath):
            return await self._connect_forward((node_id,), relayed_address(node_id), claim=claim,
                                               server_name=server_name, start_path=route)
        return await self._connect_forward((node_id,), route, claim=claim, server_name=server_name,
                                           follow_path=node_id not in self.address_book)

    async def _connect_forward(
        self, node_ids: tuple[NodeId, ...], address: Address, *, claim: bool, server_name: bytes | None = None,
        start_path: VirtualPath | None = None, follow_path: bool = False,
    ) -> ConnectionForward:
        """An idle pre-opened connection to ``address`` claiming one of node_ids, for the
        service ``server_name`` names, or a new one. ``claim``: for a CONNECT."""
        idle = self._registry.idle_forward(address, node_ids, server_name)
        if idle is not None:
            idle.claimed = claim
            return idle
        connection = ConnectionForward(self._connection_context(), address, node_ids, server_name,
                                       start_path=start_path, follow_path=follow_path)
        connection.claimed = claim
        await connection.start()
        if self._stopping:
            await connection.finish_unstarted()
            raise ProxyNotRunning("proxy is stopping")
        self._registry.add(connection)
        self._spawn(connection.run)
        self._registry.established(connection)
        return connection

    async def open_connection_forward(
        self, node_ids: NodeId | Iterable[NodeId], host: str | None = None, port: int | None = None
    ) -> NodeId:
        """Start a forward connection ahead of a CONNECT; returns the verified NodeId.

        Without host and port: the address book's entry for the (first) NodeId, else
        the relay nodes find it and both sides punch (``find_path``)."""
        if not self.running:
            raise ProxyNotRunning("proxy is not running")
        wanted = (node_ids,) if isinstance(node_ids, NodeId) else tuple(node_ids)
        if host is None or port is None:
            if not wanted:
                raise ConnectionStartError("open_connection_forward needs a NodeId or an address")
            if self.paths is not None and self.paths.routes is not None:
                connection = await self._connect_by_node_id(wanted[0], claim=False)
                assert connection.node_id is not None
                return connection.node_id
            address = await self.find_path(wanted[0])
        else:
            address = await self._resolve(host, port)
        while (opening := self._opening_forward.get(address)) is not None:
            await opening.wait()
        live = self._registry.live_forward(address, wanted)
        if live is not None and live.node_id is not None:
            return live.node_id  # the original's: a live connection to the address is enough
        self._opening_forward[address] = opened = trio.Event()
        try:
            connection = await self._connect_forward(wanted, address, claim=False)
        finally:
            del self._opening_forward[address]
            opened.set()
        assert connection.node_id is not None
        return connection.node_id

    async def close_connection_forward(self, host: str, port: int) -> None:
        if not self._running:
            raise ProxyNotRunning("proxy is not running")
        await self._registry.end(self._registry.to_proxy(self._registry.forward, host, port))

    # --- reverse ----------------------------------------------------------------------

    async def _accept_reverse(self) -> None:
        while True:
            try:
                utp = await self.endpoint.accept()
            except (EndpointClosed, trio.ClosedResourceError):
                return
            except NatError as error:
                log.debug("uTP accept failed: %s", error)
                continue
            if self._stopping or self._connection_nursery is None:
                await close_streams(utp, graceful=False, end_time=0)
                continue
            path = utp.remote_address
            if isinstance(path, VirtualPath):  # relayed: the relay authenticated who sent the SYN
                sender = relay_sender(path)
                if sender is None:  # not a relay's path: nobody to answer
                    await close_streams(utp, graceful=False, end_time=0)
                    continue
                relayed = ConnectionReverse(self._connection_context(), relayed_address(sender))
                relayed.start_path = path
                self._registry.add(relayed)
                self._spawn(relayed.run, utp)
                continue
            address = normalize_address(path)
            prepared = self._registry.idle_reverse(address)
            if prepared is not None:
                prepared.attach_utp(utp)
            else:
                connection = ConnectionReverse(self._connection_context(), address)
                self._registry.add(connection)
                self._spawn(connection.run, utp)

    async def open_connection_reverse(self, host: str, port: int) -> None:
        """Connect to the server and punch towards (host, port) ahead of its uTP connection."""
        if not self.running:
            raise ProxyNotRunning("proxy is not running")
        address = await self._resolve(host, port)
        if self._registry.live_reverse(address) is not None:
            return  # prepared already, or the peer is connected or connecting
        connection = ConnectionReverse(self._connection_context(), address)
        # Registered while it prepares: a uTP connection from the address that arrives
        # meanwhile (an original forward's SYN comes before its first PING) joins it.
        self._registry.add(connection)
        try:
            with trio.CancelScope() as starting:  # stop() cancels it
                self._starting.add(starting)
                try:
                    await connection.prepare()
                finally:
                    self._starting.discard(starting)
        except BaseException:
            with trio.CancelScope(shield=True):
                await connection.finish_unstarted()  # ended: stop() may be waiting for it
            self._registry.ended(connection)
            raise
        if self._stopping or starting.cancelled_caught:
            await connection.finish_unstarted()
            self._registry.ended(connection)
            raise ProxyNotRunning("proxy is stopping")
        self._spawn(functools.partial(connection.run, prepared=True))

    def prepared_reverse_connections(self) -> list[PreparedReverse]:
        """Reverse connections open_connection_reverse prepared whose peer has not connected yet."""
        return [
            PreparedReverse(connection.address[0], connection.address[1], connection.prepared_at)
            for connection in self._registry.reverse
            if connection.prepared_at is not None and connection.usable
        ]

    async def close_connection_reverse(self, host: str, port: int) -> None:
        if not self._running:
            raise ProxyNotRunning("proxy is not running")
        await self._registry.end(self._registry.to_proxy(self._registry.reverse, host, port))

    # --- rendezvous -----------------------------------------------------------------------

    async def find_path(self, node_id: NodeId) -> Address:
        """Where to reach ``node_id``: its address book entry, else the address the relay
        nodes' introduction and both sides' punching confirmed (typed errors, 502)."""
        live = self._registry.address_of(node_id)  # a live tunnel's path: no need to ask the relays
        return await find_path(node_id, self.address_book, self.rendezvous, self.proxy_host, live)

    def set_relay_routes(self, routes: RelayRoutes | None) -> None:
        """Use ``routes`` (the relay transport, built on this Proxy's endpoint) for
        relay fallback from now on (None: direct paths only)."""
        self.relay_routes = routes
        if self.paths is not None:
            self.paths.routes = routes

    def _path_changed(self, connection: Any, move: PathMove) -> None:
        """A live tunnel moved (paths.py): tell the path_changed callback."""
        if connection.node_id is None:
            return
        info = connection.info()
        self._registry.call(self.path_changed_callback, ConnectionEvent(
            connection.node_id, connection.address[0], connection.address[1], connection.direction,
            service=connection.service, path=info.path if info else move.to_path,
            via=info.via if info else None, move=move))

    # --- lookups ------------------------------------------------------------------------

    def get_connection_info_by_client(self, client_host: str, client_port: int) -> ConnectionInfo | None:
        """The forward connection serving the CONNECT client at that TCP address."""
        return self._registry.info_by_client(client_host, client_port)

    def get_connection_info_by_reverse(self, host: str, port: int) -> ConnectionInfo | None:
        """The reverse connection whose TCP socket to the server has that local address
        (what the server sees as its peer)."""
        return self._registry.info_by_server_socket(host, port)

    def get_connection_info_by_proxy(self, proxy_host: str, proxy_port: int) -> ConnectionInfo | None:
        """A connection (either direction) to or from the remote proxy at that address."""
        return self._registry.info_by_proxy(proxy_host, proxy_port)


@asynccontextmanager
async def open_proxy(
    *,
    tls_config: TLSConfig,
    auth_token: str | None = None,
    forward_host: str = "127.0.0.1",
    forward_port: int = 0,
    proxy_host: str = "0.0.0.0",
    proxy_port: int = 0,
    server_host: str | None = None,
    server_port: int | None = None,
    address_book: Mapping[NodeId, tuple[str, int]] | None = None,
    utp_config: Any = None,
    offload: bool = True,
    **options: Any,
) -> AsyncIterator[Proxy]:
    """Run a Proxy for the duration of the block (options: see ``Proxy``).

    ``utp_config``: the uTP tunables (``nat.utp.config.UtpConfig``); by default
    the ``rate`` congestion controller, which does not read random loss as
    congestion (LEDBAT, libutp's, halves its window on every loss and so keeps a
    few percent of a lossy path).

    ``offload``: UDP segmentation offload on the endpoint (GSO sends, GRO
    receives; see ``nat.open_endpoint``): bulk tunnels move several times more
    datagrams per syscall. Peers see ordinary datagrams; a path that refuses
    GSO falls back to plain sends by itself.
    """
    proxy = Proxy(
        tls_config=tls_config,
        auth_token=auth_token,
        address_book=address_book,
        server_host=server_host,
        server_port=server_port,
        **options,
    )
    dual_stack = proxy_host == "::"
    async with AsyncExitStack() as stack:
        try:
            endpoint = await stack.enter_async_context(
                open_endpoint(
                    proxy_host,
                    proxy_port,
                    dual_stack=dual_stack,
                    config=utp_config if utp_config is not None else UtpConfig(congestion=DEFAULT_CONGESTION),
                    close_timeout=proxy.conn_end_time,
                    offload=offload,
                )
            )
        except OSError as error:
            raise ProxyBindError("UDP proxy socket", format_host_port(proxy_host, proxy_port), error) from error
        try:
            listeners = await trio.open_tcp_listeners(forward_port, host=forward_host)
        except OSError as error:
            where = format_host_port(forward_host, forward_port)
            raise ProxyBindError("CONNECT listener (TCP)", where, error) from error
        for listener in listeners:  # closed by their accept tasks, or here if never run
            stack.push_async_callback(listener.aclose)
        async with trio.open_nursery() as nursery:
            await nursery.start(proxy._run, endpoint, listeners)
            try:
                yield proxy
            finally:
                with trio.CancelScope(shield=True):
                    await proxy.stop()
