"""CORS for the grpc-web bridge, sans-IO: the preflight answer and the headers added to
an actual response, for the configured origin allowlist.

Lists as in Connect's CORS guidance for gRPC-Web: methods POST (and OPTIONS), request
headers Content-Type, Grpc-Timeout, X-Grpc-Web, X-User-Agent plus whatever custom
metadata the preflight asks for; exposed grpc-status, grpc-message,
grpc-status-details-bin plus the response's own custom headers. A request without an
Origin header is not a browser's cross-origin request and passes; one from an origin not
on the list is refused.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

Headers = list[tuple[bytes, bytes]]

ALLOW_METHODS = b"POST, OPTIONS"
ALLOW_HEADERS = (b"content-type", b"grpc-timeout", b"x-grpc-web", b"x-user-agent")
EXPOSE_HEADERS = (b"grpc-status", b"grpc-message", b"grpc-status-details-bin")
MAX_AGE = b"86400"
ANY_ORIGIN = "*"
_TOKEN = re.compile(rb"^[!#$%&'*+\-.^_`|~0-9a-z]+$")


class CorsPolicy:
    def __init__(self, allow_origins: Sequence[str]) -> None:
        self.any_origin = ANY_ORIGIN in allow_origins
        self.origins = frozenset(origin.encode() for origin in allow_origins if origin != ANY_ORIGIN)

    def allows(self, origin: bytes | None) -> bool:
        return origin is None or self.any_origin or origin in self.origins

    def preflight(self, origin: bytes | None, requested_headers: bytes | None) -> Headers | None:
        """The headers of a 204 answer to an allowed preflight, or None to refuse it."""
        if origin is None or not self.allows(origin):
            return None
        allowed = list(ALLOW_HEADERS)
        for name in (requested_headers or b"").split(b","):
            name = name.strip().lower()
            if name and _TOKEN.match(name) and name not in allowed:
                allowed.append(name)
        return [
            (b"access-control-allow-origin", origin),
            (b"access-control-allow-methods", ALLOW_METHODS),
            (b"access-control-allow-headers", b", ".join(allowed)),
            (b"access-control-max-age", MAX_AGE),
            (b"vary", b"Origin"),
        ]

    def response_headers(self, origin: bytes | None, response_header_names: Sequence[bytes]) -> Headers:
        """Added to an actual response for an allowed origin (nothing without Origin)."""
        if origin is None:
            return []
        exposed = list(EXPOSE_HEADERS)
        for name in response_header_names:
            if name not in exposed and name != b"content-type":
                exposed.append(name)
        return [
            (b"access-control-allow-origin", origin),
            (b"access-control-expose-headers", b", ".join(exposed)),
            (b"vary", b"Origin"),
        ]
