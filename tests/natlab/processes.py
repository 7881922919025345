"""Processes run inside lab namespaces, each with a bounded lifetime.

Every process is `ip netns exec NS timeout -k 2 LIFETIME argv...` in its own
session: `timeout` ends it even if this Python process dies without cleaning up,
and stopping kills the whole process group.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence

from .commands import netns_argv
from .errors import LabProcessError


class LabProcess:
    def __init__(self, netns: str, argv: Sequence[str], lifetime: float) -> None:
        self.netns = netns
        self.argv = list(argv)
        self.lifetime = lifetime
        self._output: list[str] = []
        self._pending = b""
        # stderr goes to a file: a chatty process can never block on a full pipe.
        self._stderr = tempfile.TemporaryFile()
        self._popen = subprocess.Popen(
            netns_argv(netns, ["timeout", "-k", "2", f"{lifetime:.0f}", *self.argv]),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self._popen.pid

    @property
    def returncode(self) -> int | None:
        return self._popen.poll()

    def wait_line(self, expected: str, timeout: float = 10.0) -> str:
        """Read stdout until a line equal to `expected` (e.g. "ready") appears."""
        return self.wait_for(lambda line: line.strip() == expected, expected, timeout)

    def wait_event(self, event: str, timeout: float = 10.0) -> dict[str, object]:
        """Read stdout until a JSON line {"event": event, ...} appears; returns it."""

        def matches(line: str) -> bool:
            try:
                parsed = json.loads(line)
            except ValueError:
                return False
            return isinstance(parsed, dict) and parsed.get("event") == event

        found: dict[str, object] = json.loads(self.wait_for(matches, f"event {event}", timeout))
        return found

    def wait_for(self, matches: Callable[[str], bool], what: str, timeout: float) -> str:
        """Read stdout lines until one `matches`; returns that line.

        Reads the raw pipe (no buffered reader) so select() never misses lines
        that a buffered reader would already hold.
        """
        stdout = self._popen.stdout
        assert stdout is not None
        deadline = time.monotonic() + timeout
        while True:
            while b"\n" in self._pending:
                raw, self._pending = self._pending.split(b"\n", 1)
                line = raw.decode(errors="replace") + "\n"
                self._output.append(line)
                if matches(line):
                    return line
            left = deadline - time.monotonic()
            if left <= 0:
                break
            ready, _, _ = select.select([stdout], [], [], left)
            if not ready:
                continue
            chunk = os.read(stdout.fileno(), 65536)
            if not chunk:
                self.stop()
                raise LabProcessError(
                    f"{' '.join(self.argv)} in {self.netns} ended before {what!r}: "
                    f"{self.stderr_text()}"
                )
            self._pending += chunk
        self.stop()
        raise LabProcessError(f"{' '.join(self.argv)} in {self.netns}: no {what!r} in {timeout}s")

    def stop(self, grace: float = 3.0) -> int:
        """SIGTERM the process group, SIGKILL after `grace`; returns the exit status."""
        if self._popen.poll() is None:
            self._signal(signal.SIGTERM)
            try:
                self._popen.wait(grace)
            except subprocess.TimeoutExpired:
                self._signal(signal.SIGKILL)
                self._popen.wait(grace)
        return self._popen.returncode

    def _signal(self, signum: int) -> None:
        try:
            os.killpg(self._popen.pid, signum)
        except ProcessLookupError:
            pass  # already gone

    def output(self) -> str:
        """All stdout (the process must have ended)."""
        if self._popen.poll() is None:
            raise LabProcessError("output() needs the process to have ended; call stop() first")
        assert self._popen.stdout is not None
        rest = self._pending + self._popen.stdout.read()
        self._pending = b""
        return "".join(self._output) + rest.decode(errors="replace")

    def stderr_text(self) -> str:
        self._stderr.seek(0)
        return self._stderr.read().decode(errors="replace")

    def close_pipes(self) -> None:
        if self._popen.stdout is not None:
            self._popen.stdout.close()
        self._stderr.close()
