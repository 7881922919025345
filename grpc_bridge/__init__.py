"""RPC-aware extras for gRPC servers behind keynode."""
