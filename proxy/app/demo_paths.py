"""The demo's relay fallback part: a tunnel that cannot punch starts over a relay
node and, once a direct path is proven, moves to it mid-stream without losing a byte.

In this process, on loopback: a rendezvous relay node (UDP), a relay node over
TCP + mutual TLS, and two Proxies C and D linked to it; D serves a TCP echo server.
D ignores keyed messages at first (as a node behind a NAT that lets none of C's
punches in), so C's CONNECT by D's NodeId gets no direct path within the punch
window and starts relayed. Then D answers again: both sides' background punches
prove a direct path and each moves its half of the live tunnel, while 32 MiB
stream through it and back.
"""

from __future__ import annotations

import base64
import hashlib
import os
import time
from typing import Any

import trio

from proxy.identity.tls_config import TLSConfig
from proxy.relay.limits import RelayLimits
from proxy.relay.link import RelayLink
from proxy.relay.paths import RelayPaths
from proxy.relay.serve import serve_relay
from proxy.rendezvous.addresses import RelayAddress
from proxy.tunnel.proxy import open_proxy

TOKEN = "demo"
PAYLOAD = 32 << 20
CHUNK = 64 * 1024
TIMEOUT = 60.0


async def _echo(stream: trio.SocketStream) -> None:
    async with stream:
        try:
            while data := await stream.receive_some(CHUNK):
                await stream.send_all(data)
            await stream.send_eof()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass


async def _connect(proxy: Any, target: str) -> tuple[trio.SocketStream, float]:
    stream = await trio.open_tcp_stream(proxy.forward_host, proxy.forward_port)
    token = base64.b64encode(TOKEN.encode()).decode()
    started = time.perf_counter()
    await stream.send_all(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n"
                          f"Proxy-Authorization: Basic {token}\r\n\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        data = await stream.receive_some(4096)
        if not data:
            raise ConnectionError(f"CONNECT closed: {head!r}")
        head += data
    if not head.startswith(b"HTTP/1.1 200"):
        status_line = head.split(b"\r\n", 1)[0]
        raise ConnectionError(f"CONNECT answered {status_line!r}")
    return stream, time.perf_counter() - started


def _path_text(status: Any) -> str:
    info = status.info
    return f"relay via {info.via}" if info.path == "relay" else f"direct to {info.remote_host}:{info.remote_port}"


async def link_to_relay_node(nursery: trio.Nursery, proxy: Any, relay_node: str) -> RelayPaths:
    """Once `proxy`'s rendezvous has observed its address, link it to the relay node
    `relay_node` (`<NodeId>@<host>:<port>`) in `nursery`, wait for the registration
    and give the proxy the relay paths."""
    while proxy.rendezvous is None or not proxy.rendezvous.observed_addresses():
        await trio.sleep(0.01)
    paths = RelayPaths(proxy.endpoint, RelayLink(proxy.tls_config, relay_node))
    await nursery.start(paths.link.run)
    await paths.link.wait_registered()
    proxy.set_relay_routes(paths)
    return paths


async def relay_fallback(checks: list[tuple[str, bool]]) -> None:
    relay_tls = TLSConfig.generate()
    limits = RelayLimits(rate=1 << 30, burst=64 << 20, queue_bytes=8 << 20, queue_frames=8192)
    common: dict[str, Any] = {"auth_token": TOKEN, "proxy_host": "127.0.0.1", "punch_window": 1.0}
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            server = await nursery.start(
                lambda task_status: serve_relay(relay_tls, host="127.0.0.1", limits=limits, task_status=task_status))
            echo = (await nursery.start(trio.serve_tcp, _echo, 0))[0].socket.getsockname()
            async with open_proxy(tls_config=TLSConfig.generate(), relay_serve=True, **common) as rendezvous:
                relays = (RelayAddress(rendezvous.tls_config.node_id, "127.0.0.1", rendezvous.proxy_port),)
                async with open_proxy(tls_config=TLSConfig.generate(), relay_servers=relays, **common) as c, \
                        open_proxy(tls_config=TLSConfig.generate(), relay_servers=relays, server_host="127.0.0.1",
                                   server_port=echo[1], **common) as d:
                    relay_node = f"{relay_tls.node_id}@127.0.0.1:{server.port}"
                    links = [await link_to_relay_node(nursery, proxy, relay_node) for proxy in (c, d)]
                    await _fallback_and_move(c, d, relay_tls, checks)
                    for paths in links:
                        paths.link.close()
            nursery.cancel_scope.cancel()


async def _fallback_and_move(c: Any, d: Any, relay_tls: TLSConfig, checks: list[tuple[str, bool]]) -> None:
    print("\nrelay fallback: nodes C and D, a relay node over TCP + mutual TLS "
          f"({relay_tls.node_id}); D lets no punch in at first")
    keyed = d.endpoint.on_keyed_message
    d.endpoint.on_keyed_message = None
    stream, took = await _connect(c, f"{d.tls_config.node_id}:443")
    (status,) = c.connections()
    print(f"  CONNECT by NodeId answered 200 in {took:.2f} s; tunnel C -> D: path {_path_text(status)}")
    checks.append(("the tunnel that could not punch started over the relay node",
                   status.info.path == "relay" and status.info.via == relay_tls.node_id))
    data = os.urandom(PAYLOAD)
    back = hashlib.sha256()
    received = 0
    moved_after: list[float] = []

    async def send() -> None:
        for start in range(0, PAYLOAD, CHUNK):
            await stream.send_all(data[start:start + CHUNK])
            if start == PAYLOAD // 8:  # an eighth is through the relay: D answers punches again
                d.endpoint.on_keyed_message = keyed
                unblocked = time.perf_counter()
                nursery.start_soon(watch_move, unblocked)
        await stream.send_eof()

    async def watch_move(unblocked: float) -> None:
        while not c.connections() or c.connections()[0].info.path != "direct":
            await trio.sleep(0.005)
        moved_after.append(time.perf_counter() - unblocked)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(send)
        while received < PAYLOAD:
            chunk = await stream.receive_some(CHUNK)
            if not chunk:
                break
            back.update(chunk)
            received += len(chunk)
    (status,) = c.connections()
    await stream.aclose()
    for move in status.moves:
        after = f", {moved_after[0]:.2f} s after D answered punches again" if moved_after else ""
        print(f"  moved {move.from_path} -> {move.to_path} ({move.reason}){after}")
    print(f"  tunnel C -> D now: path {_path_text(status)}; {PAYLOAD >> 20} MiB there and back across the move, "
          f"sha256 {'equal' if back.digest() == hashlib.sha256(data).digest() else 'DIFFERENT'}")
    checks.append(("the live tunnel moved to the direct path", status.info.path == "direct" and status.move_count == 1))
    checks.append(("every byte came back across the move (sha256)",
                   received == PAYLOAD and back.digest() == hashlib.sha256(data).digest()))
