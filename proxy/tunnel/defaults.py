"""Defaults of the tunnel that the application's config also names (no imports, cheap)."""

# The appliance's uTP congestion controller; the bare core keeps libutp's LEDBAT.
DEFAULT_CONGESTION = "rate"
