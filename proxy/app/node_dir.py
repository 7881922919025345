"""The node directory: identity (key 0600, certificate chain) and auth token.

Shared by the CLI and the demo, which both create and read node directories.
"""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Any

from proxy.app.config import AUTH_TOKEN_FILE, CHAIN_FILE, KEY_FILE
from proxy.app.errors import NodeDirectoryError


def keygen(node_dir: Path, *, force: bool) -> Any:
    """Create key (0600), certificate chain and auth token (0600) in `node_dir`."""
    from proxy.identity.tls_config import TLSConfig

    key_path, chain_path = node_dir / KEY_FILE, node_dir / CHAIN_FILE
    if key_path.exists() and not force:
        raise NodeDirectoryError(
            f"{node_dir} already has an identity ({key_path}); "
            "pass --force to replace it (its NodeId is lost), or use `keynode rotate`"
        )
    try:
        node_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as error:
        raise NodeDirectoryError(f"cannot create {node_dir}: {error.strerror}") from None
    tls_config = TLSConfig.generate()
    tls_config.save(key_path, chain_path)
    token_path = node_dir / AUTH_TOKEN_FILE
    if not token_path.exists():
        from proxy.identity.keys import write_file_atomically

        write_file_atomically(token_path, (secrets.token_urlsafe(32) + "\n").encode(), 0o600)
    return tls_config


def load_identity(node_dir: Path) -> Any:
    from proxy.identity.tls_config import TLSConfig

    key_path = node_dir / KEY_FILE
    if not key_path.exists():
        raise NodeDirectoryError(
            f"no identity in {node_dir} (create one with `keynode keygen --dir {node_dir}`)"
        )
    # The node's own key: refused when others may read it, like the auth token.
    return TLSConfig.load(key_path, node_dir / CHAIN_FILE, owner_only_key=True)


def rotate(node_dir: Path) -> tuple[Any, Any]:
    """New key whose certificate the old key issues; returns (old, new) TLSConfigs."""
    from proxy.identity.certificates import rotate_key
    from proxy.identity.tls_config import TLSConfig

    old = load_identity(node_dir)
    new_key, chain = rotate_key(old.private_key, old.certificate_chain)
    new = TLSConfig(new_key, tuple(chain))
    new.save(node_dir / KEY_FILE, node_dir / CHAIN_FILE)
    return old, new


def identity_document(tls_config: Any) -> dict[str, Any]:
    from proxy.identity.certificates import certificate_issuer_node_id, certificate_node_id

    return {
        "node_id": str(tls_config.node_id),
        "chain": [
            {
                "subject": str(certificate_node_id(certificate)),
                "issuer": str(certificate_issuer_node_id(certificate)),
                "not_before": certificate.not_valid_before_utc.isoformat(),
                "not_after": certificate.not_valid_after_utc.isoformat(),
            }
            for certificate in tls_config.certificate_chain
        ],
    }
