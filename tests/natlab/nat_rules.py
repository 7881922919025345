"""nftables rulesets that turn a router namespace into one of the RFC 4787 NAT kinds.

| kind              | mapping                  | filtering                 | how                             |
|-------------------|--------------------------|---------------------------|---------------------------------|
| FULL_CONE         | endpoint-independent     | endpoint-independent      | port-preserving SNAT + a dynamic map ext port -> internal ip.port; inbound to a mapped port is DNATed from anyone |
| ADDRESS_RESTRICTED| endpoint-independent     | address-dependent         | the same map + a dynamic set (ext port . remote ip) written by outbound packets; inbound DNATed only when in the set |
| PORT_RESTRICTED   | endpoint-independent     | address+port-dependent    | plain masquerade (conntrack keeps the port and admits replies only) |
| SYMMETRIC         | address+port-dependent   | address+port-dependent    | masquerade fully-random         |

Unsolicited inbound that nothing admits is dropped in the input hook, before
conntrack confirms it, so a failed punch leaves no state that would change a
later mapping. The full-cone map relies on port preservation: two LAN hosts
using the same UDP port at once share one external port (the first one wins).
"""

from __future__ import annotations

import enum

TABLE = "natlab"


class NatKind(enum.Enum):
    FULL_CONE = "full-cone"
    ADDRESS_RESTRICTED = "address-restricted"
    PORT_RESTRICTED = "port-restricted"
    SYMMETRIC = "symmetric"

    @property
    def endpoint_independent_mapping(self) -> bool:
        return self is not NatKind.SYMMETRIC


def nat_ruleset(kind: NatKind, wan: str, wan_address: str, udp_timeout: float) -> str:
    """The complete `nft -f` text for the router's NAT table (replaces any previous one)."""
    timeout = f"{max(1, round(udp_timeout))}s"
    lines = [
        f"table ip {TABLE} {{}}",
        f"delete table ip {TABLE}",
        f"table ip {TABLE} {{",
    ]
    cone = kind in (NatKind.FULL_CONE, NatKind.ADDRESS_RESTRICTED)
    if cone:
        lines += [
            "  map cone { type inet_service : ipv4_addr . inet_service;"
            f" flags dynamic, timeout; timeout {timeout}; }}",
            "  set contacted { type inet_service . ipv4_addr;"
            f" flags dynamic, timeout; timeout {timeout}; }}",
            # Sees every outbound packet before SNAT (srcnat - 1): keeps mappings
            # (and, for address-restricted, the remote addresses) fresh while used.
            "  chain remember { type filter hook postrouting priority srcnat - 1; policy accept;",
            f'    oifname "{wan}" meta l4proto udp update @cone {{ udp sport : ip saddr . udp sport }}',
            f'    oifname "{wan}" meta l4proto udp update @contacted {{ udp sport . ip daddr }}',
            "  }",
        ]
    lines.append("  chain dnat_in { type nat hook prerouting priority dstnat; policy accept;")
    if kind is NatKind.FULL_CONE:
        lines.append(f'    iifname "{wan}" udp dport @cone dnat ip to udp dport map @cone')
    elif kind is NatKind.ADDRESS_RESTRICTED:
        lines.append(
            f'    iifname "{wan}" udp dport . ip saddr @contacted dnat ip to udp dport map @cone'
        )
    lines.append("  }")
    lines.append("  chain snat_out { type nat hook postrouting priority srcnat; policy accept;")
    if cone:
        # No port range: Linux keeps the source port, which the cone map assumes.
        lines.append(f'    oifname "{wan}" snat ip to {wan_address}')
    elif kind is NatKind.PORT_RESTRICTED:
        lines.append(f'    oifname "{wan}" masquerade')
    else:
        lines.append(f'    oifname "{wan}" masquerade fully-random')
    lines.append("  }")
    lines += [
        "  chain guard_in { type filter hook input priority filter; policy accept;",
        f'    iifname "{wan}" ct state new drop',
        "  }",
        "  chain guard_forward { type filter hook forward priority filter; policy accept;",
        f'    iifname "{wan}" ct state established,related accept',
        f'    iifname "{wan}" ct status dnat accept',
        f'    iifname "{wan}" drop',
        "  }",
        "}",
    ]
    return "\n".join(lines) + "\n"
