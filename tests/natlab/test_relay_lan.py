"""Two nodes behind one NAT that does not hairpin reach each other by NodeId alone.

Both register with a relay node on a public host and report their LAN addresses;
the introduction and the lookup reply carry them as candidates, so the punch finds
the LAN path (their public addresses lead nowhere: the router does not hairpin, see
test_proxy_lan.py). The tunnel carries a gRPC call and both status rows name the
peer's LAN address.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from tests.natlab import NatKind, open_lab
from tests.natlab.proxies import grpc_channel_through, start_node, start_server, wait_ready
from tests.natlab.relay_lab import (
    connect_by_node_id,
    relay_servers_config,
    rows_between,
    split_address,
    start_relay_node,
)


@pytest.mark.netns
@pytest.mark.parametrize("kind", [NatKind.PORT_RESTRICTED, NatKind.SYMMETRIC], ids=["port-restricted", "symmetric"])
async def test_nodes_behind_one_nat_find_each_other_on_the_lan(tmp_path: Path, kind: NatKind) -> None:
    timeouts = {"conn_connect_time": 10.0}
    with open_lab() as lab:
        relay = start_relay_node(lab, tmp_path / "relay", name="relay", timeouts=timeouts)
        wait_ready(relay)
        site = lab.add_site("office", kind)
        pc1, pc2 = site.add_host("pc1"), site.add_host("pc2")
        relay_lines = relay_servers_config([relay])
        forward = start_node(pc1, tmp_path / "a", name="A", proxy_port=4301, public_ip=site.public_address,
                             timeouts=timeouts, extra_config=relay_lines)
        _, server_port = start_server(pc2, "grpc-echo")
        reverse = start_node(pc2, tmp_path / "b", name="B", proxy_port=4302, public_ip=site.public_address,
                             server_port=server_port, timeouts=timeouts, extra_config=relay_lines)
        for node in (forward, reverse):
            wait_ready(node)
        for node in (forward, reverse):  # registered: the relay node saw the router's address
            status = await node.status()
            for _ in range(50):
                if status["observed_addresses"]:
                    break
                await trio.sleep(0.1)
                status = await node.status()
            assert [split_address(item["address"])[0] for item in status["observed_addresses"]] == [
                site.public_address]

        outcome = await connect_by_node_id(forward, reverse.node_id, 443)
        assert outcome.status == 200, outcome.message
        assert outcome.stream is not None
        async with grpc_channel_through(outcome.stream, outcome.leftover) as call:
            reply = await call(b"across the LAN by NodeId", 10.0)
            # while the tunnel is open (leaving the block closes it)
            (row,) = rows_between(await forward.status(), reverse.node_id, "")
            (back,) = rows_between(await reverse.status(), forward.node_id, "")
        assert reply == b"across the LAN by NodeId"
        assert (row["path"], split_address(row["remote"])) == ("direct", (pc2.address, 4302))
        assert split_address(back["remote"]) == (pc1.address, 4301)
        print(f"\n{kind.value}: CONNECT by NodeId -> 200 in {outcome.elapsed:.2f} s over the LAN "
              f"({row['remote']}), gRPC reply {reply!r}")
        await outcome.stream.aclose()
        for node in (forward, reverse, relay):
            assert await node.stop() == 0
