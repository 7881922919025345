"""64 MiB each way through the tunnel over a lossy, delayed, reordering path.

The forward node sits behind a port-restricted router whose WAN link drops 2%
of packets each way and delays each by 20 ms +- 5 ms (the NFQUEUE daemon;
packets whose delays cross are reordered). The reverse node is public, with an
exchange server behind it that sends 64 MiB of its own while reading ours. Both
nodes run the product's default uTP congestion controller ("rate", which does
not read random loss as congestion); LEDBAT, selectable with `[transport]
congestion = "ledbat"`, halves its window at every random loss and would not fit
the time budget (see bench/lossy_path.py for figures).

The start happens while the link is cut for its first second (every early
packet of the punch, the SYN and the control traffic lost) and still succeeds:
pings keep punching and the SYN is retransmitted after the cut.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import trio

from tests.natlab import Impairment, NatKind, open_lab
from tests.natlab.errors import LabProcessError
from tests.natlab.proxies import exchange, rendezvous_connect, start_pair

TOTAL = 64 * 1024 * 1024
CUT_AT_START = 1.0
TRANSFER_TIMEOUT = 240.0


@pytest.mark.netns
async def test_64_mib_each_way_over_2pct_loss_and_jittered_delay_after_a_lossy_start(tmp_path: Path) -> None:
    # SYN retransmissions come at 1 s and 3 s: a 5 s start outlasts the cut by far.
    timeouts = {"conn_connect_time": 5.0}
    with open_lab() as lab:
        site = lab.add_site("lossy", NatKind.PORT_RESTRICTED)
        assert site.wan is not None
        reverse_host = lab.add_public_host("far")
        forward, reverse, server = start_pair(
            tmp_path, (site.add_host("node"), site.public_address), (reverse_host, reverse_host.address),
            ports=(4400, 4401), server=("exchange", str(TOTAL)), timeouts=timeouts)
        site.wan.impair(Impairment(loss=0.02, delay=0.020, jitter=0.005, seed=5))

        site.wan.cut()
        restoring_at: list[float] = []
        async with trio.open_nursery() as nursery:

            async def restore_later() -> None:
                await trio.sleep(CUT_AT_START)
                assert site.wan is not None
                restoring_at.append(trio.current_time())
                site.wan.restore()

            nursery.start_soon(restore_later)
            answer, reverse_open = await rendezvous_connect(forward, reverse)
        assert answer.stream is not None, f"CONNECT answered {answer.status}"
        # By order of events, not by a wall-clock margin: the answer came after the
        # link was back (restore() blocks this process's loop until it is done).
        assert restoring_at and answer.answered_at > restoring_at[0], "the start cannot have beaten the cut"

        started = time.monotonic()
        rows: list[dict[str, object]] = []
        try:
            with trio.fail_after(TRANSFER_TIMEOUT):
                async with trio.open_nursery() as nursery:

                    async def sample_status() -> None:  # the connection ends with the transfer
                        await trio.sleep(5.0)
                        rows.extend((await forward.status())["connections"])

                    nursery.start_soon(sample_status)
                    sent, received, received_bytes = await exchange(answer.stream, answer.leftover, TOTAL)
                report = await trio.to_thread.run_sync(server.wait_event, "exchanged", 30.0)
        except (trio.TooSlowError, LabProcessError) as error:
            # what each side's uTP connection looks like now (window, flight, model):
            # a stall says here which of them holds it back
            states = {node.name: [(row["bytes_sent"], row["bytes_received"], row.get("transport"))
                                  for row in (await node.status())["connections"]]
                      for node in (forward, reverse)}
            ended = {}
            for node in (forward, reverse):  # why each side's tunnel ended, if it did
                await node.stop()
                ended[node.name] = [{key: record.get(key) for key in ("time", "reason", "error", "duration")}
                                    for record in node.lost_events()]
            raise AssertionError(f"{error!r} after {time.monotonic() - started:.0f} s; at 5 s {rows}; "
                                 f"now {states}; ended: {ended}") from None
        seconds = time.monotonic() - started
        await answer.stream.aclose()
        assert await forward.stop() == 0 and await reverse.stop() == 0
    rtt = [row["rtt"] for row in rows]
    windows = [row["transport"]["cwnd"] for row in rows]  # type: ignore[index]
    print(f"\nlossy start (link cut for the first {CUT_AT_START:.0f} s): CONNECT 200 after "
          f"{answer.elapsed:.2f} s, open_connection_reverse: {reverse_open}"
          f"\n64 MiB each way at 2% loss, 20 +- 5 ms each way (rate controller): {seconds:.1f} s, "
          f"{2 * TOTAL * 8 / seconds / 1e6:.1f} Mbit/s both ways together; uTP RTT after 5 s: {rtt}, "
          f"window {windows}")
    assert received_bytes == TOTAL and report["received_bytes"] == TOTAL
    assert report["received_sha256"] == sent, "forward -> reverse bytes differ"
    assert received == report["sent_sha256"], "reverse -> forward bytes differ"
