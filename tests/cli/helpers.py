"""Running `keynode` as a real subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import trio

REPO_ROOT = Path(__file__).resolve().parents[2]
KEYNODE = [sys.executable, "-m", "proxy.cli"]


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
