"""Errors of the grpc-web bridge; each carries the gRPC status its call ends with."""

from __future__ import annotations

from proxy.identity.errors import KeynodeError


class GrpcWebError(KeynodeError):
    """A grpc-web call the bridge ends itself."""

    grpc_status = 13  # INTERNAL
    http_status = 400


class InvalidBase64(GrpcWebError):
    """A grpc-web-text body that is not base64 in 4-character groups."""


class InvalidRequestFrame(GrpcWebError):
    """A request body whose gRPC framing is broken (trailers flag, cut short)."""


class RequestFrameTooLarge(GrpcWebError):
    """A request message over the bridge's limit."""

    grpc_status = 8  # RESOURCE_EXHAUSTED


class UpstreamUnavailable(GrpcWebError):
    """The gRPC target could not be reached, or its connection ended mid-call."""

    grpc_status = 14  # UNAVAILABLE
    http_status = 502


class ClientGone(KeynodeError):
    """The grpc-web client's connection ended or broke its protocol mid-call."""
