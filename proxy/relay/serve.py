"""The relay server over TCP + mutual TLS (trio driver of proxy.relay.forwarding).

``serve_relay`` listens, and for each connection runs the TLS handshake (client
certificate required), verifies the client's chain with the tunnel's Polykey rules
(``verify_client_certificate_chain``) and registers the leaf's NodeId in the core.
A client whose handshake or chain fails, in ``handshake_timeout``, is closed before
anything else happens: it is never registered and nothing it sent is read as a
frame. Then three tasks per client: the reader feeds the core, the writer takes the
client's queue in batches (one TLS write per batch; a batch not taken within
``write_timeout`` closes the client), the ticker sends keep-alive PINGs.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import trio
from cryptography import x509

from proxy.identity.errors import CertificateChainError
from proxy.identity.node_id import NodeId
from proxy.identity.verification import verify_client_certificate_chain
from proxy.relay.errors import FrameTooLarge, RelayFull, RelayProtocolError, first_error
from proxy.relay.forwarding import RelayClient, RelayCore
from proxy.relay.frames import Health, encode_frame, join_frames
from proxy.relay.limits import RelayLimits
from proxy.tls import TLSStream
from proxy.tls.errors import TLSError
from proxy.tls.stream import TLSConfigLike

__all__ = ["ALPN", "RelayServer", "RelayServerStats", "serve_relay"]

log = logging.getLogger("proxy.relay")

ALPN = b"keynode-relay/1"
RECEIVE_SIZE = 256 * 1024
THREAD_ABOVE = 4  # chains longer than this are verified in a worker thread


@dataclass
class RelayServerStats:
    connections: int = 0  # TCP connections accepted
    tls_failed: int = 0  # handshakes that failed or timed out
    chains_rejected: int = 0  # handshakes whose client chain failed verification
    slow_clients: int = 0  # closed for not taking a batch within write_timeout
    protocol_errors: int = 0  # closed for a frame a client may not send or an oversized header
    rejected_reasons: dict[str, int] = field(default_factory=dict)


class _Wake:
    """A re-armable wake-up for one writer task."""

    __slots__ = ("event",)

    def __init__(self) -> None:
        self.event = trio.Event()

    def __call__(self) -> None:
        self.event.set()

    async def wait(self) -> None:
        await self.event.wait()
        self.event = trio.Event()


class RelayServer:
    """A running relay server (``serve_relay`` reports it once listening)."""

    def __init__(self, tls_config: TLSConfigLike, limits: RelayLimits, listeners: Sequence[trio.SocketListener],
                 core: RelayCore | None = None):
        self.tls_config = tls_config
        self.limits = limits
        self.core = core if core is not None else RelayCore(limits)
        self.stats = RelayServerStats()
        self.listeners = list(listeners)
        self._handshakes = trio.Semaphore(limits.max_handshakes)

    @property
    def port(self) -> int:
        port: int = self.listeners[0].socket.getsockname()[1]
        return port

    @property
    def addresses(self) -> list[tuple[str, int]]:
        return [listener.socket.getsockname()[:2] for listener in self.listeners]

    def status(self) -> dict[str, object]:
        """What ``keynode status`` may show: the port, clients, forwarding and drops."""
        core = self.core.stats
        return {
            "port": self.port,
            "clients": self.core.client_count,
            "registered": core.registered,
            "replaced": core.replaced,
            "refused_full": core.refused_full,
            "datagrams_forwarded": core.frames_forwarded,
            "bytes_forwarded": core.bytes_forwarded,
            "drops": dict(core.drops),
            "connections": self.stats.connections,
            "tls_failed": self.stats.tls_failed,
            "chains_rejected": self.stats.chains_rejected,
            "slow_clients": self.stats.slow_clients,
            "protocol_errors": self.stats.protocol_errors,
        }

    async def restart(self, reconnect_in: float = 1.0, try_for: float = 60.0, grace: float = 1.0) -> None:
        """Before stopping the server: tell every client when to come back (RESTARTING),
        then give the writers up to ``grace`` seconds to get it out. The caller then
        cancels ``serve_relay``."""
        self.core.announce_restart(reconnect_in, try_for)
        with trio.move_on_after(grace):
            while any(client.queue for client in self.core.clients()):
                await trio.sleep(0.01)

    async def _accept_loop(self, listener: trio.SocketListener, nursery: trio.Nursery) -> None:
        while True:
            await self._handshakes.acquire()  # past max_handshakes, the kernel's backlog waits
            try:
                stream = await listener.accept()
            except BaseException:
                self._handshakes.release()
                raise
            self.stats.connections += 1
            nursery.start_soon(self._serve_connection, stream)

    def _rejected(self, reason: str) -> None:
        self.stats.rejected_reasons[reason] = self.stats.rejected_reasons.get(reason, 0) + 1

    async def _authenticate(self, tls: TLSStream) -> NodeId | None:
        """The client's proven NodeId, or None (counted) when it is refused."""
        try:
            with trio.move_on_after(self.limits.handshake_timeout):
                await tls.do_handshake()
                chain = tls.peer_certificate_chain
                if len(chain) > THREAD_ABOVE:
                    return await trio.to_thread.run_sync(self._verify, chain)
                return self._verify(chain)
            self.stats.tls_failed += 1
            self._rejected("handshake timeout")
        except CertificateChainError as error:
            self.stats.chains_rejected += 1
            self._rejected(type(error).__name__)
            log.info("relay: refused a client's chain: %s", error)
        except (TLSError, trio.BrokenResourceError, trio.ClosedResourceError, OSError) as error:
            self.stats.tls_failed += 1
            self._rejected(type(error).__name__)
        return None

    def _verify(self, chain: list[x509.Certificate]) -> NodeId:
        return verify_client_certificate_chain(chain, max_chain_length=self.limits.max_chain_length)

    async def _serve_connection(self, tcp: trio.SocketStream) -> None:
        tls = TLSStream(tcp, self.tls_config, server_side=True, alpn=(ALPN,))
        try:
            try:
                node_id = await self._authenticate(tls)
            finally:
                self._handshakes.release()
            if node_id is None:
                return
            wake = _Wake()
            try:
                client = self.core.register(node_id, wake, trio.current_time())
            except RelayFull as error:
                self._rejected("full")
                with trio.move_on_after(1.0):
                    await tls.send_all(encode_frame(Health(str(error))))
                return
            try:
                await self._run_client(tls, client, wake)
            finally:
                self.core.unregister(client)
        except (TLSError, trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass  # the client went away; its registration is gone with it
        finally:
            with trio.CancelScope(shield=True):
                await tls.aclose()

    async def _run_client(self, tls: TLSStream, client: RelayClient, wake: _Wake) -> None:
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._read_client, tls, client)
                nursery.start_soon(self._tick_client, client)
                try:
                    await self._write_client(tls, client, wake)
                finally:
                    nursery.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            raise first_error(group) from None

    async def _read_client(self, tls: TLSStream, client: RelayClient) -> None:
        core = self.core
        try:
            while not client.closing:
                data = await tls.receive_some(RECEIVE_SIZE)
                if not data:
                    core.unregister(client, "the client closed the connection")
                    return
                core.receive_bytes(client, data, trio.current_time())
        except (FrameTooLarge, RelayProtocolError) as error:
            self.stats.protocol_errors += 1
            core.unregister(client, str(error))
        except (TLSError, trio.BrokenResourceError, trio.ClosedResourceError, OSError) as error:
            core.unregister(client, f"connection failed: {error}")

    async def _tick_client(self, client: RelayClient) -> None:
        while not client.closing:
            await trio.sleep_until(self.core.tick(client, trio.current_time()))

    async def _write_client(self, tls: TLSStream, client: RelayClient, wake: _Wake) -> None:
        while True:
            await wake.wait()
            frames = client.take_output()
            if frames:
                with trio.move_on_after(self.limits.write_timeout) as scope:
                    await tls.send_all(join_frames(frames))
                if scope.cancelled_caught:
                    self.stats.slow_clients += 1
                    self.core.unregister(client, f"took no data for {self.limits.write_timeout:g} s")
                    return
            if client.closing:
                return


async def serve_relay(
    tls_config: TLSConfigLike,
    *,
    host: str | None = None,
    port: int = 0,
    limits: RelayLimits | None = None,
    core: RelayCore | None = None,
    task_status: trio.TaskStatus[RelayServer] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the relay on TCP ``host:port`` (all addresses when host is None; port 0:
    any) until cancelled. Use with ``nursery.start``: it reports the RelayServer,
    whose ``port`` is the bound port. ``core``: a RelayCore shared with another
    transport (a relay node's UDP front), whose limits then apply."""
    listeners = await trio.open_tcp_listeners(port, host=host)
    if core is not None:
        limits = core.limits
    server = RelayServer(tls_config, limits or RelayLimits(), listeners, core)
    try:
        async with trio.open_nursery() as nursery:
            for listener in listeners:
                nursery.start_soon(server._accept_loop, listener, nursery)
            task_status.started(server)
    finally:
        for listener in listeners:
            with trio.CancelScope(shield=True):
                await listener.aclose()
