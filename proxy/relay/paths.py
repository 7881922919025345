"""uTP over a relay link: each peer reached through a relay is a virtual path of
the node's endpoint (nat/utp/paths.py), so a tunnel's uTP connection, and the TLS
inside it, run end to end through the relay, and can move to or from a direct path
without a new TLS session (UtpStream.move_to).

The path to ``peer`` via relay R is ``VirtualPath(("relay", R, peer))``. Datagrams the
endpoint sends over it become SEND(peer) on R's link; RECV(source) from R is injected
as arriving over the path to ``source`` (whose NodeId the relay authenticated). The
path for a source is added on its first datagram, so a relayed SYN is accepted like
any other.
"""

from __future__ import annotations

from collections.abc import Callable

from nat.endpoint import Endpoint
from nat.utp.paths import VirtualPath
from proxy.identity.node_id import NodeId
from proxy.relay.link import RelayLink

__all__ = ["RelayPaths", "relay_path"]

MAX_PATHS = 4096  # peers one relay link carries paths for; past it, new sources are dropped


def relay_path(relay: NodeId, peer: NodeId) -> VirtualPath:
    return VirtualPath(("relay", relay, peer))


class RelayPaths:
    """Binds ``link`` to ``endpoint`` (it takes the link's ``on_receive_batch``)."""

    def __init__(self, endpoint: Endpoint, link: RelayLink) -> None:
        self.endpoint = endpoint
        self.link = link
        self.relay = link.relay.node_id
        self._paths: dict[NodeId, VirtualPath] = {}
        self.dropped_sources = 0
        link.on_receive_batch = self._receive_batch

    def path_to(self, peer: NodeId) -> VirtualPath:
        """The virtual path to ``peer`` through this relay (added to the endpoint)."""
        path = self._paths.get(peer)
        if path is None:
            path = self._paths[peer] = relay_path(self.relay, peer)
            self.endpoint.add_path(path, self._sender(peer))
        return path

    def _sender(self, peer: NodeId) -> Callable[[bytes], None]:
        send = self.link.send

        def send_to_peer(datagram: bytes) -> None:
            send(peer, datagram)  # never blocks; a dropped datagram is counted by the link

        return send_to_peer

    def _receive_batch(self, batch: list[tuple[NodeId, bytes]]) -> None:
        start = 0
        while start < len(batch):
            source = batch[start][0]
            end = start + 1
            while end < len(batch) and batch[end][0] == source:
                end += 1
            path = self._paths.get(source)
            if path is None:
                if len(self._paths) >= MAX_PATHS:
                    self.dropped_sources += end - start
                    start = end
                    continue
                path = self.path_to(source)
            self.endpoint.receive_batch_from_path([datagram for _, datagram in batch[start:end]], path)
            start = end

    def close(self) -> None:
        """Remove every path this binding added (their connections stop sending)."""
        for path in self._paths.values():
            self.endpoint.remove_path(path)
        self._paths.clear()
