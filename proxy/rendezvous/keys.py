"""Keys for keyed messages: a node's Ed25519 identity and the X25519 keys it gives.

A NodeId is an Ed25519 public key; libsodium converts it (and the private key) to
X25519, so two NodeIds alone key a NaCl box between them, with no key exchange.
Building a shared key costs about 94 us (conversion + Diffie-Hellman); it is kept
per peer in a bounded cache (least recently used out), after which a box costs
2-3 us.
"""

from __future__ import annotations

from collections import OrderedDict

import nacl.bindings
import nacl.exceptions
import nacl.signing

from proxy.identity.node_id import NodeId
from proxy.rendezvous.errors import Unauthenticated

SHARED_KEY_CACHE = 4096  # peers whose shared key is kept


class KeyRing:
    """This node's keys and a bounded cache of shared box keys per peer NodeId."""

    def __init__(self, seed: bytes, cache_size: int = SHARED_KEY_CACHE) -> None:
        self.signing_key = nacl.signing.SigningKey(seed)
        self.node_id = NodeId(bytes(self.signing_key.verify_key))
        self.node_id_bytes = bytes(self.node_id)
        secret = seed + self.node_id_bytes  # libsodium's 64-byte Ed25519 secret key
        self._curve_secret = nacl.bindings.crypto_sign_ed25519_sk_to_curve25519(secret)
        self._cache: OrderedDict[bytes, bytes] = OrderedDict()
        self.cache_size = cache_size
        self.shared_keys_built = 0

    @classmethod
    def from_private_key(cls, private_key: object) -> KeyRing:
        """From a cryptography Ed25519PrivateKey (the node's TLS key)."""
        return cls(private_key.private_bytes_raw())  # type: ignore[attr-defined]

    @property
    def cached_keys(self) -> int:
        return len(self._cache)

    def has_shared_key(self, peer: bytes) -> bool:
        return peer in self._cache

    def shared_key(self, peer: bytes) -> bytes:
        """The box key between this node and the peer NodeId (32 raw bytes);
        Unauthenticated when the bytes are no valid Ed25519 point."""
        cache = self._cache
        key = cache.get(peer)
        if key is not None:
            cache.move_to_end(peer)
            return key
        try:
            curve_public = nacl.bindings.crypto_sign_ed25519_pk_to_curve25519(peer)
            key = nacl.bindings.crypto_box_beforenm(curve_public, self._curve_secret)
        except (nacl.exceptions.RuntimeError, nacl.exceptions.ValueError, nacl.exceptions.TypeError):
            raise Unauthenticated("the sender NodeId is not a valid public key") from None
        self.shared_keys_built += 1
        cache[peer] = key
        if len(cache) > self.cache_size:
            cache.popitem(last=False)
        return key

    def sign(self, data: bytes) -> bytes:
        return self.signing_key.sign(data).signature


def verify_signature(node_id: bytes, data: bytes, signature: bytes) -> bool:
    try:
        nacl.signing.VerifyKey(node_id).verify(data, signature)
    except (nacl.exceptions.BadSignatureError, nacl.exceptions.ValueError, nacl.exceptions.TypeError):
        return False
    return True
