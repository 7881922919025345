"""Defaults of the tunnel that the application's config also names, and the checks of
the Proxy's timing options (stdlib only, cheap to import)."""

import math

# The appliance's uTP congestion controller; the bare core keeps libutp's LEDBAT.
DEFAULT_CONGESTION = "rate"

# conn_connect_time above this is refused: a start that slow is a misconfiguration.
MAX_CONN_CONNECT_TIME = 20.0


def check_timing_options(
    *,
    max_chain_length: int,
    conn_connect_time: float,
    conn_keep_alive_timeout_time: float,
    conn_end_time: float,
    conn_punch_interval_time: float,
    conn_keep_alive_interval_time: float,
) -> None:
    """ValueError naming the first option out of range."""
    if not isinstance(max_chain_length, int) or isinstance(max_chain_length, bool) or max_chain_length < 1:
        raise ValueError(f"max_chain_length must be a positive integer, not {max_chain_length!r}")
    if not 0 < conn_connect_time <= MAX_CONN_CONNECT_TIME:
        raise ValueError(f"conn_connect_time must be in (0, {MAX_CONN_CONNECT_TIME}]")
    for name, value in (
        ("conn_keep_alive_timeout_time", conn_keep_alive_timeout_time),
        ("conn_end_time", conn_end_time),
        ("conn_punch_interval_time", conn_punch_interval_time),
        ("conn_keep_alive_interval_time", conn_keep_alive_interval_time),
    ):
        if not (value > 0 and math.isfinite(value)):
            raise ValueError(f"{name} must be a positive number of seconds")
