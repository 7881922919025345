"""Log lines that a peer or a client can cause, rate-limited per key.

A failing CONNECT or connection start is worth a line on the node that saw it, but
whoever causes failures must not be able to fill the log: at most ``per_second``
lines a second per key (a target, a remote address); the rest are counted, and
the next line for that key says how many were suppressed. Keys are bounded (the
least recently used are forgotten, with their counts).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any

import trio

DEFAULT_PER_SECOND = 5
DEFAULT_MAX_KEYS = 1024


class RateLimitedLog:
    """``log(key, level, message, *args)``: the line, unless ``key`` had its share this second."""

    def __init__(
        self,
        logger: logging.Logger,
        *,
        per_second: int = DEFAULT_PER_SECOND,
        max_keys: int = DEFAULT_MAX_KEYS,
        clock: Callable[[], float] = trio.current_time,
    ) -> None:
        self.logger = logger
        self.per_second = per_second
        self.max_keys = max_keys
        self.clock = clock
        # key -> [window start, lines in the window, suppressed since the last line]
        self._keys: OrderedDict[Hashable, list[Any]] = OrderedDict()

    def log(self, key: Hashable, level: int, message: str, *args: Any, **kwargs: Any) -> bool:
        """Log the line (True) or count it as suppressed (False)."""
        if not self.logger.isEnabledFor(level):
            return False
        now = self.clock()
        state = self._keys.get(key)
        if state is None:
            state = self._keys[key] = [now, 0, 0]
            if len(self._keys) > self.max_keys:
                self._keys.popitem(last=False)
        else:
            self._keys.move_to_end(key)
        if now - state[0] >= 1.0:
            state[0], state[1] = now, 0
        if state[1] >= self.per_second:
            state[2] += 1
            return False
        state[1] += 1
        suppressed, state[2] = state[2], 0
        if suppressed:
            message += " (%d more like it suppressed)"
            args = (*args, suppressed)
        kwargs.setdefault("stacklevel", 2)  # the record names the caller, not this module
        self.logger.log(level, message, *args, **kwargs)
        return True

    def info(self, key: Hashable, message: str, *args: Any, **kwargs: Any) -> bool:
        kwargs.setdefault("stacklevel", 3)
        return self.log(key, logging.INFO, message, *args, **kwargs)
