"""Every typed keynode error, one class per distinct failure, in one namespace.

Each layer defines its own errors (identity, TLS, tunnel, application); this module
gathers them for callers that map failures at the edge (HTTP statuses, exit codes)
and for users who catch them by name. Lower layers import their own module, never
this one, so identity stays free of trio.
"""

from __future__ import annotations

from proxy.app.errors import *  # noqa: F403
from proxy.identity.errors import *  # noqa: F403
from proxy.tls.errors import *  # noqa: F403
from proxy.tunnel.errors import *  # noqa: F403
