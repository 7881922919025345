"""Where to reach a node: NodeId -> proxy (host, port).

The CONNECT edge resolves ``<encoded NodeId>:<PORT>`` targets through it, so any
CONNECT client (curl, grpcio's ``grpc.http_proxy``) can name a node by its NodeId
alone.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

from proxy.identity.node_id import NodeId


class AddressBook(Mapping[NodeId, tuple[str, int]]):
    """A mutable NodeId -> (host, port) map; the proxy only reads it."""

    def __init__(self, entries: Mapping[NodeId, tuple[str, int]] | None = None) -> None:
        self._entries: dict[NodeId, tuple[str, int]] = {}
        for node_id, (host, port) in (entries or {}).items():
            self.set(node_id, host, port)

    def set(self, node_id: NodeId, host: str, port: int) -> None:
        if not isinstance(node_id, NodeId):
            raise TypeError(f"expected a NodeId, got {type(node_id).__name__}")
        if not 0 < port < 65536:
            raise ValueError(f"port out of range: {port}")
        self._entries[node_id] = (host, port)

    def remove(self, node_id: NodeId) -> None:
        self._entries.pop(node_id, None)

    def __getitem__(self, node_id: NodeId) -> tuple[str, int]:
        return self._entries[node_id]

    def __iter__(self) -> Iterator[NodeId]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)
