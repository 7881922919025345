"""How in-process trio code (the Proxy tests) uses lab hosts: sockets made inside `enter()`."""

from __future__ import annotations

import os

import trio

from tests.natlab import NatKind, open_lab, start_reflector
from tests.natlab.reflection import parse_reply


async def test_trio_udp_socket_created_in_a_private_host_crosses_its_nat() -> None:
    with open_lab() as lab:
        server = lab.add_public_host("server")
        site = lab.add_site("home", NatKind.PORT_RESTRICTED)
        pc = site.add_host("pc")
        start_reflector(server, [(server.address, 4000)])
        home_netns = os.readlink("/proc/thread-self/ns/net")
        with pc.enter():  # no await inside: only this socket's creation moves namespace
            assert os.readlink("/proc/thread-self/ns/net") != home_netns
            sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM)
        assert os.readlink("/proc/thread-self/ns/net") == home_netns
        with sock:
            await sock.bind(("0.0.0.0", 45000))
            with trio.fail_after(5):
                await sock.sendto(b"hi", (server.address, 4000))
                data, source = await sock.recvfrom(2048)
        assert source == (server.address, 4000)
        assert parse_reply(data) == ((site.public_address, 45000), b"hi")
