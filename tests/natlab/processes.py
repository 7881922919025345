"""Processes run inside lab namespaces, each with a bounded lifetime.

Every process is `ip netns exec NS timeout -k 2 LIFETIME argv...` in its own
session: `timeout` ends it even if this Python process dies without cleaning up,
and stopping kills the whole process group.
"""

from __future__ import annotations

import os
import selectors
import signal
import subprocess
import time
from collections.abc import Sequence

from .commands import netns_argv
from .errors import LabProcessError


class LabProcess:
    def __init__(self, netns: str, argv: Sequence[str], lifetime: float) -> None:
        self.netns = netns
        self.argv = list(argv)
        self.lifetime = lifetime
        self._output: list[str] = []
        self._popen = subprocess.Popen(
            netns_argv(netns, ["timeout", "-k", "2", f"{lifetime:.0f}", *self.argv]),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self._popen.pid

    @property
    def returncode(self) -> int | None:
        return self._popen.poll()

    def wait_line(self, expected: str, timeout: float = 10.0) -> None:
        """Read stdout until a line equal to `expected` (e.g. "ready") appears."""
        stdout = self._popen.stdout
        assert stdout is not None
        deadline = time.monotonic() + timeout
        with selectors.DefaultSelector() as selector:
            selector.register(stdout, selectors.EVENT_READ)
            while time.monotonic() < deadline:
                if not selector.select(max(0.0, deadline - time.monotonic())):
                    continue
                line = stdout.readline()
                if line == "":
                    self.stop()
                    raise LabProcessError(
                        f"{' '.join(self.argv)} in {self.netns} ended before {expected!r}: "
                        f"{self.stderr_text()}"
                    )
                self._output.append(line)
                if line.strip() == expected:
                    return
        self.stop()
        raise LabProcessError(f"{' '.join(self.argv)} in {self.netns}: no {expected!r} in {timeout}s")

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
        return "".join(self._output) + self._popen.stdout.read()

    def stderr_text(self) -> str:
        if self._popen.poll() is None or self._popen.stderr is None:
            return ""
        return self._popen.stderr.read()

    def close_pipes(self) -> None:
        for pipe in (self._popen.stdout, self._popen.stderr):
            if pipe is not None:
                pipe.close()
