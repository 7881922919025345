"""The keyed-message wire format (shared decision 2) and the checks on receipt.

    00 00 00 tt | 0x01 | sender NodeId (32) | nonce (24) | box(plaintext)
    plaintext = tt | unix ms (u64) | body

The box is NaCl's (XSalsa20-Poly1305) keyed by the X25519 keys of the sender and
the receiver (keys.py). The type is repeated inside the box so the clear one
cannot be swapped. Byte 4 is the version, 0x01, so bytes 4-7 never equal STUN's
cookie (0x2112A442). A message is dropped, and counted by reason, when it is
malformed, does not open (forged, corrupted, or not for us), its timestamp is
more than MAX_SKEW from now (stale), or its nonce was seen from that sender
within the window (replayed).

New senders cost a shared key (about 94 us): how many may be built is limited per
source host (``NEW_KEYS_BURST``, ``NEW_KEYS_RATE``) and overall (ten times that), so
a flood of messages under made-up NodeIds costs little; what is over the limit is
dropped as overloaded before any crypto.

Replay window: per sender the nonces of the last MAX_SKEW (up to
NONCES_PER_SENDER, and MAX_NONCES over all senders; when a sender's share is full,
or the total, its oldest goes and nothing at or below its timestamp is accepted
from that sender any more). At most MAX_SENDERS senders are tracked; a sender is
forgotten only once everything it sent is stale anyway, so forgetting opens no
window for a replay; a new sender finding the table full of live ones is dropped
(overloaded).
"""

from __future__ import annotations

import os
import struct
from collections import OrderedDict
from dataclasses import dataclass, field

import nacl.bindings
import nacl.exceptions

from proxy.identity.node_id import NodeId
from proxy.rendezvous.buckets import TokenBuckets
from proxy.rendezvous.errors import Malformed, Overloaded, Replayed, Stale, Unauthenticated
from proxy.rendezvous.keys import KeyRing

VERSION = 1
NONCE_SIZE = 24
MAC_SIZE = 16
HEADER = struct.Struct("!4sB32s24s")  # 00 00 00 tt, version, sender, nonce
INNER = struct.Struct("!BQ")  # tt, unix ms
MIN_SIZE = HEADER.size + MAC_SIZE + INNER.size
MAX_SIZE = 1400  # keyed messages fit one datagram on any path
MAX_SKEW_MS = 30_000
NONCES_PER_SENDER = 256
MAX_SENDERS = 16384  # above the relay's registration table (10000)
MAX_NONCES = 131072  # over all senders (each about 100 bytes kept)
MIN_TYPE, MAX_TYPE = 2, 255
NEW_KEYS_BURST = 50.0  # shared keys built per source host: burst, then per second
NEW_KEYS_RATE = 50.0


def seal(keyring: KeyRing, receiver: bytes, message_type: int, body: bytes, wall_ms: int,
         nonce: bytes | None = None, max_size: int = MAX_SIZE) -> bytes:
    """One keyed message from this node to ``receiver`` (a raw NodeId); at most
    ``max_size`` bytes (relayed datagrams have their own bound, relay_udp.py)."""
    if not MIN_TYPE <= message_type <= MAX_TYPE:
        raise ValueError(f"keyed message type {message_type} out of range")
    nonce = os.urandom(NONCE_SIZE) if nonce is None else nonce
    plaintext = INNER.pack(message_type, wall_ms) + body
    boxed = nacl.bindings.crypto_box_easy_afternm(plaintext, nonce, keyring.shared_key(receiver))
    data = HEADER.pack(bytes((0, 0, 0, message_type)), VERSION, keyring.node_id_bytes, nonce) + boxed
    if len(data) > max_size:
        raise ValueError(f"keyed message of {len(data)} bytes exceeds {max_size}")
    return data


@dataclass
class _Sender:
    nonces: OrderedDict[bytes, int] = field(default_factory=OrderedDict)
    floor_ms: int = -1  # nothing at or below it is accepted (the window overflowed)
    newest_ms: int = 0


@dataclass(frozen=True)
class Opened:
    sender: NodeId
    message_type: int
    body: bytes
    wall_ms: int


class Opener:
    """Opens received keyed messages; counts what it drops by reason (``dropped``)."""

    def __init__(self, keyring: KeyRing, *, max_senders: int = MAX_SENDERS, max_size: int = MAX_SIZE,
                 dropped: dict[str, int] | None = None, nonces_per_sender: int | None = None,
                 max_nonces: int | None = None) -> None:
        self.keyring = keyring
        self.max_senders = max_senders
        self.max_size = max_size
        # A sender's share must exceed what it can send within one millisecond (its
        # oldest nonce's stamp becomes its floor): relayed datagrams need far more.
        self.nonces_per_sender = nonces_per_sender
        self.max_nonces = max_nonces  # None: the module's bounds (read when used)
        self._senders: OrderedDict[bytes, _Sender] = OrderedDict()
        # ``dropped``: another Opener's counters to share (one socket, one account).
        self.dropped: dict[str, int] = dropped if dropped is not None else {
            "malformed": 0, "unauthenticated": 0, "stale": 0, "replayed": 0, "overloaded": 0}
        self.opened = 0
        self._total = 0  # nonces held over all senders
        self.new_keys_per_source = TokenBuckets(NEW_KEYS_BURST, NEW_KEYS_RATE, limit=4096)
        self.new_keys_overall = TokenBuckets(NEW_KEYS_BURST * 10, NEW_KEYS_RATE * 10, limit=1)

    def open(self, data: bytes, wall_ms: int, source_host: str = "", now: float = 0.0) -> Opened:
        """The message, or a MessageRejected subclass (already counted). ``source_host``
        and ``now`` (monotonic) charge the new-key budget."""
        try:
            opened = self._open(data, wall_ms, source_host, now)
        except (Malformed, Unauthenticated, Stale, Replayed, Overloaded) as error:
            self.dropped[error.reason] += 1
            raise
        self.opened += 1
        return opened

    def _open(self, data: bytes, wall_ms: int, source_host: str, now: float) -> Opened:
        if not MIN_SIZE <= len(data) <= self.max_size:
            raise Malformed(f"keyed message of {len(data)} bytes")
        magic, version, sender, nonce = HEADER.unpack_from(data)
        message_type = magic[3]
        if magic[:3] != b"\x00\x00\x00" or message_type < MIN_TYPE or version != VERSION:
            raise Malformed("not a keyed message of version 1")
        if sender == self.keyring.node_id_bytes:
            raise Unauthenticated("a message claiming to come from this node")
        if not self.keyring.has_shared_key(sender) and not (
            self.new_keys_per_source.take(source_host, now) and self.new_keys_overall.take("", now)
        ):
            raise Overloaded("too many new senders from this source")
        key = self.keyring.shared_key(sender)
        try:
            plaintext = nacl.bindings.crypto_box_open_easy_afternm(data[HEADER.size:], nonce, key)
        except (nacl.exceptions.CryptoError, nacl.exceptions.ValueError, nacl.exceptions.TypeError):
            raise Unauthenticated("the box does not open") from None
        if len(plaintext) < INNER.size:
            raise Malformed("box too short")
        inner_type, stamp = INNER.unpack_from(plaintext)
        if inner_type != message_type:
            raise Malformed("the type inside differs from the type outside")
        if abs(stamp - wall_ms) > MAX_SKEW_MS:
            raise Stale(f"timestamp {stamp - wall_ms:+d} ms from now")
        self._check_replay(sender, nonce, stamp, wall_ms)
        return Opened(NodeId(sender), message_type, plaintext[INNER.size:], stamp)

    def _check_replay(self, sender: bytes, nonce: bytes, stamp: int, wall_ms: int) -> None:
        senders = self._senders
        state = senders.get(sender)
        if state is None:
            if len(senders) >= self.max_senders:
                _, oldest = next(iter(senders.items()))
                # Everything it sent is stale now, so forgetting it lets no replay in.
                if oldest.newest_ms + MAX_SKEW_MS >= wall_ms:
                    raise Overloaded("replay table full of live senders")
                self._forget(*senders.popitem(last=False))
            state = senders[sender] = _Sender()
        else:
            senders.move_to_end(sender)
        nonces = state.nonces
        if stamp <= state.floor_ms or nonce in nonces:
            raise Replayed("nonce seen before from this sender")
        # Forget this sender's nonces that went stale (anything that old is refused as
        # stale), and its oldest one when it holds its share.
        while nonces:
            first_nonce, first_stamp = next(iter(nonces.items()))
            if first_stamp + MAX_SKEW_MS >= wall_ms and len(nonces) < (self.nonces_per_sender or NONCES_PER_SENDER):
                break
            self._evict(state, wall_ms)
        nonces[nonce] = stamp
        self._total += 1
        state.newest_ms = max(state.newest_ms, stamp)
        # All senders together hold at most MAX_NONCES: the least recently heard lose
        # their oldest first (their floor rises, so nothing evicted can come back).
        while self._total > (self.max_nonces or MAX_NONCES):
            _, victim = next(iter(senders.items()))
            if victim.nonces:
                self._evict(victim, wall_ms)
            else:
                senders.move_to_end(next(iter(senders)))

    def _evict(self, state: _Sender, wall_ms: int) -> None:
        first_nonce, first_stamp = state.nonces.popitem(last=False)
        self._total -= 1
        if first_stamp + MAX_SKEW_MS >= wall_ms:
            state.floor_ms = max(state.floor_ms, first_stamp)  # evicted while live

    def _forget(self, sender: bytes, state: _Sender) -> None:
        self._total -= len(state.nonces)

    @property
    def nonce_count(self) -> int:
        return self._total

    @property
    def sender_count(self) -> int:
        return len(self._senders)
