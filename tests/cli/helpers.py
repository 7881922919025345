"""Running `keynode` as a real subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import trio

REPO_ROOT = Path(__file__).resolve().parents[2]
KEYNODE = [sys.executable, "-m", "proxy.app.cli"]


def keynode_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


def run_keynode(*args: str, timeout: float = 60, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*KEYNODE, *args], capture_output=True, text=True, timeout=timeout, cwd=REPO_ROOT,
        env=keynode_env(env),
    )


async def run_keynode_async(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[bytes]:
    """The same from trio code, so a server in the test's event loop keeps serving."""
    with trio.fail_after(timeout):
        return await trio.run_process(
            [*KEYNODE, *args], capture_stdout=True, capture_stderr=True, check=False,
            cwd=REPO_ROOT, env=keynode_env(),
        )


class RunningNode:
    """A `keynode run` subprocess whose start-up lines were read (see start_node)."""

    def __init__(self, process: trio.Process, directory: Path, info: dict[str, str], log_path: Path) -> None:
        self.process = process
        self.directory = directory
        self.info = info
        self.log_path = log_path

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    async def stop(self, timeout: float = 15) -> int:
        """SIGTERM and wait for the exit status."""
        self.process.terminate()
        with trio.fail_after(timeout):
            return await self.process.wait()


async def read_line(stream: trio.abc.ReceiveStream, buffer: bytearray) -> str | None:
    """One line from a process's stdout (None at EOF); `buffer` keeps the rest."""
    while b"\n" not in buffer:
        data = await stream.receive_some(4096)
        if not data:
            return None
        buffer += data
    line, _, rest = bytes(buffer).partition(b"\n")
    buffer[:] = rest
    return line.decode()


async def start_keynode(args: list[str], log_path: Path, ready: str, timeout: float = 30) -> tuple[trio.Process, list[str]]:
    """Start `keynode ARGS`; returns once a stdout line starts with `ready`, with the
    lines read so far. stderr goes to `log_path`."""
    import subprocess

    with open(log_path, "wb") as log_file:
        process = await trio.lowlevel.open_process(
            [*KEYNODE, *args], stdout=subprocess.PIPE, stderr=log_file, cwd=REPO_ROOT, env=keynode_env()
        )
    assert process.stdout is not None
    lines: list[str] = []
    buffer = bytearray()
    try:
        with trio.fail_after(timeout):
            while True:
                line = await read_line(process.stdout, buffer)
                if line is None:
                    raise AssertionError(f"keynode {args[0]} exited while starting:\n{log_path.read_text()}")
                lines.append(line)
                if line.startswith(ready):
                    return process, lines
    except BaseException:
        process.kill()
        await process.wait()
        raise


async def start_node(directory: Path, timeout: float = 30) -> RunningNode:
    log_path = directory / "run.log"
    process, lines = await start_keynode(["run", "--dir", str(directory)], log_path, "ready", timeout)
    info = dict(line.split(": ", 1) for line in lines if ": " in line)
    return RunningNode(process, directory, info, log_path)
