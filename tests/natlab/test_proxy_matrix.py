"""The Proxy across every pair of NAT kinds: where the original protocol punches, where not.

Ten `keynode run` nodes, each in its own lab host: a forward node behind each
NAT kind and one public, a reverse node behind each kind and one public (behind
its own router: two nodes behind one router would need hairpinning). A grpcio
echo server runs next to every reverse node. All 25 cells run at once; the test
plays the rendezvous: it tells the reverse node the forward node's public address
(`open_connection_reverse` via the control socket) and CONNECTs through the
forward node to the reverse node's public address, a moment apart. Public
address = public IP and proxy port (the lab's cone NATs preserve ports). Run
twice: the rendezvous reaching the reverse side first, and the forward side first.

Expected, per ../shared/notes/nat.md: connected (and a gRPC call answered)
everywhere except with a symmetric reverse side, and a symmetric forward side
against a port-restricted reverse side; those answer 504 once
conn_connect_time has passed, open_connection_forward (the control socket's open-forward)
raises the typed ConnectionStartTimeout behind it, and no forward connection is
left behind.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

from proxy.errors import ControlRequestFailed
from tests.natlab import NatKind, open_lab
from tests.natlab.proxies import (
    KeynodeNode,
    add_node_host,
    grpc_channel_through,
    rendezvous_connect,
    start_node,
    start_server,
    wait_ready,
)

KINDS: list[NatKind | None] = [None, NatKind.FULL_CONE, NatKind.ADDRESS_RESTRICTED,
                               NatKind.PORT_RESTRICTED, NatKind.SYMMETRIC]
LABELS = {None: "public", NatKind.FULL_CONE: "full cone", NatKind.ADDRESS_RESTRICTED: "addr-restricted",
          NatKind.PORT_RESTRICTED: "port-restricted", NatKind.SYMMETRIC: "symmetric"}
CONN_CONNECT_TIME = 3.0
# Seconds the rendezvous reaches the reverse side before the forward side
# (negative: after). Both orders give nat.md's table: when the forward side's
# first SYN meets a restricted reverse NAT not yet opened by the reverse side's
# pings, the SYN retransmitted after 1 s (initial RTO) gets through.
ORDERS = {"reverse-first": 0.2, "forward-first": -0.5}
CALL_TIMEOUT = 10.0


def expected_ok(forward: NatKind | None, reverse: NatKind | None) -> bool:
    """nat.md's table of the original protocol."""
    if reverse is NatKind.SYMMETRIC:
        return False
    return not (forward is NatKind.SYMMETRIC and reverse is NatKind.PORT_RESTRICTED)


@dataclass
class Cell:
    forward: NatKind | None
    reverse: NatKind | None
    connect_status: int = 0
    connect_elapsed: float = 0.0
    grpc_ok: bool = False
    reverse_open: str = "?"  # what open_connection_reverse answered (heard, or the error)
    forward_left: int = -1  # forward connections still registered after a failure
    typed_error: str = ""  # what open_connection_forward raised after a failure

    @property
    def ok(self) -> bool:
        return self.connect_status == 200 and self.grpc_ok

    @property
    def faithful(self) -> bool:
        if expected_ok(self.forward, self.reverse):
            return self.ok
        # Real clock (ten subprocesses): the 504 came after the whole conn_connect_time
        # and is the start timeout; no upper wall-clock bound (the timer's precision is
        # checked on virtual time in tests/proxy/test_proxy.py).
        return (self.connect_status == 504 and self.connect_elapsed >= CONN_CONNECT_TIME
                and self.typed_error == "ConnectionStartTimeout" and self.forward_left == 0)

    def text(self) -> str:
        if self.ok:
            shown = "ok"
        elif self.connect_status == 200:
            shown = "200,no-rpc"
        else:
            shown = f"{self.connect_status} {self.connect_elapsed:.1f}s"
            if self.typed_error != "ConnectionStartTimeout":
                shown += f" {self.typed_error}"
        return shown + ("" if self.faithful else " (!)")


async def run_cell(cell: Cell, forward: KeynodeNode, reverse: KeynodeNode, head_start: float) -> None:
    assert reverse.public is not None
    answer, cell.reverse_open = await rendezvous_connect(forward, reverse, head_start=head_start)
    cell.connect_status, cell.connect_elapsed = answer.status, answer.elapsed
    if answer.stream is not None:
        async with grpc_channel_through(answer.stream, answer.leftover) as call:
            payload = f"{forward.name} -> {reverse.name}".encode()
            cell.grpc_ok = await call(payload, CALL_TIMEOUT) == payload
    else:
        # The same start through the API (the control socket's open-forward) raises
        # the typed error behind the 504.
        body = {"node_id": reverse.node_id, "host": reverse.public[0], "port": reverse.public[1]}
        try:
            await forward.control("POST", "/v1/forward", body)
            cell.typed_error = "none: connected"
        except ControlRequestFailed as error:
            cell.typed_error = error.error
        status = await forward.status()
        remote = f"{reverse.public[0]}:{reverse.public[1]}"
        cell.forward_left = sum(1 for row in status["connections"] if row["remote"] == remote)


def short(outcome: str) -> str:
    return "start timeout" if outcome == "ConnectionStartTimeout" else outcome


def render(cells: dict[tuple[NatKind | None, NatKind | None], Cell]) -> str:
    width = 18
    lines = ["cells: ok = CONNECT 200 and a gRPC call answered; 504 = start timeout (HTTP), also "
             "raised as ConnectionStartTimeout by open_connection_forward",
             "forward \\ reverse".ljust(width) + "".join(LABELS[r].ljust(width) for r in KINDS)]
    for f in KINDS:
        lines.append(LABELS[f].ljust(width) + "".join(cells[(f, r)].text().ljust(width) for r in KINDS))
    lines.append("")
    lines.append("open_connection_reverse on the reverse side answered (heard = its punch was answered):")
    for f in KINDS:
        lines.append(LABELS[f].ljust(width)
                     + "".join(short(cells[(f, r)].reverse_open).ljust(width) for r in KINDS))
    return "\n".join(lines)


@pytest.mark.netns
@pytest.mark.parametrize("order", list(ORDERS))
async def test_matrix_of_nat_kinds_matches_the_original_protocol(tmp_path: Path, order: str) -> None:
    timeouts = {"conn_connect_time": CONN_CONNECT_TIME}
    with open_lab() as lab:
        forwards: dict[NatKind | None, KeynodeNode] = {}
        reverses: dict[NatKind | None, KeynodeNode] = {}
        for index, kind in enumerate(KINDS):
            host, public_ip = add_node_host(lab, "f", kind)
            node = start_node(host, tmp_path / f"f{index}", name=f"F:{LABELS[kind]}",
                              proxy_port=4100 + index, public_ip=public_ip, timeouts=timeouts)
            forwards[kind] = node
        for index, kind in enumerate(KINDS):
            host, public_ip = add_node_host(lab, "r", kind)
            _, server_port = start_server(host, "grpc-echo")
            node = start_node(host, tmp_path / f"r{index}", name=f"R:{LABELS[kind]}",
                              proxy_port=4200 + index, public_ip=public_ip, server_port=server_port,
                              timeouts=timeouts)
            reverses[kind] = node
        for node in [*forwards.values(), *reverses.values()]:
            wait_ready(node)

        cells = {(f, r): Cell(f, r) for f in KINDS for r in KINDS}
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                for (f, r), cell in cells.items():
                    nursery.start_soon(run_cell, cell, forwards[f], reverses[r], ORDERS[order])

        # A symmetric reverse side's punch is answered by public/cone forward sides
        # (their PONG goes back through its mapping), so its prepared connection is
        # heard and then waits for a uTP connection that cannot arrive, kept alive by
        # those PONGs: it stays until closed. The forward side has nothing left.
        symmetric = reverses[NatKind.SYMMETRIC]
        heard = [forwards[f] for f in KINDS if cells[(f, NatKind.SYMMETRIC)].reverse_open == "heard"]
        lingering = (await symmetric.status())["connection_reverse_count"]
        for forward in heard:
            assert forward.public is not None
            await symmetric.close_reverse(*forward.public)
        left_after_close = (await symmetric.status())["connection_reverse_count"]

        # Every tunnel is closed: no forward connection may remain anywhere, from the
        # failed cells (never registered) nor from the ok ones (ended with their client).
        with trio.fail_after(10):
            while any([(await node.status())["connection_forward_count"] for node in forwards.values()]):
                await trio.sleep(0.1)

        matrix = render(cells)
        matrix += (f"\nsymmetric reverse node: {lingering} prepared reverse connection(s) waiting after the "
                   f"failed cells ({len(heard)} punches answered); after close-reverse: {left_after_close}")
        (tmp_path / "nat_matrix.txt").write_text(matrix + "\n")
        print(f"\nNAT matrix, {order} (conn_connect_time {CONN_CONNECT_TIME} s; (!) = differs from nat.md):"
              f"\n{matrix}")
        for node in [*forwards.values(), *reverses.values()]:
            status = await node.stop()
            assert status == 0, f"{node.name} did not stop cleanly:\n{node.process.stderr_text()[-2000:]}"
        assert lingering == len(heard) and left_after_close == 0, matrix
        differing = [f"{LABELS[c.forward]} -> {LABELS[c.reverse]}" for c in cells.values() if not c.faithful]
        assert not differing, f"cells differing from nat.md: {differing}\n{matrix}"
