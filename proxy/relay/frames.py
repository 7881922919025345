"""The relay's frame codec (sans-IO), DERP-shaped.

One TLS connection per client carries frames; a frame is

    type (1 byte) | body length (4 bytes, big-endian) | body

Types (direction: c = client to relay, r = relay to client):

    0x01 SEND        c  destination NodeId (32) | datagram
    0x02 RECV        r  source NodeId (32) | datagram (the source is set by the relay)
    0x03 PEER_GONE   r  NodeId (32) | reason (1): 0 disconnected, 1 replaced by a
                        newer connection of that NodeId (sent to the older one itself)
    0x04 PING        cr payload (8)
    0x05 PONG        cr payload (8), the PING's
    0x06 HEALTH      r  UTF-8 text (empty: healthy again)
    0x07 SERVER_INFO r  version (1) | max datagram (4) | rate B/s (8) | burst B (8) |
                        keep-alive ms (4): sent once a client is registered
    0x08 RESTARTING  r  reconnect in ms (4) | try for ms (4)
    0x09 SEND_BATCH  c  destination NodeId (32) | (length (2) | datagram) ...
    0x0a RECV_BATCH  r  source NodeId (32) | (length (2) | datagram) ...
    0x0b KEYED       cr a rendezvous keyed message for the other end of the link
                        (a node on TCP only looks nodes up this way)

The batches carry several datagrams for one peer in one frame (a uTP window's worth
leaves the endpoint at once): the relay checks and forwards one frame instead of
dozens, which is most of its per-datagram cost. A batch holds at least one datagram,
each at most MAX_BATCHED bytes.

A datagram is at most MAX_DATAGRAM bytes, a frame body at most MAX_FRAME bytes.
The decoder refuses a header announcing more before buffering the body (the stream
is then unusable: FrameTooLarge); a whole frame of an unknown type is consumed and
reported (UnknownFrameType), so a reader can go on.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from proxy.identity.node_id import NODE_ID_SIZE, NodeId
from proxy.relay.errors import DatagramTooLarge, FrameTooLarge, FrameTruncated, MalformedFrame, UnknownFrameType

MAX_DATAGRAM = 64 * 1024
MAX_FRAME = 1024 * 1024
HEADER_SIZE = 5
PROTOCOL_VERSION = 1

SEND = 0x01
RECV = 0x02
PEER_GONE = 0x03
PING = 0x04
PONG = 0x05
HEALTH = 0x06
SERVER_INFO = 0x07
RESTARTING = 0x08
SEND_BATCH = 0x09
RECV_BATCH = 0x0A
KEYED = 0x0B
FRAME_TYPES = frozenset({SEND, RECV, PEER_GONE, PING, PONG, HEALTH, SERVER_INFO, RESTARTING, SEND_BATCH, RECV_BATCH,
                         KEYED})
MAX_BATCHED = 0xFFFF  # a batched datagram's length fits two bytes

GONE_DISCONNECTED = 0
GONE_REPLACED = 1

PING_SIZE = 8
_HEADER = struct.Struct("!BI")
_SERVER_INFO = struct.Struct("!BIQQI")
_RESTARTING = struct.Struct("!II")
_LENGTH = struct.Struct("!H")
pack_length = _LENGTH.pack
pack_header = _HEADER.pack


@dataclass(frozen=True, slots=True)
class Send:
    destination: NodeId
    datagram: bytes


@dataclass(frozen=True, slots=True)
class Recv:
    source: NodeId
    datagram: bytes


@dataclass(frozen=True, slots=True)
class PeerGone:
    node_id: NodeId
    reason: int


@dataclass(frozen=True, slots=True)
class Ping:
    payload: bytes


@dataclass(frozen=True, slots=True)
class Pong:
    payload: bytes


@dataclass(frozen=True, slots=True)
class Health:
    text: str


@dataclass(frozen=True, slots=True)
class ServerInfo:
    version: int
    max_datagram: int
    rate: int  # bytes per second each NodeId may send through the relay
    burst: int
    keepalive_ms: int


@dataclass(frozen=True, slots=True)
class Restarting:
    reconnect_in_ms: int
    try_for_ms: int


@dataclass(frozen=True, slots=True)
class SendBatch:
    destination: NodeId
    datagrams: tuple[bytes, ...]


@dataclass(frozen=True, slots=True)
class RecvBatch:
    source: NodeId
    datagrams: tuple[bytes, ...]


@dataclass(frozen=True, slots=True)
class Keyed:
    message: bytes


Frame = Send | Recv | SendBatch | RecvBatch | PeerGone | Ping | Pong | Health | ServerInfo | Restarting | Keyed


def frame_bytes(frame_type: int, body: bytes) -> bytes:
    if len(body) > MAX_FRAME:
        raise FrameTooLarge(f"a frame body of {len(body)} bytes is over the {MAX_FRAME}-byte limit")
    return _HEADER.pack(frame_type, len(body)) + body


def _datagram_frame(frame_type: int, node_id: NodeId, datagram: bytes) -> bytes:
    if len(datagram) > MAX_DATAGRAM:
        raise DatagramTooLarge(f"a datagram of {len(datagram)} bytes is over the {MAX_DATAGRAM}-byte limit")
    return _HEADER.pack(frame_type, NODE_ID_SIZE + len(datagram)) + bytes(node_id) + datagram


def encode_frame(frame: Frame) -> bytes:
    """The frame's bytes; DatagramTooLarge / MalformedFrame for values that do not fit."""
    match frame:
        case Send(destination, datagram):
            return _datagram_frame(SEND, destination, datagram)
        case Recv(source, datagram):
            return _datagram_frame(RECV, source, datagram)
        case SendBatch(node_id, datagrams) | RecvBatch(node_id, datagrams):
            if not datagrams:
                raise MalformedFrame("a batch holds at least one datagram")
            for datagram in datagrams:
                if len(datagram) > MAX_BATCHED:
                    raise DatagramTooLarge(f"a batched datagram of {len(datagram)} bytes is over {MAX_BATCHED}")
            body = batch_body(bytes(node_id), datagrams)
            return frame_bytes(SEND_BATCH if isinstance(frame, SendBatch) else RECV_BATCH, body)
        case PeerGone(node_id, reason):
            _check_range("reason", reason, 0xFF)
            return frame_bytes(PEER_GONE, bytes(node_id) + bytes((reason,)))
        case Ping(payload) | Pong(payload):
            if len(payload) != PING_SIZE:
                raise MalformedFrame(f"a ping payload is {PING_SIZE} bytes, not {len(payload)}")
            return frame_bytes(PING if isinstance(frame, Ping) else PONG, payload)
        case Health(text):
            return frame_bytes(HEALTH, text.encode("utf-8"))
        case ServerInfo(version, max_datagram, rate, burst, keepalive_ms):
            for name, value, top in (("version", version, 0xFF), ("max_datagram", max_datagram, 0xFFFFFFFF),
                                     ("rate", rate, 2**64 - 1), ("burst", burst, 2**64 - 1),
                                     ("keepalive_ms", keepalive_ms, 0xFFFFFFFF)):
                _check_range(name, value, top)
            return frame_bytes(SERVER_INFO, _SERVER_INFO.pack(version, max_datagram, rate, burst, keepalive_ms))
        case Keyed(message):
            if len(message) > MAX_DATAGRAM:
                raise DatagramTooLarge(f"a keyed message of {len(message)} bytes is over the limit")
            return frame_bytes(KEYED, bytes(message))
        case Restarting(reconnect_in_ms, try_for_ms):
            _check_range("reconnect_in_ms", reconnect_in_ms, 0xFFFFFFFF)
            _check_range("try_for_ms", try_for_ms, 0xFFFFFFFF)
            return frame_bytes(RESTARTING, _RESTARTING.pack(reconnect_in_ms, try_for_ms))
    raise TypeError(f"not a relay frame: {frame!r}")


def _check_range(name: str, value: int, top: int) -> None:
    if not 0 <= value <= top:
        raise MalformedFrame(f"{name} {value} is outside 0..{top}")


def parse_frame(frame_type: int, body: bytes) -> Frame:
    """The frame a (type, body) pair holds; MalformedFrame (DatagramTooLarge) for a
    body that does not fit its type, UnknownFrameType for a type not listed above."""
    if frame_type in (SEND, RECV):
        if len(body) < NODE_ID_SIZE:
            raise MalformedFrame(f"a SEND/RECV body holds at least a NodeId, got {len(body)} bytes")
        if len(body) - NODE_ID_SIZE > MAX_DATAGRAM:
            raise DatagramTooLarge(f"a datagram of {len(body) - NODE_ID_SIZE} bytes is over the limit")
        node_id, datagram = NodeId(body[:NODE_ID_SIZE]), bytes(body[NODE_ID_SIZE:])
        return Send(node_id, datagram) if frame_type == SEND else Recv(node_id, datagram)
    if frame_type in (SEND_BATCH, RECV_BATCH):
        if len(body) < NODE_ID_SIZE:
            raise MalformedFrame(f"a batch body holds at least a NodeId, got {len(body)} bytes")
        node_id, datagrams = NodeId(body[:NODE_ID_SIZE]), tuple(split_batch(body))
        return SendBatch(node_id, datagrams) if frame_type == SEND_BATCH else RecvBatch(node_id, datagrams)
    if frame_type == PEER_GONE:
        if len(body) != NODE_ID_SIZE + 1:
            raise MalformedFrame(f"a PEER_GONE body is {NODE_ID_SIZE + 1} bytes, not {len(body)}")
        return PeerGone(NodeId(body[:NODE_ID_SIZE]), body[NODE_ID_SIZE])
    if frame_type in (PING, PONG):
        if len(body) != PING_SIZE:
            raise MalformedFrame(f"a PING/PONG body is {PING_SIZE} bytes, not {len(body)}")
        return Ping(bytes(body)) if frame_type == PING else Pong(bytes(body))
    if frame_type == HEALTH:
        try:
            return Health(bytes(body).decode("utf-8"))
        except UnicodeDecodeError as error:
            raise MalformedFrame("a HEALTH text is not UTF-8") from error
    if frame_type == SERVER_INFO:
        if len(body) != _SERVER_INFO.size:
            raise MalformedFrame(f"a SERVER_INFO body is {_SERVER_INFO.size} bytes, not {len(body)}")
        return ServerInfo(*_SERVER_INFO.unpack(body))
    if frame_type == KEYED:
        if len(body) > MAX_DATAGRAM:
            raise DatagramTooLarge(f"a keyed message of {len(body)} bytes is over the limit")
        return Keyed(bytes(body))
    if frame_type == RESTARTING:
        if len(body) != _RESTARTING.size:
            raise MalformedFrame(f"a RESTARTING body is {_RESTARTING.size} bytes, not {len(body)}")
        return Restarting(*_RESTARTING.unpack(body))
    raise UnknownFrameType(frame_type)


class FrameDecoder:
    """Splits a byte stream into (type, body) pairs.

    ``feed`` bytes as they arrive, then call ``next_raw`` until it returns None. A
    header over MAX_FRAME raises FrameTooLarge, then and on every later call; a whole
    frame of an unknown type raises UnknownFrameType after it was consumed. ``end``
    (the stream ended) raises FrameTruncated if part of a frame is left.
    """

    __slots__ = ("_buffer", "_offset", "_failed")

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._offset = 0
        self._failed: FrameTooLarge | None = None

    @property
    def buffered(self) -> int:
        return len(self._buffer) - self._offset

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        if self._offset and self._offset * 2 >= len(self._buffer):
            del self._buffer[: self._offset]
            self._offset = 0
        self._buffer += data

    def next_raw(self) -> tuple[int, bytes] | None:
        if self._failed is not None:
            raise self._failed
        buffer, offset = self._buffer, self._offset
        if len(buffer) - offset < HEADER_SIZE:
            return None
        frame_type, length = _HEADER.unpack_from(buffer, offset)
        if length > MAX_FRAME:
            self._failed = FrameTooLarge(f"a frame header announces {length} bytes, over the {MAX_FRAME}-byte limit")
            raise self._failed
        end = offset + HEADER_SIZE + length
        if end > len(buffer):
            return None
        body = bytes(buffer[offset + HEADER_SIZE : end])
        self._offset = end
        if frame_type not in FRAME_TYPES:
            raise UnknownFrameType(frame_type)
        return frame_type, body

    def next_frame(self) -> Frame | None:
        """As next_raw, parsed (MalformedFrame for a bad body, which is consumed)."""
        raw = self.next_raw()
        return None if raw is None else parse_frame(*raw)

    def end(self) -> None:
        if self.buffered:
            raise FrameTruncated(f"the stream ended {self.buffered} bytes into a frame")


def decode_frames(data: bytes) -> list[Frame]:
    """Every frame in ``data``, which must end on a frame boundary."""
    decoder = FrameDecoder()
    decoder.feed(data)
    frames = []
    while (frame := decoder.next_frame()) is not None:
        frames.append(frame)
    decoder.end()
    return frames


def join_frames(frames: list[tuple[int, bytes]]) -> bytes:
    """(type, body) pairs as one run of frames, ready to write."""
    parts: list[bytes] = []
    append = parts.append
    for frame_type, body in frames:
        append(_HEADER.pack(frame_type, len(body)))
        append(body)
    return b"".join(parts)


def batch_body(node_id: bytes, datagrams: tuple[bytes, ...] | list[bytes]) -> bytes:
    """A SEND_BATCH / RECV_BATCH body (datagrams at most MAX_BATCHED bytes each)."""
    parts = [node_id]
    append = parts.append
    pack = _LENGTH.pack
    for datagram in datagrams:
        append(pack(len(datagram)))
        append(datagram)
    return b"".join(parts)


def count_batch(body: bytes) -> int:
    """How many datagrams a batch body holds (after its NodeId); MalformedFrame if
    the lengths do not add up to the body or it holds none."""
    unpack = _LENGTH.unpack_from
    offset, end, count = NODE_ID_SIZE, len(body), 0
    while offset + 2 <= end:
        offset += 2 + unpack(body, offset)[0]
        count += 1
    if offset != end or not count:
        raise MalformedFrame("a batch's datagram lengths do not add up to its body" if count
                             else "a batch holds at least one datagram")
    return count


def split_batch(body: bytes) -> list[bytes]:
    """The datagrams of a batch body (MalformedFrame as count_batch)."""
    unpack = _LENGTH.unpack_from
    offset, end = NODE_ID_SIZE, len(body)
    datagrams = []
    while offset + 2 <= end:
        length = unpack(body, offset)[0]
        offset += 2
        datagrams.append(body[offset : offset + length])
        offset += length
    if offset != end or not datagrams:
        raise MalformedFrame("a batch's datagram lengths do not add up to its body" if datagrams
                             else "a batch holds at least one datagram")
    return datagrams
