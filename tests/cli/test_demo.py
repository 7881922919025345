"""`keynode demo` itself, as a user runs it (defaults: 500 calls, 64 MiB): a relay
node and two nodes configured only with `[relay] servers`, connecting by NodeId."""

from __future__ import annotations

import re

from proxy.app.cli import ExitCode
from tests.cli.helpers import run_keynode

NODE_ID = r"v[0-9a-v]{52}"


def test_keynode_demo_passes() -> None:
    result = run_keynode("demo", timeout=180)
    output = result.stdout
    assert result.returncode == ExitCode.OK, output + result.stderr
    assert output.strip().splitlines()[-1].startswith("PASS")
    relay = re.search(rf"relay R ({NODE_ID})  UDP (127\.0\.0\.1:\d+)  \(\[relay\] serve = true\)", output)
    assert relay is not None, output
    nodes = dict(re.findall(rf"node ([AB])  ({NODE_ID})", output))
    assert set(nodes) == {"A", "B"} and len({relay.group(1), *nodes.values()}) == 3, output
    # Each node learnt its address from the relay node: on loopback, its own UDP socket.
    udp = dict(re.findall(r"node ([AB])  v[0-9a-v]{52}  (?:CONNECT \S+  )?UDP (127\.0\.0\.1:\d+)", output))
    for name in ("A", "B"):
        observed = re.search(rf"node {name} observed address \(as R saw it\): (\S+)  mapping: ", output)
        assert observed is not None and observed.group(1) == udp[name], output
    # B found by its NodeId alone, and the tunnel is direct to B's socket.
    assert f"A connects to B by NodeId alone: CONNECT {nodes['B']}:" in output
    assert f"tunnel A -> B: path direct, remote {udp['B']}" in output
    caller = re.search(rf"caller NodeId as the server saw it: ({NODE_ID})", output)
    assert caller is not None and caller.group(1) == nodes["A"]
    # ... read by the out-of-process grpcio server from the metadata B injected (kind grpc).
    assert re.search(r"node B  v[0-9a-v]{52}  UDP \S+  server 127\.0\.0\.1:\d+ \(kind grpc, pid \d+\)", output)
    assert f"the server process read x-keynode-node-id from its metadata: {nodes['A']}" in output
    assert re.search(r"500 unary round trips\s+tunnel: median [\d.]+ ms\s+p99 [\d.]+ ms", output)
    assert re.search(r"direct: median [\d.]+ ms\s+p99 [\d.]+ ms", output)
    assert re.search(r"64 MiB stream\s+tunnel: [\d.]+ MiB/s\s+direct: [\d.]+ MiB/s", output)
    # A tunnel that could not punch started over the relay node and moved to direct.
    fallback = re.search(rf"tunnel C -> D: path relay via ({NODE_ID})", output)
    assert fallback is not None, output
    assert "moved relay -> direct (direct path proven by authenticated ping/pong)" in output
    assert re.search(r"tunnel C -> D now: path direct to 127\.0\.0\.1:\d+; 32 MiB there and back across the move, "
                     r"sha256 equal", output), output
