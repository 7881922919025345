"""Removing lab namespaces: the lab's own at exit, and stale ones of aborted runs."""

from __future__ import annotations

import os
import re
import signal
import time

from .commands import run
from .errors import LabCommandError


def lab_namespaces(prefix: str) -> list[tuple[str, int]]:
    """(name, creation unix time) of every namespace carrying the lab's naming pattern."""
    pattern = re.compile(rf"^{re.escape(prefix)}-([0-9a-f]{{8}})-[0-9a-f]{{4}}-")
    found = []
    for line in run(["ip", "netns", "list"]).stdout.splitlines():
        name = line.split(" ", 1)[0]
        match = pattern.match(name)
        if match:
            found.append((name, int(match.group(1), 16)))
    return found


def _kill_namespace_processes(netns: str) -> None:
    """Processes still inside a lab namespace were started by the lab: end them."""
    done = run(["ip", "netns", "pids", netns], check=False)
    for token in done.stdout.split():
        if token.isdigit():
            try:
                os.kill(int(token), signal.SIGKILL)
            except ProcessLookupError:
                pass  # ended on its own meanwhile


def delete_namespace(netns: str) -> str | None:
    """Delete one namespace; returns a description of the failure, or None."""
    try:
        _kill_namespace_processes(netns)
        run(["ip", "netns", "del", netns])
    except LabCommandError as exc:
        if "No such file" in exc.stderr:
            return None
        return str(exc)
    return None


def sweep_stale(prefix: str, older_than: float) -> list[str]:
    """Delete this prefix's namespaces created more than `older_than` seconds ago."""
    now = time.time()
    removed = []
    for name, created in lab_namespaces(prefix):
        if now - created > older_than and delete_namespace(name) is None:
            removed.append(name)
    return removed
