"""The start status: how the reverse side tells a keynode forward side whether the
tunnel it just opened is ready, or why not.

Since an unannounced caller gets its server connection only once its chain is
verified (DESIGN.md, "nothing works for a stranger"), the reverse side learns that
its server is down after the forward side's TLS handshake is over. A 200 sent then
would be followed by a reset; instead the forward side waits for this status and
answers 200 only on "ready", else 502 saying why.

Negotiated with ALPN, so peers that do not know it are unaffected: the forward
side offers ``ALPN`` (``keynode/1``); a reverse side that knows it selects it; a
peer that does not (the original, Node's TLS, an older keynode) ignores the offer
and nothing is sent. With ``keynode/1`` agreed, the first application bytes the TLS
server sends are one status frame:

    kind (1 byte)   0 ready, 1 refused
    reason (1 byte) 0 for ready; for refused: 1 the server is unavailable (its
                    connect failed, or none is configured), 2 the caller's
                    certificate chain was rejected, 3 the service's allow list
                    does not hold the caller's NodeId (403), 4 no such service
                    (404), 5 the caller's access was revoked during its start
                    (403); other values: refused for a reason the reader does
                    not know (502)
    length (2 bytes, big-endian) of the text, at most MAX_TEXT
    text            UTF-8, the remote's explanation for a person (empty for ready)

After "refused" the reverse side ends TLS with close_notify and uTP FIN. Data
follows "ready" as usual. The codec is sans-IO; ``receive_start_status`` reads
exactly one frame from a stream (nothing beyond it).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import trio

from proxy.tunnel.errors import (
    BadStartStatus,
    ConnectionRefusedByRemote,
    RemoteRejectedChain,
    RemoteServerUnavailable,
    RemoteServiceForbidden,
    RemoteServiceNotFound,
    RemoteServiceRevoked,
)

ALPN = b"keynode/1"

READY = 0
REFUSED = 1

REASON_SERVER_UNAVAILABLE = 1
REASON_CHAIN_REJECTED = 2
REASON_FORBIDDEN = 3
REASON_NO_SUCH_SERVICE = 4
REASON_REVOKED = 5

MAX_TEXT = 1024
_HEADER = struct.Struct("!BBH")


@dataclass(frozen=True)
class StartStatus:
    ready: bool
    reason: int = 0
    text: str = ""


def encode_ready() -> bytes:
    return _HEADER.pack(READY, 0, 0)


def encode_refusal(reason: int, text: str) -> bytes:
    if not 1 <= reason <= 255:
        raise ValueError(f"a refusal reason is 1..255, not {reason}")
    body = text.encode("utf-8", "replace")[:MAX_TEXT]
    return _HEADER.pack(REFUSED, reason, len(body)) + body


def decode_header(header: bytes) -> tuple[int, int, int]:
    """(kind, reason, text length) of a frame's first four bytes; BadStartStatus."""
    kind, reason, length = _HEADER.unpack(header)
    if kind == READY and (reason or length):
        raise BadStartStatus(f"malformed start status (ready with reason {reason}, {length} bytes of text)")
    if kind not in (READY, REFUSED):
        raise BadStartStatus(f"unknown start status kind {kind}")
    if kind == REFUSED and reason == 0:
        raise BadStartStatus("a refusal without a reason")
    if length > MAX_TEXT:
        raise BadStartStatus(f"start status text of {length} bytes (at most {MAX_TEXT})")
    return kind, reason, length


def _printable(text: str) -> str:
    return "".join(character if character.isprintable() else "?" for character in text)


async def _receive_exactly(stream: trio.abc.ReceiveStream, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = await stream.receive_some(size - len(data))
        if not chunk:
            raise BadStartStatus("the remote ended the tunnel before saying whether it is ready")
        data += chunk
    return data


async def receive_start_status(stream: trio.abc.ReceiveStream) -> StartStatus:
    """Read one status frame, and not a byte more."""
    kind, reason, length = decode_header(await _receive_exactly(stream, _HEADER.size))
    text = (await _receive_exactly(stream, length)).decode("utf-8", "replace") if length else ""
    return StartStatus(kind == READY, reason, _printable(text))


def refusal_error(status: StartStatus, what: str) -> ConnectionRefusedByRemote:
    """The typed error for a refusal (502; 403 and 404 for the service policy's),
    saying what the remote said."""
    said = f": {status.text}" if status.text else ""
    if status.reason == REASON_SERVER_UNAVAILABLE:
        return RemoteServerUnavailable(
            f"{what}: the remote node could not connect to its server (down or unreachable from there){said}"
        )
    if status.reason == REASON_CHAIN_REJECTED:
        return RemoteRejectedChain(f"{what}: the remote node rejected this node's certificate chain{said}")
    if status.reason == REASON_FORBIDDEN:
        return RemoteServiceForbidden(f"{what}: forbidden by the remote node's service policy{said}")
    if status.reason == REASON_NO_SUCH_SERVICE:
        return RemoteServiceNotFound(f"{what}: the remote node has no such service{said}")
    if status.reason == REASON_REVOKED:
        return RemoteServiceRevoked(f"{what}: the remote node revoked this node's access{said}")
    return ConnectionRefusedByRemote(f"{what}: the remote node refused the connection (reason {status.reason}){said}")
