"""The HTTP CONNECT edge of the forward proxy (h11 does all HTTP parsing).

One TCP client connection carries exactly one CONNECT request. The edge reads it
(bounded in size; the caller bounds it in time with ``conn_connect_time``), checks
the method, the ``Proxy-Authorization`` and the target, and answers either
``200 Connection Established`` (after which the connection is a raw tunnel) or an
error status taken from the typed error's ``http_status``.

Targets:
- ``HOST:PORT?nodeId=<url-encoded NodeId>`` (the original's form),
- ``<encoded NodeId>:<PORT>``, resolved through an address book.
IPv6 literals are bracketed; wildcard hosts and port 0 are rejected.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import re
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import parse_qs

import h11
import trio

from proxy.identity.errors import KeynodeError, NodeIdInvalid
from proxy.identity.node_id import NodeId
from proxy.tunnel.errors import BadConnectRequest, MethodNotAllowed, ProxyAuthRequired, UnknownNodeId
from proxy.tunnel.hosts import HostPortInvalid, parse_host, parse_port_text, split_host_port
from proxy.tunnel.http_io import receive_event, receive_head

# A CONNECT request is one line plus a few headers; anything larger is hostile.
MAX_REQUEST_SIZE = 16 * 1024
READ_SIZE = 4096

REASONS: dict[int, bytes] = {
    200: b"Connection Established",
    400: b"Bad Request",
    405: b"Method Not Allowed",
    407: b"Proxy Authentication Required",
    500: b"Internal Server Error",
    502: b"Bad Gateway",
    503: b"Service Unavailable",
    504: b"Gateway Timeout",
    524: b"A Timeout Occurred",
    526: b"Invalid SSL Certificate",
}


@dataclass(frozen=True)
class ConnectTarget:
    """Where a CONNECT asks to go: the remote proxy address and the wanted NodeIds."""

    host: str  # IP literal (no brackets) or DNS name; "" when found by NodeId (lookup)
    port: int
    node_ids: tuple[NodeId, ...]
    # `<NodeId>:<PORT>` with no address book entry, on a node with relay nodes: the
    # Proxy asks the relays where the node is (proxy.rendezvous).
    lookup: bool = False


def _target_host(text: str) -> str:
    try:
        return parse_host(text, allow_wildcard=False)
    except HostPortInvalid as error:
        raise BadConnectRequest(f"bad host: {error}") from None


def _target_port(text: str) -> int:
    try:
        return parse_port_text(text, allow_zero=False)
    except HostPortInvalid as error:
        raise BadConnectRequest(f"bad port: {error}") from None


def _decode_node_id(text: str) -> NodeId:
    try:
        return NodeId.decode(text)
    except NodeIdInvalid as error:
        raise BadConnectRequest(f"invalid nodeId: {error}") from None


def _looks_like_node_id(host: str) -> bool:
    try:
        NodeId.decode(host)
    except NodeIdInvalid:
        return False
    return True


# A host that is meant as a NodeId (``<NodeId>:<PORT>``) but is not one: 'v' and a
# long run of base32hex letters, in any case. Names like that are not hostnames
# anyone uses, so the error says "invalid", not "missing".
_NODE_ID_ATTEMPT = re.compile(r"[vV][0-9a-vA-V]{31,}\Z")

TARGET_FORMS = "HOST:PORT?nodeId=<NodeId>, or <NodeId>:<PORT> for a node in the address book"


def parse_connect_target(
    target: str, address_book: Mapping[NodeId, tuple[str, int]] | None = None, *, by_node_id: bool = False
) -> ConnectTarget:
    """Parse a CONNECT request-target; raise a BadConnectRequest (400) subclass."""
    authority, has_query, query = target.partition("?")
    try:
        host_text, port_text = split_host_port(authority)
    except HostPortInvalid as error:
        raise BadConnectRequest(f"bad target: {error}") from None
    port = _target_port(port_text)
    # A NodeId never parses as an IPv6 literal, so a bracketed host is never one.
    if not has_query and _looks_like_node_id(host_text):
        # `<NodeId>:<PORT>`: the port is ignored for now (one service per node).
        node_id = NodeId.decode(host_text)
        if address_book is None or node_id not in address_book:
            if by_node_id:
                return ConnectTarget("", port, (node_id,), lookup=True)
            raise UnknownNodeId(f"no address known for {node_id} (no [peers] entry, no [relay] servers)")
        host, proxy_port = address_book[node_id]
        return ConnectTarget(_target_host(host), _target_port(str(proxy_port)), (node_id,))
    if not has_query:
        if _NODE_ID_ATTEMPT.match(host_text):
            try:
                NodeId.decode(host_text)
            except NodeIdInvalid as error:
                raise BadConnectRequest(f"invalid nodeId {host_text!r}: {error}") from None
        raise BadConnectRequest(f"missing nodeId: the target is {TARGET_FORMS}")
    try:
        params = parse_qs(query, keep_blank_values=True, strict_parsing=True, max_num_fields=16)
    except ValueError:
        raise BadConnectRequest(f"bad query: the target is {TARGET_FORMS}") from None
    values = params.get("nodeId", [])
    if not values:
        others = ", ".join(sorted(params))
        raise BadConnectRequest(f"missing nodeId (the query has {others}; the parameter is nodeId)")
    if len(values) != 1:
        raise BadConnectRequest("more than one nodeId")
    return ConnectTarget(_target_host(host_text), port, (_decode_node_id(values[0]),))


def check_proxy_authorization(headers: list[tuple[bytes, bytes]], auth_token: str | None) -> None:
    """Accept Basic credentials ``token``, ``token:`` or ``anything:token``.

    Comparisons are constant time and all candidates are compared, so timing does
    not reveal which part matched. ``auth_token=None`` disables the check.
    """
    if auth_token is None:
        return
    token = auth_token.encode()
    for name, value in headers:
        if name != b"proxy-authorization":
            continue
        scheme, _, encoded = value.strip().partition(b" ")
        if scheme.lower() != b"basic":
            continue
        try:
            credentials = base64.b64decode(encoded.strip(), validate=True)
        except (binascii.Error, ValueError):
            continue
        user, colon, password = credentials.partition(b":")
        whole = hmac.compare_digest(credentials, token)
        as_password = hmac.compare_digest(password, token) & bool(colon)
        as_user = hmac.compare_digest(user, token) & (colon == b":") & (password == b"")
        if whole | as_password | as_user:
            return
    raise ProxyAuthRequired("missing or wrong Proxy-Authorization")


class HTTPConnectEdge:
    """One client TCP connection on the CONNECT port, until it becomes a tunnel."""

    def __init__(self, stream: trio.abc.Stream, *, max_request_size: int = MAX_REQUEST_SIZE) -> None:
        self.stream = stream
        self._h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=max_request_size)
        self.request: h11.Request | None = None

    async def receive_request(self) -> h11.Request | None:
        """Read one complete request; None when the client went away first.

        Raises BadConnectRequest for bytes h11 rejects (or a request with a body).
        The caller bounds the time this takes.
        """
        try:
            request = await receive_head(self.stream, self._h11, read_size=READ_SIZE)
            if request is None:
                return None
            assert isinstance(request, h11.Request)  # h11 gives a server requests only
            self.request = request
            if request.method != b"CONNECT":
                return request  # parse() answers 405; its body does not matter
            end = await receive_event(self.stream, self._h11, read_size=READ_SIZE)
        except h11.RemoteProtocolError as error:
            raise BadConnectRequest(f"malformed request: {error}") from None
        if isinstance(end, h11.Data):
            raise BadConnectRequest("a CONNECT request has no body")
        if isinstance(end, h11.ConnectionClosed):
            return None
        return request  # EndOfMessage, or PAUSED: h11 waits for the tunnel to take over

    @property
    def trailing_data(self) -> bytes:
        """Bytes the client sent after the request (they belong to the tunnel)."""
        return bytes(self._h11.trailing_data[0])

    def parse(
        self,
        *,
        auth_token: str | None,
        address_book: Mapping[NodeId, tuple[str, int]] | None,
        by_node_id: bool = False,
    ) -> ConnectTarget:
        """Method, then authorization, then target; raises the typed 4xx errors."""
        request = self.request
        if request is None:
            raise BadConnectRequest("no request")
        if request.method != b"CONNECT":
            raise MethodNotAllowed(f"method {request.method.decode('ascii', 'replace')} not allowed")
        check_proxy_authorization(list(request.headers), auth_token)
        try:
            target = request.target.decode("ascii")
        except UnicodeDecodeError:
            raise BadConnectRequest("non-ASCII target") from None
        return parse_connect_target(target, address_book, by_node_id=by_node_id)

    async def send_established(self) -> None:
        data = self._h11.send(h11.Response(status_code=200, headers=[], reason=REASONS[200]))
        await self.stream.send_all(data)

    async def send_error(self, status: int, message: str = "") -> None:
        """Answer with an error status and a short text body; the caller closes."""
        if self._h11.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        if status not in REASONS or status == 200:
            status = 500
        body = (message or REASONS[status].decode()).encode("utf-8", "replace")[:512] + b"\n"
        headers = [
            (b"content-type", b"text/plain; charset=utf-8"),
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),
        ]
        if status == 407:
            headers.append((b"proxy-authenticate", b'Basic realm="keynode"'))
        if status == 405:
            headers.append((b"allow", b"CONNECT"))
        try:
            data = self._h11.send(h11.Response(status_code=status, headers=headers, reason=REASONS[status]))
            data += self._h11.send(h11.Data(data=body))
            data += self._h11.send(h11.EndOfMessage())
        except h11.LocalProtocolError:
            return  # h11 cannot frame a response to this input: just close
        await self.stream.send_all(data)

    async def send_error_for(self, error: BaseException) -> None:
        status = error.http_status if isinstance(error, KeynodeError) else 500
        await self.send_error(status, str(error) if isinstance(error, KeynodeError) else "")
