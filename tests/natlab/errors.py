"""Typed errors of the NAT lab (test infrastructure, not part of the product)."""

from __future__ import annotations


class LabError(Exception):
    """Base of every error the lab raises on purpose."""


class LabToolMissing(LabError):
    """A system tool the lab drives (ip, nft, iptables, tc, conntrack, timeout) is absent."""


class LabCommandError(LabError):
    """A lab command exited non-zero or timed out; carries its argv and output."""

    def __init__(self, argv: list[str], returncode: int | None, stdout: str, stderr: str) -> None:
        self.argv = argv
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr
        status = "timed out" if returncode is None else f"exited {returncode}"
        super().__init__(f"{' '.join(argv)} {status}: {stderr.strip() or stdout.strip()}")


class LabProcessError(LabError):
    """A process started inside a namespace did not become ready or died early."""
