"""Makes the keys for protecting victim checkpoints at rest.

    python -m experiments.protect --out ~/.heistlab-keys

writes ``checkpoint.key`` (AES-256, hex, mode 600), ``manifest_signing.pem`` (Ed25519 private, mode 600) and
``manifest_verify.pem`` (public), then prints the overrides that use them: the same ``protection.*``
keys work for ``experiments.run``, ``experiments.audit`` and ``experiments.serve`` (``configs/protection``).
A server that only loads victims needs ``protection.verify_key_file`` and the encryption key; the signing key
can stay with whoever trains them. Keys are never put in configs.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from heistlab import protection


def make_keys(directory: Path) -> dict[str, Path]:
    directory.mkdir(parents=True, exist_ok=True)
    key_path = directory / "checkpoint.key"
    descriptor = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        handle.write(protection.new_key() + "\n")
    private_path, public_path = protection.generate_signing_pair(directory)
    return {"encryption_key_file": key_path, "signing_key_file": private_path, "verify_key_file": public_path}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, required=True, help="folder for the new key files")
    arguments = parser.parse_args(argv)
    try:
        paths = make_keys(arguments.out.expanduser())
    except FileExistsError as error:
        parser.exit(2, f"refusing to overwrite an existing key: {error.filename}\n")
    print(" ".join(f"protection.{name}={path}" for name, path in paths.items()))


if __name__ == "__main__":
    main()
