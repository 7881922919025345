"""NAT lab: Linux network namespaces, veth pairs and nftables as a fake internet.

    from tests.natlab import open_lab, NatKind, Impairment

    with open_lab() as lab:
        server = lab.add_public_host("server", extra_addresses=1)
        site = lab.add_site("home", NatKind.PORT_RESTRICTED, udp_timeout=5)
        client = site.add_host("pc")
        site.wan.impair(Impairment(loss=0.01, delay=0.02, jitter=0.005))
        sock = client.socket()          # a socket inside the client's namespace
        server.spawn([...], ready_line="ready")

Needs root and ip, nft, iptables, tc, conntrack (a missing one fails loudly).
"""

from .errors import LabCommandError, LabError, LabProcessError, LabToolMissing
from .impairment import Impairment
from .nat_rules import NatKind
from .processes import LabProcess
from .reflection import REFLECTOR, Reflector, start_reflector
from .topology import Host, Lab, Link, Namespace, Site, open_lab, root_interfaces

__all__ = [
    "REFLECTOR", "Host", "Impairment", "Lab", "LabCommandError", "LabError", "LabProcess",
    "LabProcessError", "LabToolMissing", "Link", "Namespace", "NatKind", "Reflector", "Site",
    "open_lab", "root_interfaces", "start_reflector",
]
