"""Live tunnels moving between a relay node and the direct path, in the NAT lab
(real kernel NAT, `keynode run` nodes configured only with `[relay] servers`).

A relay node on a public host; node A behind one port-restricted NAT, node B
behind another with an exchange server as its `[server]`. "The direct path cut"
is an nftables table in A's router that drops UDP between A's site and B's public
address, both ways: the relay node's traffic is untouched.

- A CONNECT by NodeId while the direct path is cut starts over the relay; a
  transfer runs; the cut is lifted and the live tunnel moves to direct (both
  halves); the direct path is cut again and it moves back to the relay; the
  transfer ends sha256-equal both ways. The time each move took is printed.
  Meanwhile the relay node's host captures every packet: the marker sent through
  the tunnel during the relayed phase never appears in what it forwarded.
- The relay node killed during a direct transfer changes nothing; restarted, both
  nodes register with it again by themselves.
- A node behind a router that forwards no UDP at all links to the relay node over
  TCP + mutual TLS (`:tcp=` in its `[relay] servers`) and is reached by NodeId
  through it: path relay on both sides, 16 MiB each way sha256-equal.
- A NAT rebinding mid-stream (a symmetric router's conntrack flushed): the tunnel
  falls back to the relay and a new authenticated punch moves it to the new mapping.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import socket
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio

from tests.natlab import NatKind, open_lab
from tests.natlab.processes import LabProcess
from tests.natlab.proxies import PYTHON, KeynodeNode, exchange, start_node, start_server, wait_ready
from tests.natlab.relay_lab import connect_by_node_id, relay_servers_config, start_relay_node
from tests.natlab.topology import Host, Lab, Site

CUT_TABLE = "keynode_cut"
BACK = 16 << 20  # what B's exchange server sends back
CHUNK = 64 * 1024
PACE = 0.02  # seconds between chunks: about 3 MiB/s, so the moves happen mid-stream
PHASE_BYTES = 6 << 20  # sent on each path before the next step
MOVE_TIMEOUT = 30.0
TIMEOUTS = {"conn_connect_time": 10.0}
ETH_P_ALL = 0x0003


def cut_direct(router: Site, peer_ip: str) -> None:
    """Drop UDP between this router's site and ``peer_ip`` (forwarded, both ways)."""
    router.run(["nft", "-f", "-"], input_text=(
        f"table inet {CUT_TABLE} {{\n"
        "  chain forward {\n"
        "    type filter hook forward priority -50; policy accept;\n"
        f"    ip daddr {peer_ip} udp dport 1-65535 drop\n"
        f"    ip saddr {peer_ip} udp sport 1-65535 drop\n"
        "  }\n"
        "}\n"))


def restore_direct(router: Site) -> None:
    router.run(["nft", "delete", "table", "inet", CUT_TABLE])


class Capture:
    """Every packet the relay node's host sees (AF_PACKET in its namespace), read by
    a thread; counts bytes and whether ``marker`` appeared in any."""

    def __init__(self, host: Host, marker: bytes) -> None:
        with host.enter():
            self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        self.sock.settimeout(0.2)
        self.marker = marker
        self.bytes = 0
        self.packets = 0
        self.marker_seen = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            try:
                packet = self.sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            self.packets += 1
            self.bytes += len(packet)
            if self.marker in packet:
                self.marker_seen += 1

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()


@dataclass
class Pair:
    lab: Lab
    relay: KeynodeNode
    relay_dir: Path
    a: KeynodeNode
    b: KeynodeNode
    site_a: Site
    site_b: Site
    server: LabProcess
    server_port: int


async def registered(node: KeynodeNode, timeout: float = 20.0) -> None:
    with trio.fail_after(timeout):
        while not (await node.status()).get("observed_addresses"):
            await trio.sleep(0.1)


def start_client_and_server_nodes(tmp_path: Path, client: tuple[Site, str, int], server_side: tuple[Site, str, int],
                                  server_bytes: int, extra_config: list[str]
                                  ) -> tuple[KeynodeNode, KeynodeNode, LabProcess, int]:
    """A node on a host of each (site, name, proxy port), both ready; the second fronts an
    exchange server sending `server_bytes`. Returns the two nodes, the server and its port."""
    (client_site, client_name, client_port), (server_site, server_name, server_proxy_port) = client, server_side
    client_host, server_host = client_site.add_host("node"), server_site.add_host("node")
    server, server_port = start_server(server_host, "exchange", str(server_bytes))
    a = start_node(client_host, tmp_path / client_name.lower(), name=client_name, proxy_port=client_port,
                   public_ip=client_site.public_address, timeouts=TIMEOUTS, extra_config=extra_config)
    b = start_node(server_host, tmp_path / server_name.lower(), name=server_name, proxy_port=server_proxy_port,
                   public_ip=server_site.public_address, server_port=server_port, timeouts=TIMEOUTS,
                   extra_config=extra_config)
    for node in (a, b):
        wait_ready(node)
    return a, b, server, server_port


@asynccontextmanager
async def relay_and_pair(tmp_path: Path, server_bytes: int, kind_a: NatKind = NatKind.PORT_RESTRICTED,
                         kind_b: NatKind = NatKind.PORT_RESTRICTED) -> AsyncIterator[Pair]:
    with open_lab() as lab:
        relay = wait_ready(start_relay_node(lab, tmp_path / "relay", name="relay", timeouts=TIMEOUTS))
        relay_lines = relay_servers_config([relay])
        site_a = lab.add_site("a", kind_a)
        site_b = lab.add_site("b", kind_b)
        a, b, server, server_port = start_client_and_server_nodes(
            tmp_path, (site_a, "A", 4300), (site_b, "B", 4301), server_bytes, relay_lines)
        for node in (a, b):
            await registered(node)
        pair = Pair(lab, relay, tmp_path / "relay", a, b, site_a, site_b, server, server_port)
        yield pair
        for node in (a, b, pair.relay):
            if node.process.returncode is None:
                assert await node.stop() == 0, f"{node.name} did not stop cleanly"


async def row_toward(node: KeynodeNode, peer: KeynodeNode) -> dict[str, Any] | None:
    rows = [row for row in (await node.status())["connections"]
            if row.get("node_id") == peer.node_id and row.get("state") == "established"]
    return rows[0] if rows else None


async def wait_path(pair: Pair, path: str) -> float:
    """Until both halves of the tunnel are on ``path``; returns the seconds it took."""
    started = time.monotonic()
    with trio.fail_after(MOVE_TIMEOUT):
        while True:
            rows = [await row_toward(pair.a, pair.b), await row_toward(pair.b, pair.a)]
            if all(row is not None and row.get("path") == path for row in rows):
                return time.monotonic() - started
            await trio.sleep(0.05)


@pytest.mark.netns
async def test_a_live_tunnel_moves_relay_to_direct_and_back_sha256_equal_and_the_relay_sees_no_plaintext(
        tmp_path: Path) -> None:
    marker = b"KEYNODE-PLAINTEXT-MARKER-" + os.urandom(8).hex().encode()
    async with relay_and_pair(tmp_path, BACK) as pair:
        cut_direct(pair.site_a, pair.site_b.public_address)
        capture = Capture(pair.relay.host, marker)
        answer = await connect_by_node_id(pair.a, pair.b.node_id, pair.server_port, timeout=30)
        assert answer.status == 200 and answer.stream is not None, answer.message
        relayed_in = answer.elapsed
        await wait_path(pair, "relay")
        row = await row_toward(pair.a, pair.b)
        assert row is not None and row["via"] == pair.relay.node_id
        stream = answer.stream
        sent_total = 0
        moves: dict[str, float] = {}
        captured: dict[str, int] = {}

        async def steps() -> None:
            nonlocal sent_total
            while sent_total < PHASE_BYTES:
                await trio.sleep(0.05)
            capture.stop()  # what the relay node saw while it carried the marker and the first phase
            captured.update(packets=capture.packets, bytes=capture.bytes, marker=capture.marker_seen)
            restore_direct(pair.site_a)
            moves["relay -> direct"] = await wait_path(pair, "direct")
            mark = sent_total
            while sent_total < mark + PHASE_BYTES:
                await trio.sleep(0.05)
            cut_direct(pair.site_a, pair.site_b.public_address)
            moves["direct -> relay"] = await wait_path(pair, "relay")
            mark = sent_total
            while sent_total < mark + PHASE_BYTES:
                await trio.sleep(0.05)
            done.set()

        done = trio.Event()  # every step taken: the sender ends its stream
        sent_digest = hashlib.sha256()
        received_digest = hashlib.sha256()
        received = len(answer.leftover)
        received_digest.update(answer.leftover)

        async def send() -> None:
            nonlocal sent_total
            async with trio.open_nursery() as nursery:
                nursery.start_soon(steps)
                first = marker * (CHUNK // len(marker))
                while True:
                    chunk = first if sent_total == 0 else os.urandom(CHUNK)
                    sent_digest.update(chunk)
                    await stream.send_all(chunk)
                    sent_total += len(chunk)
                    if done.is_set():
                        break
                    await trio.sleep(PACE)
            await stream.send_eof()

        async def receive() -> None:
            nonlocal received
            while data := await stream.receive_some(CHUNK):
                received_digest.update(data)
                received += len(data)

        try:
            with trio.fail_after(4 * MOVE_TIMEOUT + 120):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(send)
                    nursery.start_soon(receive)
                report = await trio.to_thread.run_sync(pair.server.wait_event, "exchanged", 60.0)
        except BaseException:
            rows = [await row_toward(pair.a, pair.b), await row_toward(pair.b, pair.a)]
            print(f"\nstuck: sent {sent_total}, received {received}, moves {moves}, rows {rows}")
            try:
                print("server:", pair.server.wait_event("exchanged", 2.0))
            except Exception as error:  # noqa: BLE001
                print("server did not report:", error)
            for node in (pair.a, pair.b, pair.relay):
                print(f"--- {node.name}\n" + "\n".join(node.process.stderr_text().splitlines()[-25:]))
            raise
        await stream.aclose()
        print(f"\nCONNECT by NodeId with the direct path cut: 200 (relayed) in {relayed_in:.2f} s; "
              + "; ".join(f"{name} took {seconds:.2f} s (lift/cut to both halves moved)"
                          for name, seconds in moves.items())
              + f"; {sent_total >> 20} MiB there, {received >> 20} MiB back; relay host captured "
              f"{captured.get('packets')} packets, {captured.get('bytes', 0) >> 20} MiB, marker seen "
              f"{captured.get('marker')} times")
        assert report["received_bytes"] == sent_total and report["received_sha256"] == sent_digest.hexdigest()
        assert received == BACK and report["sent_sha256"] == received_digest.hexdigest()
        assert set(moves) == {"relay -> direct", "direct -> relay"}
        assert captured["bytes"] >= PHASE_BYTES  # it carried the first phase (and the marker) ...
        assert captured["marker"] == 0  # ... and never saw it in plaintext
        restore_direct(pair.site_a)


@pytest.mark.netns
async def test_the_relay_node_killed_during_a_direct_transfer_changes_nothing_and_nodes_reregister(
        tmp_path: Path) -> None:
    total = 128 << 20
    async with relay_and_pair(tmp_path, total) as pair:
        answer = await connect_by_node_id(pair.a, pair.b.node_id, pair.server_port, timeout=30)
        assert answer.status == 200 and answer.stream is not None, answer.message
        await wait_path(pair, "direct")
        relay_host = pair.relay.host

        rows: list[dict[str, Any] | None] = []

        async def kill_relay() -> None:
            await trio.sleep(0.3)
            assert await pair.relay.stop() == 0
            rows.append(await row_toward(pair.a, pair.b))  # the transfer still runs

        with trio.fail_after(300):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(kill_relay)
                sent, received, count = await exchange(answer.stream, answer.leftover, total)
            report = await trio.to_thread.run_sync(pair.server.wait_event, "exchanged", 60.0)
        await answer.stream.aclose()
        (row,) = rows
        assert pair.relay.process.returncode is not None  # it was down during the transfer
        assert report["received_sha256"] == sent and report["received_bytes"] == total
        assert received == report["sent_sha256"] and count == total
        assert row is not None and row["path"] == "direct" and row["moves"]["count"] == 0
        # Restarted (same identity, same address): both nodes register again by themselves.
        process = relay_host.spawn([*PYTHON, "-m", "proxy.app.cli", "run", "--dir", str(pair.relay_dir)])
        pair.relay = wait_ready(dataclasses.replace(pair.relay, process=process, info={}))
        started = time.monotonic()
        with trio.fail_after(60):
            while (await pair.relay.status())["rendezvous"].get("registrations", 0) < 2:
                await trio.sleep(0.2)
        print(f"\nrelay node killed 0.3 s into a 128 MiB-each-way direct transfer: sha256-equal, path direct, "
              f"0 moves; restarted: both nodes registered again after {time.monotonic() - started:.1f} s")


def drop_all_udp(router: Site) -> None:
    """The router forwards no UDP at all, either way (TCP passes)."""
    router.run(["nft", "-f", "-"], input_text=(
        f"table inet {CUT_TABLE} {{\n"
        "  chain forward {\n"
        "    type filter hook forward priority -50; policy accept;\n"
        "    meta l4proto udp drop\n"
        "  }\n"
        "}\n"))


@pytest.mark.netns
async def test_a_node_whose_router_drops_all_udp_connects_through_the_relay_over_tcp(tmp_path: Path) -> None:
    total = 16 << 20
    with open_lab() as lab:
        relay_host = lab.add_public_host("relay")
        relay = wait_ready(start_node(relay_host, tmp_path / "relay", name="relay", proxy_port=4000,
                                      public_ip=relay_host.address, timeouts=TIMEOUTS,
                                      extra_config=["[relay]", "serve = true", "tcp_port = 4443"]))
        servers = ["[relay]", f'servers = ["{relay.node_id}@{relay_host.address}:4000:tcp=4443"]']
        blocked = lab.add_site("noudp", NatKind.PORT_RESTRICTED)
        drop_all_udp(blocked)
        far = lab.add_site("far", NatKind.PORT_RESTRICTED)
        u, p, server, server_port = start_client_and_server_nodes(
            tmp_path, (blocked, "U", 4310), (far, "P", 4311), total, servers)
        await registered(p)
        started = time.monotonic()
        answer = None
        with trio.fail_after(60):  # U links to the relay over TCP once no UDP registration answered
            while answer is None or answer.stream is None:
                answer = await connect_by_node_id(u, p.node_id, server_port, timeout=30)
                if answer.stream is None:
                    await trio.sleep(1.0)
        linked_after = time.monotonic() - started
        rows = [await row_toward(u, p), await row_toward(p, u)]
        with trio.fail_after(120):
            sent, received, count = await exchange(answer.stream, answer.leftover, total)
            report = await trio.to_thread.run_sync(server.wait_event, "exchanged", 60.0)
        await answer.stream.aclose()
        print(f"\nnode behind a router dropping all UDP: CONNECT by NodeId answered 200 {linked_after:.1f} s after "
              f"both were up (path {rows[0] and rows[0]['path']} via {rows[0] and rows[0]['via']}); "
              f"{total >> 20} MiB each way sha256-equal")
        assert all(row is not None and row["path"] == "relay" and row["via"] == relay.node_id for row in rows), rows
        assert report["received_sha256"] == sent and report["received_bytes"] == total
        assert received == report["sent_sha256"] and count == total
        assert not (await u.status()).get("observed_addresses")  # no UDP ever left its site
        for node in (u, p, relay):
            assert await node.stop() == 0


@pytest.mark.netns
async def test_a_nat_rebinding_mid_stream_moves_the_tunnel_to_the_new_mapping(tmp_path: Path) -> None:
    """A behind a symmetric NAT, B behind a full cone: direct. A's router forgets its
    mappings mid-stream (conntrack flushed), so A's datagrams leave from a new port.
    B drops them (nat never follows an unauthenticated source), both halves fall
    back to the relay, and a new authenticated punch moves both to A's new mapping;
    the transfer ends sha256-equal."""
    async with relay_and_pair(tmp_path, BACK, NatKind.SYMMETRIC, NatKind.FULL_CONE) as pair:
        answer = await connect_by_node_id(pair.a, pair.b.node_id, pair.server_port, timeout=30)
        assert answer.status == 200 and answer.stream is not None, answer.message
        await wait_path(pair, "direct")
        before = await row_toward(pair.b, pair.a)
        assert before is not None
        stream = answer.stream
        sent, back = hashlib.sha256(), hashlib.sha256()
        back.update(answer.leftover)
        counts = {"sent": 0, "received": len(answer.leftover)}
        rebound: dict[str, Any] = {}
        done = trio.Event()

        async def rebind() -> None:
            while counts["sent"] < PHASE_BYTES:
                await trio.sleep(0.05)
            pair.site_a.flush_conntrack()
            started = time.monotonic()
            with trio.fail_after(MOVE_TIMEOUT):
                while True:
                    row = await row_toward(pair.b, pair.a)
                    forward = await row_toward(pair.a, pair.b)
                    if (row is not None and forward is not None and row["path"] == forward["path"] == "direct"
                            and row["remote"] != before["remote"]):
                        break
                    await trio.sleep(0.05)
            rebound.update(seconds=time.monotonic() - started, remote=row["remote"], moves=row["moves"])
            mark = counts["sent"]
            while counts["sent"] < mark + PHASE_BYTES:
                await trio.sleep(0.05)
            done.set()

        async def send() -> None:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(rebind)
                while not done.is_set():
                    chunk = os.urandom(CHUNK)
                    sent.update(chunk)
                    await stream.send_all(chunk)
                    counts["sent"] += len(chunk)
                    await trio.sleep(PACE)
            await stream.send_eof()

        async def receive() -> None:
            while data := await stream.receive_some(CHUNK):
                back.update(data)
                counts["received"] += len(data)

        with trio.fail_after(MOVE_TIMEOUT + 120):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(send)
                nursery.start_soon(receive)
            report = await trio.to_thread.run_sync(pair.server.wait_event, "exchanged", 60.0)
        await stream.aclose()
        reasons = [move["reason"] for move in rebound["moves"]["recent"]]
        print(f"\nNAT rebinding mid-stream: B saw A at {before['remote']}, then at {rebound['remote']} after "
              f"{rebound['seconds']:.2f} s (B's moves: {reasons}); {counts['sent'] >> 20} MiB there, "
              f"{counts['received'] >> 20} MiB back, sha256-equal")
        assert report["received_bytes"] == counts["sent"] and report["received_sha256"] == sent.hexdigest()
        assert counts["received"] == BACK and report["sent_sha256"] == back.hexdigest()
