"""Cutting and restoring a link; router UDP mappings expiring after the set timeout."""

from __future__ import annotations

import time

import pytest

from tests.natlab import NatKind, open_lab, start_reflector
from tests.natlab.reflection import observed_address, receives

UDP_TIMEOUT = 3.0


@pytest.mark.netns
def test_cut_drops_everything_and_restore_brings_the_same_mapping_back() -> None:
    with open_lab() as lab:
        server = lab.add_public_host("server")
        site = lab.add_site("home", NatKind.PORT_RESTRICTED)
        pc = site.add_host("pc")
        start_reflector(server, [(server.address, 4000)])
        target = (server.address, 4000)
        assert site.wan is not None
        with pc.socket() as sock:
            sock.bind(("0.0.0.0", 43000))
            before = observed_address(sock, target)
            site.wan.cut()
            with pytest.raises(TimeoutError):
                observed_address(sock, target, attempts=3, wait=0.5)
            site.wan.restore()
            after = observed_address(sock, target)
        assert before == after == (site.public_address, 43000)


@pytest.mark.netns
def test_udp_mappings_expire_after_the_router_timeout() -> None:
    """For every kind: a mapping answers while fresh and is gone once idle past the timeout."""
    with open_lab() as lab:
        remote = lab.add_public_host("remote")
        stranger = lab.add_public_host("stranger")
        cases = []
        for kind in NatKind:
            site = lab.add_site(kind.value, kind, udp_timeout=UDP_TIMEOUT)
            pc = site.add_host("pc")
            inside = pc.socket()
            inside.bind(("0.0.0.0", 44000))
            outside = remote.socket()
            outside.bind((remote.address, 0))
            # Only the full cone admits a stranger; it must stop doing so too.
            other = stranger.socket() if kind is NatKind.FULL_CONE else None
            cases.append((kind, site, inside, outside, other))

        fresh = []
        for kind, site, inside, outside, other in cases:
            inside.sendto(b"open", outside.getsockname())
            got = receives(outside, 1.0)
            assert got, f"{kind.value}: nothing crossed the NAT"
            mapped = got[0][1]
            outside.sendto(b"fresh", mapped)
            assert [data for data, _ in receives(inside, 0.5)] == [b"fresh"], kind.value
            entries = [line for line in site.conntrack_entries() if f"dport={mapped[1]}" in line]
            assert entries, kind.value
            # The router's timeout applies: "udp 17 <seconds left> src=...".
            assert all(0 < int(line.split()[2]) <= UDP_TIMEOUT for line in entries), (kind.value, entries)
            if other is not None:
                other.sendto(b"fresh-stranger", mapped)
                assert [data for data, _ in receives(inside, 0.5)] == [b"fresh-stranger"]
            fresh.append((kind, site, inside, outside, other, mapped))

        # Idle: nothing refreshes the mappings. Wait on the routers' tables (listing them
        # refreshes nothing) until the kernel expired every entry; the bound only stops a
        # mapping that never expires.
        deadline = time.monotonic() + UDP_TIMEOUT + 30.0
        while any(site.conntrack_entries() for _, site, *_ in fresh) and time.monotonic() < deadline:
            time.sleep(0.2)  # plain sync test code: poll the kernel's state

        for kind, site, inside, outside, other, mapped in fresh:
            assert not site.conntrack_entries(), f"{kind.value}: conntrack entry survived"
            outside.sendto(b"stale", mapped)
            if other is not None:
                other.sendto(b"stale-stranger", mapped)
            assert receives(inside, 0.5) == [], f"{kind.value}: expired mapping still admits"
            for sock in (inside, outside, other):
                if sock is not None:
                    sock.close()
        print(f"all four kinds: mappings gone after {UDP_TIMEOUT:.0f} s idle")
