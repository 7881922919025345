"""Every live connection of one Proxy, forward and reverse.

The registry is where the lifecycle meets the Proxy: a connection is added once
started (forward) or accepted or prepared (reverse); its ``established`` and
``ended`` (given to it in its ``ConnectionContext``) record when it was
established and call the user's established and lost callbacks; the Proxy asks it
for counts, idle connections to reuse, lookups and statuses, and has it end
connections within ``conn_end_time``.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import trio

from nat import VirtualPath
from proxy.identity.node_id import NodeId
from proxy.tunnel.errors import ProxyNotRunning
from proxy.tunnel.forward import ConnectionForward
from proxy.tunnel.lifecycle import TunnelConnection
from proxy.tunnel.peer import Address, normalize_address
from proxy.tunnel.records import ConnectionCallback, ConnectionEvent, ConnectionInfo, ConnectionStatus
from proxy.tunnel.reverse import ConnectionReverse
from proxy.tunnel.services import ServicePolicy

log = logging.getLogger(__name__)

# Each connection's own close is bounded by conn_end_time; the margin only covers
# scheduling.
END_MARGIN = 0.5


Spawn = Callable[[Callable[[], Awaitable[None]]], None]


class ConnectionRegistry:
    """The live connections of one Proxy and the callbacks about them."""

    def __init__(
        self,
        *,
        end_time: float,
        established_callback: ConnectionCallback | None = None,
        lost_callback: ConnectionCallback | None = None,
    ) -> None:
        self.end_time = end_time
        self.established_callback = established_callback
        self.lost_callback = lost_callback
        self.forward: set[ConnectionForward] = set()
        self.reverse: set[ConnectionReverse] = set()
        self._established_at: dict[TunnelConnection, float] = {}
        # Where an async callback runs: a task of the Proxy's connection nursery
        # (set by the Proxy once running; ProxyNotRunning once it is gone).
        self.spawn: Spawn | None = None
        self._callbacks_running = 0
        self._callbacks_idle = trio.Event()
        self._callbacks_idle.set()

    # --- callbacks --------------------------------------------------------------------

    def _call(self, callback: ConnectionCallback | None, event: ConnectionEvent) -> None:
        """Run a user callback, a plain function or an async one (awaited in a task of
        its own); its failure is logged, never breaks a connection or the proxy."""
        if callback is None:
            return
        try:
            result: Any = callback(event)
        except Exception:  # a user callback is foreign code: contain it, say so
            log.exception("connection callback failed for %s", event)
            return
        if inspect.isawaitable(result):
            self._await_callback(result, event)

    def call(self, callback: ConnectionCallback | None, event: ConnectionEvent) -> None:
        """Run a callback of the Proxy's own (e.g. path_changed) the same contained way."""
        self._call(callback, event)

    def _await_callback(self, result: Awaitable[Any], event: ConnectionEvent) -> None:
        async def run() -> None:
            try:
                await result
            except Exception:  # foreign code, as above
                log.exception("connection callback failed for %s", event)
            finally:
                self._callback_done()

        self._callbacks_running += 1
        self._callbacks_idle = trio.Event()
        try:
            if self.spawn is None:
                raise ProxyNotRunning("proxy is not running")
            self.spawn(run)
        except ProxyNotRunning:
            self._callback_done()
            log.warning("connection callback for %s not run: the proxy is not running", event)
            if inspect.iscoroutine(result):
                result.close()

    def _callback_done(self) -> None:
        self._callbacks_running -= 1
        if not self._callbacks_running:
            self._callbacks_idle.set()

    async def callbacks_done(self) -> None:
        """Until no async callback is running."""
        await self._callbacks_idle.wait()

    # --- lifecycle --------------------------------------------------------------------

    def add(self, connection: ConnectionForward | ConnectionReverse) -> None:
        if isinstance(connection, ConnectionForward):
            self.forward.add(connection)
        else:
            self.reverse.add(connection)

    def established(self, connection: TunnelConnection) -> None:
        assert connection.node_id is not None
        self._established_at[connection] = trio.current_time()
        self._call(
            self.established_callback,
            ConnectionEvent(
                connection.node_id,
                connection.address[0],
                connection.address[1],
                connection.direction,
                service=connection.service,
                path=connection.path_kind,
            ),
        )
        connection.reported_established()

    def ended(self, connection: TunnelConnection) -> None:
        """Drop a finished connection; the lost callback hears of it if it had been established."""
        was_established = self._established_at.pop(connection, None) is not None
        if isinstance(connection, ConnectionForward):
            self.forward.discard(connection)
        elif isinstance(connection, ConnectionReverse):
            self.reverse.discard(connection)
        if was_established and connection.node_id is not None:
            self._call(
                self.lost_callback,
                ConnectionEvent(
                    connection.node_id,
                    connection.address[0],
                    connection.address[1],
                    connection.direction,
                    connection.end_reason,
                    connection.end_error,
                    connection.service,
                    path=connection.path_kind,
                ),
            )

    def all(self) -> list[TunnelConnection]:
        return [*self.forward, *self.reverse]

    def revoke(self, policy: ServicePolicy) -> int:
        """Close, as ``revoked``, every connection whose NodeId ``policy`` no longer
        lets through: a reverse one whose service is gone or no longer allows any
        NodeId of the caller's chain, a forward one to a node [forward]
        allow_targets leaves out. Connections still starting check at their end."""
        revoked = [
            connection
            for connection in self.all()
            if connection.node_id is not None
            and not (
                policy.still_allows(connection.service, connection.chain_node_ids)
                if isinstance(connection, ConnectionReverse)
                else policy.target_allowed((connection.node_id,))
            )
        ]
        for connection in revoked:
            connection.revoke()
        return len(revoked)

    async def end(self, connections: Iterable[TunnelConnection]) -> None:
        """Close connections and wait until they ended, at most conn_end_time (and a margin)."""
        connections = list(connections)
        for connection in connections:
            connection.close()
        with trio.move_on_after(self.end_time + END_MARGIN):
            for connection in connections:
                await connection.ended.wait()

    # --- queries ----------------------------------------------------------------------

    def idle_forward(
        self, address: Address, node_ids: tuple[NodeId, ...], server_name: bytes | None = None
    ) -> ConnectionForward | None:
        """A connection opened ahead of time to ``address``, to one of ``node_ids``,
        for the same remote service (``server_name``), not yet taken."""
        for connection in self.forward:
            if (
                connection.address == address
                and connection.usable
                and connection.node_id in node_ids
                and connection.server_name == server_name
            ):
                return connection
        return None

    def idle_reverse(self, address: Address) -> ConnectionReverse | None:
        """A connection prepared for ``address``, still waiting for its uTP connection."""
        for connection in self.reverse:
            if connection.address == address and connection.usable:
                return connection
        return None

    def live_forward(self, address: Address, node_ids: tuple[NodeId, ...]) -> ConnectionForward | None:
        """A started connection to ``address``, to one of ``node_ids``, still alive (taken or not)."""
        for connection in self.forward:
            if connection.address == address and connection.node_id in node_ids and connection.alive:
                return connection
        return None

    def live_reverse(self, address: Address) -> ConnectionReverse | None:
        """A connection from ``address`` that is prepared (or being prepared) for it, or
        was started by it once it proved it receives (not a stranger's half-open SYN)."""
        for connection in self.reverse:
            if connection.address != address:
                continue
            if connection.usable:
                return connection
            peer = connection.peer
            if connection.alive and peer is not None and peer.proven.is_set():
                return connection
        return None

    def address_of(self, node_id: NodeId) -> Address | None:
        """Where a live connection (either direction) with that verified NodeId goes
        directly now: its uTP path when that is an address (it may have moved since it
        started), never a relayed one."""
        for connection in (*self.forward, *self.reverse):
            if connection.node_id == node_id and connection.alive:
                utp = connection.utp
                path = connection.address if utp is None else utp.path
                if type(path) is not VirtualPath and path[1] != 0:  # port 0: relayed_address
                    return normalize_address(path)
        return None

    def to_proxy(self, connections: Iterable[TunnelConnection], host: str, port: int) -> list[TunnelConnection]:
        """Those of ``connections`` to or from the remote proxy at (host, port)."""
        key = normalize_address((host, port))
        return [connection for connection in connections if connection.address == key]

    def statuses(self) -> list[ConnectionStatus]:
        """Every established connection, forward then reverse, with its counters."""
        statuses = []
        for connection in self.all():
            established_at = self._established_at.get(connection)
            if established_at is None:
                continue
            status = connection.status(established_at)
            if status is not None:
                statuses.append(status)
        return statuses

    def info_by_client(self, host: str, port: int) -> ConnectionInfo | None:
        key = normalize_address((host, port))
        for connection in self.forward:
            if connection.tcp_address == key:
                return connection.info()
        return None

    def info_by_server_socket(self, host: str, port: int) -> ConnectionInfo | None:
        key = normalize_address((host, port))
        for connection in self.reverse:
            if connection.tcp_address is not None and normalize_address(connection.tcp_address) == key:
                return connection.info()
        return None

    def info_by_proxy(self, host: str, port: int) -> ConnectionInfo | None:
        key = normalize_address((host, port))
        for connection in self.all():
            if connection.address == key and connection.node_id is not None:
                return connection.info()
        return None
