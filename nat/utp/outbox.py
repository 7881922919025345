"""The outbox: everything a connection hands its multiplexer, in one place.

A connection never reaches into its multiplexer. It marks itself dirty (it has
something to send, or to evaluate, at the next ``datagrams_to_send``), emits
events, queues a datagram of its own (a keep-alive), and reports leaving the
half-open state or its end, all here. The multiplexer owns the outbox and
drains it: ``datagrams_to_send`` flushes the dirty connections after the queued
datagrams, ``next_event`` pops the events.

The containers are public and stable (never replaced), so a connection's
per-packet paths keep a direct reference to the set or deque they add to: an
``add`` costs the same as before, with no method of the outbox in between.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Generic, Protocol

from nat.utp.config import UtpStats
from nat.utp.events import ConnT, UtpEventOf
from nat.utp.states import Address, Datagram

__all__ = ["Outbox", "Flushable"]


class Flushable(Protocol):
    """A connection as its outbox knows it (``UtpConnection``)."""

    @property
    def remote_address(self) -> Address: ...

    @property
    def recv_id(self) -> int: ...

    def flush_into(self, now: float, out: list[Datagram]) -> None: ...


class Outbox(Generic[ConnT]):
    """Dirty connections, events and queued datagrams of one multiplexer (events
    about connections of type ``ConnT``: UtpConnection)."""

    __slots__ = ("dirty", "events", "datagrams", "stats", "half_open", "_retire")

    def __init__(self, stats: UtpStats, retire: Callable[[Flushable], None]) -> None:
        # connections to flush at the next datagrams_to_send
        self.dirty: set[Flushable] = set()
        self.events: deque[UtpEventOf[ConnT]] = deque()
        # datagrams queued outside a flush (RESETs, keep-alives): they leave first
        self.datagrams: list[Datagram] = []
        self.stats = stats
        # incoming connections still in SYN_RECV (bounded by max_half_open)
        self.half_open = 0
        self._retire = retire

    def take_datagrams(self) -> list[Datagram]:
        """The queued datagrams; the queue starts empty again."""
        datagrams = self.datagrams
        self.datagrams = []
        return datagrams

    def enter_half_open(self) -> None:
        self.half_open += 1

    def leave_half_open(self) -> None:
        self.half_open -= 1

    def retire(self, conn: Flushable) -> None:
        """``conn`` is done for good: its connection id no longer finds it."""
        self._retire(conn)
