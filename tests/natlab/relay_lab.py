"""Relay nodes in the lab, nodes that know only their relay nodes, CONNECT by NodeId.

A relay node is a `keynode run` with `[relay] serve = true` on a public lab host.
Every other node is configured with its own `[server]` (when it has one) and
`[relay] servers` alone: no `[peers]`, so the only way it finds another node is by
asking its relay nodes. The test process CONNECTs through a node's forward port to
`<NodeId>:<port>` (the NodeId form of the CONNECT target) and keeps the answer's
status, time and error text.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from .proxies import CHUNK, KeynodeNode, forward_port_socket, send_connect, start_node

if TYPE_CHECKING:
    from .nat_rules import NatKind
    from .topology import Host, Lab

RELAY_PORT = 4000
# Values of `nat_mapping` in `keynode status --json` once a node has compared what
# two relay nodes observed (RFC 4787 terms).
ENDPOINT_INDEPENDENT = "endpoint-independent"
ENDPOINT_DEPENDENT = "endpoint-dependent"


def relay_entry(relay: KeynodeNode) -> str:
    """`<NodeId>@<public ip>:<port>`: how `[relay] servers` names a relay node."""
    assert relay.public is not None
    return f"{relay.node_id}@{relay.public[0]}:{relay.public[1]}"


def relay_servers_config(relays: Sequence[KeynodeNode]) -> list[str]:
    """The `[relay]` section of a node that registers with `relays`."""
    entries = ", ".join(f'"{relay_entry(relay)}"' for relay in relays)
    return ["[relay]", f"servers = [{entries}]"]


def start_relay_node(lab: Lab, directory: Path, *, name: str, port: int = RELAY_PORT,
                     timeouts: dict[str, float] | None = None) -> KeynodeNode:
    """A relay node (`[relay] serve = true`) alone on a new public host, listening on
    `port`; not yet waited for (call `wait_ready`)."""
    host = lab.add_public_host(name)
    return start_node(host, directory, name=name, proxy_port=port, public_ip=host.address,
                      timeouts=timeouts, extra_config=["[relay]", "serve = true"])


def add_node_host(lab: Lab, role: str, kind: NatKind | None, *, udp_timeout: float) -> tuple[Host, str]:
    """A host for one node: public (kind None) or alone behind a new router of `kind`
    whose UDP mappings expire after `udp_timeout` s of silence. Returns the host and
    its public IP (what a relay node observes)."""
    if kind is None:
        host = lab.add_public_host(f"{role}-public")
        return host, host.address
    site = lab.add_site(f"{role}-{kind.value}", kind, udp_timeout=udp_timeout)
    return site.add_host("node"), site.public_address


# --- CONNECT by NodeId ------------------------------------------------------------------


@dataclass
class ConnectOutcome:
    status: int
    elapsed: float  # seconds from sending CONNECT to its answer's head
    message: str = ""  # the error body (empty on 200)
    stream: trio.SocketStream | None = None  # the tunnel, when 200
    leftover: bytes = b""  # tunnel bytes that came with the 200


async def connect_by_node_id(node: KeynodeNode, target_node_id: str, port: int,
                             *, timeout: float = 30.0) -> ConnectOutcome:
    """`CONNECT <NodeId>:<port>` through `node`'s forward port, from inside its namespace."""
    target = f"{target_node_id}:{port}"
    sock, stream = forward_port_socket(node)
    try:
        with trio.fail_after(timeout):
            started, answer, answered_at = await send_connect(node, sock, stream, target, target)
            elapsed = answered_at - started
            head, _, rest = answer.partition(b"\r\n\r\n")
            status = int(head.split(b" ", 2)[1])
            if status == 200:
                return ConnectOutcome(status, elapsed, stream=stream, leftover=rest)
            length = _content_length(head)
            while len(rest) < length and (data := await stream.receive_some(CHUNK)):
                rest += data
    except BaseException:
        await stream.aclose()
        raise
    await stream.aclose()
    return ConnectOutcome(status, elapsed, rest.decode(errors="replace").strip())


def _content_length(head: bytes) -> int:
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value.strip())
    return 0


# --- what a node's status says ----------------------------------------------------------


def split_address(text: str) -> tuple[str, int]:
    """`host:port` or `[v6]:port` as (host, port)."""
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port)


def observed_addresses(status: dict[str, Any]) -> list[tuple[str, int]]:
    """`observed_addresses` of a status: one entry per relay node that answered,
    `{"address": "host:port", "relay": NodeId}`; the addresses, in that order."""
    return [split_address(entry["address"]) for entry in status["observed_addresses"]]


async def wait_for_nat_mapping(node: KeynodeNode, timeout: float) -> dict[str, Any]:
    """Poll `status` until the node has an observed address and has classified its
    mapping (two relay nodes answered); returns that status."""
    with trio.move_on_after(timeout):
        while True:
            status = await node.status()
            if status.get("observed_addresses") and status.get("nat_mapping") in (
                    ENDPOINT_INDEPENDENT, ENDPOINT_DEPENDENT):
                return status
            await trio.sleep(0.2)
    status = await node.status()
    raise AssertionError(f"{node.name}: no classified mapping after {timeout} s: "
                         f"observed_addresses={status.get('observed_addresses')!r} "
                         f"nat_mapping={status.get('nat_mapping')!r}")


def rows_between(status: dict[str, Any], node_id: str, public_ip: str) -> list[dict[str, Any]]:
    """`status` connection rows toward one peer: its NodeId, or (a prepared row, no
    NodeId yet) its public IP."""
    rows = []
    for row in status["connections"]:
        host = split_address(row["remote"])[0] if row.get("remote") else None
        if row.get("node_id") == node_id or host == public_ip:
            rows.append(row)
    return rows
