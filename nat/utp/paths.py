"""Paths: where a uTP connection's datagrams go, and where its peer's come from.

A connection's *path* is either

- a direct UDP address: ``(host, port)`` (or an IPv6 4-tuple), whose datagrams
  the driver sends from its socket; or
- a :class:`VirtualPath`: an opaque key the caller chooses (for example
  ``VirtualPath(("relay", relay_node_id, peer_node_id))``), whose datagrams the
  driver hands to a sender registered for that key (``Endpoint.add_path``)
  instead of the socket, and whose incoming datagrams the caller injects
  (``Endpoint.receive_from_path``).

The multiplexer treats both alike: a connection is keyed by (path, connection
id), a SYN arriving over a virtual path opens a connection bound to it, and
``UtpMultiplexer.move_connection`` rekeys a live connection onto another path
(the uTP wire format is the same on every path). Only the driver tells them
apart, by type: ``type(path) is VirtualPath``.

A ``VirtualPath`` is a one-field named tuple, so it hashes and compares in C
(the multiplexer looks up (path, id) for every datagram) and fits wherever an
address does; a direct address's first field is a host string, so no address
equals a virtual path.

Packet size: a connection's packet size is fixed when it is made, from its first
path (``UtpConfig.mtu_payload``, or ``mtu_payload_ipv6`` for an IPv6 address; a
virtual path gets ``mtu_payload``), because sequence numbers are per packet and
packets in flight are resent as they are. Every path a connection moves to must
therefore carry datagrams of up to that size plus the 20-byte header (and the
SACK extension, at most ``mtu_payload + 20`` in all): a relay whose framing needs
room lowers ``mtu_payload`` for the endpoint instead.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import NamedTuple

from nat.utp.states import Address

__all__ = ["VirtualPath", "Path", "path_host", "is_ipv6_path"]


class VirtualPath(NamedTuple):
    """A path that is not a UDP address of ours: datagrams over it go to the
    sender registered for it (a relay link, say). ``key`` is any hashable value
    the caller picks; two VirtualPaths with equal keys are the same path."""

    key: Hashable


# A connection's path: a direct address or a VirtualPath (both tuples).
Path = Address


def path_host(path: Path) -> object:
    """What the multiplexer's per-source limits count by: an address's host (every
    port of one IP shares the SYN limit), a virtual path itself."""
    if type(path) is VirtualPath:
        return path
    return path[0]


def is_ipv6_path(path: Path) -> bool:
    """A direct IPv6 address (libutp's smaller packet ceiling applies)."""
    return type(path) is not VirtualPath and ":" in str(path[0])
