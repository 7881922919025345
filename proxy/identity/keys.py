"""Ed25519 node keys: generate, save (PKCS#8 PEM, mode 0600, atomic) and load."""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    load_pem_private_key,
)

from proxy.identity.errors import KeyFileError, PrivateFileExposed

PRIVATE_KEY_FILE_MODE = 0o600


def generate_key_pair() -> Ed25519PrivateKey:
    """A fresh Ed25519 private key (its public half is the NodeId)."""
    return Ed25519PrivateKey.generate()


def private_key_to_pem(key: Ed25519PrivateKey) -> bytes:
    return key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())


def private_key_from_pem(data: bytes) -> Ed25519PrivateKey:
    try:
        key = load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as error:
        raise KeyFileError(f"not an unencrypted PKCS#8 PEM private key: {error}") from error
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"expected an Ed25519 private key, got {type(key).__name__}")
    return key


def write_file_atomically(path: str | os.PathLike[str], data: bytes, mode: int) -> None:
    """Write ``data`` to ``path`` so readers see the old file or the whole new one.

    The temporary file is created with ``mode`` from the start (O_EXCL, in the target
    directory), so a secret is never readable by others, not even for a moment.
    """
    target = Path(path)
    directory = target.parent
    try:
        descriptor, temporary = tempfile.mkstemp(prefix=f".{target.name}.", dir=directory)
    except OSError as error:
        raise KeyFileError(f"cannot create a file in {directory}: {error}") from error
    try:
        # mkstemp creates 0600; set the wanted mode before any byte is written.
        os.fchmod(descriptor, mode)
        with os.fdopen(descriptor, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, target)
    except OSError as error:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise KeyFileError(f"cannot write {target}: {error}") from error
    _fsync_directory(directory)


def _fsync_directory(directory: Path) -> None:
    """Make the rename durable. Best effort: the rename itself is already done, and
    some file systems refuse opening or syncing a directory."""
    try:
        directory_descriptor = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        with contextlib.suppress(OSError):
            os.fsync(directory_descriptor)
    finally:
        os.close(directory_descriptor)


def save_private_key(key: Ed25519PrivateKey, path: str | os.PathLike[str]) -> None:
    """Save as unencrypted PKCS#8 PEM, file mode 0600, atomically."""
    write_file_atomically(path, private_key_to_pem(key), PRIVATE_KEY_FILE_MODE)


def read_private_file(path: str | os.PathLike[str]) -> bytes:
    """The bytes of a secret file (a private key, an auth token) that only its owner
    may access, like ssh with its keys: a secret others can read is a mistake to stop on.

    The mode is checked on the opened file, so the file read is the file checked.
    Raises PrivateFileExposed (the message says the chmod to run), KeyFileError when
    it is not a regular file, and OSError (FileNotFoundError, ...) when it cannot be
    opened or read: callers word those in their own terms."""
    # O_NONBLOCK: opening a FIFO planted in its place must not hang; a file ignores it.
    descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    try:
        mode = os.fstat(descriptor).st_mode
        if not stat.S_ISREG(mode):
            raise KeyFileError(f"{os.fspath(path)} is not a regular file")
        if mode & 0o077:
            raise PrivateFileExposed(
                f"{os.fspath(path)} is open to group or others (mode {stat.S_IMODE(mode):04o});"
                f" run: chmod 600 {os.fspath(path)}"
            )
        with os.fdopen(descriptor, "rb", closefd=False) as file:
            return file.read()
    finally:
        os.close(descriptor)


def load_private_key(path: str | os.PathLike[str], *, owner_only: bool = False) -> Ed25519PrivateKey:
    """The key in a PEM file. ``owner_only``: refuse a file group or others may access
    (PrivateFileExposed); off by default, since a library's caller may keep keys where
    modes mean something else (a secrets mount, a read-only image)."""
    try:
        data = read_private_file(path) if owner_only else Path(path).read_bytes()
    except OSError as error:
        raise KeyFileError(f"cannot read private key {path}: {error}") from error
    return private_key_from_pem(data)
