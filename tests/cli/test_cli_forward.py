"""`keynode forward` as one command, like ssh -L: with no node running it runs one
in-process from the same node directory; it never listens without a way through."""

from __future__ import annotations

import hashlib
import json
import os
import socket
from pathlib import Path

import trio

from proxy.app.cli import ExitCode
from tests.cli.helpers import run_keynode_async, start_keynode, start_node
from tests.cli.test_cli_run import make_node, serve_digest_server
from tests.cli.test_port_forward import digest_through


def free_tcp_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def test_forward_without_a_node_runs_one_from_the_node_directory(tmp_path: Path) -> None:
    with trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            server_port = await nursery.start(serve_digest_server)
            dir_a, dir_b = tmp_path / "a", tmp_path / "b"
            id_b = make_node(
                dir_b, f'[proxy]\nhost = "127.0.0.1"\n[server]\nhost = "127.0.0.1"\nport = {server_port}\n'
            )
            node_b = await start_node(dir_b)
            b_proxy = node_b.info["proxy"]
            # A fixed CONNECT port and no node running on it: the case that used to
            # print "listening" and then close every client with 0 bytes.
            forward_port = free_tcp_port()
            id_a = make_node(
                dir_a,
                f'[forward]\nport = {forward_port}\n[proxy]\nhost = "127.0.0.1"\n[peers]\n"{id_b}" = "{b_proxy}"\n',
            )
            forward, lines = await start_keynode(
                ["forward", "--listen", "127.0.0.1:0", id_b, "--dir", str(dir_a)], tmp_path / "forward.log",
                "listening on",
            )
            info = dict(line.split(": ", 1) for line in lines[:-1])
            assert info["node_id"] == id_a and info["forward"] == f"127.0.0.1:{forward_port}"
            listen_port = int(lines[-1].split()[2].rpartition(":")[2])

            payload = os.urandom(1024 * 1024 + 3)
            assert await digest_through(listen_port, payload) == hashlib.sha256(payload).hexdigest()

            # The node in the forward process is a node: its control socket answers.
            status = await run_keynode_async("status", "--json", "--dir", str(dir_a))
            assert status.returncode == 0, status.stderr.decode()
            document = json.loads(status.stdout)
            assert document["node_id"] == id_a and document["forward"] == f"127.0.0.1:{forward_port}"

            forward.terminate()
            with trio.fail_after(20):
                assert await forward.wait() == 0
            assert not (dir_a / "control.sock").exists()
            assert await node_b.stop() == 0
            nursery.cancel_scope.cancel()
    log = (tmp_path / "forward.log").read_text()
    assert "running as" in log and "stopped" in log


async def test_forward_via_nothing_fails_before_listening(tmp_path: Path) -> None:
    node_id = make_node(tmp_path / "a", '[proxy]\nhost = "127.0.0.1"\n')
    nowhere = free_tcp_port()
    with trio.fail_after(60):
        result = await run_keynode_async(
            "forward", "--via", f"127.0.0.1:{nowhere}", "--listen", "127.0.0.1:0",
            f"{node_id}@127.0.0.1:9", "--dir", str(tmp_path / "a"),
        )
    assert result.returncode == ExitCode.NETWORK
    assert b"listening" not in result.stdout
    (line,) = result.stderr.decode().splitlines()
    assert line.startswith(f"keynode forward: cannot reach the forward proxy 127.0.0.1:{nowhere}")
    assert "keynode run" in line
