"""Multiserver address lists and the signed address record.

Text form (after ssb multiserver): alternatives separated by ``;``, layers of one
alternative by ``~``, a layer is ``name(:arg)*`` with ``name`` = ``[a-z][a-z0-9-]+``;
an argument is any non-space text where ``!`` escapes ``! : ; ~``. keynode knows
two layers:

- ``utp:<host>:<port>``: a node's UDP socket (an IPv6 literal escapes each ``:``
  as ``!:``, e.g. ``utp:2001!:db8!:!:1:4000``);
- ``relay:<relay NodeId>@<host>:<port>`` (optionally ``:tcp=<port>``): a relay node
  it registers with, at its UDP port, and the TCP port of its relay over TCP +
  mutual TLS (``[relay] tcp_port`` there), for a node whose UDP is blocked. In a
  node's record the first relay entry is its home relay.

A record is (NodeId, seq, address list) signed by the NodeId's key; seq only
grows (unix milliseconds, at least one above the last one this process made), so
a holder keeps the newest and refuses older ones. Its text form, which a user can
paste into a peer's ``[peers]``, is ``keynode-record:`` + base64url (no padding)
of the binary form: version 1 | NodeId 32 | seq u64 | length u16 | UTF-8 list |
Ed25519 signature 64 over ``keynode address record v1\\0`` + the bytes before it.
"""

from __future__ import annotations

import base64
import ipaddress
import re
import struct
import time
from dataclasses import dataclass

import nacl.exceptions
import nacl.signing

from proxy.identity.errors import NodeIdInvalid
from proxy.identity.node_id import NodeId
from proxy.rendezvous.errors import AddressInvalid, RecordForged, RecordInvalid, RecordOutdated, RelayServerInvalid

_NAME = re.compile(r"[a-z][a-z0-9-]+\Z")
_ESCAPED = "!:;~"
_LABEL = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)\Z")
_PORT = re.compile(r"[0-9]{1,5}\Z")
RECORD_PREFIX = "keynode-record:"
_SIGNING_CONTEXT = b"keynode address record v1\x00"
_RECORD_HEAD = struct.Struct("!B32sQH")
_SIGNATURE_SIZE = 64
MAX_ADDRESS_TEXT = 2048  # bytes of address list a record may carry


@dataclass(frozen=True)
class Layer:
    """One ``name:arg:arg`` section."""

    name: str
    args: tuple[str, ...] = ()


Alternative = tuple[Layer, ...]


def _escape(arg: str) -> str:
    return "".join("!" + char if char in _ESCAPED else char for char in arg)


def format_multiaddress(alternatives: tuple[Alternative, ...]) -> str:
    """Print alternatives in the multiserver text form (the inverse of parse)."""
    if not alternatives:
        raise AddressInvalid("an address list needs at least one address")
    out = []
    for alternative in alternatives:
        if not alternative:
            raise AddressInvalid("an address needs at least one layer")
        layers = []
        for layer in alternative:
            if not _NAME.match(layer.name):
                raise AddressInvalid(f"bad layer name {layer.name!r}")
            if any(char.isspace() for arg in layer.args for char in arg):
                raise AddressInvalid("an argument must not contain spaces")
            layers.append(":".join((layer.name, *map(_escape, layer.args))))
        out.append("~".join(layers))
    return ";".join(out)


def _split(text: str, separator: str) -> list[str]:
    """Split at unescaped separators, keeping escapes for the next level."""
    parts, current, index = [], [], 0
    while index < len(text):
        char = text[index]
        if char == "!":
            if index + 1 >= len(text) or text[index + 1] not in _ESCAPED:
                raise AddressInvalid(f"'!' must escape one of {_ESCAPED} (at {index})")
            current.append(text[index : index + 2])
            index += 2
            continue
        if char == separator:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
        index += 1
    parts.append("".join(current))
    return parts


def _unescape(arg: str) -> str:
    return re.sub(r"!(.)", r"\1", arg)


def parse_multiaddress(text: str) -> tuple[Alternative, ...]:
    """Parse the multiserver text form; AddressInvalid with the reason."""
    if not isinstance(text, str) or not text:
        raise AddressInvalid("an address list must be non-empty text")
    if any(char.isspace() for char in text):
        raise AddressInvalid("an address list must not contain spaces")
    alternatives = []
    for alternative_text in _split(text, ";"):
        layers = []
        for layer_text in _split(alternative_text, "~"):
            name, *args = _split(layer_text, ":")
            if not _NAME.match(name):
                raise AddressInvalid(f"bad layer name {name!r} in {alternative_text!r}")
            layers.append(Layer(name, tuple(_unescape(arg) for arg in args)))
        alternatives.append(tuple(layers))
    return tuple(alternatives)


# --- keynode's layers --------------------------------------------------------------


@dataclass(frozen=True)
class UtpAddress:
    host: str
    port: int

    def layer(self) -> Layer:
        return Layer("utp", (self.host, str(self.port)))


@dataclass(frozen=True)
class RelayAddress:
    node_id: NodeId
    host: str
    port: int
    tcp_port: int | None = None  # its relay over TCP + mutual TLS, if it offers one

    def layer(self) -> Layer:
        tcp = () if self.tcp_port is None else (f"tcp={self.tcp_port}",)
        return Layer("relay", (f"{self.node_id}@{self.host}", str(self.port), *tcp))


KeynodeAddress = UtpAddress | RelayAddress


def _port(text: str, where: str) -> int:
    if not _PORT.match(text) or not 0 < int(text) < 65536:
        raise AddressInvalid(f"bad port {text!r} in {where}")
    return int(text)


def _host(text: str, where: str) -> str:
    """An IP literal (one spelling, no wildcard) or a DNS name (lower case)."""
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        name = text.lower().removesuffix(".")
        if len(name) > 253 or not all(_LABEL.match(label) for label in name.split(".")):
            raise AddressInvalid(f"bad host {text!r} in {where}") from None
        return name
    if ip.is_unspecified:
        raise AddressInvalid(f"{text!r} in {where} is a wildcard, not a host to reach")
    return str(ip)


def keynode_addresses(text: str) -> tuple[KeynodeAddress, ...]:
    """The alternatives of a list that keynode understands (single-layer ``utp`` and
    ``relay``), in order; others (a later ``quic``, layered ones) are skipped. At
    least one must be understood."""
    found: list[KeynodeAddress] = []
    for alternative in parse_multiaddress(text):
        if len(alternative) != 1:
            continue
        layer = alternative[0]
        where = format_multiaddress((alternative,))
        if layer.name == "utp":
            if len(layer.args) != 2:
                raise AddressInvalid(f"{where}: utp takes host and port")
            found.append(UtpAddress(_host(layer.args[0], where), _port(layer.args[1], where)))
        elif layer.name == "relay":
            if len(layer.args) not in (2, 3) or "@" not in layer.args[0]:
                raise AddressInvalid(f"{where}: relay takes <NodeId>@host, port and optionally tcp=<port>")
            node_text, _, host = layer.args[0].partition("@")
            try:
                node_id = NodeId.decode(node_text)
            except NodeIdInvalid as error:
                raise AddressInvalid(f"{where}: bad relay NodeId: {error}") from None
            tcp_port = None
            if len(layer.args) == 3:
                if not layer.args[2].startswith("tcp="):
                    raise AddressInvalid(f"{where}: a relay's third argument is tcp=<port>")
                tcp_port = _port(layer.args[2][4:], where)
            found.append(RelayAddress(node_id, _host(host, where), _port(layer.args[1], where), tcp_port))
    if not found:
        raise AddressInvalid(f"no utp or relay address in {text!r}")
    return tuple(found)


def format_keynode_addresses(addresses: tuple[KeynodeAddress, ...]) -> str:
    return format_multiaddress(tuple((address.layer(),) for address in addresses))


# --- signed records --------------------------------------------------------------------


@dataclass(frozen=True)
class AddressRecord:
    node_id: NodeId
    seq: int
    addresses: str  # the multiserver text
    signature: bytes

    def to_bytes(self) -> bytes:
        return _unsigned(self.node_id, self.seq, self.addresses) + self.signature

    def to_text(self) -> str:
        return RECORD_PREFIX + base64.urlsafe_b64encode(self.to_bytes()).decode().rstrip("=")

    def understood(self) -> tuple[KeynodeAddress, ...]:
        return keynode_addresses(self.addresses)


def _unsigned(node_id: NodeId, seq: int, addresses: str) -> bytes:
    data = addresses.encode()
    return _RECORD_HEAD.pack(1, bytes(node_id), seq, len(data)) + data


def sign_record(signing_key: nacl.signing.SigningKey, seq: int, addresses: str) -> AddressRecord:
    keynode_addresses(addresses)  # only lists keynode can read are published
    if len(addresses.encode()) > MAX_ADDRESS_TEXT:
        raise AddressInvalid(f"address list longer than {MAX_ADDRESS_TEXT} bytes")
    node_id = NodeId(bytes(signing_key.verify_key))
    body = _unsigned(node_id, seq, addresses)
    signature = signing_key.sign(_SIGNING_CONTEXT + body).signature
    return AddressRecord(node_id, seq, addresses, signature)


def record_from_bytes(data: bytes) -> AddressRecord:
    """Decode and verify; RecordInvalid (malformed) or RecordForged (bad signature)."""
    if len(data) < _RECORD_HEAD.size + _SIGNATURE_SIZE:
        raise RecordInvalid("record too short")
    version, node_bytes, seq, length = _RECORD_HEAD.unpack_from(data)
    if version != 1:
        raise RecordInvalid(f"unknown record version {version}")
    if length > MAX_ADDRESS_TEXT or len(data) != _RECORD_HEAD.size + length + _SIGNATURE_SIZE:
        raise RecordInvalid("record length does not match its contents")
    body = data[: _RECORD_HEAD.size + length]
    signature = data[_RECORD_HEAD.size + length :]
    try:
        addresses = body[_RECORD_HEAD.size :].decode()
    except UnicodeDecodeError:
        raise RecordInvalid("record addresses are not UTF-8") from None
    try:
        nacl.signing.VerifyKey(node_bytes).verify(_SIGNING_CONTEXT + body, signature)
    except (nacl.exceptions.BadSignatureError, nacl.exceptions.ValueError, nacl.exceptions.TypeError):
        raise RecordForged("record signature does not verify under its NodeId") from None
    try:
        keynode_addresses(addresses)
    except AddressInvalid as error:
        raise RecordInvalid(f"record addresses: {error}") from None
    return AddressRecord(NodeId(node_bytes), seq, addresses, bytes(signature))


def record_from_text(text: str) -> AddressRecord:
    if not isinstance(text, str) or not text.startswith(RECORD_PREFIX):
        raise RecordInvalid(f"a record starts with {RECORD_PREFIX!r}")
    encoded = text[len(RECORD_PREFIX) :]
    if not re.fullmatch(r"[A-Za-z0-9_-]*", encoded):
        raise RecordInvalid("a record is base64url text")
    try:
        data = base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4))
    except ValueError:
        raise RecordInvalid("a record is base64url text") from None
    return record_from_bytes(data)


class RecordBook:
    """The newest verified record per NodeId; older or equal sequence numbers refused."""

    def __init__(self, limit: int = 4096) -> None:
        self.limit = limit
        self._records: dict[NodeId, AddressRecord] = {}

    def offer(self, record: AddressRecord) -> AddressRecord:
        held = self._records.get(record.node_id)
        if held is not None and record.seq <= held.seq:
            if record == held:
                return held
            raise RecordOutdated(f"record seq {record.seq} is not above the held {held.seq}")
        self._records.pop(record.node_id, None)
        self._records[record.node_id] = record
        while len(self._records) > self.limit:
            del self._records[next(iter(self._records))]
        return record

    def get(self, node_id: NodeId) -> AddressRecord | None:
        return self._records.get(node_id)


class SequenceClock:
    """Record sequence numbers that grow across calls and restarts: unix ms, at least one
    above the last one given (``last``: one given before, e.g. by an earlier run, in
    case the clock went back)."""

    def __init__(self, last: int = 0) -> None:
        self._last = last

    def advance_past(self, last: int) -> None:
        self._last = max(self._last, last)

    def next(self) -> int:
        self._last = max(self._last + 1, int(time.time() * 1000))
        return self._last


def parse_relay_server(text: object) -> RelayAddress:
    """A `[relay] servers` entry: ``<NodeId>@host:port`` (``[v6]:port`` for IPv6) or the
    multiserver ``relay:<NodeId>@host:port``, either followed by ``:tcp=<port>`` when
    the relay node also relays over TCP; RelayServerInvalid with the reason."""
    if not isinstance(text, str):
        raise RelayServerInvalid(f"must be a string '<NodeId>@host:port', not {type(text).__name__}")
    if text.startswith("relay:"):
        try:
            found = keynode_addresses(text)
        except AddressInvalid as error:
            raise RelayServerInvalid(str(error)) from None
        if len(found) != 1 or not isinstance(found[0], RelayAddress):
            raise RelayServerInvalid(f"{text!r} is not one relay:<NodeId>@host:port address")
        return found[0]
    tcp_port = None
    base, tcp_marker, tcp_text = text.rpartition(":tcp=")
    if tcp_marker:
        try:
            tcp_port = _port(tcp_text, text)
        except AddressInvalid as error:
            raise RelayServerInvalid(str(error)) from None
        text = base
    node_text, at, rest = text.partition("@")
    if not at:
        raise RelayServerInvalid(f"{text!r} is not '<NodeId>@host:port'")
    try:
        node_id = NodeId.decode(node_text)
    except NodeIdInvalid as error:
        raise RelayServerInvalid(f"{node_text!r} is not a NodeId: {error}") from None
    if rest.startswith("["):
        host, close, port_text = rest[1:].partition("]:")
        if not close or ":" not in host:
            raise RelayServerInvalid(f"{rest!r} is not '[IPv6]:port'")
    else:
        host, colon, port_text = rest.rpartition(":")
        if not colon or ":" in host or not host:
            raise RelayServerInvalid(f"{rest!r} is not 'host:port' (IPv6 goes in brackets)")
    try:
        return RelayAddress(node_id, _host(host, text), _port(port_text, text), tcp_port)
    except AddressInvalid as error:
        raise RelayServerInvalid(str(error)) from None
