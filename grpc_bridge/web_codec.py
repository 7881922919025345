"""grpc-web <-> native gRPC translation, sans-IO: content types, the base64 text mode,
request frame checks, the trailers frame, header rewriting and the HTTP -> gRPC status map.

Follows grpc/grpc doc/PROTOCOL-WEB.md and the behaviour of Envoy's grpc_web filter:
- request: the four grpc-web content types; the body is native gRPC framing (5-byte
  prefix: flag, 4-byte big-endian length), base64 of it in text mode, decoded in 4-byte
  groups (padding may appear at any group, since a client may flush anywhere);
- upstream request: content-type ``application/grpc``, ``te: trailers``,
  ``grpc-accept-encoding: identity`` unless given, no content-length, no hop-by-hop headers;
- response: ``application/grpc-web(-text)+proto``; HTTP/2 trailers become one final frame
  flagged 0x80 holding ``name:value\\r\\n`` lines; text mode base64-encodes each frame alone;
- a non-gRPC upstream answer gets a grpc-status from its HTTP status (grpc/grpc
  doc/http-grpc-status-mapping.md) and a grpc-message from its body, at most 16 KiB.
"""

from __future__ import annotations

import binascii
import enum
import struct
from collections.abc import Iterable, Sequence

from grpc_bridge.web_errors import InvalidBase64, InvalidRequestFrame, RequestFrameTooLarge

Headers = list[tuple[bytes, bytes]]

FRAME_HEADER = struct.Struct(">BI")
FLAG_COMPRESSED = 0x01
FLAG_TRAILERS = 0x80
MAX_GRPC_MESSAGE = 16 * 1024

# gRPC status codes used by the bridge itself.
OK = 0
CANCELLED = 1
UNKNOWN = 2
DEADLINE_EXCEEDED = 4
PERMISSION_DENIED = 7
RESOURCE_EXHAUSTED = 8
UNIMPLEMENTED = 12
INTERNAL = 13
UNAVAILABLE = 14
UNAUTHENTICATED = 16

GRPC_CONTENT_TYPE = b"application/grpc"
BINARY_RESPONSE_TYPE = b"application/grpc-web+proto"
TEXT_RESPONSE_TYPE = b"application/grpc-web-text+proto"

# Connection-specific headers (RFC 9110 7.6.1, RFC 9113 8.2.2) plus the ones the bridge
# recomputes itself; none of them crosses the bridge in either direction.
HOP_BY_HOP = frozenset(
    {
        b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade", b"te",
        b"trailer", b"host", b"content-length", b"proxy-authorization", b"proxy-authenticate",
        b"http2-settings",
    }
)
# Browser-only request headers that mean nothing to a gRPC server.
BROWSER_ONLY = frozenset({b"origin", b"referer", b"access-control-request-method", b"access-control-request-headers"})
# What a grpc-web trailers frame carries from a trailers-only answer: everything but these.
NOT_METADATA = frozenset({b":status", b"content-type"}) | HOP_BY_HOP


class WebFormat(enum.Enum):
    BINARY = "binary"
    TEXT = "text"

    @property
    def response_content_type(self) -> bytes:
        return TEXT_RESPONSE_TYPE if self is WebFormat.TEXT else BINARY_RESPONSE_TYPE


def request_format(content_type: bytes | None) -> WebFormat | None:
    """The grpc-web flavour named by a request's content type, or None if it is not grpc-web."""
    if content_type is None:
        return None
    media = content_type.split(b";", 1)[0].strip().lower()
    if media in (b"application/grpc-web", b"application/grpc-web+proto"):
        return WebFormat.BINARY
    if media in (b"application/grpc-web-text", b"application/grpc-web-text+proto"):
        return WebFormat.TEXT
    return None


class Base64Decoder:
    """Incremental base64 in 4-character groups; a padded group may end any flush."""

    def __init__(self) -> None:
        self._pending = b""

    def feed(self, data: bytes) -> bytes:
        buffer = self._pending + data
        usable = len(buffer) - len(buffer) % 4
        self._pending = buffer[usable:]
        return _decode_groups(buffer[:usable])

    def finish(self) -> None:
        if self._pending:
            raise InvalidBase64(f"the text body ends with {len(self._pending)} characters past its last 4-character group")


def _decode_groups(text: bytes) -> bytes:
    if not text:
        return b""
    if b"=" not in text:
        return _strict(text)
    pieces = []
    start = 0
    while start < len(text):
        pad = text.find(b"=", start)
        end = len(text) if pad < 0 else (pad // 4 + 1) * 4
        pieces.append(_strict(text[start:end]))
        start = end
    return b"".join(pieces)


def _strict(text: bytes) -> bytes:
    try:
        return binascii.a2b_base64(text, strict_mode=True)
    except binascii.Error as error:
        raise InvalidBase64(f"invalid base64 in the text body: {error}") from None


class TextEncoder:
    """Base64 of a response byte stream, padded at each gRPC frame's end so every frame
    is encoded on its own, without holding a whole frame in memory."""

    def __init__(self) -> None:
        self._carry = b""  # < 3 bytes of the current frame not yet encoded
        self._header = b""  # a frame header being collected
        self._remaining = 0  # payload bytes left in the current frame

    def feed(self, data: bytes) -> bytes:
        out = []
        view = memoryview(data)
        while view:
            if self._remaining == 0:
                need = FRAME_HEADER.size - len(self._header)
                self._header += bytes(view[:need])
                chunk, view = view[:need], view[need:]
                self._carry += bytes(chunk)
                if len(self._header) < FRAME_HEADER.size:
                    break
                self._remaining = FRAME_HEADER.unpack(self._header)[1]
                self._header = b""
                if self._remaining == 0:
                    out.append(self._flush())
                continue
            take = min(self._remaining, len(view))
            self._carry += bytes(view[:take])
            view = view[take:]
            self._remaining -= take
            if self._remaining == 0:
                out.append(self._flush())
        whole = len(self._carry) - len(self._carry) % 3
        if whole:
            out.append(binascii.b2a_base64(self._carry[:whole], newline=False))
            self._carry = self._carry[whole:]
        return b"".join(out)

    def _flush(self) -> bytes:
        carry, self._carry = self._carry, b""
        return binascii.b2a_base64(carry, newline=False)

    def finish(self) -> bytes:
        """Whatever is left (only when the upstream cut a frame short)."""
        self._header = b""
        self._remaining = 0
        return self._flush() if self._carry else b""


class RequestFrames:
    """Checks the request body's framing as it streams past, holding nothing: no trailers
    frame from a client, no message over the limit, no frame cut short at the end."""

    def __init__(self, max_message: int) -> None:
        self.max_message = max_message
        self._header = b""
        self._remaining = 0
        self.frames = 0

    def feed(self, data: bytes) -> None:
        position = 0
        while position < len(data):
            if self._remaining:
                take = min(self._remaining, len(data) - position)
                self._remaining -= take
                position += take
                continue
            need = FRAME_HEADER.size - len(self._header)
            self._header += data[position : position + need]
            position += need
            if len(self._header) < FRAME_HEADER.size:
                return
            flags, length = FRAME_HEADER.unpack(self._header)
            self._header = b""
            if flags & ~FLAG_COMPRESSED:
                raise InvalidRequestFrame(f"request frame with flags 0x{flags:02x} (only 0x00 and 0x01 are messages)")
            if length > self.max_message:
                raise RequestFrameTooLarge(f"request message of {length} bytes exceeds the limit of {self.max_message}")
            self._remaining = length
            self.frames += 1

    def finish(self) -> None:
        if self._header or self._remaining:
            raise InvalidRequestFrame("the request body ends inside a gRPC frame")


def trailers_frame(trailers: Iterable[tuple[bytes, bytes]]) -> bytes:
    block = b"".join(name.lower() + b":" + value + b"\r\n" for name, value in trailers)
    return FRAME_HEADER.pack(FLAG_TRAILERS, len(block)) + block


def status_trailers(code: int, message: str) -> Headers:
    trailers = [(b"grpc-status", str(code).encode())]
    if message:
        trailers.append((b"grpc-message", percent_encode(message)))
    return trailers


def percent_encode(message: str) -> bytes:
    """grpc-message encoding: printable ASCII except '%' as is, the rest %XX of UTF-8,
    cut so the result stays within MAX_GRPC_MESSAGE."""
    out = bytearray()
    for byte in message.encode("utf-8", "replace"):
        piece = bytes([byte]) if 0x20 <= byte <= 0x7E and byte != 0x25 else b"%%%02X" % byte
        if len(out) + len(piece) > MAX_GRPC_MESSAGE:
            break
        out += piece
    return bytes(out)


def grpc_status_for_http(status: int) -> int:
    """grpc/grpc doc/http-grpc-status-mapping.md, for answers that carry no grpc-status."""
    return {
        400: INTERNAL, 401: UNAUTHENTICATED, 403: PERMISSION_DENIED, 404: UNIMPLEMENTED,
        429: UNAVAILABLE, 431: INTERNAL, 502: UNAVAILABLE, 503: UNAVAILABLE, 504: UNAVAILABLE,
    }.get(status, UNKNOWN)


def non_grpc_answer(status: int, content_type: bytes | None, body: bytes) -> Headers:
    """Trailers for an upstream answer that is not gRPC (HTTP error, wrong content type)."""
    code = grpc_status_for_http(status) if status != 200 else UNKNOWN
    text = body.decode("utf-8", "replace").strip()
    if not text:
        kind = content_type.decode("latin-1") if content_type else "no content-type"
        text = f"upstream answered HTTP {status} ({kind}), not gRPC"
    return status_trailers(code, text)


def is_grpc_answer(status: int, content_type: bytes | None) -> bool:
    if status != 200 or content_type is None:
        return False
    media = content_type.split(b";", 1)[0].strip().lower()
    return media == GRPC_CONTENT_TYPE or media.startswith(GRPC_CONTENT_TYPE + b"+")


def upstream_request_headers(method: bytes, path: bytes, authority: bytes, headers: Sequence[tuple[bytes, bytes]]) -> Headers:
    """The native gRPC request headers for a grpc-web request (names already lower-case)."""
    out: Headers = [
        (b":method", method),
        (b":scheme", b"http"),
        (b":path", path),
        (b":authority", authority),
        (b"content-type", GRPC_CONTENT_TYPE),
        (b"te", b"trailers"),
    ]
    accept_encoding = False
    for name, value in headers:
        if name in HOP_BY_HOP or name in BROWSER_ONLY or name.startswith(b":"):
            continue
        if name in (b"content-type", b"accept", b"x-grpc-web"):
            continue
        if name == b"grpc-accept-encoding":
            accept_encoding = True
        out.append((name, value))
    if not accept_encoding:
        out.append((b"grpc-accept-encoding", b"identity"))
    return out


def web_response_headers(upstream: Sequence[tuple[bytes, bytes]], web_format: WebFormat) -> Headers:
    """The grpc-web response headers for a native gRPC answer's headers."""
    out: Headers = [(b"content-type", web_format.response_content_type)]
    for name, value in upstream:
        if name.startswith(b":") or name in NOT_METADATA:
            continue
        out.append((name, value))
    return out


def trailer_metadata(block: Sequence[tuple[bytes, bytes]]) -> Headers:
    """The entries of an HTTP/2 trailers (or trailers-only headers) block that belong in
    the grpc-web trailers frame."""
    return [(name, value) for name, value in block if not name.startswith(b":") and name not in NOT_METADATA]


def header_value(headers: Sequence[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    for key, value in headers:
        if key == name:
            return value
    return None
