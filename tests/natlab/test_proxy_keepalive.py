"""Keep-alive across NATs whose UDP mappings expire after 5 s, and the keep-alive timeout.

Every node sits alone behind a port-restricted router (plain conntrack
masquerade: a mapping admits only the exact remote it was opened towards, and
once expired, nothing from outside). A grpcio echo server runs behind each
reverse node; the test is the rendezvous and the gRPC client (see proxies.py).
"""

from __future__ import annotations

import time
from pathlib import Path

import grpc
import pytest
import trio

from tests.natlab import NatKind, open_lab
from tests.natlab.proxies import (
    KeynodeNode,
    grpc_channel_through,
    rendezvous_connect,
    start_pair,
)
from tests.natlab.topology import Lab, Site

UDP_TIMEOUT = 5.0
IDLE = 20.0
CALL_TIMEOUT = 5.0


def start_nat_pair(lab: Lab, directory: Path, name: str, timeouts: dict[str, float],
                   base_port: int) -> tuple[KeynodeNode, KeynodeNode, Site]:
    """A forward and a reverse node, each behind its own port-restricted router
    with 5 s UDP timeouts; returns them and the reverse node's router."""
    sites = [lab.add_site(f"{name}-{role}", NatKind.PORT_RESTRICTED, udp_timeout=UDP_TIMEOUT)
             for role in ("f", "r")]
    forward_end, reverse_end = [(site.add_host("node"), site.public_address) for site in sites]
    forward, reverse, _ = start_pair(directory, forward_end, reverse_end, ports=(base_port, base_port + 1),
                                     name=name, timeouts=timeouts)
    return forward, reverse, sites[1]


async def call_after_idle(forward: KeynodeNode, reverse: KeynodeNode, reverse_site: Site,
                          outcome: dict[str, object]) -> None:
    """Connect, call, stay idle IDLE s, call again; record what happened."""
    answer, _ = await rendezvous_connect(forward, reverse)
    assert answer.stream is not None, f"{forward.name}: CONNECT answered {answer.status}"
    async with grpc_channel_through(answer.stream, answer.leftover) as call:
        outcome["first"] = await call(b"before idle", CALL_TIMEOUT)
        await trio.sleep(IDLE)
        assert reverse.public is not None
        outcome["mapped"] = any(f"dport={reverse.public[1]}" in line
                                for line in reverse_site.conntrack_entries())
        try:
            outcome["after"] = await call(b"after idle", CALL_TIMEOUT)
        except grpc.RpcError as error:
            outcome["after"] = error.code()


@pytest.mark.netns
async def test_keep_alive_holds_mappings_open_and_without_it_the_tunnel_dies(tmp_path: Path) -> None:
    """Same layout twice, run side by side: default keep-alive (a ping every 1 s),
    and keep-alive effectively stopped (first ping after 60 s, timeout 120 s)."""
    stopped = {"conn_keep_alive_interval_time": 60.0, "conn_keep_alive_timeout_time": 120.0}
    with open_lab() as lab:
        kept_pair = start_nat_pair(lab, tmp_path, "kept", {}, 4300)
        stopped_pair = start_nat_pair(lab, tmp_path, "stopped", stopped, 4310)
        kept: dict[str, object] = {}
        lapsed: dict[str, object] = {}
        with trio.fail_after(IDLE + 40):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(call_after_idle, *kept_pair, kept)
                nursery.start_soon(call_after_idle, *stopped_pair, lapsed)
        print(f"\nrouters' UDP timeout {UDP_TIMEOUT:.0f} s, idle {IDLE:.0f} s:"
              f"\n  keep-alive every 1 s: reverse router mapping alive {kept['mapped']}, call after idle -> "
              f"{kept['after']!r}\n  keep-alive stopped:   reverse router mapping alive {lapsed['mapped']}, "
              f"call after idle -> {lapsed['after']!r}")
        for node in [*kept_pair[:2], *stopped_pair[:2]]:
            assert await node.stop() == 0, node.process.stderr_text()[-2000:]
    assert kept["first"] == b"before idle" and lapsed["first"] == b"before idle"
    assert kept["mapped"] is True and kept["after"] == b"after idle"
    assert lapsed["mapped"] is False, "the reverse router kept a mapping nothing refreshed"
    assert lapsed["after"] == grpc.StatusCode.DEADLINE_EXCEEDED


@pytest.mark.netns
async def test_cut_link_ends_both_sides_with_keep_alive_timeout(tmp_path: Path) -> None:
    # Real clock (keynode subprocesses in namespaces): no wall-clock bound is asserted.
    # The end is checked by its reason and message, naming the timeout; how the timer
    # paces it (conn_keep_alive_timeout_time after last heard, to the tick) is checked
    # on virtual time in tests/proxy/test_proxy_blackhole.py.
    timeout = 3.0
    timeouts = {"conn_keep_alive_interval_time": 0.5, "conn_keep_alive_timeout_time": timeout}
    with open_lab() as lab:
        forward, reverse, reverse_site = start_nat_pair(lab, tmp_path, "cut", timeouts, 4320)
        answer, _ = await rendezvous_connect(forward, reverse)
        assert answer.stream is not None, f"CONNECT answered {answer.status}"
        client = answer.stream
        assert reverse_site.wan is not None
        assert (await forward.status())["connection_forward_count"] == 1
        reverse_site.wan.cut()
        cut_at = time.time()
        with trio.fail_after(timeout + 30):  # a hang fails here
            try:
                while await client.receive_some(65536):
                    pass  # the server's HTTP/2 preface, if it came after the CONNECT answer
            except trio.BrokenResourceError:
                pass  # closed with a reset: closed all the same
            client_closed = time.time() - cut_at
            while ((await forward.status())["connection_forward_count"]
                   or (await reverse.status())["connection_reverse_count"]):
                await trio.sleep(0.1)
        await client.aclose()
        assert await forward.stop() == 0 and await reverse.stop() == 0
        lost = {node.name: node.lost_events() for node in (forward, reverse)}
    print(f"\nlink cut, keep-alive timeout {timeout} s: CONNECT client closed after {client_closed:.2f} s; "
          + "; ".join(f"{name}: {[(e['reason'], round(e['at'] - cut_at, 2)) for e in events]}"
                      for name, events in lost.items()))
    for name, events in lost.items():
        assert [e["reason"] for e in events] == ["keep_alive_timeout"], (name, events)
        assert f"in {timeout}s" in events[0]["error"], (name, events)  # "no message from ... in 3.0s"
        assert events[0]["at"] > cut_at, (name, events)  # ended by the cut, not before it
