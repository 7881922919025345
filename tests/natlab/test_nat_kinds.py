"""Each router kind behaves exactly as its RFC 4787 class, observed from outside.

Mapping: one internal socket asks a reflector on two ports and on a second
address which source it sees. Filtering: after the socket has contacted one
remote endpoint only, a packet from that remote address on another port, and
one from a third host, are sent unsolicited to the mapped port; a packet from
the contacted endpoint itself is the control that proves probes get through.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from tests.natlab import Host, Lab, NatKind, Site, open_lab, start_reflector
from tests.natlab.reflection import observed_address, receives

REFLECTOR_PORTS = (4000, 4001)
PROBE_PORT = 4002


@dataclass
class World:
    lab: Lab
    reflector: Host  # two addresses, reflector on both ports of the first, first port of the second
    stranger: Host  # a third address that was never contacted
    sites: dict[NatKind, tuple[Site, Host]]


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    with open_lab() as lab:
        reflector = lab.add_public_host("refl", extra_addresses=1)
        stranger = lab.add_public_host("stranger")
        sites = {}
        for kind in NatKind:
            site = lab.add_site(kind.value, kind)
            sites[kind] = (site, site.add_host("pc"))
        r0, r1 = reflector.addresses
        start_reflector(reflector, [(r0, REFLECTOR_PORTS[0]), (r0, REFLECTOR_PORTS[1]),
                                    (r1, REFLECTOR_PORTS[0])])
        yield World(lab, reflector, stranger, sites)


def _udp(host: Host, address: str = "0.0.0.0", port: int = 0) -> socket.socket:
    sock = host.socket()
    sock.bind((address, port))
    return sock


def _admitted(sender: socket.socket, receiver: socket.socket, target: tuple[str, int]) -> bool:
    """Send a few probes (tolerates no loss needed; the lab link is clean) and see if any arrive."""
    payload = b"unsolicited"
    for _ in range(3):
        sender.sendto(payload, target)
    return any(data == payload for data, _ in receives(receiver, 0.5))


EXPECTED = {
    # kind: (endpoint-independent mapping, admits same address/other port, admits other address)
    NatKind.FULL_CONE: (True, True, True),
    NatKind.ADDRESS_RESTRICTED: (True, True, False),
    NatKind.PORT_RESTRICTED: (True, False, False),
    NatKind.SYMMETRIC: (False, False, False),
}


@pytest.mark.netns
@pytest.mark.parametrize("kind", list(NatKind), ids=[kind.value for kind in NatKind])
def test_nat_kind_matches_rfc4787(world: World, kind: NatKind) -> None:
    site, pc = world.sites[kind]
    r0, r1 = world.reflector.addresses
    expected_eim, expected_same_address, expected_other_address = EXPECTED[kind]

    # Mapping behaviour.
    with _udp(pc, port=41000) as sock:
        seen = [observed_address(sock, target)
                for target in ((r0, REFLECTOR_PORTS[0]), (r0, REFLECTOR_PORTS[1]),
                               (r1, REFLECTOR_PORTS[0]))]
    assert all(ip == site.public_address for ip, _ in seen), seen
    ports = [port for _, port in seen]
    if expected_eim:
        assert len(set(ports)) == 1, f"{kind.value}: expected one external port, saw {seen}"
        assert ports[0] == 41000, "the cone kinds preserve the source port"
    else:
        assert len(set(ports)) == 3, f"{kind.value}: expected a new port per destination, saw {seen}"

    # Filtering behaviour: the internal socket contacts one remote endpoint only.
    with (_udp(pc, port=42000) as inside, _udp(world.reflector, r0, 4100) as contacted,
          _udp(world.reflector, r0, 4101) as same_address,
          _udp(world.stranger) as other_address):
        inside.sendto(b"hello", (r0, 4100))
        got = receives(contacted, 1.0)
        assert got, "the outbound packet did not cross the NAT"
        mapped = got[0][1]
        assert mapped[0] == site.public_address
        assert _admitted(contacted, inside, mapped), "control: the contacted endpoint's reply was dropped"
        admitted_same_address = _admitted(same_address, inside, mapped)
        admitted_other_address = _admitted(other_address, inside, mapped)
    print(f"{kind.value}: mappings {ports}, from same address/other port "
          f"{'admitted' if admitted_same_address else 'dropped'}, from other address "
          f"{'admitted' if admitted_other_address else 'dropped'}")
    assert admitted_same_address == expected_same_address
    assert admitted_other_address == expected_other_address
