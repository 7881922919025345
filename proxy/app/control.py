"""The control socket of `keynode run`, its client, and the human tables.

A Unix domain socket (mode 0600, in the node directory which is 0700) carrying
HTTP/1.1 (h11) with JSON bodies, one request per connection:

    GET  /v1/status                             -> status document
    POST /v1/forward  {"node_id", "host", "port"} -> {"node_id": ...}
                      (no host and port: [peers], else found through the relay nodes)
    POST /v1/reverse  {"host", "port"}            -> {}
    POST /v1/close    {"direction": "forward" | "reverse", "host", "port"} -> {}
    GET  /v1/lookup?host=H&port=P               -> the connection whose local TCP
                                                   address is H:P (who is calling)
    POST /v1/reload-identity                    -> {"node_id": ...} (after `keynode rotate`)
    GET  /v1/address                            -> {"node_id", "seq", "addresses", "record"}:
                                                   this node's address list, signed
    POST /v1/reload                             -> {"services", "peers", "revoked",
                                                   "restart_needed"} (reload.py; a bad
                                                   config: 400 ConfigError)
    GET  /v1/events                             -> 200 application/x-ndjson, chunked:
                                                   a "subscribed" line, then one line per
                                                   connection event until either side
                                                   ends it (events.py; 503 when full)

Errors are `{"error": <class name>, "message": <text>}` with a 4xx/5xx status. The
server never trusts the request: size and time are bounded, bodies are validated,
and a failing request ends only its own connection.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket as stdlib_socket
import stat
import time
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import parse_qs, urlsplit

import h11
import trio

from proxy.app.errors import ConfigError, ControlError, ControlRequestFailed, ControlUnreachable
from proxy.app.events import Subscription, format_move
from proxy.identity.errors import KeynodeError, NodeIdInvalid
from proxy.identity.node_id import NodeId
from proxy.tunnel.errors import ConnectionNotFound
from proxy.tunnel.hosts import HostPortInvalid, parse_host, parse_port, parse_port_text
from proxy.tunnel.http_io import receive_body, receive_event, receive_head, receive_message

log = logging.getLogger("keynode.control")

MAX_REQUEST_SIZE = 64 * 1024
# The node is ours, but a bound costs nothing; a status of 100k connections fits.
MAX_RESPONSE_SIZE = 64 * 1024 * 1024
REQUEST_TIMEOUT = 10.0
# Opening a connection may take conn_connect_time (at most 20 s) plus TLS.
CLIENT_TIMEOUT = 30.0
DIRECTIONS = ("forward", "reverse")
EVENTS_PATH = "/v1/events"
MAX_EVENT_LINE = 64 * 1024  # an event line is a few hundred bytes; the client's bound


class ControlHandler(Protocol):
    """What `keynode run` exposes over the control socket."""

    async def status(self) -> dict[str, Any]: ...

    async def open_forward(self, node_id: NodeId, host: str | None, port: int | None) -> dict[str, Any]: ...

    async def open_reverse(self, host: str, port: int) -> dict[str, Any]: ...

    async def close(self, direction: str, host: str, port: int) -> dict[str, Any]: ...

    async def lookup(self, host: str, port: int) -> dict[str, Any]: ...

    async def reload_identity(self) -> dict[str, Any]: ...

    async def address_record(self) -> dict[str, Any]: ...
    async def reload(self) -> dict[str, Any]: ...

    def subscribe_events(self) -> Subscription: ...


class BadControlRequest(ValueError):
    """A request the server cannot serve as sent (400)."""


# --- server ---------------------------------------------------------------------


def _bind_unix_socket(path: Path) -> stdlib_socket.socket:
    """Bind and listen at `path` with mode 0600; replaces a stale socket file, refuses
    to take over one a live process answers on."""
    if path.exists() or path.is_symlink():
        if not stat.S_ISSOCK(path.lstat().st_mode):
            raise ControlError(f"{path} exists and is not a socket; remove it or set [control] socket")
        probe = stdlib_socket.socket(stdlib_socket.AF_UNIX, stdlib_socket.SOCK_STREAM)
        try:
            probe.connect(str(path))
        except OSError:
            path.unlink()  # stale: its process is gone
        else:
            raise ControlError(f"another keynode already listens on {path}; stop it first")
        finally:
            probe.close()
    sock = stdlib_socket.socket(stdlib_socket.AF_UNIX, stdlib_socket.SOCK_STREAM)
    # umask makes the socket 0600 from birth, so there is no window where others can connect.
    old_umask = os.umask(0o177)
    try:
        sock.bind(str(path))
    except OSError as error:
        sock.close()
        raise ControlError(f"cannot create the control socket {path}: {error.strerror}") from None
    finally:
        os.umask(old_umask)
    os.chmod(path, 0o600)
    sock.listen(64)
    sock.setblocking(False)
    return sock


async def serve_control(
    path: Path,
    handler: ControlHandler,
    *,
    task_status: trio.TaskStatus[Path] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the control socket at `path` until cancelled; removes it on exit."""
    raw = _bind_unix_socket(path)
    listener = trio.SocketListener(trio.socket.from_stdlib_socket(raw))
    try:
        async with trio.open_nursery() as nursery:
            task_status.started(path)

            async def serve(stream: trio.SocketStream) -> None:
                await _serve_one(stream, handler)

            await trio.serve_listeners(serve, [listener], handler_nursery=nursery)
    finally:
        with trio.CancelScope(shield=True):
            await listener.aclose()
        try:
            path.unlink()
        except FileNotFoundError:
            pass


async def _serve_one(stream: trio.SocketStream, handler: ControlHandler) -> None:
    connection = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST_SIZE)
    async with stream:
        try:
            try:
                with trio.fail_after(REQUEST_TIMEOUT):
                    message = await receive_message(stream, connection, max_body_size=MAX_REQUEST_SIZE)
            except (trio.TooSlowError, h11.RemoteProtocolError) as error:
                if connection.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                    await _respond(stream, connection, 400, {"error": "BadControlRequest", "message": str(error)})
                return
            if message is None:
                return  # the client went away before a whole request (e.g. a liveness probe)
            request, body = message
            assert isinstance(request, h11.Request)  # h11 gives a server requests only
            if request.method == b"GET" and urlsplit(request.target.decode("ascii", "replace")).path == EVENTS_PATH:
                await _serve_events(stream, connection, handler)
                return
            status, document = await _dispatch(handler, request, body)
            await _respond(stream, connection, status, document)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return  # a client gone mid-answer ends only its own connection


async def _respond(stream: trio.SocketStream, connection: h11.Connection, status: int, document: Any) -> None:
    body = json.dumps(document).encode()
    headers = [
        ("Content-Type", "application/json"),
        ("Content-Length", str(len(body))),
        ("Connection", "close"),
    ]
    data = connection.send(h11.Response(status_code=status, headers=headers))
    data += connection.send(h11.Data(data=body)) + connection.send(h11.EndOfMessage())
    await stream.send_all(data)


async def _serve_events(stream: trio.SocketStream, connection: h11.Connection, handler: ControlHandler) -> None:
    """GET /v1/events: one JSON line per event, no time limit, until the hub ends the
    stream (the node stops: the chunked body ends cleanly) or the client leaves."""
    try:
        subscription = handler.subscribe_events()
    except KeynodeError as error:
        await _respond(stream, connection, error.http_status, _error_document(error))
        return
    except Exception as error:  # a bug here must not take the control socket down
        log.exception("control request GET %s failed", EVENTS_PATH)
        await _respond(stream, connection, 500, _error_document(error))
        return
    with subscription:
        headers = [("Content-Type", "application/x-ndjson"), ("Cache-Control", "no-store"), ("Connection", "close")]
        # No Content-Length: h11 sends the body chunked.
        await stream.send_all(connection.send(h11.Response(status_code=200, headers=headers)))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_cancel_when_client_leaves, stream, nursery.cancel_scope)
            async for event in subscription:
                line = json.dumps(event).encode() + b"\n"
                await stream.send_all(connection.send(h11.Data(data=line)))
            await stream.send_all(connection.send(h11.EndOfMessage()))
            nursery.cancel_scope.cancel()


async def _cancel_when_client_leaves(stream: trio.SocketStream, scope: trio.CancelScope) -> None:
    """A quiet stream would not notice a client gone until the next event: watch for
    its EOF. What it sends after the request is read and ignored."""
    try:
        while await stream.receive_some(4096):
            pass
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    scope.cancel()


def _error_document(error: BaseException) -> dict[str, str]:
    return {"error": type(error).__name__, "message": str(error)}


async def _dispatch(handler: ControlHandler, request: h11.Request, body: bytes) -> tuple[int, Any]:
    method = request.method.decode("ascii", "replace")
    url = urlsplit(request.target.decode("ascii", "replace"))
    routes = {
        ("GET", "/v1/status"): _route_status,
        ("POST", "/v1/forward"): _route_forward,
        ("POST", "/v1/reverse"): _route_reverse,
        ("POST", "/v1/close"): _route_close,
        ("GET", "/v1/lookup"): _route_lookup,
        ("POST", "/v1/reload-identity"): _route_reload_identity,
        ("GET", "/v1/address"): _route_address,
        ("POST", "/v1/reload"): _route_reload,
    }
    route = routes.get((method, url.path))
    if route is None:
        known_path = url.path == EVENTS_PATH or any(path == url.path for _, path in routes)
        status = 405 if known_path else 404
        return status, {"error": "NotFound" if status == 404 else "MethodNotAllowed",
                        "message": f"no route {method} {url.path}"}
    try:
        arguments = _parse_arguments(method, url.query, body)
        return 200, await route(handler, arguments)
    except (BadControlRequest, NodeIdInvalid, ConfigError) as error:
        return 400, _error_document(error)
    except ConnectionNotFound as error:
        return 404, _error_document(error)
    except KeynodeError as error:
        status = error.http_status if 400 <= error.http_status <= 599 else 500
        return status, _error_document(error)
    except Exception as error:
        # A bug behind one control request must not take the node (and its tunnels) down.
        log.exception("control request %s %s failed", method, url.path)
        return 500, _error_document(error)


def _parse_arguments(method: str, query: str, body: bytes) -> dict[str, Any]:
    if method == "GET":
        return {key: values[-1] for key, values in parse_qs(query).items()}
    if not body:
        return {}
    try:
        document = json.loads(body)
    except (ValueError, RecursionError) as error:
        raise BadControlRequest(f"body is not JSON: {error}") from None
    if not isinstance(document, dict):
        raise BadControlRequest("body must be a JSON object")
    return document


def _host_port_arguments(arguments: Mapping[str, Any]) -> tuple[str, int]:
    try:
        host = parse_host(arguments.get("host"))
        port = arguments.get("port")
        # GET arguments come as query text, POST ones as JSON numbers.
        if isinstance(port, str):
            return host, parse_port_text(port, allow_zero=False)
        return host, parse_port(port, allow_zero=False)
    except HostPortInvalid as error:
        raise BadControlRequest(f"host/port: {error}") from None


async def _route_status(handler: ControlHandler, arguments: dict[str, Any]) -> Any:
    return await handler.status()


async def _route_forward(handler: ControlHandler, arguments: dict[str, Any]) -> Any:
    node_text = arguments.get("node_id")
    if not isinstance(node_text, str):
        raise BadControlRequest("node_id: must be an encoded NodeId string")
    node_id = NodeId.decode(node_text)
    if "host" not in arguments and "port" not in arguments:
        return await handler.open_forward(node_id, None, None)  # by NodeId alone
    host, port = _host_port_arguments(arguments)
    return await handler.open_forward(node_id, host, port)


async def _route_reverse(handler: ControlHandler, arguments: dict[str, Any]) -> Any:
    return await handler.open_reverse(*_host_port_arguments(arguments))


async def _route_close(handler: ControlHandler, arguments: dict[str, Any]) -> Any:
    direction = arguments.get("direction")
    if direction not in DIRECTIONS:
        raise BadControlRequest(f"direction: must be one of {', '.join(DIRECTIONS)}")
    return await handler.close(direction, *_host_port_arguments(arguments))


async def _route_lookup(handler: ControlHandler, arguments: dict[str, Any]) -> Any:
    return await handler.lookup(*_host_port_arguments(arguments))


async def _route_reload_identity(handler: ControlHandler, arguments: dict[str, Any]) -> Any:
    return await handler.reload_identity()


async def _route_address(handler: ControlHandler, arguments: dict[str, Any]) -> Any:
    return await handler.address_record()
async def _route_reload(handler: ControlHandler, arguments: dict[str, Any]) -> Any:
    return await handler.reload()


# --- client ---------------------------------------------------------------------


async def control_request(
    path: Path, method: str, target: str, body: Any = None, *, timeout: float = CLIENT_TIMEOUT
) -> Any:
    """One request to the control socket; returns the decoded JSON answer.

    Raises ControlUnreachable when no node answers, ControlRequestFailed when the
    node answers with an error."""
    stream = await _connect(path)
    connection = h11.Connection(h11.CLIENT)
    payload = b"" if body is None else json.dumps(body).encode()
    headers = [("Host", "keynode"), ("Content-Length", str(len(payload))), ("Connection", "close")]
    if body is not None:
        headers.append(("Content-Type", "application/json"))
    try:
        async with stream:
            with trio.fail_after(timeout):
                data = connection.send(h11.Request(method=method, target=target, headers=headers))
                data += connection.send(h11.Data(data=payload)) if payload else b""
                await stream.send_all(data + connection.send(h11.EndOfMessage()))
                response, answer = await _read_response(stream, connection)
    except trio.TooSlowError:
        raise ControlUnreachable(f"the node on {path} did not answer within {timeout} s") from None
    except (trio.BrokenResourceError, h11.RemoteProtocolError) as error:
        raise ControlUnreachable(f"the node on {path} dropped the request: {error}") from None
    document = _answer_document(path, answer)
    if response.status_code != 200:
        raise _request_failed(response.status_code, document)
    return document


async def _connect(path: Path) -> trio.SocketStream:
    try:
        return await trio.open_unix_socket(str(path))
    except (FileNotFoundError, ConnectionRefusedError):
        raise ControlUnreachable(
            f"no keynode answers on {path} (start it with `keynode run`, or pass --control)"
        ) from None
    except OSError as error:
        if error.errno in (errno.EACCES, errno.EPERM):
            raise ControlUnreachable(f"no permission to use {path} (run as the node's user)") from None
        raise ControlUnreachable(f"cannot connect to {path}: {error.strerror or error}") from None


def _answer_document(path: Path, answer: bytes) -> Any:
    try:
        return json.loads(answer) if answer else {}
    except (ValueError, RecursionError):
        raise ControlUnreachable(f"the node on {path} answered with something other than JSON") from None


def _request_failed(status: int, document: Any) -> ControlRequestFailed:
    error_name = message = ""
    if isinstance(document, dict):
        error_name = str(document.get("error", ""))
        message = str(document.get("message", ""))
    return ControlRequestFailed(status, error_name or "Error", message)


async def stream_events(path: Path, *, timeout: float = CLIENT_TIMEOUT) -> AsyncIterator[dict[str, Any]]:
    """`GET /v1/events`: each event document as the node sends it, the "subscribed"
    one first; ends when the node ends the stream. `timeout` bounds only the start.

    Raises ControlUnreachable (no node, or it dropped the stream) or
    ControlRequestFailed (refused, e.g. 503 TooManySubscribers)."""
    stream = await _connect(path)
    connection = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_REQUEST_SIZE)
    request = h11.Request(method="GET", target=EVENTS_PATH, headers=[("Host", "keynode"), ("Connection", "close")])
    async with stream:
        try:
            with trio.fail_after(timeout):
                await stream.send_all(connection.send(request) + connection.send(h11.EndOfMessage()))
                response = await receive_head(stream, connection)
                if not isinstance(response, h11.Response):
                    raise h11.RemoteProtocolError("closed without an answer")
                if response.status_code != 200:
                    answer = await receive_body(stream, connection, max_body_size=MAX_REQUEST_SIZE)
                    raise _request_failed(response.status_code, _answer_document(path, answer))
            pending = b""
            while True:
                event = await receive_event(stream, connection)
                if isinstance(event, h11.EndOfMessage):
                    return
                if not isinstance(event, h11.Data):
                    raise h11.RemoteProtocolError("the stream ended before its end")
                *lines, pending = (pending + event.data).split(b"\n")
                if len(pending) > MAX_EVENT_LINE:
                    raise h11.RemoteProtocolError(f"an event line longer than {MAX_EVENT_LINE} bytes")
                for line in lines:
                    if line.strip():
                        yield _answer_document(path, line)
        except trio.TooSlowError:
            raise ControlUnreachable(f"the node on {path} did not answer within {timeout} s") from None
        except (trio.BrokenResourceError, h11.RemoteProtocolError) as error:
            raise ControlUnreachable(f"the node on {path} dropped the event stream: {error}") from None


async def _read_response(stream: trio.SocketStream, connection: h11.Connection) -> tuple[h11.Response, bytes]:
    message = await receive_message(stream, connection, max_body_size=MAX_RESPONSE_SIZE, read_size=65536)
    if message is None:
        raise h11.RemoteProtocolError("closed without an answer")
    response, body = message
    assert isinstance(response, h11.Response)  # h11 gives a client responses only
    return response, body


# --- human output ----------------------------------------------------------------


def format_bytes(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    raise AssertionError("unreachable")


def format_age(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m"


def format_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)) for row in [header, *rows]]
    return "\n".join(line.rstrip() for line in lines)


def format_services(services: list[Mapping[str, Any]]) -> str:
    """The services table of `keynode status` (none: a line saying so)."""
    if not services:
        return "\nno services (no [server] and no [services]: incoming tunnels are refused)"
    rows = [
        [
            str(service.get("name")) + (" (default)" if service.get("default") else ""),
            str(service.get("target")),
            "-" if service.get("port") is None else str(service.get("port")),
            str(service.get("kind")),
            str(service.get("allow")),
        ]
        for service in services
    ]
    return "\n" + format_table(["SERVICE", "TARGET", "PORT", "KIND", "ALLOW"], rows)


def format_status(status: Mapping[str, Any]) -> str:
    lines = [
        f"NodeId:  {status.get('node_id')}",
        f"forward: {status.get('forward')}   (HTTP CONNECT)",
        f"proxy:   {status.get('proxy')}   (UDP: uTP + ping/pong)",
        f"server:  {status.get('server') or '-'}",
        f"control: {status.get('control_socket')}",
        *([f"grpc_web: {status['grpc_web']}   (grpc-web bridge)"] if status.get("grpc_web") else []),
        f"uptime:  {format_age(float(status.get('uptime', 0)))}",
    ]
    observed = status.get("observed_addresses") or []
    if status.get("relay_servers") or status.get("relay_serve"):
        seen = ", ".join(f"{item.get('address')} (relay {item.get('relay')})" for item in observed)
        lines.append(f"observed: {seen or '- (no relay node has answered yet)'}")
        lines.append(f"NAT mapping: {status.get('nat_mapping', 'unknown')}")
        if status.get("relay_serve"):
            lines.append("relay node: serving (registrations, lookups, introductions)")
    lines.append(format_services(status.get("services") or []))
    connections = status.get("connections") or []
    if not connections:
        lines.append("\nno connections")
        return "\n".join(lines)
    rows = []
    for item in connections:
        rtt = item.get("rtt")
        rows.append([
            str(item.get("direction", "?")),
            str(item.get("state") or "established"),
            str(item.get("node_id") or "-"),
            str(item.get("remote") or "?"),
            format_path(item),
            str(item.get("local") or "-"),
            format_age(float(item.get("age") or 0)),
            format_bytes(float(item.get("bytes_sent") or 0)),
            format_bytes(float(item.get("bytes_received") or 0)),
            "-" if rtt is None else f"{float(rtt) * 1000:.1f} ms",
            str(item.get("service") or "-"),
            str(item["moves"].get("count", 0)) if isinstance(item.get("moves"), dict) else "-",
        ])
    header = ["DIRECTION", "STATE", "NODEID", "REMOTE", "PATH", "LOCAL", "AGE", "SENT", "RECEIVED", "RTT", "SERVICE",
              "MOVES"]
    return "\n".join(lines) + f"\n\n{format_table(header, rows)}" + format_moves(connections)


def format_path(item: Mapping[str, Any]) -> str:
    """"direct", or "relay via <relay NodeId, shortened>"."""
    path = str(item.get("path") or "-")
    via = item.get("via")
    return f"{path} via {str(via)[:12]}..." if path == "relay" and via else path


def format_moves(connections: list[Mapping[str, Any]]) -> str:
    """The last moves of each tunnel that moved, under the table."""
    lines = []
    for item in connections:
        moves = item.get("moves") or {}
        for move in moves.get("recent") or []:
            when = time.strftime("%H:%M:%S", time.localtime(float(move.get("at") or 0)))
            lines.append(f"  {when} {item.get('direction')} {item.get('node_id')}: {format_move(move)}")
    return "\n\npath moves:\n" + "\n".join(lines) if lines else ""
