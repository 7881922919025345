"""The CONNECT front end of a Proxy: the listener's accept loop, one task per TCP
client, the request read within ``conn_connect_time``, and its answer: the
connection found or started for the target (by address, or by NodeId through the
Proxy's paths), then 200 and the client handed to that connection, or the typed
error's status (logged here too, rate-limited per target).

``stop()`` waits (``wait_answered``) for CONNECTs past their request so that each
gets its answer (503 once stopping) rather than a dropped socket.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import trio

from proxy.identity.errors import KeynodeError
from proxy.tunnel.connection import TRANSPORT_ERRORS, close_streams
from proxy.tunnel.errors import ProxyNotRunning
from proxy.tunnel.hosts import format_host_port
from proxy.tunnel.http_connect import ConnectTarget, HTTPConnectEdge
from proxy.tunnel.peer import normalize_address
from proxy.tunnel.ratelimit import RateLimitedLog
from proxy.tunnel.services import server_name_for

if TYPE_CHECKING:
    from proxy.tunnel.forward import ConnectionForward

log = logging.getLogger("proxy.tunnel.proxy")


class ConnectFrontEnd:
    """Serves the CONNECT listeners of one Proxy."""

    def __init__(self, proxy: Any, *, spawn: Callable[..., None], resolve: Callable[..., Awaitable[Any]],
                 connect_forward: Callable[..., Awaitable[Any]], connect_by_node_id: Callable[..., Awaitable[Any]],
                 starting: set[trio.CancelScope]) -> None:
        # The Proxy (its module imports this one) for its settings, and what of its
        # insides the front end uses: handed over, not reached into.
        self.proxy = proxy
        self._spawn = spawn
        self._resolve = resolve
        self._connect_forward = connect_forward
        self._connect_by_node_id = connect_by_node_id
        self._starting = starting  # stop() cancels every scope in it
        # CONNECTs past their request, not yet answered: stop lets them answer.
        self._answering = 0
        self._answered = trio.Event()
        # Failed CONNECTs, logged here too (the client only sees its answer), per target.
        self._failures = RateLimitedLog(log)

    async def wait_answered(self) -> None:
        """Until every CONNECT past its request has been answered."""
        while self._answering:
            await self._answered.wait()

    async def accept(self, listener: trio.SocketListener) -> None:
        async with listener:
            while True:
                try:
                    client = await listener.accept()
                except OSError as error:  # e.g. EMFILE: back off, keep serving
                    log.warning("CONNECT listener accept failed: %s", error)
                    await trio.sleep(0.1)
                    continue
                self._spawn(self._handle_client, client)

    async def _handle_client(self, client: trio.SocketStream) -> None:
        handed_over = False
        try:
            handed_over = await self._serve_connect(client)
        except TRANSPORT_ERRORS as error:
            log.debug("CONNECT client went away: %s", error)
        except Exception:  # a defect must drop this client, never the proxy
            log.exception("CONNECT handler failed")
        finally:
            if not handed_over:
                await close_streams(client, graceful=False, end_time=0)

    async def _serve_connect(self, client: trio.SocketStream) -> bool:
        """Answer one CONNECT; True when the client now belongs to a connection."""
        edge = HTTPConnectEdge(client)
        request = None
        with trio.move_on_after(self.proxy.conn_connect_time):
            try:
                request = await edge.receive_request()
            except KeynodeError as error:
                await edge.send_error_for(error)
                return False
        if request is None:
            return False  # slow, incomplete or abandoned request: dropped
        self._answering += 1
        try:
            return await self._answer_connect(edge, client)
        finally:
            self._answering -= 1
            self._answered.set()
            self._answered = trio.Event()

    async def _answer_connect(self, edge: HTTPConnectEdge, client: trio.SocketStream) -> bool:
        proxy = self.proxy
        connection: ConnectionForward | None = None
        # Now, while the client is surely there (OSError if it is gone already).
        client_address = normalize_address(client.socket.getpeername())
        target: ConnectTarget | None = None
        try:
            target = edge.parse(
                auth_token=proxy.auth_token, address_book=proxy.address_book,
                by_node_id=proxy.rendezvous_options.finds_by_node_id,
            )
            proxy.policy.check_target(target.node_ids)  # 403 before anything is sent
            if not proxy.running:
                raise ProxyNotRunning("proxy is stopping")
            # stop() cancels starts in progress; their clients get 503.
            with trio.CancelScope() as starting:
                self._starting.add(starting)
                try:
                    server_name = server_name_for(target.service_port, target.service_name)
                    if target.lookup:
                        connection = await self._connect_by_node_id(
                            target.node_ids[0], claim=True, server_name=server_name)
                    else:
                        address = await self._resolve(target.host, target.port)
                        connection = await self._connect_forward(
                            target.node_ids, address, claim=True, server_name=server_name
                        )
                finally:
                    self._starting.discard(starting)
            if connection is None:
                raise ProxyNotRunning("proxy is stopping")
        except KeynodeError as error:
            if target is not None:  # a start that failed (or 503): say so here too, rate-limited
                self._log_failed_connect(target, error)
            await edge.send_error_for(error)
            return False
        except TRANSPORT_ERRORS:
            raise
        except Exception as error:  # "other": answer 500 and say what happened
            log.exception("CONNECT to %r failed", edge.request.target if edge.request else None)
            await edge.send_error_for(error)
            return False
        # From here the connection is this client's: nothing may outlive it.
        try:
            await edge.send_established()
        except TRANSPORT_ERRORS:
            connection.close()
            return False
        except BaseException:
            connection.close()
            raise
        connection.attach_client(client, client_address, edge.trailing_data)
        return True

    def _log_failed_connect(self, target: ConnectTarget, error: KeynodeError) -> None:
        where = format_host_port(target.host, target.port)
        node_ids = ", ".join(str(node_id) for node_id in target.node_ids)
        self._failures.info(
            (target.host, target.port), "CONNECT to %s (%s) answered %d: %s", where, node_ids, error.http_status, error
        )
