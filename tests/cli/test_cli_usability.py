"""CLI conventions: --version, errors as JSON with --json, a closed stdout pipe, and
prepared reverse connections in `status`."""

from __future__ import annotations

import json
import os
import subprocess
from importlib.metadata import version
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import trio

from proxy.app.cli import ExitCode
from proxy.app.control import format_status, serve_control
from proxy.app.node_dir import keygen
from proxy.app.runner import connection_rows
from proxy.errors import ConnectionNotFound
from tests.cli.helpers import KEYNODE, REPO_ROOT, keynode_env, run_keynode, run_keynode_async

STATUS = {"node_id": "v" + "0" * 52, "forward": "127.0.0.1:1", "proxy": "0.0.0.0:2", "server": None,
          "control_socket": "/x", "uptime": 1, "connections": []}


class StatusOnlyHandler:
    """A node that answers status and refuses a close (404 ConnectionNotFound)."""

    async def status(self) -> dict[str, Any]:
        return STATUS

    async def close(self, direction: str, host: str, port: int) -> dict[str, Any]:
        raise ConnectionNotFound(f"no {direction} connection to {host}:{port}")


def test_version_comes_from_the_package_metadata() -> None:
    shown = run_keynode("--version")
    assert shown.returncode == 0 and shown.stdout == f"keynode {version('keynode')}\n"


async def test_errors_are_json_with_json(tmp_path: Path) -> None:
    unreachable = await run_keynode_async("status", "--json", "--control", str(tmp_path / "none.sock"))
    assert unreachable.returncode == ExitCode.CONTROL_UNREACHABLE and unreachable.stdout == b""
    (line,) = unreachable.stderr.decode().splitlines()
    document = json.loads(line)
    assert document["error"] == "ControlUnreachable" and document["exit_code"] == ExitCode.CONTROL_UNREACHABLE
    assert "keynode run" in document["message"]

    usage = await run_keynode_async("open-forward", "vnot", "1.2.3.4:5", "--json")
    assert usage.returncode == ExitCode.USAGE
    (line,) = usage.stderr.decode().splitlines()
    document = json.loads(line)
    assert document["error"] == "UsageError" and document["exit_code"] == ExitCode.USAGE
    assert "is not a NodeId" in document["message"]

    socket_path = tmp_path / "control.sock"
    async with trio.open_nursery() as nursery:
        await nursery.start(serve_control, socket_path, StatusOnlyHandler())
        refused = await run_keynode_async("close", "forward", "127.0.0.1:9", "--control", str(socket_path), "--json")
        nursery.cancel_scope.cancel()
    assert refused.returncode == ExitCode.REQUEST_FAILED and refused.stdout == b""
    document = json.loads(refused.stderr)
    assert document["error"] == "ControlRequestFailed" and document["exit_code"] == ExitCode.REQUEST_FAILED
    assert document["node_error"] == "ConnectionNotFound" and document["http_status"] == 404

    # Without --json the same failures stay one human line.
    human = await run_keynode_async("status", "--control", str(tmp_path / "none.sock"))
    assert human.stderr.decode().startswith("keynode status: no keynode answers")


def run_into_closed_pipe(*args: str) -> subprocess.CompletedProcess[bytes]:
    """`keynode ARGS | reader-that-already-left`: stdout is a pipe nobody reads."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        return subprocess.run([*KEYNODE, *args], stdout=write_end, stderr=subprocess.PIPE, cwd=REPO_ROOT,
                              env=keynode_env(), timeout=60, check=False)
    finally:
        os.close(write_end)


@pytest.mark.parametrize("json_flag", [(), ("--json",)])
def test_a_closed_stdout_is_not_an_error(tmp_path: Path, json_flag: tuple[str, ...]) -> None:
    keygen(tmp_path / "n", force=False)
    for args in (("id", "--dir", str(tmp_path / "n"), *json_flag), ("--version",)):
        result = run_into_closed_pipe(*args)
        assert (result.returncode, result.stderr.decode()) == (0, ""), args


async def test_status_into_a_closed_pipe(tmp_path: Path) -> None:
    socket_path = tmp_path / "control.sock"
    read_end, write_end = os.pipe()
    os.close(read_end)
    async with trio.open_nursery() as nursery:
        await nursery.start(serve_control, socket_path, StatusOnlyHandler())
        with trio.fail_after(60):
            result = await trio.run_process(
                [*KEYNODE, "status", "--json", "--control", str(socket_path)], stdout=write_end,
                capture_stderr=True, check=False, cwd=REPO_ROOT, env=keynode_env(),
            )
        nursery.cancel_scope.cancel()
    os.close(write_end)
    assert (result.returncode, result.stderr.decode()) == (0, "")


class FakeProxy:
    """What connection_rows reads of the Proxy: established and prepared connections."""

    def __init__(self, now: float) -> None:
        self.now = now

    def connections(self) -> list[Any]:
        return []

    def prepared_reverse_connections(self) -> list[Any]:
        return [SimpleNamespace(remote_host="203.0.113.5", remote_port=4000, prepared_at=self.now - 5)]


async def test_status_lists_prepared_reverse_connections() -> None:
    rows = connection_rows(FakeProxy(trio.current_time()))
    assert rows == [{
        "direction": "reverse", "state": "prepared", "node_id": None, "remote": "203.0.113.5:4000",
        "local": None, "age": 5.0, "bytes_sent": 0, "bytes_received": 0, "rtt": None, "service": None,
    }]
    text = format_status({**STATUS, "connections": rows})
    (line,) = [line for line in text.splitlines() if line.startswith("reverse")]
    assert line.split()[:4] == ["reverse", "prepared", "-", "203.0.113.5:4000"]
