"""`keynode run`: a Proxy from a Config, its logs, its control socket, its signals.

Start order: signal receiver (so SIGINT/SIGTERM always mean "stop gracefully"),
the Proxy (binds the UDP and CONNECT ports), the control socket; then the bound
addresses are printed to stdout and the node serves until a signal arrives.
Stopping leaves the Proxy's block, which stops it as DESIGN.md says (503, refuse,
every connection ends within conn_end_time), and removes the control socket.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack, contextmanager
from typing import TYPE_CHECKING, Any

import trio

from proxy.app.config import Config
from proxy.app.events import EventHub, Subscription
from proxy.identity.errors import KeynodeError
from proxy.identity.node_id import NodeId
from proxy.tunnel.errors import ConnectionNotFound, ProxyBindError
from proxy.tunnel.hosts import format_host_port

if TYPE_CHECKING:
    from proxy.tunnel.proxy import Proxy

log = logging.getLogger("keynode.run")
ADDRESS_SEQ_FILE = "address_seq"  # in the node directory: the last signed record's seq
EVENT_STREAMS_END_TIME = 2.0  # seconds the event streams get to end at a stop


# --- logging -----------------------------------------------------------------------


class JsonLinesFormatter(logging.Formatter):
    """One JSON object a line: time, level, logger, message, and the record's fields."""

    def format(self, record: logging.LogRecord) -> str:
        document: dict[str, Any] = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.UTC).isoformat(),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        document.update(getattr(record, "fields", {}))
        if record.exc_info:
            document["exception"] = self.formatException(record.exc_info)
        return json.dumps(document, default=str)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:  # noqa: N802
        moment = datetime.datetime.fromtimestamp(record.created, datetime.UTC)
        return moment.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def setup_logging(level: str, log_format: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonLinesFormatter() if log_format == "json" else TextFormatter())
    root = logging.getLogger()
    for existing in list(root.handlers):
        root.removeHandler(existing)
    root.addHandler(handler)
    root.setLevel(level.upper())


# --- connection events and listing -------------------------------------------------------


def _address_text(address: Any) -> str | None:
    if not address:
        return None
    return format_host_port(str(address[0]), int(address[1]))


class ConnectionLog:
    """Logs every connection established and lost, remembers when each began, and
    publishes them and the path moves of live tunnels to `hub` (`GET /v1/events`)."""

    def __init__(self, hub: EventHub | None = None) -> None:
        self.established_at: dict[tuple[str, str, str, int], list[float]] = {}
        self.hub = hub

    @staticmethod
    def _key(event: Any) -> tuple[str, str, str, int]:
        return (str(getattr(event.direction, "value", event.direction)), str(event.remote_node_id),
                str(event.remote_host), int(event.remote_port))

    def _publish(self, document: dict[str, Any]) -> None:
        if self.hub is not None:
            self.hub.publish(document)

    def established(self, event: Any) -> None:
        key = self._key(event)
        self.established_at.setdefault(key, []).append(time.monotonic())
        direction, node_id, host, port = key
        remote = format_host_port(host, port)
        service = getattr(event, "service", None)
        fields = {"direction": direction, "node_id": node_id, "remote": remote, "service": service}
        log.info("connection established: %s %s at %s%s", direction, node_id, remote,
                 f" (service {service})" if service else "",
                 extra={"fields": {"event": "established", **fields}})
        self._publish({"event": "established", "at": time.time(), **fields, **_path_fields(event)})

    def lost(self, event: Any) -> None:
        key = self._key(event)
        started = self.established_at.get(key)
        duration = time.monotonic() - started.pop(0) if started else None
        if started is not None and not started:
            del self.established_at[key]
        direction, node_id, host, port = key
        remote = format_host_port(host, port)
        reason = str(getattr(event.reason, "value", event.reason))
        error = getattr(event, "error", None)
        detail = f" ({type(error).__name__}: {error})" if error is not None else ""
        service = getattr(event, "service", None)
        fields = {"direction": direction, "node_id": node_id, "remote": remote, "reason": reason,
                  "service": service, "error": None if error is None else str(error), "duration": duration}
        log.info("connection lost: %s %s at %s: %s%s", direction, node_id, remote, reason, detail,
                 extra={"fields": {"event": "lost", **fields}})
        self._publish({"event": "lost", "at": time.time(), **fields})

    def path_changed(self, event: Any) -> None:
        """A live tunnel moved between direct and relay (the Proxy's path_changed_callback)."""
        direction, node_id, host, port = self._key(event)
        move = event.move.as_dict() if event.move is not None else {}
        path = _path_fields(event)
        # The move's fields as `status` shows moves (from, to, reason, address, via);
        # the tunnel's via, when the Proxy could not read it, is the relay moved to.
        self._publish({
            "event": "path_changed", "at": move.pop("at", time.time()), "direction": direction,
            "node_id": node_id, "remote": format_host_port(host, port), **move,
            "path": path["path"], "via": path["via"] or move.get("via"),
        })


def _path_fields(event: Any) -> dict[str, Any]:
    """The tunnel's path when the event happened: "direct", or "relay" via a relay node."""
    via = getattr(event, "via", None)
    return {"path": getattr(event, "path", "direct"), "via": None if via is None else str(via)}


def connection_rows(proxy: Any) -> list[dict[str, Any]]:
    """One row per connection for `status`: the established ones (`Proxy.connections()`),
    then the reverse connections prepared by open-reverse whose peer has not connected
    yet (`Proxy.prepared_reverse_connections()`: no NodeId, no bytes yet)."""
    now = trio.current_time()
    rows = []
    for status in proxy.connections():
        info = status.info
        local = (info.tcp_host, info.tcp_port) if info.tcp_host is not None else None
        rows.append({
            "direction": info.direction.value,
            "state": "established",
            "node_id": str(info.remote_node_id),
            "path": info.path,  # "direct" (uTP to the peer's address) or "relay" (via a relay node)
            "via": None if info.via is None else str(info.via),
            "moves": {"count": status.move_count, "recent": [move.as_dict() for move in status.moves]},
            "remote": _address_text((info.remote_host, info.remote_port)),
            "local": _address_text(local),
            "age": round(now - status.established_at, 3),
            "bytes_sent": status.bytes_sent,
            "bytes_received": status.bytes_received,
            "rtt": status.rtt,
            "service": info.service,
            "transport": status.transport,
        })
    for prepared in proxy.prepared_reverse_connections():
        rows.append({
            "direction": "reverse",
            "state": "prepared",
            "node_id": None,
            "remote": _address_text((prepared.remote_host, prepared.remote_port)),
            "local": None,
            "age": round(now - prepared.prepared_at, 3),
            "bytes_sent": 0,
            "bytes_received": 0,
            "rtt": None,
            "service": None,
        })
    return rows


# --- control handler ------------------------------------------------------------------


def info_document(info: Any) -> dict[str, Any]:
    return {
        "node_id": str(info.remote_node_id),
        "direction": str(getattr(info.direction, "value", info.direction)),
        "remote": format_host_port(info.remote_host, info.remote_port),
        "local": format_host_port(info.local_host, info.local_port),
        "tcp": None if info.tcp_host is None else format_host_port(info.tcp_host, info.tcp_port),
        "certificates": len(info.remote_certificates),
    }


class NodeController:
    """The control socket's view of a running Proxy."""

    def __init__(self, proxy: Proxy, config: Config, node_id: NodeId, hub: EventHub | None = None) -> None:
        self.proxy = proxy
        self.config = config
        self.node_id = node_id
        self.hub = hub if hub is not None else EventHub()
        self.started = time.monotonic()
        self.grpc_web: str | None = None  # the [grpc_web] bridge's bound host:port

    def addresses(self) -> dict[str, Any]:
        proxy = self.proxy
        server = self.config.server
        return {
            "node_id": str(self.node_id),
            "forward": format_host_port(proxy.forward_host, proxy.forward_port),
            "proxy": format_host_port(proxy.proxy_host, proxy.proxy_port),
            "server": None if server is None else str(server),
            "control_socket": str(self.config.control_socket),
            "grpc_web": self.grpc_web,
            "pid": os.getpid(),
        }

    def rendezvous(self) -> dict[str, Any]:
        """observed_addresses: [{"address": "host:port", "relay": NodeId}] as each relay
        node saw this node; nat_mapping: "endpoint-independent", "endpoint-dependent" or
        "unknown" (fewer than two relays answered)."""
        service = self.proxy.rendezvous
        return {
            "observed_addresses": [] if service is None else service.observed_addresses(),
            "nat_mapping": "unknown" if service is None else service.nat_mapping(),
            "relay_serve": self.config.relay_serve,
            "relay_servers": [f"{relay.node_id}@{format_host_port(relay.host, relay.port)}"
                              for relay in self.config.relay_servers],
            "relay_tcp_port": None if service is None or service.relay_server is None else service.relay_server.port,
            "rendezvous": {} if service is None else service.counters,
        }

    async def address_record(self) -> dict[str, Any]:
        """This node's address list as a signed record (`keynode id --address`)."""
        from proxy.rendezvous.errors import RendezvousUnavailable

        service = self.proxy.rendezvous
        if service is None:
            raise RendezvousUnavailable(
                "this node has no [relay] servers and does not serve as one: no address record to sign"
            )
        # The last seq given is kept in the node directory, so a record signed after a
        # restart is newer even if the clock went back meanwhile.
        seq_file = self.config.node_dir / ADDRESS_SEQ_FILE
        try:
            last = int(seq_file.read_text().strip() or 0)
        except (OSError, ValueError):
            last = 0
        record = service.address_record(above=last)
        try:
            seq_file.write_text(f"{record.seq}\n")
        except OSError as error:
            log.warning("cannot keep the address record's seq in %s: %s", seq_file, error)
        return {"node_id": str(record.node_id), "seq": record.seq, "addresses": record.addresses,
                "record": record.to_text()}

    async def status(self) -> dict[str, Any]:
        return {
            **self.addresses(),
            **self.rendezvous(),
            "uptime": round(time.monotonic() - self.started, 3),
            "connection_forward_count": self.proxy.connection_forward_count,
            "connection_reverse_count": self.proxy.connection_reverse_count,
            "services": self.proxy.policy.describe(),
            "connections": connection_rows(self.proxy),
        }

    def subscribe_events(self) -> Subscription:
        """A stream of connection events, opening with a "subscribed" line (events.py)."""
        return self.hub.subscribe({"event": "subscribed", "at": time.time(), "node_id": str(self.node_id)})

    async def open_forward(self, node_id: NodeId, host: str | None, port: int | None) -> dict[str, Any]:
        """Without host and port: [peers], else the relay nodes find it (both sides punch)."""
        if host is None or port is None:
            host, port = await self.proxy.find_path(node_id)
        verified = await self.proxy.open_connection_forward([node_id], host, port)
        return {"node_id": str(verified), "address": format_host_port(host, port)}

    async def reload(self) -> dict[str, Any]:
        """Re-read the config's services, allow lists and [peers] (reload.py)."""
        from proxy.app.reload import reload_node

        return reload_node(self)

    async def open_reverse(self, host: str, port: int) -> dict[str, Any]:
        await self.proxy.open_connection_reverse(host, port)
        return {}

    async def close(self, direction: str, host: str, port: int) -> dict[str, Any]:
        before = self._count(direction)
        if direction == "forward":
            await self.proxy.close_connection_forward(host, port)
        else:
            await self.proxy.close_connection_reverse(host, port)
        if self._count(direction) == before:
            raise ConnectionNotFound(
                f"no {direction} connection to {format_host_port(host, port)} (see `keynode status`)"
            )
        return {}

    def _count(self, direction: str) -> int:
        proxy = self.proxy
        return proxy.connection_forward_count if direction == "forward" else proxy.connection_reverse_count

    async def reload_identity(self) -> dict[str, Any]:
        """Use the key and chain now in the node directory (after `keynode rotate`) for
        connections started from now on; live connections keep their session."""
        from proxy.app.node_dir import load_identity

        tls_config = load_identity(self.config.node_dir)
        self.proxy.set_tls_config(tls_config)
        if self.proxy.rendezvous is not None:  # register and sign under the new NodeId
            from proxy.rendezvous.keys import KeyRing

            self.proxy.rendezvous.set_identity(KeyRing.from_private_key(tls_config.private_key))
            self.proxy.rendezvous.routes.tls_config = tls_config  # its TCP links to relays, from now on
        previous, self.node_id = self.node_id, tls_config.node_id
        log.info("identity reloaded: %s (was %s)", self.node_id, previous,
                 extra={"fields": {"event": "identity_reloaded", "node_id": str(self.node_id),
                                   "previous_node_id": str(previous)}})
        return {"node_id": str(self.node_id), "previous_node_id": str(previous)}

    async def lookup(self, host: str, port: int) -> dict[str, Any]:
        info = self.proxy.get_connection_info_by_reverse(host, port)
        if info is None:
            info = self.proxy.get_connection_info_by_client(host, port)
        if info is None:
            raise ConnectionNotFound(f"no connection has the local TCP address {format_host_port(host, port)}")
        return info_document(info)


# --- the node ------------------------------------------------------------------------


async def run_node(config: Config, tls_config: Any) -> int:
    """`keynode run`: the node until SIGINT/SIGTERM; returns the exit status (0 after a
    graceful stop). Its addresses go to stdout, then "ready"."""
    setup_logging(config.log_level, config.log_format)
    with stop_signal_receiver() as signals:
        stop = trio.Event()
        async with trio.open_nursery() as nursery:
            addresses = await nursery.start(serve_node, config, tls_config, stop)
            print_addresses(addresses)
            print("ready", flush=True)
            await wait_for_signal(signals)
            stop.set()
    return 0


def print_addresses(addresses: dict[str, Any]) -> None:
    for name in ("node_id", "forward", "proxy", "server", "control_socket"):
        print(f"{name}: {addresses[name] or '-'}", flush=True)
    if addresses.get("grpc_web"):  # only when [grpc_web] is configured
        print(f"grpc_web: {addresses['grpc_web']}", flush=True)


async def wait_for_signal(signals: AsyncIterator[int]) -> None:
    async for number in signals:
        name = signal.Signals(number).name
        log.info("stopping on %s", name, extra={"fields": {"event": "stopping", "signal": name}})
        return


async def serve_node(
    config: Config,
    tls_config: Any,
    stop: trio.Event,
    *,
    task_status: trio.TaskStatus[dict[str, Any]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """The node (the Proxy and its control socket) until `stop` is set, then a graceful
    stop (as DESIGN.md says: 503, refuse, every connection ends within conn_end_time).
    Reports its addresses document once it serves. Used by `keynode run` and by
    `keynode forward` when no node is running."""
    from nat.utp.config import UtpConfig
    from proxy.app.control import serve_control
    from proxy.app.grpc_app import serve_grpc_web_for_node, service_splicers
    from proxy.app.reload import reload_on_sighup
    from proxy.tunnel.address_book import AddressBook
    from proxy.tunnel.proxy import open_proxy

    hub = EventHub()
    events = ConnectionLog(hub)
    timeouts = config.timeouts
    server = config.server
    proxy_block = open_proxy(
        tls_config=tls_config,
        auth_token=config.auth.value,
        forward_host=config.forward.host,
        forward_port=config.forward.port,
        proxy_host=config.proxy.host,
        proxy_port=config.proxy.port,
        server_host=None if server is None else server.host,
        server_port=None if server is None else server.port,
        address_book=AddressBook({node_id: (peer.host, peer.port) for node_id, peer in config.peers.items()}),
        utp_config=UtpConfig(congestion=config.congestion),
        max_chain_length=config.max_chain_length,
        policy=config.policy,
        conn_connect_time=timeouts.conn_connect_time,
        conn_keep_alive_timeout_time=timeouts.conn_keep_alive_timeout_time,
        conn_end_time=timeouts.conn_end_time,
        conn_punch_interval_time=timeouts.conn_punch_interval_time,
        conn_keep_alive_interval_time=timeouts.conn_keep_alive_interval_time,
        connection_established_callback=events.established,
        connection_lost_callback=events.lost,
        path_changed_callback=events.path_changed,
        relay_servers=config.relay_servers,
        relay_serve=config.relay_serve,
        peer_relays=config.peer_relays,
        punch_window=config.relay_punch_window,
        splicers=service_splicers(),  # kind "grpc": the caller's identity in every request
    )
    async with AsyncExitStack() as stack:
        try:
            proxy = await stack.enter_async_context(proxy_block)
        except (OSError, BaseExceptionGroup) as error:
            # Only start-up failures are binding problems; later ones keep their own type.
            leaf = _single_leaf(error)
            if isinstance(leaf, ProxyBindError) or (isinstance(leaf, OSError) and not isinstance(leaf, KeynodeError)):
                raise BindError(config, leaf) from error
            raise
        await _start_relay_transport(proxy, config, tls_config)
        controller = NodeController(proxy, config, tls_config.node_id, hub)
        async with trio.open_nursery() as nursery:
            await nursery.start(serve_control, config.control_socket, controller)
            await nursery.start(reload_on_sighup, controller)
            if config.grpc_web is not None:
                controller.grpc_web = await nursery.start(
                    serve_grpc_web_for_node, config.grpc_web, proxy, config.auth.value
                )
            addresses = controller.addresses()
            log.info("running as %s", tls_config.node_id, extra={"fields": {"event": "started", **addresses}})
            task_status.started(addresses)
            await stop.wait()
            # Event streams end their chunked bodies cleanly before the control socket
            # goes; a client that does not read is not waited for long.
            hub.close()
            with trio.move_on_after(EVENT_STREAMS_END_TIME):
                await hub.wait_idle()
            nursery.cancel_scope.cancel()
        # Leaving the stack (not cancelled) stops the Proxy gracefully.
    log.info("stopped", extra={"fields": {"event": "stopped"}})


async def _start_relay_transport(proxy: Any, config: Config, tls_config: Any) -> None:
    """[relay]: the node's TLS identity for TCP links to relays (prefer_tcp: use them
    whenever offered); on a relay node its limits (rate, burst) and its relay over
    TCP + mutual TLS (tcp_port)."""
    service = proxy.rendezvous
    if service is None:
        return
    from dataclasses import replace

    from proxy.relay.limits import RelayLimits

    limits = None
    if config.relay_rate is not None or config.relay_burst is not None:
        defaults = RelayLimits()
        limits = replace(defaults, rate=config.relay_rate or defaults.rate, burst=config.relay_burst or defaults.burst)
    await service.configure_relay(tls_config, limits=limits, tcp_port=config.relay_tcp_port,
                                  prefer_tcp=config.relay_prefer_tcp)
    if service.relay_server is not None:
        log.info("relay over TCP + mutual TLS on port %d", service.relay_server.port,
                 extra={"fields": {"event": "relay_tcp", "port": service.relay_server.port}})


@contextmanager
def stop_signal_receiver() -> Iterator[AsyncIterator[int]]:
    """SIGINT/SIGTERM as a channel, for a graceful stop; once it closes, more of them
    are ignored. trio re-raises the signals still queued when the receiver closes,
    under the handlers that were in place before it opened, so those handlers must
    already ignore them: a second signal sent with the first (e.g. to the whole
    process group) must not kill a clean exit."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        yield signals


def _single_leaf(error: BaseException) -> BaseException:
    while isinstance(error, BaseExceptionGroup) and len(error.exceptions) == 1:
        error = error.exceptions[0]
    return error


class BindError(KeynodeError, OSError):
    """The node could not bind one of its addresses."""

    def __init__(self, config: Config, error: OSError) -> None:
        if isinstance(error, ProxyBindError):  # it says which socket, at which address
            section = "[proxy]" if error.socket_name.startswith("UDP") else "[forward]"
            super().__init__(f"{error} (choose another port in the config's {section}, or stop what uses it)")
        else:
            what = f"forward {config.forward} and proxy {config.proxy} (UDP)"
            super().__init__(
                f"cannot bind {what}: {error.strerror or error} "
                "(choose other ports in the config, or stop what uses them)"
            )
        self.errno = error.errno
