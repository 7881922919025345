"""UDP socket set-up for the endpoint: binding, kernel buffers, segmentation offload.

Linux UDP segmentation offload: a sender may hand the kernel one buffer holding a
run of equal-size datagrams (the last may be shorter) with a UDP_SEGMENT control
message; the kernel sends them as separate datagrams. A receiver that enables
UDP_GRO may get such a run in one read, with a UDP_GRO control message giving the
segment size. One syscall then carries up to 64 datagrams.
"""

from __future__ import annotations

import ipaddress
import socket as stdlib_socket
import struct

import trio

__all__ = [
    "DEFAULT_SOCKET_BUFFER_SIZE",
    "GSO_MAX_SEGMENTS",
    "GSO_MAX_BYTES",
    "bind_udp_socket",
    "enable_gro",
    "gro_segment_size",
    "is_ip_literal",
]

# Large kernel buffers: the original lost most of its throughput to receive
# buffer overflow (208 KiB default). The kernel caps these at rmem_max/wmem_max
# unless we are privileged (SO_RCVBUFFORCE), which we try first.
DEFAULT_SOCKET_BUFFER_SIZE = 8 * 1024 * 1024

# UDP segmentation offload (Linux >= 4.18 GSO, 5.0 GRO): see open_endpoint(offload=).
SOL_UDP = 17
UDP_SEGMENT = 103
UDP_GRO = 104
GSO_MAX_SEGMENTS = 64  # the kernel's UDP_MAX_SEGMENTS
GSO_MAX_BYTES = 65000  # one GSO send stays below the 64 KiB IP datagram limit
GSO_SIZE = struct.Struct("=H")
_CMSG_INT = struct.Struct("=i")
GRO_CMSG_SPACE = stdlib_socket.CMSG_SPACE(_CMSG_INT.size)
_SO_RCVBUFFORCE = getattr(stdlib_socket, "SO_RCVBUFFORCE", 33)
_SO_SNDBUFFORCE = getattr(stdlib_socket, "SO_SNDBUFFORCE", 32)


def _set_buffer(sock: stdlib_socket.socket, forced: int, normal: int, size: int) -> None:
    try:
        sock.setsockopt(stdlib_socket.SOL_SOCKET, forced, size)
    except OSError:
        # Unprivileged: the kernel silently caps at net.core.[rw]mem_max.
        sock.setsockopt(stdlib_socket.SOL_SOCKET, normal, size)


async def bind_udp_socket(
    host: str, port: int, dual_stack: bool, buffer_size: int
) -> stdlib_socket.socket:
    if dual_stack:
        if host in ("", "0.0.0.0", "::"):
            host = "::"
        elif ipaddress.ip_address(host).version != 6:
            raise ValueError(f"dual_stack needs an IPv6 (or wildcard) host, not {host!r}")
    infos = await trio.socket.getaddrinfo(
        host, port, type=stdlib_socket.SOCK_DGRAM, flags=stdlib_socket.AI_PASSIVE
    )
    family, _, _, _, sockaddr = infos[0]
    sock = stdlib_socket.socket(family, stdlib_socket.SOCK_DGRAM)
    try:
        if family == stdlib_socket.AF_INET6:
            sock.setsockopt(stdlib_socket.IPPROTO_IPV6, stdlib_socket.IPV6_V6ONLY, not dual_stack)
        _set_buffer(sock, _SO_RCVBUFFORCE, stdlib_socket.SO_RCVBUF, buffer_size)
        _set_buffer(sock, _SO_SNDBUFFORCE, stdlib_socket.SO_SNDBUF, buffer_size)
        sock.bind(sockaddr)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def enable_gro(sock: stdlib_socket.socket) -> bool:
    try:
        sock.setsockopt(SOL_UDP, UDP_GRO, 1)
    except OSError:
        return False  # an old kernel: receive datagram by datagram
    return True


def is_ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    return True


def gro_segment_size(ancillary: list[tuple[int, int, bytes]], size: int) -> int:
    """The segment size a UDP_GRO read reports (``size`` itself if none)."""
    for level, kind, value in ancillary:
        if level == SOL_UDP and kind == UDP_GRO and len(value) >= _CMSG_INT.size:
            return _CMSG_INT.unpack_from(value)[0] or size
    return size
