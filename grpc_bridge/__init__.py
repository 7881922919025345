"""RPC-aware extras for gRPC servers behind keynode."""

from grpc_bridge.identity import CallerLookup, NodeIdentityInterceptor, current_caller, parse_grpc_peer  # noqa: F401
