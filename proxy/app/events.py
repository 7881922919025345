"""Connection events pushed to subscribers (`GET /v1/events`, `keynode events`).

The runner's connection callbacks publish one JSON-ready dict per event; each
subscriber gets them in order through a bounded buffer of its own. Publishing is
synchronous and never blocks or raises into the Proxy: a subscriber that falls
behind loses the newest events, counted, and is told so by one
`{"event": "dropped", "count": N}` line where the gap is. Nothing here does I/O
beyond trio memory channels; the control socket writes the lines.
"""

from __future__ import annotations

import datetime
import logging
import time
from collections.abc import Mapping
from typing import Any

import trio

from proxy.app.errors import EventHubClosed, TooManySubscribers

log = logging.getLogger("keynode.events")

BUFFER_SIZE = 256  # events a subscriber may be behind before it loses some
MAX_SUBSCRIBERS = 16

Event = dict[str, Any]


class Subscription:
    """One subscriber's stream: iterate for its events; ends when the hub closes.
    Use as a context manager (or call `close`) so leaving frees its slot."""

    def __init__(self, hub: EventHub, buffer_size: int) -> None:
        self._hub = hub
        self._send, self._receive = trio.open_memory_channel[Event](buffer_size)
        self.dropped = 0  # events lost since the last "dropped" line was queued

    def offer(self, event: Event) -> None:
        """Queue `event` without waiting; a full buffer drops it (counted)."""
        try:
            if self.dropped:
                self._send.send_nowait({"event": "dropped", "count": self.dropped})
                self.dropped = 0
            self._send.send_nowait(event)
        except trio.WouldBlock:
            self.dropped += 1
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self._hub.discard(self)  # the reader left without closing: free its slot

    def end(self) -> None:
        """No more events: the reader sees the end once it has the queued ones."""
        self._send.close()

    def close(self) -> None:
        self.end()
        self._receive.close()
        self._hub.discard(self)

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> Event:
        try:
            return await self._receive.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            raise StopAsyncIteration from None  # the hub ended it, or it was closed


class EventHub:
    """Fans published events out to at most `max_subscribers` subscriptions."""

    def __init__(self, *, buffer_size: int = BUFFER_SIZE, max_subscribers: int = MAX_SUBSCRIBERS) -> None:
        self.buffer_size = buffer_size
        self.max_subscribers = max_subscribers
        self._subscriptions: set[Subscription] = set()
        self._closed = False
        self._idle = trio.Event()
        self._idle.set()

    @property
    def subscriber_count(self) -> int:
        return len(self._subscriptions)

    def subscribe(self, greeting: Event | None = None) -> Subscription:
        """A new subscription; `greeting` is its first event (before any published
        after this call). Raises TooManySubscribers or EventHubClosed."""
        if self._closed:
            raise EventHubClosed("the node is stopping; no new event streams")
        if len(self._subscriptions) >= self.max_subscribers:
            raise TooManySubscribers(
                f"{self.max_subscribers} event streams are already open; close one (keynode events) and retry"
            )
        subscription = Subscription(self, self.buffer_size)
        if greeting is not None:
            subscription.offer(greeting)
        self._subscriptions.add(subscription)
        self._idle = trio.Event()
        return subscription

    def discard(self, subscription: Subscription) -> None:
        self._subscriptions.discard(subscription)
        if not self._subscriptions:
            self._idle.set()

    def publish(self, event: Event) -> None:
        """Give `event` to every subscriber now; never blocks, never raises."""
        try:
            for subscription in list(self._subscriptions):
                subscription.offer(event)
        except Exception:  # a bug here must not reach the Proxy's callback path
            log.exception("publishing event %s failed", event.get("event"))

    def close(self) -> None:
        """End every stream (each reader gets what is queued, then the end) and
        refuse new ones."""
        self._closed = True
        for subscription in list(self._subscriptions):
            subscription.end()

    async def wait_idle(self) -> None:
        """Until no subscription is open."""
        await self._idle.wait()


# --- human form (`keynode events`) ----------------------------------------------------


def format_event(event: Event) -> str:
    """One line for people: UTC time, the event, the tunnel, what happened."""
    at = event.get("at")
    moment = datetime.datetime.fromtimestamp(float(at) if isinstance(at, (int, float)) else time.time(), datetime.UTC)
    kind = str(event.get("event"))
    tunnel = f"{event.get('direction')} {event.get('node_id')}"
    if kind == "subscribed":
        text = f"subscribed to {event.get('node_id')}"
    elif kind == "established":
        service = f" (service {event['service']})" if event.get("service") else ""
        text = f"established {tunnel} at {event.get('remote')}{service}{_via(event)}"
    elif kind == "lost":
        error = f" ({event['error']})" if event.get("error") else ""
        text = f"lost {tunnel} at {event.get('remote')}: {event.get('reason')}{error}"
    elif kind == "path_changed":
        text = f"path_changed {tunnel}: {format_move(event)}"
    elif kind == "dropped":
        text = f"dropped {event.get('count')} events (this client read too slowly)"
    else:
        text = f"{kind} {event}"
    return f"{moment.strftime('%Y-%m-%dT%H:%M:%SZ')} {' '.join(text.split())}"


def format_move(move: Mapping[str, Any]) -> str:
    """A path move as `status` and `events` show it: "relay -> direct 198.51.100.7:4000 (upgrade)"."""
    where = move.get("address") or (f"relay {move.get('via')}" if move.get("via") else "")
    return f"{move.get('from')} -> {move.get('to')} {where} ({move.get('reason')})"


def _via(event: Event) -> str:
    return f" via relay {event['via']}" if event.get("path") == "relay" and event.get("via") else ""
