"""TLS 1.3 over any trio stream (pyOpenSSL, memory BIOs), mutual, Ed25519."""

from proxy.tls.stream import SEND_SLICE, TLSConfigLike, TLSStream, open_tls_stream

__all__ = ["SEND_SLICE", "TLSConfigLike", "TLSStream", "open_tls_stream"]
