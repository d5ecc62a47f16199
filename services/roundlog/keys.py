"""Signing keys on disk, and the signer every producer of events uses.

A key file is an unencrypted PKCS#8 PEM Ed25519 private key (what ``openssl genpkey
-algorithm ed25519`` writes), readable by its owner only. Its key id is the raw public key in
hex; that id travels with every signature, so anyone can check one without a registry.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from roundlog.config import ConfigError
from roundlog.domain.authority import KEY_HEADER, SIGNATURE_HEADER, signed_message


def key_id_of(private_key: Ed25519PrivateKey) -> str:
    raw = private_key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return raw.hex()


def create_key_file(path: Path) -> str:
    """Write a new private key to ``path`` (mode 0600, never over an existing file); its key id."""
    private_key = Ed25519PrivateKey.generate()
    pem = private_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(pem)
    return key_id_of(private_key)


@dataclass(frozen=True)
class Signer:
    """Signs record values as one key."""

    private_key: Ed25519PrivateKey
    key_id: str

    @classmethod
    def from_file(cls, path: str | Path) -> Signer:
        try:
            loaded = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
        except OSError as error:
            raise ConfigError(f"ROUNDLOG_KEY_FILE {path}: {error.strerror}") from None
        except (ValueError, TypeError) as error:
            raise ConfigError(
                f"ROUNDLOG_KEY_FILE {path} is not an unencrypted PEM private key: {error}"
            ) from None
        if not isinstance(loaded, Ed25519PrivateKey):
            raise ConfigError(f"ROUNDLOG_KEY_FILE {path} holds a {type(loaded).__name__}, not an Ed25519 key")
        return cls(loaded, key_id_of(loaded))

    def headers(self, value: bytes) -> list[tuple[str, bytes]]:
        """The headers that sign a record whose value is ``value``."""
        signature = self.private_key.sign(signed_message(self.key_id, value))
        return [(KEY_HEADER, self.key_id.encode("ascii")), (SIGNATURE_HEADER, signature)]
