"""The lab: namespaces joined by veth pairs into a small fake internet with NATs.

    public host ──┐                         ┌── router (NAT kind) ── bridge "lan" ── private hosts
    public host ──┤── core (routes 198.18.0.0/15) ──┤
                  └─────────────────────────┘── router ...

Addresses: attachment i to the core is the link 198.18.i.0/24 (core .1, the
other end .2, extra host addresses .3, .4, ...); site i's LAN is 10.i.0.0/24
(router .1, private hosts .10, .11, ...); direct host pairs use 198.19.j.0/24.
Every namespace is named `<prefix>-<unix time hex>-<random>-<role>`, unique per
run and datable by the stale sweep. Interface names are short and local to their
namespace (veths are created directly inside them), never in the root namespace.
"""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from .commands import entered_netns, require_tools, run, run_in, socket_in
from .errors import LabError
from .impairment import Direction, Impairment
from .nat_rules import NatKind, nat_ruleset
from .processes import LabProcess
from .sweep import delete_namespace, sweep_stale

DEFAULT_PREFIX = "knl"


class Namespace:
    """One network namespace of the lab; run commands and processes inside it."""

    def __init__(self, lab: Lab, role: str) -> None:
        self.lab = lab
        self.role = role
        self.netns = f"{lab.run_id}-{role}"

    def run(self, argv: Sequence[str], *, timeout: float = 15.0, check: bool = True,
            input_text: str | None = None) -> subprocess.CompletedProcess[str]:
        return run_in(self.netns, argv, timeout=timeout, check=check, input_text=input_text)

    def spawn(self, argv: Sequence[str], *, lifetime: float | None = None,
              ready_line: str | None = None) -> LabProcess:
        """A long-lived process in this namespace, stopped when the lab closes."""
        return self.lab.spawn(self.netns, argv, lifetime=lifetime, ready_line=ready_line)

    def socket(self, family: int = socket.AF_INET, type: int = socket.SOCK_DGRAM) -> socket.socket:
        """A socket living in this namespace, usable from this process."""
        return socket_in(self.netns, family, type)

    @contextmanager
    def enter(self) -> Iterator[None]:
        """Run the block's socket creation inside this namespace (this thread only)."""
        with entered_netns(self.netns):
            yield

    def sysctl(self, key: str, value: str) -> None:
        """Set a per-namespace sysctl (net.*) by writing /proc/sys from inside the namespace."""
        with entered_netns(self.netns), open(f"/proc/sys/{key.replace('.', '/')}", "w") as f:
            f.write(value)


class Link:
    """A veth pair between end a (netns, ifname) and end b; impair each direction."""

    def __init__(self, lab: Lab, a: tuple[str, str], b: tuple[str, str]) -> None:
        self.a = a
        self.b = b
        self.a_to_b = Direction(lab, sender=a, receiver=b)
        self.b_to_a = Direction(lab, sender=b, receiver=a)

    def impair(self, impairment: Impairment, *, a_to_b: bool = True, b_to_a: bool = True) -> None:
        """Set (replace) the impairment of the chosen directions."""
        if a_to_b:
            self.a_to_b.set(impairment)
        if b_to_a:
            self.b_to_a.set(impairment)

    def clear(self) -> None:
        """Remove loss, delay and rate both ways (a cut stays until `restore()`)."""
        self.impair(Impairment())

    def cut(self) -> None:
        """Drop everything both ways (the interfaces stay up: a silent outage)."""
        self.a_to_b.cut(True)
        self.b_to_a.cut(True)

    def restore(self) -> None:
        self.a_to_b.cut(False)
        self.b_to_a.cut(False)


class Host(Namespace):
    """An end host: public (on the core), private (behind a site's router) or in a direct pair."""

    def __init__(self, lab: Lab, role: str) -> None:
        super().__init__(lab, role)
        self.addresses: list[str] = []
        self.uplink: Link | None = None  # a = this host's end

    @property
    def address(self) -> str:
        return self.addresses[0]


class Site(Namespace):
    """A NAT router of one RFC 4787 kind with a private LAN behind it."""

    def __init__(self, lab: Lab, role: str, kind: NatKind, index: int) -> None:
        super().__init__(lab, role)
        self.kind = kind
        self.index = index
        self.public_address = f"198.18.{index}.2"
        self.lan_prefix = f"10.{index}.0"
        self.wan: Link | None = None  # a = the router's WAN end, b = the core
        self.hosts: list[Host] = []
        self.udp_timeout = 30.0

    def set_udp_timeout(self, seconds: float) -> None:
        """Conntrack UDP timeouts (and the cone map's) of this router. Reloading the
        NAT table forgets the cone mappings, so set it before traffic starts."""
        self.udp_timeout = seconds
        for key in ("net.netfilter.nf_conntrack_udp_timeout",
                    "net.netfilter.nf_conntrack_udp_timeout_stream"):
            self.sysctl(key, str(max(1, round(seconds))))
        self.run(["nft", "-f", "-"], input_text=nat_ruleset(self.kind, "wan0",
                                                            self.public_address, seconds))

    def conntrack_entries(self, protocol: str = "udp") -> list[str]:
        done = self.run(["conntrack", "-L", "-p", protocol], check=False)
        return [line for line in done.stdout.splitlines() if line.strip()]

    def flush_conntrack(self) -> None:
        self.run(["conntrack", "-F"], check=False)

    def add_host(self, name: str) -> Host:
        """A private host on this site's LAN (10.<site>.0.<10+k>), default route via the router."""
        k = len(self.hosts)
        host = self.lab._new_host(f"{self.role}-{name}")
        lan_if = f"h{k}"
        self.lab._veth(host.netns, "up0", self.netns, lan_if)
        self.run(["ip", "link", "set", lan_if, "master", "lan", "up"])
        address = f"{self.lan_prefix}.{10 + k}"
        host.run(["ip", "addr", "add", f"{address}/24", "dev", "up0"])
        host.run(["ip", "link", "set", "up0", "up"])
        host.run(["ip", "route", "add", "default", "via", f"{self.lan_prefix}.1"])
        host.addresses.append(address)
        host.uplink = Link(self.lab, (host.netns, "up0"), (self.netns, lan_if))
        self.hosts.append(host)
        return host


class Lab:
    """Owner of every namespace and process of one run; use `open_lab()`."""

    def __init__(self, prefix: str = DEFAULT_PREFIX, process_lifetime: float = 600.0) -> None:
        self.prefix = prefix
        self.run_id = f"{prefix}-{int(time.time()):08x}-{secrets.token_hex(2)}"
        self.process_lifetime = process_lifetime
        self.namespaces: list[Namespace] = []
        self.processes: list[LabProcess] = []
        self.core: Namespace | None = None
        self._attachments = 0
        self._pairs = 0
        self._queues: dict[str, int] = {}
        self.links: list[Link] = []

    # -- building blocks -------------------------------------------------------

    def _add_namespace(self, ns: Namespace) -> None:
        run(["ip", "netns", "add", ns.netns])
        self.namespaces.append(ns)  # registered before anything else can fail
        ns.run(["ip", "link", "set", "lo", "up"])

    def _new_host(self, role: str) -> Host:
        host = Host(self, role)
        self._add_namespace(host)
        return host

    def _veth(self, netns_a: str, if_a: str, netns_b: str, if_b: str) -> None:
        run(["ip", "link", "add", if_a, "netns", netns_a, "type", "veth",
             "peer", "name", if_b, "netns", netns_b])
        for netns, ifname in ((netns_a, if_a), (netns_b, if_b)):
            # One packet per skb: loss and queueing then act on real packets, not
            # on 64 KiB TSO super-packets.
            run_in(netns, ["ip", "link", "set", ifname, "gso_max_segs", "1", "up"])

    def _ensure_core(self) -> Namespace:
        if self.core is None:
            core = Namespace(self, "core")
            self._add_namespace(core)
            core.sysctl("net.ipv4.ip_forward", "1")
            self.core = core
        return self.core

    def _attach(self, ns: Namespace, ifname: str) -> tuple[int, Link]:
        core = self._ensure_core()
        self._attachments += 1
        i = self._attachments
        if i > 250:
            raise LabError("at most 250 attachments to the core")
        core_if = f"c{i}"
        self._veth(ns.netns, ifname, core.netns, core_if)
        core.run(["ip", "addr", "add", f"198.18.{i}.1/24", "dev", core_if])
        ns.run(["ip", "addr", "add", f"198.18.{i}.2/24", "dev", ifname])
        ns.run(["ip", "route", "add", "default", "via", f"198.18.{i}.1"])
        link = Link(self, (ns.netns, ifname), (core.netns, core_if))
        self.links.append(link)
        return i, link

    def allocate_queue(self, netns: str) -> int:
        self._queues[netns] = self._queues.get(netns, 0) + 1
        return self._queues[netns]

    # -- public API ------------------------------------------------------------

    def add_public_host(self, name: str, *, extra_addresses: int = 0) -> Host:
        """A host on the fake internet: 198.18.i.2, plus .3, .4, ... if asked."""
        host = self._new_host(name)
        i, link = self._attach(host, "up0")
        host.addresses.append(f"198.18.{i}.2")
        for k in range(extra_addresses):
            extra = f"198.18.{i}.{3 + k}"
            host.run(["ip", "addr", "add", f"{extra}/24", "dev", "up0"])
            host.addresses.append(extra)
        host.uplink = link
        return host

    def add_site(self, name: str, kind: NatKind, *, udp_timeout: float = 30.0) -> Site:
        """A NAT router of `kind` on the core; add private hosts with `site.add_host`."""
        site = Site(self, name, kind, self._attachments + 1)
        self._add_namespace(site)
        index, link = self._attach(site, "wan0")
        assert index == site.index
        site.wan = link
        site.sysctl("net.ipv4.ip_forward", "1")
        site.run(["ip", "link", "add", "lan", "type", "bridge"])
        site.run(["ip", "addr", "add", f"{site.lan_prefix}.1/24", "dev", "lan"])
        site.run(["ip", "link", "set", "lan", "up"])
        site.set_udp_timeout(udp_timeout)
        return site

    def add_host_pair(self, name_a: str, name_b: str) -> tuple[Host, Host]:
        """Two hosts joined by one veth (198.19.j.1 and .2), no router: `a.uplink` is the link."""
        self._pairs += 1
        j = self._pairs
        a, b = self._new_host(name_a), self._new_host(name_b)
        self._veth(a.netns, "up0", b.netns, "up0")
        for host, last in ((a, 1), (b, 2)):
            host.run(["ip", "addr", "add", f"198.19.{j}.{last}/24", "dev", "up0"])
            host.addresses.append(f"198.19.{j}.{last}")
        link = Link(self, (a.netns, "up0"), (b.netns, "up0"))
        a.uplink = b.uplink = link
        self.links.append(link)
        return a, b

    def spawn(self, netns: str, argv: Sequence[str], *, lifetime: float | None = None,
              ready_line: str | None = None, ready_timeout: float = 10.0) -> LabProcess:
        process = LabProcess(netns, argv, lifetime or self.process_lifetime)
        self.processes.append(process)
        if ready_line is not None:
            process.wait_line(ready_line, ready_timeout)
        return process

    def stop_process(self, process: LabProcess) -> int:
        status = process.stop()
        process.close_pipes()
        if process in self.processes:
            self.processes.remove(process)
        return status

    def close(self) -> None:
        """Stop every process, then delete every namespace (and with them veths, nft and
        iptables state). Tries everything, then reports what could not be removed."""
        failures: list[str] = []
        for process in reversed(self.processes):
            try:
                process.stop()
                process.close_pipes()
            except (OSError, subprocess.TimeoutExpired) as exc:
                failures.append(f"process {process.pid}: {exc}")
        self.processes.clear()
        for ns in reversed(self.namespaces):
            problem = delete_namespace(ns.netns)
            if problem:
                failures.append(problem)
        self.namespaces.clear()
        if failures:
            raise LabError("lab cleanup incomplete: " + "; ".join(failures))


@contextmanager
def open_lab(*, prefix: str = DEFAULT_PREFIX, stale_after: float = 1800.0,
             process_lifetime: float = 600.0) -> Iterator[Lab]:
    """Build a lab; everything it made is removed on exit, also on error or Ctrl-C.

    First removes namespaces of earlier runs with the same prefix that are older
    than `stale_after` seconds (aborted runs); younger ones may belong to a run
    going on in parallel and are left alone.
    """
    require_tools()
    sweep_stale(prefix, stale_after)
    lab = Lab(prefix, process_lifetime)
    try:
        yield lab
    finally:
        lab.close()


def root_interfaces() -> set[str]:
    """Interface names in the namespace this process runs in (for leak checks)."""
    return set(os.listdir("/sys/class/net"))
