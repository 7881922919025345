"""keynode appliance layer: identity, TLS, the HTTP CONNECT forward proxy, the reverse proxy."""

from proxy.errors import *  # noqa: F401,F403
