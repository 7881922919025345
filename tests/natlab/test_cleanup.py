"""Closing a lab leaves nothing behind: no namespace, interface, nft/iptables state or process."""

from __future__ import annotations

import os
import subprocess
import time

import pytest

from tests.natlab import Impairment, LabError, NatKind, open_lab, root_interfaces, start_reflector
from tests.natlab.sweep import lab_namespaces


def _root_state() -> dict[str, object]:
    def out(argv: list[str]) -> str:
        return subprocess.run(argv, capture_output=True, text=True, timeout=15, check=True).stdout

    return {
        "interfaces": root_interfaces(),
        "nft": out(["nft", "list", "ruleset"]),
        "iptables": "\n".join(line for line in out(["iptables-save"]).splitlines()
                              if not line.startswith("#")),
        "qdiscs": out(["tc", "qdisc", "show"]),
    }


def _netns_names() -> set[str]:
    listing = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=15,
                             check=True).stdout
    return {line.split(" ", 1)[0] for line in listing.splitlines() if line.strip()}


def _alive(pid: int) -> bool:
    return os.path.exists(f"/proc/{pid}")


@pytest.mark.netns
def test_closing_a_busy_lab_removes_everything() -> None:
    before = _root_state()
    with open_lab() as lab:
        server = lab.add_public_host("server", extra_addresses=1)
        site = lab.add_site("home", NatKind.FULL_CONE, udp_timeout=5)
        site.add_host("pc")
        a, _b = lab.add_host_pair("a", "b")
        reflector = start_reflector(server, [(server.address, 4000)])
        assert site.wan is not None and a.uplink is not None
        site.wan.impair(Impairment(loss=0.01, delay=0.01, jitter=0.002, rate_bit=10_000_000))
        a.uplink.impair(Impairment(delay=0.005))
        a.uplink.cut()
        pids = [process.pid for process in lab.processes]
        assert len(pids) == 5  # reflector + a delay daemon per direction of two links
        run_id = lab.run_id
        assert len([name for name in _netns_names() if name.startswith(run_id)]) == 6
    assert not [name for name in _netns_names() if name.startswith(run_id)]
    assert not any(_alive(pid) for pid in pids + [reflector.process.pid])
    assert _root_state() == before


@pytest.mark.netns
@pytest.mark.parametrize("failure", [RuntimeError("test failure"), KeyboardInterrupt()],
                         ids=["exception", "keyboard-interrupt"])
def test_failure_inside_the_lab_still_cleans_up(failure: BaseException) -> None:
    run_id = ""
    with pytest.raises(type(failure)):
        with open_lab() as lab:
            run_id = lab.run_id
            lab.add_site("home", NatKind.SYMMETRIC).add_host("pc")
            raise failure
    assert run_id and not [name for name in _netns_names() if name.startswith(run_id)]


@pytest.mark.netns
def test_stale_namespaces_of_aborted_runs_are_swept() -> None:
    prefix = "knlsweep"
    stale = f"{prefix}-{int(time.time()) - 3600:08x}-dead-core"
    young = f"{prefix}-{int(time.time()):08x}-beef-core"
    subprocess.run(["ip", "netns", "add", stale], check=True, timeout=15)
    subprocess.run(["ip", "netns", "add", young], check=True, timeout=15)
    # A leftover process of the aborted run, itself bounded in case the sweep fails.
    leftover = subprocess.Popen(["ip", "netns", "exec", stale, "sleep", "60"],
                                start_new_session=True)
    try:
        assert {stale, young} <= {name for name, _ in lab_namespaces(prefix)}
        with open_lab(prefix=prefix, stale_after=600) as lab:
            lab.add_public_host("h")
            names = _netns_names()
            assert stale not in names, "a namespace an hour old was not swept"
            assert young in names, "a young namespace (maybe a parallel run) was swept"
        assert leftover.wait(5) != 0, "the stale run's process was not ended"
    finally:
        if leftover.poll() is None:
            leftover.kill()
            leftover.wait(5)
        for name in (stale, young):
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=15)
    assert not {stale, young} & _netns_names()


def test_lab_error_is_the_base_of_lab_errors() -> None:
    from tests.natlab import LabCommandError, LabProcessError, LabToolMissing

    assert all(issubclass(cls, LabError)
               for cls in (LabCommandError, LabProcessError, LabToolMissing))
