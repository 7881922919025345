"""Per-direction impairment of one veth link: loss, delay/jitter/reordering, rate, cut.

A direction A->B is impaired where its packets arrive, at B's end:
- cut and loss: an nftables netdev table on B's interface, ingress hook
  (`drop`, or `numgen random mod 1000000 < N drop`), so dropped packets never
  reach conntrack or the stack;
- delay, jitter, reordering: an iptables NFQUEUE rule in B's mangle PREROUTING
  (`--queue-bypass`: if the daemon is gone packets pass instead of vanishing)
  served by nfqueue_delay.py running in B's namespace;
- rate: a tc tbf qdisc on A's egress (a sender-side bottleneck with a queue).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .commands import run_in

if TYPE_CHECKING:
    from .processes import LabProcess
    from .topology import Lab

LOSS_SCALE = 1_000_000
DELAY_DAEMON = Path(__file__).with_name("nfqueue_delay.py")


@dataclass(frozen=True)
class Impairment:
    """What one direction of a link suffers. Times in seconds, loss a fraction."""

    loss: float = 0.0
    delay: float = 0.0
    jitter: float = 0.0
    rate_bit: int | None = None  # bits per second
    seed: int = 0  # jitter draws, so a run can be repeated

    def __post_init__(self) -> None:
        if not 0.0 <= self.loss <= 1.0:
            raise ValueError(f"loss must be a fraction in [0, 1], not {self.loss}")
        if self.delay < 0 or self.jitter < 0:
            raise ValueError("delay and jitter must be >= 0")
        if self.rate_bit is not None and self.rate_bit <= 0:
            raise ValueError("rate_bit must be positive")

    @property
    def needs_queue(self) -> bool:
        return self.delay > 0 or self.jitter > 0


class Direction:
    """The impairment state of one direction: sender (netns, ifname) -> receiver (netns, ifname)."""

    def __init__(self, lab: Lab, sender: tuple[str, str], receiver: tuple[str, str]) -> None:
        self.lab = lab
        self.sender_netns, self.sender_if = sender
        self.receiver_netns, self.receiver_if = receiver
        self.impairment = Impairment()
        self.is_cut = False
        self._daemon: LabProcess | None = None
        self._queue_num: int | None = None
        self._has_tbf = False
        self._table = f"natlab_{self.receiver_if}"

    def _ingress_rules(self) -> list[str]:
        rules = []
        if self.is_cut:
            rules.append("drop")
        if self.impairment.loss > 0:
            threshold = round(self.impairment.loss * LOSS_SCALE)
            rules.append(f"numgen random mod {LOSS_SCALE} < {threshold} drop")
        return rules

    def _apply_ingress(self) -> None:
        rules = self._ingress_rules()
        text = f"table netdev {self._table} {{}}\ndelete table netdev {self._table}\n"
        if rules:
            body = "\n".join(f"    {rule}" for rule in rules)
            text += (
                f"table netdev {self._table} {{\n"
                f"  chain ingress {{ type filter hook ingress device \"{self.receiver_if}\""
                f" priority filter; policy accept;\n{body}\n  }}\n}}\n"
            )
        run_in(self.receiver_netns, ["nft", "-f", "-"], input_text=text)

    def _iptables_rule(self, action: str) -> list[str]:
        assert self._queue_num is not None
        return ["iptables", "-w", "5", "-t", "mangle", action, "PREROUTING", "-i", self.receiver_if,
                "-j", "NFQUEUE", "--queue-num", str(self._queue_num), "--queue-bypass"]

    def _stop_delay(self) -> None:
        if self._daemon is not None:
            run_in(self.receiver_netns, self._iptables_rule("-D"))
            self.lab.stop_process(self._daemon)
            self._daemon = None

    def _start_delay(self) -> None:
        if self._queue_num is None:
            self._queue_num = self.lab.allocate_queue(self.receiver_netns)
        imp = self.impairment
        self._daemon = self.lab.spawn(
            self.receiver_netns,
            [sys.executable, str(DELAY_DAEMON), "--queue", str(self._queue_num),
             "--delay-ms", f"{imp.delay * 1000:.3f}", "--jitter-ms", f"{imp.jitter * 1000:.3f}",
             "--seed", str(imp.seed), "--lifetime", f"{self.lab.process_lifetime:.0f}"],
            ready_line="ready",
        )
        run_in(self.receiver_netns, self._iptables_rule("-A"))

    def _apply_rate(self) -> None:
        if self._has_tbf:
            run_in(self.sender_netns, ["tc", "qdisc", "del", "dev", self.sender_if, "root"])
            self._has_tbf = False
        rate = self.impairment.rate_bit
        if rate is not None:
            # A bucket of ~4 ms of traffic (at least a few packets) and a queue of 50 ms.
            burst = max(16 * 1514, rate // 8 // 250)
            run_in(self.sender_netns, ["tc", "qdisc", "add", "dev", self.sender_if, "root", "tbf",
                                       "rate", f"{rate}bit", "burst", str(burst), "latency", "50ms"])
            self._has_tbf = True

    def set(self, impairment: Impairment) -> None:
        old = self.impairment
        self.impairment = impairment
        self._apply_ingress()
        if (old.delay, old.jitter, old.seed) != (impairment.delay, impairment.jitter, impairment.seed):
            self._stop_delay()
            if impairment.needs_queue:
                self._start_delay()
        if old.rate_bit != impairment.rate_bit:
            self._apply_rate()

    @property
    def delay_daemon(self) -> LabProcess | None:
        """The running delay daemon of this direction, if any."""
        return self._daemon

    def cut(self, is_cut: bool) -> None:
        self.is_cut = is_cut
        self._apply_ingress()
