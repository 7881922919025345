"""Where a forward connection goes: a host and port resolved for the UDP socket's
family, or a NodeId found through the address book or the relay nodes."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import trio

from proxy.identity.node_id import NodeId
from proxy.identity.tls_config import TLSConfig
from proxy.rendezvous.addresses import RelayAddress
from proxy.rendezvous.driver import RendezvousService
from proxy.rendezvous.errors import RendezvousUnavailable
from proxy.rendezvous.keys import KeyRing
from proxy.rendezvous.node import RendezvousTimers
from proxy.tunnel.errors import ConnectionStartError
from proxy.tunnel.hosts import HostPortInvalid, ip_literal, parse_host
from proxy.tunnel.peer import Address, normalize_address


async def resolve_address(host: str, port: int, proxy_host: str) -> Address:
    """An IP literal as is, a name resolved for the family of the socket bound to
    ``proxy_host``; ConnectionStartError (502) otherwise."""
    if not 0 < port < 65536:
        raise ConnectionStartError(f"cannot connect to port {port}")
    try:
        host = parse_host(host, allow_wildcard=False)
    except HostPortInvalid as error:
        raise ConnectionStartError(f"cannot connect to {host!r}: {error}") from None
    ip = ip_literal(host)
    if ip is not None:
        return normalize_address((str(ip), port))
    if proxy_host == "::":
        family = trio.socket.AF_UNSPEC  # dual stack
    elif ":" in proxy_host:
        family = trio.socket.AF_INET6
    else:
        family = trio.socket.AF_INET
    try:
        infos = await trio.socket.getaddrinfo(host, port, family=family, type=trio.socket.SOCK_DGRAM)
    except OSError as error:
        raise ConnectionStartError(f"cannot resolve {host}: {error}") from error
    for _, _, _, _, sockaddr in infos:
        address = normalize_address(sockaddr)
        resolved = ip_literal(address[0])
        if resolved is not None and resolved.is_unspecified:
            # "0" resolves to 0.0.0.0, which Linux connects to this host.
            raise ConnectionStartError(f"cannot connect to {host!r}: it names the wildcard address {resolved}")
        return address
    raise ConnectionStartError(f"no usable address for {host}")


async def find_path(
    node_id: NodeId,
    address_book: Mapping[NodeId, tuple[str, int]],
    rendezvous: RendezvousService | None,
    proxy_host: str,
    live: Address | None = None,
) -> Address:
    """The address book's entry for ``node_id``, else where a live tunnel with it goes
    (``live``), else the path the relay nodes' introduction and both sides' punching
    confirmed (proxy.rendezvous errors, 502)."""
    known = address_book.get(node_id)
    if known is not None:
        return await resolve_address(known[0], known[1], proxy_host)
    if live is not None:
        return live
    if rendezvous is None:
        raise RendezvousUnavailable(f"no address known for {node_id}: no [peers] entry and no [relay] servers")
    return normalize_address(await rendezvous.find_path(node_id))


@dataclass(frozen=True)
class RendezvousOptions:
    """What the Proxy's rendezvous does: the relay nodes it registers with and asks,
    whether it serves as one, and relay nodes named for a peer by its address list
    or record in [peers] (its home relays, asked for that peer only)."""

    relay_servers: tuple[RelayAddress, ...] = ()
    serve: bool = False
    peer_relays: Mapping[NodeId, tuple[RelayAddress, ...]] = field(default_factory=dict)
    timers: RendezvousTimers | None = None

    @property
    def finds_by_node_id(self) -> bool:
        return bool(self.relay_servers or self.peer_relays)


async def start_rendezvous(
    nursery: trio.Nursery, endpoint: Any, tls_config: TLSConfig, options: RendezvousOptions
) -> RendezvousService | None:
    """The node's rendezvous, started in ``nursery``, when it has relays or is one."""
    if not options.finds_by_node_id and not options.serve:
        return None
    keyring = KeyRing.from_private_key(tls_config.private_key)
    service = RendezvousService(endpoint, keyring, options.relay_servers, serve=options.serve,
                                home_relays=options.peer_relays, timers=options.timers)
    await nursery.start(service.run)
    return service
