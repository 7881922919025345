"""Reach a node by its NodeId alone, across every pair of NAT kinds.

Two relay nodes (`[relay] serve = true`), each alone on a public lab host. Ten
`keynode run` nodes, each in its own lab host: a forward node behind each NAT kind
and one public, a reverse node behind each kind and one public with a grpcio echo
server beside it (two nodes behind one router would need hairpinning). Every node
is configured with its own `[server]` (reverse nodes) and `[relay] servers` naming
both relay nodes: no `[peers]`, no address told by the test. Every router forgets
a UDP mapping after 30 s of silence.

Two relay nodes, not one: a node learns whether its NAT's mapping depends on the
destination by comparing the addresses two relay nodes observe for its one UDP
socket (a symmetric NAT shows them two different ports). One relay node with two
addresses on one socket would not do: its answers would leave from the primary
address, which a restricted NAT does not admit.

All 25 cells run at once: the test CONNECTs through the forward node to
`<reverse NodeId>:<port>` and makes a gRPC call through the tunnel. Expected
(issues 13 and 14): 25 of 25 connect within 3 s; directly everywhere except
symmetric <-> port-restricted (both ways) and symmetric <-> symmetric, which
punch nothing and start over a relay node once the punch window (1 s) has passed
(status rows: path "relay", via one of the relay nodes; the background punch never
succeeds, so they stay relayed). Each relayed cell also carries 64 MiB each way
through a second service of the reverse node (`[services.bulk]`, an exchange
server), sha256-equal. Then, for all cells at once: 2 minutes idle
(the tunnels stay open), a second call on each tunnel; the tunnels are closed, the
pairs' own NAT mappings left to expire (30 s), and a new CONNECT by NodeId must
connect again within 3 s: only the nodes' registrations with the relay nodes were
kept open meanwhile.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trio

from tests.natlab import NatKind, open_lab
from tests.natlab.processes import LabProcess
from tests.natlab.proxies import KeynodeNode, exchange, grpc_channel_through, start_node, start_server, wait_ready
from tests.natlab.relay_lab import (
    ENDPOINT_DEPENDENT,
    ENDPOINT_INDEPENDENT,
    add_node_host,
    connect_by_node_id,
    observed_addresses,
    relay_entry,
    relay_servers_config,
    rows_between,
    split_address,
    start_relay_node,
    wait_for_nat_mapping,
)

KINDS: list[NatKind | None] = [None, NatKind.FULL_CONE, NatKind.ADDRESS_RESTRICTED,
                               NatKind.PORT_RESTRICTED, NatKind.SYMMETRIC]
LABELS = {None: "public", NatKind.FULL_CONE: "full cone", NatKind.ADDRESS_RESTRICTED: "addr-restricted",
          NatKind.PORT_RESTRICTED: "port-restricted", NatKind.SYMMETRIC: "symmetric"}
# Far above every answer expected here, so that a start that merely timed out can
# never pass for a fast failure.
CONN_CONNECT_TIME = 10.0
DIRECT_WITHIN = 3.0  # issue 13: a direct connection within 3 s of the CONNECT
# A hopeless pair starts relayed once its punch window (1 s) has passed (the node
# cannot know beforehand: symmetric -> port-restricted fails where symmetric ->
# addr-restricted, an identical mapping, works): lookup + window + a relayed start.
RELAYED_WITHIN = 3.0
BULK = 64 << 20  # each way, in the relayed cells
BULK_PORT = 1314  # [services.bulk] port of every reverse node
BULK_TIMEOUT = 300.0
UDP_TIMEOUT = 30.0  # every router's UDP mapping timeout
IDLE = 120.0
CALL_TIMEOUT = 10.0
CLASSIFY_TIMEOUT = 30.0
CLEANUP_TIMEOUT = 15.0
DIRECT = "direct"
RELAY = "relay"


def expected_direct(forward: NatKind | None, reverse: NatKind | None) -> bool:
    """Issue 13's table: 22 of 25 cells connect directly (the rest relayed, issue 14)."""
    pair = {forward, reverse}
    return pair != {NatKind.SYMMETRIC} and pair != {NatKind.SYMMETRIC, NatKind.PORT_RESTRICTED}


@dataclass
class Attempt:
    """One CONNECT by NodeId and, when it was answered 200, a gRPC call through it."""

    status: int = 0
    elapsed: float = 0.0
    message: str = ""
    call: str = "-"  # "ok", or what went wrong

    def connected(self) -> bool:
        return self.status == 200 and self.call == "ok"



@dataclass
class Cell:
    forward: NatKind | None
    reverse: NatKind | None
    first: Attempt = field(default_factory=Attempt)
    after_idle_call: str = "-"  # the second call on the first tunnel, after IDLE
    second: Attempt = field(default_factory=Attempt)
    bulk: str = "-"  # relayed cells: the 64 MiB exchange, "ok" or what differed
    bulk_seconds: float = 0.0
    bulk_digests: tuple[str, str] = ("", "")  # sha256 sent, received
    problems: list[str] = field(default_factory=list)  # from the status checks

    @property
    def name(self) -> str:
        return f"{LABELS[self.forward]} -> {LABELS[self.reverse]}"

    @property
    def expected(self) -> str:
        return DIRECT if expected_direct(self.forward, self.reverse) else RELAY

    def outcome(self) -> str:
        """What happened, in the table's words, or the first thing that differed."""
        within = DIRECT_WITHIN if self.expected == DIRECT else RELAYED_WITHIN
        for label, attempt in (("first", self.first), ("after idle", self.second)):
            if not attempt.connected():
                return f"{label}: {attempt.status} {attempt.call}"
            if attempt.elapsed > within:
                return f"{label}: {attempt.elapsed:.1f}s"
        if self.after_idle_call != "ok":
            return f"idle: {self.after_idle_call}"
        if self.expected == RELAY and self.bulk != "ok":
            return f"bulk: {self.bulk}"
        if self.problems:
            return "status: see below"
        return self.expected

    def detail(self) -> str:
        parts = [f"{self.name}: first {self.first.status} in {self.first.elapsed:.2f}s"]
        if self.first.message:
            parts.append(f"({self.first.message!r})")
        parts.append(f"call {self.first.call}; after idle: call {self.after_idle_call}, "
                     f"new CONNECT {self.second.status} in {self.second.elapsed:.2f}s call {self.second.call}")
        if self.second.message and self.second.message != self.first.message:
            parts.append(f"({self.second.message!r})")
        if self.expected == RELAY:
            parts.append(f"64 MiB each way relayed: {self.bulk} in {self.bulk_seconds:.1f}s")
        parts.extend(self.problems)
        return " ".join(parts)


async def attempt_call(call: Any, payload: bytes) -> str:
    import grpc

    try:
        reply = await call(payload, CALL_TIMEOUT)
    except grpc.RpcError as error:
        return f"{error.code()}: {error.details()}"
    return "ok" if reply == payload else "wrong reply"


async def run_cell(cell: Cell, forward: KeynodeNode, reverse: KeynodeNode, port: int,
                   connected: trio.Event, idle_over: trio.Event) -> None:
    """The first CONNECT and call; keeps the tunnel open until `idle_over`, then calls
    again and closes it."""
    try:
        answer = await connect_by_node_id(forward, reverse.node_id, port, timeout=CONN_CONNECT_TIME + 10)
        first = cell.first
        first.status, first.elapsed, first.message = answer.status, answer.elapsed, answer.message
        if answer.stream is None:
            return
        async with grpc_channel_through(answer.stream, answer.leftover) as call:
            payload = f"{cell.name}".encode()
            first.call = await attempt_call(call, payload)
            connected.set()
            await idle_over.wait()
            cell.after_idle_call = await attempt_call(call, payload + b" after idle")
    finally:
        connected.set()


async def run_second(cell: Cell, forward: KeynodeNode, reverse: KeynodeNode, port: int) -> None:
    """A new CONNECT by NodeId (and a call) once the pair's own mappings have expired."""
    answer = await connect_by_node_id(forward, reverse.node_id, port, timeout=CONN_CONNECT_TIME + 10)
    second = cell.second
    second.status, second.elapsed, second.message = answer.status, answer.elapsed, answer.message
    if answer.stream is not None:
        async with grpc_channel_through(answer.stream, answer.leftover) as call:
            second.call = await attempt_call(call, f"{cell.name} again".encode())


def check_observed(node: KeynodeNode, kind: NatKind | None, status: dict[str, Any]) -> list[str]:
    """The node's observed addresses and mapping class are right for its NAT kind."""
    assert node.public is not None
    public_ip, port = node.public
    observed = observed_addresses(status)
    mapping = status["nat_mapping"]
    problems = []
    if any(host != public_ip for host, _ in observed):
        problems.append(f"observed {observed}, expected only {public_ip}")
    if kind is NatKind.SYMMETRIC:
        if mapping != ENDPOINT_DEPENDENT:
            problems.append(f"nat_mapping {mapping!r}, expected {ENDPOINT_DEPENDENT!r}")
        if len({p for _, p in observed}) < 2:
            problems.append(f"observed {observed}: a symmetric NAT shows two relay nodes two ports")
    else:
        if mapping != ENDPOINT_INDEPENDENT:
            problems.append(f"nat_mapping {mapping!r}, expected {ENDPOINT_INDEPENDENT!r}")
        if set(observed) != {(public_ip, port)}:
            problems.append(f"observed {observed}, expected {public_ip}:{port} (the NAT keeps the port)")
    return [f"{node.name}: {problem}" for problem in problems]


def check_rows(cell: Cell, forward: KeynodeNode, reverse: KeynodeNode, relay_ids: set[str],
               forward_status: dict[str, Any], reverse_status: dict[str, Any]) -> None:
    """`status --json` on both sides of a connected cell: an established row for the
    peer's NodeId with the cell's path; direct: the peer's public address as remote;
    relayed: via one of the relay nodes."""
    assert forward.public is not None and reverse.public is not None
    sides = (
        ("forward", forward_status, reverse, cell.reverse),
        ("reverse", reverse_status, forward, cell.forward),
    )
    for direction, status, peer, peer_kind in sides:
        assert peer.public is not None
        rows = [row for row in status["connections"]
                if row["node_id"] == peer.node_id and row["direction"] == direction
                and row["state"] == "established"]
        if not rows:
            cell.problems.append(f"no established {direction} row for {peer.name}")
        for row in rows:
            if row.get("path") != cell.expected:
                cell.problems.append(f"{direction} row path {row.get('path')!r}")
            if cell.expected == RELAY:
                if row.get("via") not in relay_ids:
                    cell.problems.append(f"{direction} row via {row.get('via')!r}, not a relay node")
                continue
            host, port = split_address(row["remote"])
            # A symmetric NAT picked a port of its own for this peer.
            if host != peer.public[0] or (peer_kind is not NatKind.SYMMETRIC and port != peer.public[1]):
                cell.problems.append(f"{direction} row remote {row['remote']}, expected {peer.public[0]}"
                                     + ("" if peer_kind is NatKind.SYMMETRIC else f":{peer.public[1]}"))


async def run_bulk(cell: Cell, forward: KeynodeNode, reverse: KeynodeNode) -> None:
    """64 MiB each way through a relayed cell, to the reverse node's bulk service."""
    answer = await connect_by_node_id(forward, reverse.node_id, BULK_PORT, timeout=CONN_CONNECT_TIME + 10)
    if answer.stream is None:
        cell.bulk = f"CONNECT {answer.status}: {answer.message}"
        return
    started = trio.current_time()
    with trio.fail_after(BULK_TIMEOUT):
        sent, received, count = await exchange(answer.stream, answer.leftover, BULK)
    cell.bulk_seconds = trio.current_time() - started
    await answer.stream.aclose()
    cell.bulk_digests = (sent, received)
    cell.bulk = "ok" if count == BULK else f"received {count} bytes"
    status = await forward.status()
    paths = [row.get("path") for row in status["connections"]
             if row.get("node_id") == reverse.node_id and row.get("service") is not None]
    if any(path != RELAY for path in paths):
        cell.bulk = f"bulk tunnel paths {paths}"


async def check_bulk_reports(cells: list[Cell], servers: dict[NatKind | None, LabProcess]) -> None:
    """Each relayed exchange's bytes arrived whole at the reverse side's server, and
    the server's arrived whole here (sha256 both ways)."""
    reports: list[dict[str, object]] = []
    for kind in {cell.reverse for cell in cells}:
        for _ in [cell for cell in cells if cell.reverse == kind]:
            reports.append(await trio.to_thread.run_sync(servers[kind].wait_event, "exchanged", 60.0))
    for cell in cells:
        if cell.bulk != "ok":
            continue
        sent, received = cell.bulk_digests
        if not any(report["received_sha256"] == sent and report["received_bytes"] == BULK
                   and report["sent_sha256"] == received for report in reports):
            cell.bulk = "sha256 differs"


async def introductions(node: KeynodeNode) -> int:
    """Introductions the node accepted from its relay nodes so far."""
    count: int = (await node.status())["rendezvous"]["introductions"]
    return count


async def wait_nothing_between(first: KeynodeNode, second: KeynodeNode) -> list[str]:
    """Wait until neither node has a connection row toward the other; returns the
    rows still there after CLEANUP_TIMEOUT."""
    assert first.public is not None and second.public is not None
    left: list[str] = []
    with trio.move_on_after(CLEANUP_TIMEOUT):
        while True:
            left = []
            for node, peer in ((first, second), (second, first)):
                assert peer.public is not None
                rows = rows_between(await node.status(), peer.node_id, peer.public[0])
                left += [f"{node.name} still has {row['direction']} {row['state']} {row['remote']}"
                         for row in rows]
            if not left:
                return []
            await trio.sleep(0.2)
    return left


async def collect_left_behind(keys: list[tuple[NatKind | None, NatKind | None]],
                              forwards: dict[NatKind | None, KeynodeNode],
                              reverses: dict[NatKind | None, KeynodeNode],
                              into: dict[tuple[NatKind | None, NatKind | None], list[str]]) -> None:
    """`wait_nothing_between` for the cells `keys`, all at once."""

    async def one(key: tuple[NatKind | None, NatKind | None]) -> None:
        into[key] = await wait_nothing_between(forwards[key[0]], reverses[key[1]])

    async with trio.open_nursery() as nursery:
        for key in keys:
            nursery.start_soon(one, key)


def render(cells: dict[tuple[NatKind | None, NatKind | None], Cell]) -> str:
    width = 21
    lines = ["forward \\ reverse".ljust(18) + "".join(LABELS[r].ljust(width) for r in KINDS)]
    for f in KINDS:
        row = []
        for r in KINDS:
            cell = cells[(f, r)]
            text = cell.outcome()
            row.append((text if text == cell.expected else text + " (!)").ljust(width))
        lines.append(LABELS[f].ljust(18) + "".join(row))
    return "\n".join(line.rstrip() for line in lines)


@pytest.mark.netns
async def test_connect_by_node_id_alone_across_nat_kinds(tmp_path: Path) -> None:
    timeouts = {"conn_connect_time": CONN_CONNECT_TIME}
    with open_lab() as lab:
        relays = [start_relay_node(lab, tmp_path / f"relay{index}", name=f"relay-{index}",
                                   timeouts=timeouts) for index in (1, 2)]
        for relay in relays:
            wait_ready(relay)
        relay_lines = relay_servers_config(relays)
        forwards: dict[NatKind | None, KeynodeNode] = {}
        reverses: dict[NatKind | None, KeynodeNode] = {}
        server_ports: dict[NatKind | None, int] = {}
        for index, kind in enumerate(KINDS):
            host, public_ip = add_node_host(lab, "f", kind, udp_timeout=UDP_TIMEOUT)
            forwards[kind] = start_node(host, tmp_path / f"f{index}", name=f"F:{LABELS[kind]}",
                                        proxy_port=4100 + index, public_ip=public_ip, timeouts=timeouts,
                                        extra_config=relay_lines)
        bulk_servers: dict[NatKind | None, LabProcess] = {}
        for index, kind in enumerate(KINDS):
            host, public_ip = add_node_host(lab, "r", kind, udp_timeout=UDP_TIMEOUT)
            _, server_ports[kind] = start_server(host, "grpc-echo")
            bulk_servers[kind], bulk_port = start_server(host, "exchange", str(BULK))
            reverses[kind] = start_node(host, tmp_path / f"r{index}", name=f"R:{LABELS[kind]}",
                                        proxy_port=4200 + index, public_ip=public_ip,
                                        server_port=server_ports[kind], timeouts=timeouts,
                                        extra_config=[*relay_lines,
                                                      # the gRPC server named by its port, as before
                                                      "[services.grpc]",
                                                      f'target = "127.0.0.1:{server_ports[kind]}"',
                                                      f"port = {server_ports[kind]}", 'allow = "*"',
                                                      "[services.bulk]",
                                                      f'target = "127.0.0.1:{bulk_port}"', f"port = {BULK_PORT}", 'allow = "*"'])
        nodes = [*forwards.values(), *reverses.values()]
        for node in nodes:
            wait_ready(node)

        # Each node's view of itself, from what the two relay nodes observed.
        observed_problems: list[str] = []
        observed_lines: list[str] = []
        for kinds_to_nodes in (forwards, reverses):
            for kind, node in kinds_to_nodes.items():
                status = await wait_for_nat_mapping(node, CLASSIFY_TIMEOUT)
                observed_problems += check_observed(node, kind, status)
                observed_lines.append(f"  {node.name:<18} {status['nat_mapping']:<21} "
                                      + ", ".join(f"{host}:{port}" for host, port in observed_addresses(status)))

        # Introductions each reverse node accepted from a relay node, before each phase.
        introduced = [{kind: await introductions(node) for kind, node in reverses.items()}]
        cells = {(f, r): Cell(f, r) for f in KINDS for r in KINDS}
        connected = {key: trio.Event() for key in cells}
        idle_over = trio.Event()
        left_behind: dict[tuple[NatKind | None, NatKind | None], list[str]] = {}
        with trio.fail_after(IDLE + 4 * CONN_CONNECT_TIME + 120):
            async with trio.open_nursery() as nursery:
                for (f, r), cell in cells.items():
                    nursery.start_soon(run_cell, cell, forwards[f], reverses[r], server_ports[r],
                                       connected[(f, r)], idle_over)
                for event in connected.values():
                    await event.wait()
                # Tunnels of the connected cells are open: both sides' status rows.
                statuses = {id(node): await node.status() for node in nodes}
                relay_ids = {relay.node_id for relay in relays}
                for (f, r), cell in cells.items():
                    if cell.first.status == 200:
                        check_rows(cell, forwards[f], reverses[r], relay_ids,
                                   statuses[id(forwards[f])], statuses[id(reverses[r])])
                relayed = [key for key, cell in cells.items() if cell.expected == RELAY]
                async with trio.open_nursery() as bulk:
                    for key in relayed:
                        bulk.start_soon(run_bulk, cells[key], forwards[key[0]], reverses[key[1]])
                await check_bulk_reports([cells[key] for key in relayed], bulk_servers)
                failed = [key for key, cell in cells.items() if cell.first.status != 200]
                await collect_left_behind(failed, forwards, reverses, left_behind)
                await trio.sleep(IDLE)
                idle_over.set()
            # Tunnels closed; wait until their connections ended, then until the pairs'
            # own NAT mappings expired: a new CONNECT needs the relay nodes again.
            after_closing: dict[tuple[NatKind | None, NatKind | None], list[str]] = {}
            await collect_left_behind(list(cells), forwards, reverses, after_closing)
            for key, left in after_closing.items():
                cells[key].problems += [f"after closing: {text}" for text in left]
            await trio.sleep(UDP_TIMEOUT + 5)
            introduced.append({kind: await introductions(node) for kind, node in reverses.items()})
            async with trio.open_nursery() as nursery:
                for (f, r), cell in cells.items():
                    nursery.start_soon(run_second, cell, forwards[f], reverses[r], server_ports[r])
            introduced.append({kind: await introductions(node) for kind, node in reverses.items()})
        # Every CONNECT, in both phases, reached its target through a relay node's
        # introduction (nothing cached: the punch sessions of the first phase are over).
        for phase, (before, after) in enumerate(zip(introduced[:-1], introduced[1:], strict=True)):
            for r, node in reverses.items():
                if after[r] - before[r] < len(KINDS):
                    for f in KINDS:
                        cells[(f, r)].problems.append(
                            f"phase {phase + 1}: {node.name} accepted {after[r] - before[r]} introductions "
                            f"for {len(KINDS)} CONNECTs")
        for key, left in left_behind.items():
            cells[key].problems += [f"after failing: {text}" for text in left]

        matrix = render(cells)
        details = "\n".join(cell.detail() for cell in cells.values())
        report = (f"NAT matrix by NodeId alone (relay nodes {', '.join(relay_entry(r) for r in relays)}; "
                  f"routers' UDP timeout {UDP_TIMEOUT:.0f} s; {IDLE:.0f} s idle; (!) = differs from issues 13 "
                  f"and 14)\n"
                  f"{matrix}\n\nobserved addresses and mapping:\n" + "\n".join(observed_lines)
                  + f"\n\ncells:\n{details}")
        (tmp_path / "relay_matrix.txt").write_text(report + "\n")
        print("\n" + report)
        for node in [*nodes, *relays]:
            exit_status = await node.stop()
            assert exit_status == 0, f"{node.name} did not stop cleanly:\n{node.process.stderr_text()[-2000:]}"
        assert not observed_problems, "\n".join(observed_problems)
        differing = [cell.detail() for cell in cells.values() if cell.outcome() != cell.expected]
        assert not differing, "cells differing from issues 13 and 14:\n" + "\n".join(differing) + "\n" + matrix
        assert sum(cell.outcome() == DIRECT for cell in cells.values()) == 22, matrix
        assert sum(cell.outcome() == RELAY for cell in cells.values()) == 3, matrix
