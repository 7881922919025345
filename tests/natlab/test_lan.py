"""Two hosts behind one NAT: they reach each other on LAN addresses; the router does not hairpin."""

from __future__ import annotations

import pytest

from tests.natlab import NatKind, open_lab, start_reflector
from tests.natlab.reflection import observed_address, receives


@pytest.mark.netns
@pytest.mark.parametrize("kind", [NatKind.FULL_CONE, NatKind.PORT_RESTRICTED],
                         ids=["full-cone", "port-restricted"])
def test_lan_peers_talk_directly_and_there_is_no_hairpin(kind: NatKind) -> None:
    with open_lab() as lab:
        server = lab.add_public_host("server")
        site = lab.add_site("home", kind)
        pc1, pc2 = site.add_host("pc1"), site.add_host("pc2")
        start_reflector(server, [(server.address, 4000)])
        with pc1.socket() as one, pc2.socket() as two:
            one.bind(("0.0.0.0", 46000))
            two.bind(("0.0.0.0", 46001))
            public = observed_address(one, (server.address, 4000))
            assert public == (site.public_address, 46000)

            two.sendto(b"lan", (pc1.address, 46000))
            assert receives(one, 0.5) == [(b"lan", (pc2.address, 46001))]

            two.sendto(b"hairpin", public)
            assert receives(one, 0.5) == [], "the router hairpinned"
