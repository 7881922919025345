"""`keynode demo` itself, as a user runs it (defaults: 500 calls, 64 MiB)."""

from __future__ import annotations

import re

from proxy.app.cli import ExitCode
from tests.cli.helpers import run_keynode


def test_keynode_demo_passes() -> None:
    result = run_keynode("demo", timeout=180)
    output = result.stdout
    assert result.returncode == ExitCode.OK, output + result.stderr
    assert output.strip().splitlines()[-1].startswith("PASS")
    node_ids = re.findall(r"node [AB]  (v[0-9a-v]{52})", output)
    assert len(node_ids) == 2 and node_ids[0] != node_ids[1]
    caller = re.search(r"caller NodeId as the server saw it: (v[0-9a-v]{52})", output)
    assert caller is not None and caller.group(1) == node_ids[0]
    assert re.search(r"500 unary round trips\s+tunnel: median [\d.]+ ms\s+p99 [\d.]+ ms", output)
    assert re.search(r"direct: median [\d.]+ ms\s+p99 [\d.]+ ms", output)
    assert re.search(r"64 MiB stream\s+tunnel: [\d.]+ MiB/s\s+direct: [\d.]+ MiB/s", output)
