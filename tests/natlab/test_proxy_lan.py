"""Two nodes behind one NAT that does not hairpin reach each other on their LAN addresses.

Both nodes sit on one site's LAN; the rendezvous gives each the other's LAN
address (and proxy port): the tunnel comes up and carries a gRPC call. Given
their public addresses instead, they cannot meet (the router does not hairpin,
test_lan.py shows it for plain UDP): 504 once conn_connect_time has passed.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from tests.natlab import NatKind, open_lab
from tests.natlab.proxies import grpc_channel_through, rendezvous_connect, start_pair

CONN_CONNECT_TIME = 3.0


@pytest.mark.netns
@pytest.mark.parametrize("kind", [NatKind.FULL_CONE, NatKind.PORT_RESTRICTED],
                         ids=["full-cone", "port-restricted"])
async def test_nodes_behind_one_nat_connect_on_lan_addresses(tmp_path: Path, kind: NatKind) -> None:
    timeouts = {"conn_connect_time": CONN_CONNECT_TIME}
    with open_lab() as lab:
        site = lab.add_site("office", kind)
        pc1, pc2 = site.add_host("pc1"), site.add_host("pc2")
        forward, reverse, _ = start_pair(tmp_path, (pc1, pc1.address), (pc2, pc2.address),
                                         ports=(4501, 4502), timeouts=timeouts)

        answer, lan_reverse_open = await rendezvous_connect(forward, reverse)
        assert answer.stream is not None, f"CONNECT on LAN addresses answered {answer.status}"
        async with grpc_channel_through(answer.stream, answer.leftover) as call:
            reply = await call(b"across the LAN", 10.0)

        # The same two nodes told each other's public address: no hairpin, no tunnel.
        forward.public, reverse.public = (site.public_address, 4501), (site.public_address, 4502)
        public_answer, _ = await rendezvous_connect(forward, reverse)
        with trio.fail_after(10):
            while (await forward.status())["connection_forward_count"]:
                await trio.sleep(0.1)
        assert await forward.stop() == 0 and await reverse.stop() == 0
    print(f"\n{kind.value}: LAN addresses -> CONNECT 200, gRPC reply {reply!r}, "
          f"open_connection_reverse {lan_reverse_open}; public addresses -> {public_answer.status} "
          f"after {public_answer.elapsed:.1f} s")
    assert reply == b"across the LAN"
    assert lan_reverse_open == "heard"
    # Real clock (subprocesses in namespaces): 504 is the start timeout's status, and it
    # came once the whole conn_connect_time had passed (no upper wall-clock bound: the
    # timer's precision is checked on virtual time in tests/proxy/test_proxy.py).
    assert public_answer.status == 504
    assert public_answer.elapsed >= CONN_CONNECT_TIME
