"""Running commands, in the root namespace or inside a lab namespace.

Everything the lab does to the kernel goes through `run`, so every call has a
timeout and a failure is a typed error naming the command and its stderr.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import socket
import subprocess
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from .errors import LabCommandError, LabToolMissing

REQUIRED_TOOLS = ("ip", "nft", "iptables", "tc", "conntrack", "timeout")
COMMAND_TIMEOUT = 15.0
CLONE_NEWNET = 0x40000000
NETNS_DIR = "/var/run/netns"


def require_tools(tools: Sequence[str] = REQUIRED_TOOLS) -> None:
    """Fail loudly (never skip) when the lab cannot be built on this machine."""
    missing = [tool for tool in tools if shutil.which(tool) is None]
    if missing:
        raise LabToolMissing(
            f"NAT lab needs {', '.join(missing)} (make system installs them; run as root)"
        )
    if os.geteuid() != 0:
        raise LabToolMissing("NAT lab needs root (network namespaces, nftables)")


def run(
    argv: Sequence[str],
    *,
    input_text: str | None = None,
    timeout: float = COMMAND_TIMEOUT,
    check: bool = True,
) -> subprocess.CompletedProcess[str]:
    argv = list(argv)
    try:
        done = subprocess.run(
            argv, input=input_text, capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired as exc:
        raise LabCommandError(argv, None, str(exc.stdout or ""), str(exc.stderr or "")) from exc
    if check and done.returncode != 0:
        raise LabCommandError(argv, done.returncode, done.stdout, done.stderr)
    return done


def netns_argv(netns: str, argv: Sequence[str]) -> list[str]:
    return ["ip", "netns", "exec", netns, *argv]


def run_in(netns: str, argv: Sequence[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    return run(netns_argv(netns, argv), **kwargs)  # type: ignore[arg-type]


_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


@contextmanager
def entered_netns(netns: str) -> Iterator[None]:
    """Move the calling thread into `netns` for the duration of the block.

    Sockets keep the namespace they were created in, so a socket made inside the
    block lives in the lab host for good, while the thread returns home after it.
    Only this thread moves; keep the block short and free of awaits.
    """
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        target = os.open(os.path.join(NETNS_DIR, netns), os.O_RDONLY)
        try:
            _setns(target)
        finally:
            os.close(target)
        try:
            yield
        finally:
            _setns(home)
    finally:
        os.close(home)


def socket_in(
    netns: str, family: int = socket.AF_INET, type: int = socket.SOCK_DGRAM, proto: int = 0
) -> socket.socket:
    """A socket that lives in `netns` (usable from anywhere in this process)."""
    with entered_netns(netns):
        return socket.socket(family, type, proto)
