"""`keynode run` for real: two nodes as subprocesses, the control-socket commands,
`keynode forward` carrying TCP through the tunnel, logs, SIGTERM."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import stat
from pathlib import Path

import trio

from proxy.app.cli import ExitCode
from proxy.app.node_dir import keygen
from tests.cli.helpers import run_keynode, run_keynode_async, start_keynode, start_node


async def serve_digest_server(*, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
    """Reads until EOF, answers with the sha256 of what it read, closes."""

    async def handle(stream: trio.SocketStream) -> None:
        digest = hashlib.sha256()
        while data := await stream.receive_some(65536):
            digest.update(data)
        await stream.send_all(digest.hexdigest().encode())
        await stream.aclose()

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    task_status.started(listeners[0].socket.getsockname()[1])
    await trio.serve_listeners(handle, listeners)


# A loaded CI machine can take more than the default 2 s to start a connection.
PATIENT = "[timeouts]\nconn_connect_time = 10\n"


def make_node(directory: Path, config: str) -> str:
    tls_config = keygen(directory, force=False)
    (directory / "config.toml").write_text(config if "[timeouts]" in config else config + PATIENT)
    return str(tls_config.node_id)


async def keynode_json(*args: str) -> object:
    result = await run_keynode_async(*args, "--json")
    assert result.returncode == 0, result.stderr.decode()
    return json.loads(result.stdout)


async def test_two_nodes_control_commands_forward_and_sigterm(tmp_path: Path) -> None:
    with trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            server_port = await nursery.start(serve_digest_server)
            dir_a, dir_b = tmp_path / "a", tmp_path / "b"
            id_b = make_node(
                dir_b,
                f'[proxy]\nhost = "127.0.0.1"\n[server]\nhost = "127.0.0.1"\nport = {server_port}\n'
                '[log]\nformat = "json"\n',
            )
            node_b = await start_node(dir_b)
            b_proxy = node_b.info["proxy"]
            id_a = make_node(dir_a, f'[proxy]\nhost = "127.0.0.1"\n[peers]\n"{id_b}" = "{b_proxy}"\n')
            node_a = await start_node(dir_a)
            assert (node_a.info["node_id"], node_b.info["node_id"]) == (id_a, id_b)
            control_a = dir_a / "control.sock"
            assert stat.S_IMODE(os.stat(control_a).st_mode) == 0o600

            status = await keynode_json("status", "--dir", str(dir_a))
            assert status["node_id"] == id_a and status["forward"] == node_a.info["forward"]
            assert status["connections"] == []
            human = await run_keynode_async("status", "--dir", str(dir_a))
            assert id_a in human.stdout.decode() and "no connections" in human.stdout.decode()

            # open-forward / close through the control socket
            # (no HOST:PORT: A's [peers] address book says where B is)
            opened = await run_keynode_async("open-forward", id_b, "--dir", str(dir_a))
            assert opened.returncode == 0, opened.stderr.decode()
            assert id_b in opened.stdout.decode()
            unknown_peer = await run_keynode_async("open-forward", id_a, "--dir", str(dir_a))
            assert unknown_peer.returncode == ExitCode.USAGE
            assert "[peers]" in unknown_peer.stderr.decode()
            status = await keynode_json("status", "--dir", str(dir_a))
            assert [c["node_id"] for c in status["connections"]] == [id_b]
            assert status["connections"][0]["direction"] == "forward"
            assert status["connections"][0]["remote"] == b_proxy
            assert status["connections"][0]["age"] >= 0
            assert status["connection_forward_count"] == 1
            closed = await run_keynode_async("close", "forward", b_proxy, "--dir", str(dir_a))
            assert closed.returncode == 0, closed.stderr.decode()
            again = await run_keynode_async("close", "forward", b_proxy, "--dir", str(dir_a))
            assert again.returncode == ExitCode.REQUEST_FAILED
            assert "no forward connection" in again.stderr.decode()

            # open-reverse from B toward A (the NAT-opening side), then close it
            a_proxy = node_a.info["proxy"]
            opened = await run_keynode_async("open-reverse", a_proxy, "--dir", str(dir_b))
            assert opened.returncode == 0, opened.stderr.decode()
            # status lists the prepared connection (no peer connected yet, no NodeId)
            status_b = await keynode_json("status", "--dir", str(dir_b))
            prepared = [c for c in status_b["connections"] if c["state"] == "prepared"]
            assert [(c["direction"], c["remote"], c["node_id"]) for c in prepared] == [("reverse", a_proxy, None)]
            assert status_b["connection_reverse_count"] == 1
            human = await run_keynode_async("status", "--dir", str(dir_b))
            assert "prepared" in human.stdout.decode() and "no connections" not in human.stdout.decode()
            closed = await run_keynode_async("close", "reverse", a_proxy, "--dir", str(dir_b))
            assert closed.returncode == 0, closed.stderr.decode()

            # a wrong NodeId at B's address: the chain is rejected, one line, exit 6
            wrong = await run_keynode_async("open-forward", id_a, b_proxy, "--dir", str(dir_a))
            assert wrong.returncode == ExitCode.REQUEST_FAILED
            assert len(wrong.stderr.decode().splitlines()) == 1

            # keynode forward: TCP through A's CONNECT port, the tunnel, B, to the server
            forward_log = tmp_path / "forward.log"
            forward, lines = await start_keynode(
                ["forward", "--listen", "127.0.0.1:0", f"{id_b}@{b_proxy}", "--dir", str(dir_a)],
                forward_log, "listening on",
            )
            listen_port = int(lines[-1].split()[2].rpartition(":")[2])
            payload = os.urandom(3 * 1024 * 1024 + 7)
            stream = await trio.open_tcp_stream("127.0.0.1", listen_port)
            await stream.send_all(payload)
            # While the tunnel is open, status shows it with bytes and RTT.
            status = await keynode_json("status", "--dir", str(dir_a))
            tunnels = [c for c in status["connections"] if c["node_id"] == id_b]
            assert len(tunnels) == 1 and tunnels[0]["local"] is not None
            assert tunnels[0]["bytes_sent"] > 0 and tunnels[0]["rtt"] is not None
            transport = tunnels[0]["transport"]  # the uTP connection, as ss -ti shows TCP's
            assert transport["congestion"] == "rate" and transport["cwnd"] > 0 and transport["unacked_packets"] >= 0
            assert transport["peer_window"] > 0 and transport["srtt"] > 0 and transport["reorder_packets"] >= 3
            await stream.send_eof()  # half-close: the digest must still come back
            reply = b""
            while data := await stream.receive_some(65536):
                reply += data
            await stream.aclose()
            assert reply.decode() == hashlib.sha256(payload).hexdigest()

            forward.terminate()
            assert await forward.wait() == 0

            # lookup: B's server sees A's NodeId behind the TCP peer address (checked
            # live by `keynode demo`); an unknown address is a clean 404 here.
            unknown = await run_keynode_async("lookup", "127.0.0.1:1", "--dir", str(dir_b))
            assert unknown.returncode == ExitCode.REQUEST_FAILED

            # rotate B while it runs: it switches keys; A, knowing only the old
            # NodeId, still accepts it because the chain links the new key to the old.
            rotated = await keynode_json("rotate", "--dir", str(dir_b))
            assert rotated["reloaded"] is True and rotated["previous_node_id"] == id_b
            status_b = await keynode_json("status", "--dir", str(dir_b))
            assert status_b["node_id"] == rotated["node_id"] != id_b
            opened = await run_keynode_async("open-forward", id_b, b_proxy, "--dir", str(dir_a))
            assert opened.returncode == 0, opened.stderr.decode()
            assert id_b in opened.stdout.decode()

            assert await node_a.stop() == 0
            assert await node_b.stop() == 0
            nursery.cancel_scope.cancel()

    assert not control_a.exists() and not (dir_b / "control.sock").exists()
    log_a = node_a.log
    assert f"connection established: forward {id_b} at {b_proxy}" in log_a
    assert f"connection lost: forward {id_b} at {b_proxy}" in log_a
    assert "stopping on SIGTERM" in log_a and "stopped" in log_a
    events = [json.loads(line) for line in node_b.log.splitlines()]
    established = [e for e in events if e.get("event") == "established"]
    assert established and all(e["node_id"] == id_a and e["direction"] == "reverse" for e in established)
    assert any(e.get("event") == "lost" and e.get("reason") for e in events)
    assert events[-1]["event"] == "stopped"


async def test_run_refuses_a_taken_port_and_a_second_instance(tmp_path: Path) -> None:
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    directory = tmp_path / "n"
    make_node(directory, f'[forward]\nport = {port}\n[proxy]\nhost = "127.0.0.1"\n')
    with trio.fail_after(60):
        result = await run_keynode_async("run", "--dir", str(directory))
    taken.close()
    assert result.returncode == ExitCode.NETWORK
    stderr = result.stderr.decode()
    assert "cannot bind" in stderr and "Traceback" not in stderr
    # which socket, at which address, and where to change it
    assert f"cannot bind the CONNECT listener (TCP) to 127.0.0.1:{port}: " in stderr
    assert "the config's [forward]" in stderr
    assert stderr.strip().splitlines()[-1].startswith("keynode run: ")

    (directory / "config.toml").write_text('[proxy]\nhost = "127.0.0.1"\n')
    with trio.fail_after(60):
        node = await start_node(directory)
        second = await run_keynode_async("run", "--dir", str(directory))
        assert second.returncode != 0 and "already listens" in second.stderr.decode()
        assert await node.stop() == 0


async def test_sigint_stops_like_sigterm(tmp_path: Path) -> None:
    directory = tmp_path / "n"
    make_node(directory, '[proxy]\nhost = "127.0.0.1"\n[log]\nlevel = "debug"\n')
    with trio.fail_after(60):
        node = await start_node(directory)
        node.process.send_signal(signal.SIGINT)
        assert await node.process.wait() == 0
    assert "stopping on SIGINT" in node.log


async def test_repeated_sigterm_still_exits_cleanly(tmp_path: Path) -> None:
    directory = tmp_path / "n"
    make_node(directory, '[proxy]\nhost = "127.0.0.1"\n')
    with trio.fail_after(60):
        node = await start_node(directory)
        # Like a signal sent to a process group and forwarded again: SIGTERMs keep
        # arriving while the node stops, including while its signal receiver closes
        # (trio re-raises signals still queued then).
        sent = 0
        while node.process.returncode is None and sent < 2000:
            try:
                node.process.terminate()
            except ProcessLookupError:
                break
            sent += 1
            await trio.sleep(0.001)
        assert await node.process.wait() == 0
        assert sent > 1
    assert node.log.rstrip().endswith("stopped")


def test_run_rejects_unknown_key(tmp_path: Path) -> None:
    directory = tmp_path / "n"
    make_node(directory, "[timeouts]\nconn_connect_tme = 3\n")
    result = run_keynode("run", "--dir", str(directory))
    assert result.returncode == ExitCode.CONFIG
    assert "timeouts.conn_connect_tme: unknown key" in result.stderr
    assert str(directory / "config.toml") in result.stderr
