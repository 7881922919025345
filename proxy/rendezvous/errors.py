"""Typed errors of the rendezvous layer (keyed messages, addresses, records, lookups)."""

from __future__ import annotations

from proxy.identity.errors import KeynodeError


class RendezvousError(KeynodeError):
    """Keyed messages, multiserver addresses, signed records, relay lookups."""


# --- keyed messages: each is one reason a received datagram is dropped and counted


class MessageRejected(RendezvousError):
    """A keyed message that is dropped; ``reason`` names the counter it goes to."""

    reason = "rejected"


class Malformed(MessageRejected):
    """Not a keyed message of a known version, type and layout."""

    reason = "malformed"


class Unauthenticated(MessageRejected):
    """The box did not open with the key the sender's NodeId gives: forged or corrupted."""

    reason = "unauthenticated"


class Stale(MessageRejected):
    """The timestamp inside is more than the allowed skew away from now."""

    reason = "stale"


class Replayed(MessageRejected):
    """A nonce already seen from this sender within the window (or older than it)."""

    reason = "replayed"


class Overloaded(MessageRejected):
    """The replay table is full of live senders: a new sender waits for room."""

    reason = "overloaded"


# --- addresses and records


class AddressInvalid(RendezvousError, ValueError):
    """Text that is not a multiserver address list keynode understands."""

    http_status = 400


class RecordInvalid(RendezvousError, ValueError):
    """A signed address record that cannot be read."""

    http_status = 400


class RecordForged(RecordInvalid):
    """A record whose signature does not verify under the NodeId it names."""


class RecordOutdated(RecordInvalid):
    """A record whose sequence number is not above the one already held."""


class RelayServerInvalid(RendezvousError, ValueError):
    """A `[relay] servers` entry that is not `<NodeId>@host:port`."""


# --- lookups and punching


class RendezvousUnavailable(RendezvousError):
    """No relay node is configured or none answered (HTTP 502)."""

    http_status = 502


class NodeNotFound(RendezvousError):
    """No relay node knows the NodeId (it is not registered anywhere we asked) (HTTP 502)."""

    http_status = 502


class NoDirectPath(RendezvousError):
    """The target was introduced but no authenticated path appeared within the punch
    window (HTTP 502): both NATs are hard (needs a relay, issue 14)."""

    http_status = 502


class NoRelayRoute(RendezvousError):
    """No relay node to reach a peer through: none registered, none known for it."""

    http_status = 502


class RelayPingTimeout(RendezvousError):
    """No authenticated PATH_PONG came back over a relayed path in time."""

    http_status = 504
