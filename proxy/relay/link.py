"""The client side of the TCP relay: ``RelayLink`` (trio driver of proxy.relay.session).

A node whose UDP is blocked (or that needs a relay) keeps one link per relay it
uses: TCP to the relay's address, mutual TLS, the relay's chain verified against
the NodeId in ``<relay NodeId>@host:port`` (anything else is RelayIdentityMismatch),
then frames. The link is registered once the relay's SERVER_INFO arrives. It
reconnects by itself with exponential backoff (jittered, ``backoff_min`` to
``backoff_max``; back to the minimum after a registration; after RESTARTING, the
relay's reconnect-in delay once), sends keep-alive PINGs
and gives up on a connection silent for ``timeout``.

``send(destination, datagram)`` never blocks: while unregistered, or past the
queue's bound, the datagram is dropped and counted (``drops``), as UDP would.
``on_receive(source, datagram)`` is called in the reader task for each RECV, or
``on_receive_batch([(source, datagram), ...])`` once per read with every RECV in
it (cheaper per datagram); an exception from either is logged and counted, and the
link goes on.
"""

from __future__ import annotations

import logging
import random
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from proxy.identity.errors import CertificateChainError, NodeIdInvalid
from proxy.identity.node_id import NodeId
from proxy.identity.verification import verify_server_certificate_chain
from proxy.relay.errors import (
    RelayAddressInvalid,
    RelayError,
    RelayIdentityMismatch,
    RelayRejected,
    RelayTimeout,
    first_error,
)
from proxy.relay.frames import GONE_REPLACED, Health, Keyed, PeerGone, Recv, RecvBatch, Restarting
from proxy.relay.serve import ALPN
from proxy.relay.session import NOT_CONNECTED, RelayClientSession
from proxy.tls import TLSStream
from proxy.tls.errors import TLSError
from proxy.tls.stream import TLSConfigLike

__all__ = ["RelayAddress", "RelayLink", "RelayLinkStats"]

log = logging.getLogger("proxy.relay")

RECEIVE_SIZE = 256 * 1024
_ADDRESS = re.compile(r"^(?P<node>[^@]+)@(?:\[(?P<ip6>[^\]]+)\]|(?P<host>[^:\[\]]+)):(?P<port>\d{1,5})$")


@dataclass(frozen=True)
class RelayAddress:
    """``<relay NodeId>@host:port`` (an IPv6 host in brackets)."""

    node_id: NodeId
    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> RelayAddress:
        match = _ADDRESS.match(text.strip())
        if match is None:
            raise RelayAddressInvalid(f"{text!r} is not a relay address '<NodeId>@host:port'")
        try:
            node_id = NodeId.decode(match["node"])
        except NodeIdInvalid as error:
            raise RelayAddressInvalid(f"{text!r}: {error}") from error
        port = int(match["port"])
        if not 0 < port < 65536:
            raise RelayAddressInvalid(f"{text!r}: port {port} is outside 1..65535")
        return cls(node_id, match["ip6"] or match["host"], port)

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.node_id}@{host}:{self.port}"


@dataclass
class RelayLinkStats:
    connects: int = 0  # connection attempts
    registrations: int = 0
    failures: int = 0
    replaced: int = 0  # times another connection of this NodeId took the relay's registration
    callback_errors: int = 0
    last_error: str = ""


class RelayLink:
    """A node's link to one relay over TCP + mutual TLS; see the module docstring."""

    def __init__(
        self,
        tls_config: TLSConfigLike,
        relay: RelayAddress | str,
        on_receive: Callable[[NodeId, bytes], None] | None = None,
        *,
        on_receive_batch: Callable[[list[tuple[NodeId, bytes]]], None] | None = None,
        on_peer_gone: Callable[[NodeId, int], None] | None = None,
        on_keyed: Callable[[bytes], None] | None = None,
        keepalive: float = 15.0,
        timeout: float = 45.0,
        connect_timeout: float = 10.0,
        backoff_min: float = 0.1,
        backoff_max: float = 10.0,
        queue_bytes: int = 4 * 1024 * 1024,
    ) -> None:
        self.tls_config = tls_config
        self.relay = relay if isinstance(relay, RelayAddress) else RelayAddress.parse(relay)
        self.on_receive = on_receive
        self.on_receive_batch = on_receive_batch
        self.on_peer_gone = on_peer_gone
        self.on_keyed = on_keyed  # a KEYED frame: a rendezvous message from the relay node
        self.keepalive = keepalive
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.backoff_min = backoff_min
        self.backoff_max = backoff_max
        self.queue_bytes = queue_bytes
        leaf_key = tls_config.certificate_chain[0].public_key()
        self.node_id = NodeId.from_public_key(leaf_key) if isinstance(leaf_key, Ed25519PublicKey) else None
        self.stats = RelayLinkStats()
        self.drops: Counter[str] = Counter()
        self.health = ""  # the relay's last HEALTH text
        self.restart_delay: float | None = None  # from RESTARTING: wait this long before reconnecting
        self._session: RelayClientSession | None = None
        self._registered = trio.Event()
        self._output = trio.Event()
        self._closed = False
        self._scope: trio.CancelScope | None = None

    # --- public API ------------------------------------------------------------------

    @property
    def registered(self) -> bool:
        session = self._session
        return session is not None and session.registered

    @property
    def output_pending(self) -> int:
        """Bytes queued for the relay and not yet written (0 when not connected)."""
        return 0 if self._session is None else self._session.output_pending

    @property
    def rtt(self) -> float | None:
        return None if self._session is None else self._session.rtt

    def send(self, destination: NodeId, datagram: bytes | bytearray | memoryview) -> bool:
        """Queue one datagram for ``destination`` (via the relay); False if dropped."""
        session = self._session
        if session is None or not session.registered:
            self.drops[NOT_CONNECTED] += 1
            return False
        if session.send(destination, datagram):
            self._output.set()
            return True
        return False

    def send_keyed(self, message: bytes) -> bool:
        """A rendezvous keyed message to the relay node over this link; False (counted)
        while not registered."""
        session = self._session
        if session is None or not session.registered:
            self.drops[NOT_CONNECTED] += 1
            return False
        session.send_keyed(message)
        self._output.set()
        return True

    def status(self) -> dict[str, object]:
        """What ``keynode status`` may show for this link."""
        return {
            "relay": str(self.relay),
            "registered": self.registered,
            "rtt_ms": None if self.rtt is None else round(self.rtt * 1000, 3),
            "connects": self.stats.connects,
            "registrations": self.stats.registrations,
            "failures": self.stats.failures,
            "replaced": self.stats.replaced,
            "last_error": self.stats.last_error,
            "health": self.health,
            "drops": dict(self.drops),
        }

    async def wait_registered(self) -> None:
        while not self.registered:
            await self._registered.wait()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Keep the link up until ``close`` or cancellation; reports started at once."""
        backoff = self.backoff_min
        with trio.CancelScope() as self._scope:
            task_status.started()
            while not self._closed:
                self.stats.connects += 1
                registrations = self.stats.registrations
                try:
                    await self._connect_once()
                except _Replaced as replaced:
                    self._note_failure(replaced)
                    backoff = self.backoff_max  # someone else is this NodeId now: do not fight
                    registrations = self.stats.registrations
                except (RelayError, TLSError, trio.BrokenResourceError, trio.ClosedResourceError,
                        OSError) as error:
                    self._note_failure(error)
                if self.stats.registrations > registrations:
                    backoff = self.backoff_min  # it was registered: a fresh start
                delay = backoff * random.uniform(0.8, 1.2)
                if self.restart_delay is not None:  # the relay said when it will be back
                    delay, self.restart_delay = self.restart_delay, None
                await trio.sleep(delay)
                backoff = min(self.backoff_max, backoff * 2)

    def close(self) -> None:
        self._closed = True
        if self._scope is not None:
            self._scope.cancel()

    # --- one connection ---------------------------------------------------------------

    def _note_failure(self, error: BaseException) -> None:
        self.stats.failures += 1
        self.stats.last_error = f"{type(error).__name__}: {error}"
        log.info("relay link to %s: %s", self.relay, self.stats.last_error)

    async def _connect_once(self) -> None:
        """One connection, from connect until it ends; returns normally only if it
        was registered, raises otherwise."""
        relay = self.relay
        with trio.fail_after(self.connect_timeout):
            tcp = await trio.open_tcp_stream(relay.host, relay.port)
        tls = TLSStream(tcp, self.tls_config, server_side=False, alpn=(ALPN,))
        session = RelayClientSession(trio.current_time(), queue_bytes=self.queue_bytes,
                                     keepalive=self.keepalive, timeout=self.timeout, drops=self.drops)
        try:
            with trio.move_on_after(self.connect_timeout) as scope:
                await tls.do_handshake()
                try:
                    verify_server_certificate_chain([relay.node_id], tls.peer_certificate_chain)
                except CertificateChainError as error:
                    raise RelayIdentityMismatch(f"{relay.host}:{relay.port} is not relay {relay.node_id}: {error}") from error
            if scope.cancelled_caught:
                raise RelayTimeout(f"no TLS handshake with {relay} within {self.connect_timeout:g} s")
            self._session = session
            self._output = trio.Event()
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._watch_registration, session)
                    nursery.start_soon(self._write, tls, session)
                    nursery.start_soon(self._tick, session)
                    try:
                        await self._read(tls, session)
                    finally:
                        nursery.cancel_scope.cancel()
            except BaseExceptionGroup as group:
                raise first_error(group) from None
        finally:
            self._session = None
            with trio.CancelScope(shield=True):
                await tls.aclose()

    async def _watch_registration(self, session: RelayClientSession) -> None:
        await trio.sleep(self.connect_timeout)
        if not session.registered:
            raise RelayTimeout(f"relay {self.relay} did not register this node within {self.connect_timeout:g} s")

    async def _read(self, tls: TLSStream, session: RelayClientSession) -> None:
        while True:
            data = await tls.receive_some(RECEIVE_SIZE)
            if not data:
                if session.registered:
                    return
                raise RelayRejected(f"relay {self.relay} closed the connection without registering this node"
                                    f"{': ' + self.health if self.health else ''}")
            was_registered = session.registered
            frames = session.receive_bytes(data, trio.current_time())
            if session.output_pending:
                self._output.set()
            if session.registered and not was_registered:
                self.stats.registrations += 1
                self._registered.set()
                self._registered = trio.Event()
            batch: list[tuple[NodeId, bytes]] = []
            for frame in frames:
                if isinstance(frame, RecvBatch):
                    source = frame.source
                    batch.extend([(source, datagram) for datagram in frame.datagrams])
                elif isinstance(frame, Recv):
                    batch.append((frame.source, frame.datagram))
                elif isinstance(frame, PeerGone):
                    if frame.reason == GONE_REPLACED and frame.node_id == self.node_id:
                        self.stats.replaced += 1
                        raise _Replaced(f"another connection of this NodeId registered with {self.relay}")
                    if self.on_peer_gone is not None:
                        self.on_peer_gone(frame.node_id, frame.reason)
                elif isinstance(frame, Health):
                    self.health = frame.text
                elif isinstance(frame, Keyed):
                    if self.on_keyed is not None:
                        try:
                            self.on_keyed(frame.message)
                        except Exception:
                            self.stats.callback_errors += 1
                            log.exception("relay link: the keyed-message callback failed")
                elif isinstance(frame, Restarting):
                    self.restart_delay = frame.reconnect_in_ms / 1000
            if batch:
                self._deliver(batch)

    def _deliver(self, batch: list[tuple[NodeId, bytes]]) -> None:
        try:
            if self.on_receive_batch is not None:
                self.on_receive_batch(batch)
            elif self.on_receive is not None:
                for source, datagram in batch:
                    self.on_receive(source, datagram)
        except Exception:
            self.stats.callback_errors += 1
            log.exception("relay link: a receive callback failed")

    async def _write(self, tls: TLSStream, session: RelayClientSession) -> None:
        while True:
            await self._output.wait()
            self._output = trio.Event()
            data = session.take_output()
            if data:
                await tls.send_all(data)

    async def _tick(self, session: RelayClientSession) -> None:
        while True:
            now = trio.current_time()
            if session.timed_out(now):
                raise RelayTimeout(f"nothing heard from relay {self.relay} for {self.timeout:g} s")
            deadline = session.tick(now)
            if session.output_pending:
                self._output.set()
            await trio.sleep_until(deadline)


class _Replaced(RelayRejected):
    """Another connection of this node's NodeId took the relay's registration."""
