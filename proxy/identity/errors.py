"""Errors of identity (keys, NodeIds, certificates) and the root of every keynode error.

Each class carries ``http_status``: the status the HTTP CONNECT edge answers with
when this failure ends a CONNECT (DESIGN.md, "The Proxy"). The root lives here, in
the lowest layer, because every layer derives from it.
"""

from __future__ import annotations


class KeynodeError(Exception):
    """Base of every error keynode raises on purpose."""

    http_status = 500


# --- identity -----------------------------------------------------------------


class IdentityError(KeynodeError):
    """Keys, NodeIds and certificates."""


class NodeIdInvalid(IdentityError, ValueError):
    """Text or bytes that are not exactly one 32-byte NodeId."""

    http_status = 400


class KeyFileError(IdentityError):
    """A key or certificate file is missing, unreadable or malformed."""


class PrivateFileExposed(KeyFileError):
    """A private key (or another secret file) that group or others may access."""


class CertificateChainError(IdentityError):
    """A peer's certificate chain was rejected (HTTP 526)."""

    http_status = 526


class CertChainEmpty(CertificateChainError):
    """The peer presented no certificate at all."""


class CertChainTooLong(CertificateChainError):
    """The chain holds more certificates than the verifier accepts (checked before any
    signature, so a long chain costs the verifier nothing)."""


class CertChainNoNodeIds(CertificateChainError):
    """Server-side verification was asked with no wanted NodeIds."""


class CertChainUnclaimed(CertificateChainError):
    """No certificate in the chain claims any of the wanted NodeIds."""


class CertChainBrokenLink(CertificateChainError):
    """chain[i] is not issued by, or not signed by, chain[i+1]."""


class CertChainDateInvalid(CertificateChainError):
    """A certificate is expired or not yet valid."""


class CertChainNameInvalid(CertificateChainError):
    """A certificate's subject CN is missing or is not an encoded NodeId."""


class CertChainKeyInvalid(CertificateChainError):
    """A certificate's key is not Ed25519, or its CN NodeId is not its own key."""


class CertChainSignatureInvalid(CertificateChainError):
    """A node signature (or a certificate's own signature) does not verify."""


class CertChainMalformed(CertificateChainError):
    """A certificate's fields cannot be parsed (bad version, extensions, encodings)."""
