"""The README's two-machine quickstart, for real: node A on the fake internet, node B
behind a port-restricted NAT, each `keynode run` in its own network namespace.

B's server is unreachable until B opens the reverse side toward A (`keynode
open-reverse`, which punches through B's NAT); then `keynode forward` on A carries
TCP to the server behind B.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import sys
import time
from pathlib import Path

import pytest

from proxy.app.cli import ExitCode
from proxy.app.node_dir import keygen
from tests.cli.helpers import REPO_ROOT, run_keynode
from tests.natlab import LabProcess, NatKind, open_lab

PROXY_PORT = 4000
SERVER_PORT = 7000

DIGEST_SERVER = f"""
import hashlib, socket
listener = socket.create_server(("127.0.0.1", {SERVER_PORT}))
print("ready", flush=True)
while True:
    connection, _ = listener.accept()
    with connection:
        digest = hashlib.sha256()
        while data := connection.recv(65536):
            digest.update(data)
        connection.sendall(digest.hexdigest().encode())
"""


def stop_by_pid(process: LabProcess, pid: int, timeout: float = 15.0) -> int | None:
    """SIGTERM `pid` and wait (bounded) for the lab process wrapping it to end."""
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while process.returncode is None and time.monotonic() < deadline:
        time.sleep(0.05)  # plain blocking code (no trio here): poll the child
    return process.returncode


def keynode_argv(*args: str) -> list[str]:
    return ["env", f"PYTHONPATH={REPO_ROOT}", "PYTHONUNBUFFERED=1", sys.executable, "-m", "proxy.app.cli", *args]


@pytest.mark.netns
def test_quickstart_across_a_nat(tmp_path: Path) -> None:
    dir_a, dir_b = tmp_path / "a", tmp_path / "b"
    id_a = str(keygen(dir_a, force=False).node_id)
    id_b = str(keygen(dir_b, force=False).node_id)
    with open_lab(process_lifetime=120) as lab:
        machine_a = lab.add_public_host("a")
        home = lab.add_site("home", NatKind.PORT_RESTRICTED)
        machine_b = home.add_host("b")
        a_address = f"{machine_a.address}:{PROXY_PORT}"
        b_public = f"{home.public_address}:{PROXY_PORT}"  # the NAT keeps the port

        (dir_b / "config.toml").write_text(
            f'[proxy]\nhost = "0.0.0.0"\nport = {PROXY_PORT}\n'
            f'[server]\nhost = "127.0.0.1"\nport = {SERVER_PORT}\n'
            '[timeouts]\nconn_connect_time = 5\n'
        )
        (dir_a / "config.toml").write_text(
            f'[proxy]\nhost = "0.0.0.0"\nport = {PROXY_PORT}\n'
            '[timeouts]\nconn_connect_time = 3\n'
            f'[peers]\n"{id_b}" = "{b_public}"\n'
        )
        lab.spawn(machine_b.netns, [sys.executable, "-c", DIGEST_SERVER], ready_line="ready")
        node_b = lab.spawn(machine_b.netns, keynode_argv("run", "--dir", str(dir_b)),
                           ready_line="ready", ready_timeout=30)
        node_a = lab.spawn(machine_a.netns, keynode_argv("run", "--dir", str(dir_a)),
                           ready_line="ready", ready_timeout=30)

        # B's NAT drops A's unsolicited packets: the connection cannot start.
        blocked = run_keynode("open-forward", id_b, "--dir", str(dir_a))
        assert blocked.returncode == ExitCode.REQUEST_FAILED, blocked.stderr
        assert "504" in blocked.stderr or "Timeout" in blocked.stderr or "timed out" in blocked.stderr

        # B opens the reverse side toward A: its pings open B's NAT for A.
        opened = run_keynode("open-reverse", a_address, "--dir", str(dir_b))
        assert opened.returncode == 0, opened.stderr

        forward = lab.spawn(
            machine_a.netns,
            keynode_argv("forward", "--listen", "127.0.0.1:0", id_b, "--dir", str(dir_a)),
        )
        line = forward.wait_for(lambda text: text.startswith("listening on"), "listening on", 30)
        listen_port = int(line.split()[2].rpartition(":")[2])

        payload = os.urandom(1024 * 1024 + 3)
        client = machine_a.socket(socket.AF_INET, socket.SOCK_STREAM)
        client.settimeout(30)
        with client:
            client.connect(("127.0.0.1", listen_port))
            client.sendall(payload)
            # While the tunnel is open, B lists it: a reverse connection from A.
            status_b = json.loads(run_keynode("status", "--json", "--dir", str(dir_b)).stdout)
            client.shutdown(socket.SHUT_WR)  # half-close: the digest still comes back
            reply = b""
            while data := client.recv(65536):
                reply += data
        assert reply.decode() == hashlib.sha256(payload).hexdigest()
        assert id_a in [connection["node_id"] for connection in status_b["connections"]]
        assert all(c["direction"] == "reverse" for c in status_b["connections"])

        forward.stop()
        # SIGTERM to keynode itself (its pid from `status`), not to the lab's wrapper
        # process group, whose `timeout -k 2` would turn a slow stop into a SIGKILL.
        pid_a = json.loads(run_keynode("status", "--json", "--dir", str(dir_a)).stdout)["pid"]
        pid_b = json.loads(run_keynode("status", "--json", "--dir", str(dir_b)).stdout)["pid"]
        statuses = [stop_by_pid(node_a, pid_a), stop_by_pid(node_b, pid_b)]
        log_a, log_b = node_a.stderr_text(), node_b.stderr_text()
    assert statuses == [0, 0], (statuses, log_a, log_b)
    assert f"connection established: forward {id_b} at {b_public}" in log_a
    assert f"connection established: reverse {id_a} at {a_address}" in log_b
    assert "stopping on SIGTERM" in log_a and "stopped" in log_b
