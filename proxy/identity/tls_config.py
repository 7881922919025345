"""TLSConfig: a node's private key and its certificate chain (leaf first)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from proxy.identity.certificates import chain_from_pem, chain_to_pem, generate_certificate
from proxy.identity.errors import KeyFileError
from proxy.identity.keys import (
    PRIVATE_KEY_FILE_MODE,
    generate_key_pair,
    load_private_key,
    private_key_to_pem,
    write_file_atomically,
)
from proxy.identity.node_id import NodeId

CERTIFICATE_FILE_MODE = 0o644  # public material


@dataclass(frozen=True)
class TLSConfig:
    """What a node presents in TLS: its key and a chain whose leaf is that key's."""

    private_key: Ed25519PrivateKey
    certificate_chain: tuple[x509.Certificate, ...]

    def __post_init__(self) -> None:
        if not isinstance(self.private_key, Ed25519PrivateKey):
            raise TypeError("private_key must be an Ed25519 private key")
        chain = tuple(self.certificate_chain)
        object.__setattr__(self, "certificate_chain", chain)
        if not chain:
            raise ValueError("certificate_chain must hold at least the leaf certificate")
        leaf_key = chain[0].public_key()
        if not isinstance(leaf_key, Ed25519PublicKey) or NodeId.from_public_key(
            leaf_key
        ) != NodeId.from_public_key(self.private_key.public_key()):
            raise ValueError("the leaf certificate does not belong to private_key")

    @property
    def node_id(self) -> NodeId:
        return NodeId.from_public_key(self.private_key.public_key())

    @property
    def leaf_certificate(self) -> x509.Certificate:
        return self.certificate_chain[0]

    @classmethod
    def generate(cls) -> TLSConfig:
        """A fresh key and a self-signed certificate for it."""
        key = generate_key_pair()
        return cls(key, (generate_certificate(key),))

    @classmethod
    def load(
        cls,
        key_path: str | os.PathLike[str],
        chain_path: str | os.PathLike[str],
        *,
        owner_only_key: bool = False,
    ) -> TLSConfig:
        """Key and chain from files; ``owner_only_key`` refuses a key file that group
        or others may access (PrivateFileExposed), as ``keynode`` does."""
        key = load_private_key(key_path, owner_only=owner_only_key)
        try:
            data = Path(chain_path).read_bytes()
        except OSError as error:
            raise KeyFileError(f"cannot read certificate chain {chain_path}: {error}") from error
        try:
            return cls(key, tuple(chain_from_pem(data)))
        except ValueError as error:
            raise KeyFileError(f"{chain_path} does not match {key_path}: {error}") from error

    def save(self, key_path: str | os.PathLike[str], chain_path: str | os.PathLike[str]) -> None:
        write_file_atomically(key_path, private_key_to_pem(self.private_key), PRIVATE_KEY_FILE_MODE)
        write_file_atomically(chain_path, chain_to_pem(self.certificate_chain), CERTIFICATE_FILE_MODE)
