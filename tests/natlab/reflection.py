"""Client side of the UDP reflector (reflector.py): who does the far side see?"""

from __future__ import annotations

import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .processes import LabProcess
    from .topology import Host

REFLECTOR = Path(__file__).with_name("reflector.py")


@dataclass
class Reflector:
    host: Host
    endpoints: list[tuple[str, int]]
    process: LabProcess


def start_reflector(host: Host, endpoints: list[tuple[str, int]]) -> Reflector:
    """Run reflector.py in `host`, bound to each (ip, port); returns once bound."""
    process = host.spawn([sys.executable, str(REFLECTOR), *(f"{ip}:{port}" for ip, port in endpoints)],
                         ready_line="ready")
    return Reflector(host, endpoints, process)


def parse_reply(data: bytes) -> tuple[tuple[str, int], bytes]:
    """(observed source address, echoed payload) of a reflector reply."""
    line, _, payload = data.partition(b"\n")
    ip, port = line.decode().split(" ")
    return (ip, int(port)), payload


def observed_address(sock: socket.socket, reflector: tuple[str, int], *, attempts: int = 3,
                     wait: float = 1.0) -> tuple[str, int]:
    """Ask a reflector which source address it sees for `sock` (retries on loss)."""
    nonce = f"whoami {time.monotonic_ns()}".encode()
    sock.settimeout(wait)
    for _ in range(attempts):
        sock.sendto(nonce, reflector)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                data, source = sock.recvfrom(65535)
            except TimeoutError:
                break
            if source == reflector:
                address, payload = parse_reply(data)
                if payload == nonce:
                    return address
    raise TimeoutError(f"no answer from reflector {reflector}")


def receives(sock: socket.socket, wait: float) -> list[tuple[bytes, tuple[str, int]]]:
    """Every datagram arriving on `sock` within `wait` seconds."""
    got = []
    deadline = time.monotonic() + wait
    while (left := deadline - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            got.append(sock.recvfrom(65535))
        except TimeoutError:
            break
    return got
