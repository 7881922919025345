"""keynode data-transfer layer: one UDP socket, uTP (BEP 29), out-of-band messages."""

from nat.errors import *  # noqa: F401,F403
