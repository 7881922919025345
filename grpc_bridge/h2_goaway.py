"""GOAWAY outside h2's connection state machine.

h2 (4.x) closes its connection state on the first GOAWAY sent or received: any
frame after it, even DATA of a stream the GOAWAY lets finish or the PING that
gRPC's graceful shutdown sends between its two GOAWAYs, is then a protocol
error. A relay must pass GOAWAY on and keep serving the streams it spares
(RFC 9113 6.8), so the relay handles GOAWAY itself: ``GoAwaySplitter`` takes
the GOAWAY frames out of the bytes before they reach h2, and ``goaway_frame``
builds the ones the relay sends. Everything else passes to h2 untouched and in
order; malformed GOAWAY frames (on a stream, shorter than 8 bytes) are left in
for h2 to refuse.

Reading every frame header here also enforces the frame size limit as soon as a
header announces more: h2 buffers a whole frame before it checks its length, so
a peer could make it hold up to 16 MiB per connection.
"""

from __future__ import annotations

from dataclasses import dataclass

FRAME_HEADER = 9
GOAWAY_TYPE = 0x7
CLIENT_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


class OverlongFrame(ValueError):
    """A frame header announced more than the frame size limit."""


@dataclass(frozen=True)
class GoAway:
    last_stream_id: int
    error_code: int
    debug_data: bytes


def goaway_frame(last_stream_id: int, error_code: int) -> bytes:
    """A GOAWAY frame (no debug data)."""
    payload = (last_stream_id & 0x7FFFFFFF).to_bytes(4, "big") + error_code.to_bytes(4, "big")
    return len(payload).to_bytes(3, "big") + bytes([GOAWAY_TYPE, 0]) + bytes(4) + payload


class GoAwaySplitter:
    """Cuts a connection's inbound bytes into runs for h2 and GOAWAY frames.

    ``preface``: bytes that precede the first frame (the client preface, on the
    server side of a connection); passed through without being read as frames."""

    def __init__(self, *, preface: int = 0, max_frame_size: int = 1 << 24) -> None:
        self._preface_left = preface
        self._skip = 0  # bytes of the current (non-GOAWAY) frame still to pass through
        self._carry = b""  # an incomplete frame header, or an incomplete GOAWAY frame
        self.max_frame_size = max_frame_size

    def split(self, data: bytes | bytearray) -> list[bytes | GoAway]:
        """``data`` as, in order, byte runs for h2 and the GOAWAY frames among them."""
        buffer = memoryview(self._carry + bytes(data)) if self._carry else memoryview(data)
        self._carry = b""
        size = len(buffer)
        position = 0
        if self._preface_left:
            taken = min(self._preface_left, size)
            self._preface_left -= taken
            position += taken
        if self._skip:
            taken = min(self._skip, size - position)
            self._skip -= taken
            position += taken
        pieces: list[bytes | GoAway] = []
        start = 0
        while position < size:
            if size - position < FRAME_HEADER:
                self._carry = bytes(buffer[position:])
                break
            length = int.from_bytes(buffer[position : position + 3], "big")
            kind = buffer[position + 3]
            stream = int.from_bytes(buffer[position + 5 : position + 9], "big") & 0x7FFFFFFF
            end = position + FRAME_HEADER + length
            if length > self.max_frame_size:
                raise OverlongFrame(f"a frame of {length} bytes (the limit is {self.max_frame_size})")
            if kind == GOAWAY_TYPE and stream == 0 and length >= 8:
                if end > size:
                    self._carry = bytes(buffer[position:])
                    break
                if position > start:
                    pieces.append(bytes(buffer[start:position]))
                body = buffer[position + FRAME_HEADER : end]
                last = int.from_bytes(body[0:4], "big") & 0x7FFFFFFF
                pieces.append(GoAway(last, int.from_bytes(body[4:8], "big"), bytes(body[8:])))
                start = position = end
            elif end <= size:
                position = end
            else:
                self._skip = end - size
                position = size
        if position > start:
            pieces.append(bytes(buffer[start:position]))
        return pieces
