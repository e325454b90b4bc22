"""Protection at rest: AES-256-GCM encryption and Ed25519-signed manifests.

Keys never live in configs or code: each is read from a file or an environment variable the operator names.
An encrypted blob is ``MAGIC || 12-byte nonce || ciphertext+tag``; GCM authenticates it, so a wrong key or any
modified byte is refused (``ProtectionError``), never decrypted into garbage. A manifest is signed with an
Ed25519 private key and verified with the matching public key, so a server that only holds the public key can
refuse a tampered or swapped model before serving it.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
from pathlib import Path
from typing import NamedTuple

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

MAGIC = b"HEISTLAB-AESGCM-1\n"
NONCE_BYTES = 12
KEY_BYTES = 32


class ProtectionError(RuntimeError):
    """A key that cannot be read, a blob that fails authentication, or a signature that does not verify."""


def parse_key(text: str | bytes, source: str) -> bytes:
    """A 32-byte AES-256 key from raw bytes, hex or base64 text."""
    if isinstance(text, bytes) and len(text) == KEY_BYTES:
        return text
    stripped = (text.decode() if isinstance(text, bytes) else text).strip()
    for decode in (bytes.fromhex, base64.b64decode):
        try:
            key = decode(stripped)
        except (ValueError, binascii.Error):
            continue
        if len(key) == KEY_BYTES:
            return key
    raise ProtectionError(f"{source}: expected a 32-byte AES-256 key as hex (64 characters) or base64")


def load_key(key_file: str | os.PathLike | None = None, key_env: str | None = None) -> bytes | None:
    """Reads the encryption key from ``key_file`` or the environment variable ``key_env``; None if neither."""
    if key_file is not None:
        path = Path(os.path.expanduser(str(key_file)))
        if not path.is_file():
            raise ProtectionError(f"encryption key file {path} does not exist")
        return parse_key(path.read_bytes(), str(path))
    if key_env is not None:
        value = os.environ.get(key_env)
        if not value:
            raise ProtectionError(f"environment variable {key_env} (the encryption key) is not set")
        return parse_key(value, f"${key_env}")
    return None


def new_key() -> str:
    """A fresh random AES-256 key as hex, for ``experiments.keys`` or an operator's key file."""
    return os.urandom(KEY_BYTES).hex()


def encrypt(payload: bytes, key: bytes, associated_data: bytes = b"") -> bytes:
    nonce = os.urandom(NONCE_BYTES)
    return MAGIC + nonce + AESGCM(key).encrypt(nonce, payload, associated_data)


def is_encrypted(blob: bytes) -> bool:
    return blob.startswith(MAGIC)


def decrypt(blob: bytes, key: bytes | None, source: str, associated_data: bytes = b"") -> bytes:
    """Decrypts and authenticates ``blob``; raises ``ProtectionError`` naming ``source`` on any failure."""
    if not is_encrypted(blob):
        raise ProtectionError(f"{source} is not an encrypted heistlab file")
    if key is None:
        raise ProtectionError(f"{source} is encrypted; name its key (a key file or environment variable)")
    nonce, ciphertext = blob[len(MAGIC) : len(MAGIC) + NONCE_BYTES], blob[len(MAGIC) + NONCE_BYTES :]
    try:
        return AESGCM(key).decrypt(nonce, ciphertext, associated_data)
    except InvalidTag:
        raise ProtectionError(
            f"{source} failed authentication: the key is wrong or the file was modified"
        ) from None


class SigningKeys(NamedTuple):
    """The private key that signs manifests (trainer side) and the public key that verifies them (server)."""

    private: Ed25519PrivateKey | None
    public: Ed25519PublicKey | None


def generate_signing_pair(directory: Path) -> tuple[Path, Path]:
    """Writes ``manifest_signing.pem`` (private, mode 600) and ``manifest_verify.pem`` (public)."""
    directory.mkdir(parents=True, exist_ok=True)
    private = Ed25519PrivateKey.generate()
    private_path, public_path = directory / "manifest_signing.pem", directory / "manifest_verify.pem"
    private_bytes = private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    descriptor = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(private_bytes)
    public_path.write_bytes(
        private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return private_path, public_path


def load_signing_keys(private_file: str | None = None, public_file: str | None = None) -> SigningKeys:
    private = public = None
    if private_file is not None:
        loaded = serialization.load_pem_private_key(_read(private_file, "signing key"), password=None)
        if not isinstance(loaded, Ed25519PrivateKey):
            raise ProtectionError(f"signing key {private_file} is not an Ed25519 private key")
        private, public = loaded, loaded.public_key()
    if public_file is not None:
        loaded = serialization.load_pem_public_key(_read(public_file, "verify key"))
        if not isinstance(loaded, Ed25519PublicKey):
            raise ProtectionError(f"verify key {public_file} is not an Ed25519 public key")
        public = loaded
    return SigningKeys(private, public)


def _read(path: str, what: str) -> bytes:
    resolved = Path(os.path.expanduser(str(path)))
    if not resolved.is_file():
        raise ProtectionError(f"{what} file {resolved} does not exist")
    return resolved.read_bytes()


def canonical(manifest: dict) -> bytes:
    unsigned = {key: value for key, value in manifest.items() if key != "signature"}
    return json.dumps(unsigned, sort_keys=True, separators=(",", ":"), default=str).encode()


def sign_manifest(manifest: dict, private: Ed25519PrivateKey) -> dict:
    return {**manifest, "signature": private.sign(canonical(manifest)).hex()}


def verify_manifest(manifest: dict, public: Ed25519PublicKey, source: str) -> None:
    """Refuses a manifest that is unsigned or whose signature does not verify with ``public``."""
    signature = manifest.get("signature")
    if not signature:
        raise ProtectionError(f"{source} is not signed, but a verify key was given: refusing to load it")
    try:
        public.verify(bytes.fromhex(signature), canonical(manifest))
    except (InvalidSignature, ValueError):
        raise ProtectionError(
            f"{source}: signature does not verify: the manifest or model was modified, swapped, or signed "
            "with another key"
        ) from None
