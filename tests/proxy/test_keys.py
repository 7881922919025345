"""Ed25519 keys on disk: PKCS#8 PEM, mode 0600, atomic replacement."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ec import SECP256R1, generate_private_key
from cryptography.hazmat.primitives.serialization import (
    BestAvailableEncryption,
    Encoding,
    NoEncryption,
    PrivateFormat,
)

from proxy.errors import KeyFileError, PrivateFileExposed
from proxy.identity.keys import generate_key_pair, load_private_key, read_private_file, save_private_key
from proxy.identity.node_id import NodeId
from proxy.identity.tls_config import TLSConfig


def test_save_load_round_trip_and_mode(tmp_path: Path) -> None:
    key = generate_key_pair()
    path = tmp_path / "node.key"
    save_private_key(key, path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    text = path.read_bytes()
    assert text.startswith(b"-----BEGIN PRIVATE KEY-----\n")  # PKCS#8, unencrypted
    loaded = load_private_key(path)
    assert NodeId.from_public_key(loaded.public_key()) == NodeId.from_public_key(key.public_key())
    assert list(tmp_path.iterdir()) == [path]  # no temporary left behind


def test_mode_is_0600_even_with_a_permissive_umask(tmp_path: Path) -> None:
    previous = os.umask(0)
    try:
        save_private_key(generate_key_pair(), tmp_path / "node.key")
    finally:
        os.umask(previous)
    assert stat.S_IMODE(os.stat(tmp_path / "node.key").st_mode) == 0o600


def test_overwrite_replaces_a_world_readable_file_atomically(tmp_path: Path) -> None:
    path = tmp_path / "node.key"
    path.write_bytes(b"old")
    os.chmod(path, 0o644)
    inode_before = os.stat(path).st_ino
    key = generate_key_pair()
    save_private_key(key, path)
    # A new file was renamed over the old one: it never inherited the 0644 mode.
    assert os.stat(path).st_ino != inode_before
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert load_private_key(path).public_key() == key.public_key()


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o620, 0o601])
def test_owner_only_refuses_a_key_others_can_access(tmp_path: Path, mode: int) -> None:
    tls = TLSConfig.generate()
    key_path, chain_path = tmp_path / "key.pem", tmp_path / "chain.pem"
    tls.save(key_path, chain_path)
    key_path.chmod(mode)
    with pytest.raises(PrivateFileExposed, match=f"run: chmod 600 {key_path}"):
        load_private_key(key_path, owner_only=True)
    with pytest.raises(PrivateFileExposed):
        TLSConfig.load(key_path, chain_path, owner_only_key=True)
    # Off by default: a library caller may keep keys where modes mean something else.
    assert TLSConfig.load(key_path, chain_path).node_id == tls.node_id
    key_path.chmod(0o400)
    assert TLSConfig.load(key_path, chain_path, owner_only_key=True).node_id == tls.node_id


def test_owner_only_refuses_what_is_not_a_file(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo, 0o600)  # opening it must not wait for a writer
    with pytest.raises(KeyFileError, match="not a regular file"):
        read_private_file(fifo)
    with pytest.raises(KeyFileError, match="not a regular file"):
        load_private_key(tmp_path, owner_only=True)
    with pytest.raises(KeyFileError, match="cannot read"):
        load_private_key(tmp_path / "absent", owner_only=True)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError):
        load_private_key(tmp_path / "absent.key")


def test_save_into_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError):
        save_private_key(generate_key_pair(), tmp_path / "no" / "such" / "node.key")


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"garbage",
        b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
        generate_private_key(SECP256R1()).private_bytes(
            Encoding.PEM, PrivateFormat.PKCS8, BestAvailableEncryption(b"pw")
        ),
    ],
)
def test_malformed_or_encrypted_key_files(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "bad.key"
    path.write_bytes(content)
    with pytest.raises(KeyFileError):
        load_private_key(path)


def test_non_ed25519_key_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "ec.key"
    path.write_bytes(
        generate_private_key(SECP256R1()).private_bytes(
            Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()
        )
    )
    with pytest.raises(KeyFileError, match="Ed25519"):
        load_private_key(path)


# --- TLSConfig files -------------------------------------------------------------


def test_tls_config_generate_save_load(tmp_path: Path) -> None:
    from proxy.identity.tls_config import TLSConfig

    config = TLSConfig.generate()
    assert config.node_id == NodeId.from_public_key(config.private_key.public_key())
    assert len(config.certificate_chain) == 1
    config.save(tmp_path / "node.key", tmp_path / "chain.pem")
    assert stat.S_IMODE(os.stat(tmp_path / "node.key").st_mode) == 0o600
    loaded = TLSConfig.load(tmp_path / "node.key", tmp_path / "chain.pem")
    assert loaded.node_id == config.node_id
    assert loaded.certificate_chain == config.certificate_chain


def test_tls_config_with_a_rotated_chain(tmp_path: Path) -> None:
    from proxy.identity.certificates import generate_certificate, rotate_key
    from proxy.identity.tls_config import TLSConfig

    old_key = generate_key_pair()
    new_key, chain = rotate_key(old_key, [generate_certificate(old_key)])
    config = TLSConfig(new_key, tuple(chain))
    config.save(tmp_path / "k", tmp_path / "c")
    assert TLSConfig.load(tmp_path / "k", tmp_path / "c").certificate_chain == tuple(chain)


def test_tls_config_rejects_a_mismatched_pair(tmp_path: Path) -> None:
    from proxy.identity.certificates import chain_to_pem, generate_certificate
    from proxy.identity.tls_config import TLSConfig

    key, other = generate_key_pair(), generate_key_pair()
    with pytest.raises(ValueError):
        TLSConfig(key, (generate_certificate(other),))
    with pytest.raises(ValueError):
        TLSConfig(key, ())
    save_private_key(key, tmp_path / "k")
    (tmp_path / "c").write_bytes(chain_to_pem([generate_certificate(other)]))
    with pytest.raises(KeyFileError):
        TLSConfig.load(tmp_path / "k", tmp_path / "c")
    with pytest.raises(KeyFileError):
        TLSConfig.load(tmp_path / "k", tmp_path / "missing")
