"""NodeId: a node's identity, which is its 32-byte Ed25519 public key.

Text form (Polykey-compatible): multibase base32hex, lower case, prefix ``v``, no
padding, so always ``v`` + 52 characters. Decoding is strict: only the canonical
encoding of exactly 32 bytes is accepted, so no two strings name the same node.
"""

from __future__ import annotations

import base64

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from proxy.identity.errors import NodeIdInvalid

NODE_ID_SIZE = 32
MULTIBASE_PREFIX = "v"  # multibase code for base32hex, lower case, no padding
ENCODED_NODE_ID_LENGTH = 53  # prefix + ceil(256 / 5)

_BASE32HEX_ALPHABET = frozenset("0123456789abcdefghijklmnopqrstuv")


class NodeId:
    """An immutable, hashable 32-byte NodeId."""

    __slots__ = ("_bytes",)
    _bytes: bytes

    def __init__(self, value: bytes | bytearray | memoryview) -> None:
        data = bytes(value)
        if len(data) != NODE_ID_SIZE:
            raise NodeIdInvalid(f"a NodeId is {NODE_ID_SIZE} bytes, got {len(data)}")
        object.__setattr__(self, "_bytes", data)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError("NodeId is immutable")

    def __delattr__(self, name: str) -> None:
        raise AttributeError("NodeId is immutable")

    @classmethod
    def from_public_key(cls, public_key: Ed25519PublicKey) -> NodeId:
        if not isinstance(public_key, Ed25519PublicKey):
            raise NodeIdInvalid("a NodeId is an Ed25519 public key")
        return cls(public_key.public_bytes(Encoding.Raw, PublicFormat.Raw))

    def public_key(self) -> Ed25519PublicKey:
        """The Ed25519 public key this NodeId is (raises NodeIdInvalid if not a point)."""
        try:
            return Ed25519PublicKey.from_public_bytes(self._bytes)
        except ValueError as error:
            raise NodeIdInvalid("NodeId is not a valid Ed25519 public key") from error

    def encode(self) -> str:
        text = base64.b32hexencode(self._bytes).decode("ascii").rstrip("=").lower()
        return MULTIBASE_PREFIX + text

    @classmethod
    def decode(cls, text: str) -> NodeId:
        if not isinstance(text, str):
            raise NodeIdInvalid("an encoded NodeId is a str")
        if len(text) != ENCODED_NODE_ID_LENGTH or not text.startswith(MULTIBASE_PREFIX):
            raise NodeIdInvalid("an encoded NodeId is 'v' followed by 52 base32hex characters")
        body = text[1:]
        if not set(body) <= _BASE32HEX_ALPHABET:
            raise NodeIdInvalid("an encoded NodeId uses lower-case base32hex only")
        padded = body.upper() + "=" * (-len(body) % 8)
        try:
            data = base64.b32hexdecode(padded)
        except ValueError as error:  # binascii.Error is a ValueError
            raise NodeIdInvalid("an encoded NodeId is not valid base32hex") from error
        node_id = cls(data)
        # The last character carries 4 padding bits: only the all-zero form is canonical.
        if node_id.encode() != text:
            raise NodeIdInvalid("an encoded NodeId is not in canonical form")
        return node_id

    def __bytes__(self) -> bytes:
        return self._bytes

    def __str__(self) -> str:
        return self.encode()

    def __repr__(self) -> str:
        return f"NodeId({self.encode()!r})"

    def __eq__(self, other: object) -> bool:
        if isinstance(other, NodeId):
            return self._bytes == other._bytes
        return NotImplemented

    def __hash__(self) -> int:
        return hash((NodeId, self._bytes))

    def __lt__(self, other: NodeId) -> bool:
        if isinstance(other, NodeId):
            return self._bytes < other._bytes
        return NotImplemented

    def __reduce__(self) -> tuple[type[NodeId], tuple[bytes]]:
        return (NodeId, (self._bytes,))
