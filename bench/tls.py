"""TLS benchmark: our TLSStream (pyOpenSSL, memory BIOs) next to the standard
library's ssl module, measured the same way in the same run.

    .venv/bin/python bench/tls.py [--quick]

Both stacks run mutual TLS 1.3 with the same Ed25519 node certificates, client and
server in this one process (so each figure is the CPU of both ends together):

* handshake: a fresh client/server pair over trio.testing.memory_stream_pair, time
  from start to both handshakes done (median and p99);
* bulk: client -> server, send_all in 1 MiB chunks, receive_some(64 KiB), MiB/s,
  over four transports: trio.testing.memory_stream_pair (unbounded buffer: a
  sender that outruns the receiver piles up megabytes that every later append
  moves, so it penalises many small sends), a bounded in-memory stream (trio
  memory channels, backpressure like a socket), TCP on loopback, and our uTP
  (nat.open_endpoint) on loopback with a sixth of the bytes;
* the same two without trio (bare pyOpenSSL Connection vs ssl.SSLObject pumped by
  hand), to show what the crypto itself costs and what the stream layer adds.

The two stacks alternate (handshakes in batches of 10, bulk round by round) so both
see the same load on a shared machine; bulk also reports MiB per CPU-second of this
process, steadier than wall time when other processes compete.

Bounded: about 15-30 s on a busy 2-core machine, hard limit 60 s (--quick: seconds).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import ssl
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import trio
import trio.testing
from OpenSSL import SSL

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from proxy.identity.certificates import chain_to_pem  # noqa: E402
from proxy.identity.keys import private_key_to_pem  # noqa: E402
from proxy.identity.tls_config import TLSConfig  # noqa: E402
from proxy.tls.stream import TLSStream, _context_for  # noqa: E402

MiB = 1024 * 1024
SEND_CHUNK = 1 * MiB
RECEIVE_SIZE = 64 * 1024

StreamPair = tuple[trio.abc.Stream, trio.abc.Stream]
exits: contextlib.AsyncExitStack  # holds transports' resources (uTP endpoints) for the run


# --- the standard library's side -------------------------------------------------


def stdlib_contexts(client: TLSConfig, server: TLSConfig, directory: Path) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """ssl contexts with the same identities. The ssl module has no accept-any
    verify callback, so each side trusts the other's chain root instead."""

    def files(name: str, config: TLSConfig) -> tuple[str, str]:
        key_path, chain_path = directory / f"{name}.key", directory / f"{name}.pem"
        key_path.write_bytes(private_key_to_pem(config.private_key))
        chain_path.write_bytes(chain_to_pem(config.certificate_chain))
        return str(chain_path), str(key_path)

    def context(purpose: ssl.Purpose, own: TLSConfig, peer: TLSConfig, name: str) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if purpose is ssl.Purpose.CLIENT_AUTH else ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ctx.maximum_version = ssl.TLSVersion.TLSv1_3
        ctx.load_cert_chain(*files(name, own))
        ctx.load_verify_locations(cadata=chain_to_pem(peer.certificate_chain[-1:]).decode())
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.options |= ssl.OP_NO_TICKET
        if purpose is ssl.Purpose.CLIENT_AUTH:
            ctx.num_tickets = 0
        return ctx

    return (
        context(ssl.Purpose.SERVER_AUTH, client, server, "client"),
        context(ssl.Purpose.CLIENT_AUTH, server, client, "server"),
    )


# --- transports ------------------------------------------------------------------------


class ChannelStream(trio.abc.HalfCloseableStream):
    """An in-memory transport with a bounded buffer (backpressure like a socket),
    built on trio memory channels. trio.testing.memory_stream_pair buffers without
    bound, so there a fast sender piles up megabytes and every append then moves
    them: that measures the test double more than TLS."""

    def __init__(self, send: trio.MemorySendChannel[bytes], receive: trio.MemoryReceiveChannel[bytes]) -> None:
        self._send, self._receive = send, receive
        self._leftover = b""

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if data:
            await self._send.send(bytes(data))
        else:
            await trio.lowlevel.checkpoint()

    async def wait_send_all_might_not_block(self) -> None:
        await trio.lowlevel.checkpoint()

    async def send_eof(self) -> None:
        await self._send.aclose()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if not self._leftover:
            try:
                self._leftover = await self._receive.receive()
            except trio.EndOfChannel:
                return b""
        else:
            await trio.lowlevel.checkpoint()
        if max_bytes is None or max_bytes >= len(self._leftover):
            chunk, self._leftover = self._leftover, b""
        else:
            chunk, self._leftover = self._leftover[:max_bytes], self._leftover[max_bytes:]
        return chunk

    async def aclose(self) -> None:
        await self._send.aclose()
        await self._receive.aclose()


def channel_stream_pair(chunks: int = 16) -> StreamPair:
    a_send, b_receive = trio.open_memory_channel[bytes](chunks)
    b_send, a_receive = trio.open_memory_channel[bytes](chunks)
    return ChannelStream(a_send, a_receive), ChannelStream(b_send, b_receive)


async def tcp_stream_pair() -> StreamPair:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    try:
        port = listeners[0].socket.getsockname()[1]
        client = await trio.open_tcp_stream("127.0.0.1", port)
        server = await listeners[0].accept()
    finally:
        for listener in listeners:
            await listener.aclose()
    return client, server


# --- stream-level measurements ----------------------------------------------------


async def handshake_times(make_pair: Callable[[], StreamPair], count: int) -> list[float]:
    times = []
    for _ in range(count):
        start = time.perf_counter()
        client, server = make_pair()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client.do_handshake)  # type: ignore[attr-defined]
            nursery.start_soon(server.do_handshake)  # type: ignore[attr-defined]
        times.append(time.perf_counter() - start)
        await trio.aclose_forcefully(client)
        await trio.aclose_forcefully(server)
    return times


async def bulk_rate(make_pair: Callable[[], Awaitable[StreamPair]], total: int) -> tuple[float, float]:
    """(MiB/s of wall time, MiB per CPU-second of this process)."""
    client, server = await make_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(client.do_handshake)  # type: ignore[attr-defined]
        nursery.start_soon(server.do_handshake)  # type: ignore[attr-defined]
    chunk = os.urandom(SEND_CHUNK)
    total = max(1, total // SEND_CHUNK) * SEND_CHUNK  # whole chunks only
    received = 0

    async def send() -> None:
        for _ in range(total // SEND_CHUNK):
            await client.send_all(chunk)

    async def receive() -> None:
        nonlocal received
        while received < total:
            received += len(await server.receive_some(RECEIVE_SIZE))

    start, start_cpu = time.perf_counter(), time.process_time()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(send)
        nursery.start_soon(receive)
    elapsed, cpu = time.perf_counter() - start, time.process_time() - start_cpu
    await trio.aclose_forcefully(client)
    await trio.aclose_forcefully(server)
    return total / MiB / elapsed, total / MiB / cpu


# --- bare (no trio) measurements ------------------------------------------------------


def bare_pyopenssl_pair(client: TLSConfig, server: TLSConfig) -> tuple[SSL.Connection, SSL.Connection]:
    c = SSL.Connection(_context_for(client, False), None)
    c.set_connect_state()
    s = SSL.Connection(_context_for(server, True), None)
    s.set_accept_state()
    return c, s


def bare_pyopenssl_handshake(client: TLSConfig, server: TLSConfig) -> tuple[SSL.Connection, SSL.Connection]:
    c, s = bare_pyopenssl_pair(client, server)
    done = [False, False]
    while not all(done):
        for index, (a, b) in enumerate(((c, s), (s, c))):
            try:
                a.do_handshake()
                done[index] = True
            except SSL.WantReadError:
                pass
            try:
                b.bio_write(a.bio_read(1 << 20))
            except SSL.WantReadError:
                pass
    return c, s


def bare_pyopenssl_bulk(client: TLSConfig, server: TLSConfig, total: int) -> tuple[float, float]:
    c, s = bare_pyopenssl_handshake(client, server)
    chunk = memoryview(os.urandom(SEND_CHUNK))
    start, start_cpu = time.perf_counter(), time.process_time()
    for _ in range(total // SEND_CHUNK):
        for offset in range(0, SEND_CHUNK, 128 * 1024):
            c.send(chunk[offset : offset + 128 * 1024])
            s.bio_write(c.bio_read(256 * 1024))
            try:
                while True:
                    s.recv(RECEIVE_SIZE)
            except SSL.WantReadError:
                pass
    return total / MiB / (time.perf_counter() - start), total / MiB / (time.process_time() - start_cpu)


def bare_stdlib_handshake(
    contexts: tuple[ssl.SSLContext, ssl.SSLContext],
) -> tuple[ssl.SSLObject, ssl.SSLObject, list[ssl.MemoryBIO]]:
    bios = [ssl.MemoryBIO() for _ in range(4)]  # c_in, c_out, s_in, s_out
    c = contexts[0].wrap_bio(bios[0], bios[1], server_side=False)
    s = contexts[1].wrap_bio(bios[2], bios[3], server_side=True)
    done = [False, False]
    while not all(done):
        for index, (obj, out_bio, peer_in) in enumerate(((c, bios[1], bios[2]), (s, bios[3], bios[0]))):
            try:
                obj.do_handshake()
                done[index] = True
            except ssl.SSLWantReadError:
                pass
            peer_in.write(out_bio.read())
    return c, s, bios


def bare_stdlib_bulk(contexts: tuple[ssl.SSLContext, ssl.SSLContext], total: int) -> tuple[float, float]:
    c, s, bios = bare_stdlib_handshake(contexts)
    chunk = memoryview(os.urandom(SEND_CHUNK))
    start, start_cpu = time.perf_counter(), time.process_time()
    for _ in range(total // SEND_CHUNK):
        for offset in range(0, SEND_CHUNK, 128 * 1024):
            c.write(chunk[offset : offset + 128 * 1024])
            bios[2].write(bios[1].read())
            try:
                while True:
                    s.read(RECEIVE_SIZE)
            except ssl.SSLWantReadError:
                pass
    return total / MiB / (time.perf_counter() - start), total / MiB / (time.process_time() - start_cpu)


def timed(function: Callable[[], object], count: int) -> list[float]:
    times = []
    for _ in range(count):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return times


# --- report --------------------------------------------------------------------------


def p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds (a smoke run)")
    parser.add_argument("--chain-length", type=int, default=1, help="certificates per chain (key rotations + 1)")
    arguments = parser.parse_args()
    handshakes = 30 if arguments.quick else 200
    bulk_total = (16 if arguments.quick else 48) * MiB
    rounds = 1 if arguments.quick else 5

    from proxy.identity.certificates import rotate_key

    def identity() -> TLSConfig:
        config = TLSConfig.generate()
        key, chain = config.private_key, list(config.certificate_chain)
        for _ in range(arguments.chain_length - 1):
            key, chain = rotate_key(key, chain)
        return TLSConfig(key, tuple(chain))

    client_config, server_config = identity(), identity()
    with tempfile.TemporaryDirectory() as directory:
        contexts = stdlib_contexts(client_config, server_config, Path(directory))

    def ours(pair: StreamPair) -> StreamPair:
        return (
            TLSStream(pair[0], client_config, server_side=False),
            TLSStream(pair[1], server_config, server_side=True),
        )

    def stdlib(pair: StreamPair) -> StreamPair:
        return (
            trio.SSLStream(pair[0], contexts[0], server_side=False),
            trio.SSLStream(pair[1], contexts[1], server_side=True),
        )

    def ours_pair() -> StreamPair:
        return ours(trio.testing.memory_stream_pair())

    def stdlib_pair() -> StreamPair:
        return stdlib(trio.testing.memory_stream_pair())

    transports: list[tuple[str, Callable[[], Awaitable[StreamPair]]]] = []

    async def over_memory_stream() -> StreamPair:
        return trio.testing.memory_stream_pair()

    async def over_channel_stream() -> StreamPair:
        return channel_stream_pair()

    from nat import open_endpoint

    async def over_utp() -> StreamPair:
        # Two endpoints kept open until the run ends (closed by `exits`).
        client_end = await exits.enter_async_context(open_endpoint())
        server_end = await exits.enter_async_context(open_endpoint())
        accepted: list[trio.abc.Stream] = []
        async with trio.open_nursery() as nursery:

            async def accept() -> None:
                accepted.append(await server_end.accept())

            nursery.start_soon(accept)
            client = await client_end.connect(server_end.address)
        return client, accepted[0]

    # (name, maker, bytes per round): our uTP in Python is far slower than TCP.
    transports = [
        ("memory_stream_pair", over_memory_stream, bulk_total),
        ("bounded memory", over_channel_stream, bulk_total),
        ("TCP loopback", tcp_stream_pair, bulk_total),
        ("uTP loopback (nat)", over_utp, bulk_total // 6),
    ]

    # Warm up both (imports, first context, allocator).
    await handshake_times(ours_pair, 5)
    await handshake_times(stdlib_pair, 5)

    # The machine is shared and noisy: the two stacks alternate in small batches so
    # that both see the same load, and every figure is a median.
    batch = 10
    stream_times: dict[str, list[float]] = {"ours": [], "stdlib": []}
    bare_times: dict[str, list[float]] = {"ours": [], "stdlib": []}
    for _ in range(handshakes // batch):
        stream_times["ours"] += await handshake_times(ours_pair, batch)
        stream_times["stdlib"] += await handshake_times(stdlib_pair, batch)
        bare_times["ours"] += timed(lambda: bare_pyopenssl_handshake(client_config, server_config), batch)
        bare_times["stdlib"] += timed(lambda: bare_stdlib_handshake(contexts), batch)

    labels = {"ours": "TLSStream (pyOpenSSL)", "stdlib": "trio.SSLStream (ssl)"}
    bare_labels = {"ours": "pyOpenSSL memory BIO", "stdlib": "ssl.SSLObject MemoryBIO"}
    rows: list[tuple[str, str, str]] = []
    for key in ("ours", "stdlib"):
        times = stream_times[key]
        rows.append((f"handshake, trio stream: {labels[key]}",
                     f"{statistics.median(times) * 1e3:.2f} ms", f"{p99(times) * 1e3:.2f} ms"))
    for key in ("ours", "stdlib"):
        times = bare_times[key]
        rows.append((f"handshake, bare: {bare_labels[key]}",
                     f"{statistics.median(times) * 1e3:.2f} ms", f"{p99(times) * 1e3:.2f} ms"))

    bulk_rows: list[tuple[str, str, str]] = []

    def bulk_row(name: str, results: list[tuple[float, float]]) -> tuple[str, str, str]:
        return (
            name,
            f"{statistics.median(r[0] for r in results):.0f} MiB/s",
            f"{statistics.median(r[1] for r in results):.0f} MiB/CPU-s",
        )

    wraps = {"ours": ours, "stdlib": stdlib}
    for transport_name, make_transport, total in transports:
        results: dict[str, list[tuple[float, float]]] = {"ours": [], "stdlib": []}
        for _ in range(rounds):
            for key in ("ours", "stdlib"):

                async def make(
                    wrap: Callable[[StreamPair], StreamPair] = wraps[key], make_transport=make_transport
                ) -> StreamPair:
                    return wrap(await make_transport())

                results[key].append(await bulk_rate(make, total))
        for key in ("ours", "stdlib"):
            bulk_rows.append(bulk_row(f"bulk, {transport_name}: {labels[key]}", results[key]))
    bare_results: dict[str, list[tuple[float, float]]] = {"ours": [], "stdlib": []}
    for _ in range(rounds):
        bare_results["ours"].append(bare_pyopenssl_bulk(client_config, server_config, bulk_total))
        bare_results["stdlib"].append(bare_stdlib_bulk(contexts, bulk_total))
    for key in ("ours", "stdlib"):
        bulk_rows.append(bulk_row(f"bulk, bare: {bare_labels[key]}", bare_results[key]))

    c, _ = bare_pyopenssl_handshake(client_config, server_config)
    print(
        f"mutual TLS 1.3 ({c.get_cipher_name()}), Ed25519, chain length {arguments.chain_length}, "
        f"client+server in one process; {handshakes} handshakes, bulk {bulk_total // MiB} MiB x {rounds} "
        f"(median), send_all {SEND_CHUNK // 1024} KiB, receive_some {RECEIVE_SIZE // 1024} KiB"
    )
    width = max(len(row[0]) for row in rows + bulk_rows)
    print(f"{'handshake':<{width}}  {'median':>14}  {'p99':>14}")
    for name, median, tail in rows:
        print(f"{name:<{width}}  {median:>14}  {tail:>14}")
    print(f"{'bulk (one direction)':<{width}}  {'wall':>14}  {'CPU':>14}")
    for name, rate, cpu_rate in bulk_rows:
        print(f"{name:<{width}}  {rate:>14}  {cpu_rate:>14}")


async def bounded_main() -> None:
    global exits
    with trio.fail_after(60):  # a bench must never hang a CI job
        async with contextlib.AsyncExitStack() as exits:
            await main()


if __name__ == "__main__":
    trio.run(bounded_main)
