"""Victims: trained once per configuration and cached on disk behind a SHA-256 digest.

A cache entry is a folder named by the digest of the victim's canonical configuration (model, training,
data split), holding ``params.msgpack`` and ``manifest.json``. The manifest records the configuration and the
SHA-256 of the parameter bytes; a checkpoint whose bytes no longer match is refused, never loaded.

With ``AtRest`` protection the parameters are stored AES-256-GCM encrypted (bound to their cache entry)
and the manifest is signed with Ed25519; a verify key makes unsigned or mis-signed manifests a refusal.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple, Protocol, runtime_checkable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import serialization

from heistlab import protection, training
from heistlab.data import Splits

CHECKPOINT_FORMAT = 1


class TamperedCheckpointError(RuntimeError):
    """A checkpoint whose bytes do not match the digest its manifest recorded."""


class AtRest(NamedTuple):
    """Checkpoint protection at rest: an AES-256 key and Ed25519 signing/verify keys (each may be None)."""

    encryption_key: bytes | None = None
    signing: protection.SigningKeys = protection.SigningKeys(None, None)


UNPROTECTED = AtRest()


@runtime_checkable
class Classifier(Protocol):
    """What the prediction API needs of a victim: any object with these serves (see external_victims).

    ``predict_proba`` maps float32 inputs ``(N, *input_shape)`` to ``(N, num_classes)`` probabilities.
    """

    @property
    def input_shape(self) -> tuple[int, ...]: ...

    @property
    def num_classes(self) -> int: ...

    def predict_proba(self, inputs: np.ndarray) -> np.ndarray: ...


class Victim(NamedTuple):
    """A Flax model and its parameters (held by the prediction API, never by an attack)."""

    model: nn.Module
    params: Any
    input_shape: tuple[int, ...]

    @property
    def num_classes(self) -> int:
        """The width of the model's output, traced (not computed) on one input of ``input_shape``."""
        probe = jax.ShapeDtypeStruct((1, *self.input_shape), jnp.float32)
        return int(jax.eval_shape(self.model.apply, self.params, probe).shape[-1])

    def predict_proba(self, inputs: np.ndarray) -> np.ndarray:
        return training.predict_proba(self.model, self.params, inputs)


def config_digest(config: dict) -> str:
    canonical = json.dumps({"format": CHECKPOINT_FORMAT, **config}, sort_keys=True, default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


def atomic_write_bytes(path: Path, payload: bytes) -> None:
    """Writes ``payload`` to ``path`` so that readers see the old file or the whole new one, never a part."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", delete=False) as handle:
        handle.write(payload)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(handle.name, path)


def save_checkpoint(folder: Path, params: Any, config: dict, at_rest: AtRest = UNPROTECTED) -> None:
    payload = serialization.to_bytes(params)
    stored = payload
    if at_rest.encryption_key is not None:
        stored = protection.encrypt(payload, at_rest.encryption_key, associated_data=folder.name.encode())
    atomic_write_bytes(folder / "params.msgpack", stored)
    manifest = {
        "config": config,
        "sha256": hashlib.sha256(payload).hexdigest(),
        "format": CHECKPOINT_FORMAT,
        "encrypted": at_rest.encryption_key is not None,
    }
    if at_rest.signing.private is not None:
        manifest = protection.sign_manifest(manifest, at_rest.signing.private)
    atomic_write_bytes(folder / "manifest.json", json.dumps(manifest, indent=2, default=str).encode())


def load_checkpoint(folder: Path, template: Any, at_rest: AtRest = UNPROTECTED) -> Any:
    """Loads parameters shaped like ``template`` after verifying signature, decryption and SHA-256."""
    manifest = json.loads((folder / "manifest.json").read_text())
    if at_rest.signing.public is not None:
        protection.verify_manifest(manifest, at_rest.signing.public, str(folder / "manifest.json"))
    payload = (folder / "params.msgpack").read_bytes()
    if protection.is_encrypted(payload):
        source = str(folder / "params.msgpack")
        payload = protection.decrypt(payload, at_rest.encryption_key, source, folder.name.encode())
    actual = hashlib.sha256(payload).hexdigest()
    if actual != manifest["sha256"]:
        raise TamperedCheckpointError(
            f"refusing checkpoint {folder / 'params.msgpack'}: its SHA-256 is {actual} but the manifest "
            f"recorded {manifest['sha256']}; the file was modified or corrupted. Delete the folder {folder} "
            "to retrain the victim."
        )
    return serialization.from_bytes(template, payload)


def load_or_train(
    model: nn.Module,
    splits: Splits,
    train_config: training.TrainConfig,
    seed: int,
    identity: dict,
    cache_dir: Path | None,
    augment_training: Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]] | None = None,
    at_rest: AtRest = UNPROTECTED,
) -> tuple[Victim, bool]:
    """Returns the victim for ``identity`` (its configuration) and whether it came from the cache.

    ``augment_training(x, y)`` extends the training data first (a model-side defense, such as a watermark).
    """
    key = jax.random.key(seed)
    folder = cache_dir / "victims" / config_digest(identity) if cache_dir is not None else None
    template = training.init_params(model, splits.input_shape, key)
    if folder is not None and (folder / "manifest.json").exists():
        return Victim(model, load_checkpoint(folder, template, at_rest), splits.input_shape), True
    x, y = splits.victim_train.x, splits.victim_train.y
    if augment_training is not None:
        x, y = augment_training(x, y)
    params = training.train_classifier(model, x, training.one_hot(y, splits.num_classes), key, train_config)
    if folder is not None:
        save_checkpoint(folder, params, identity, at_rest)
    return Victim(model, params, splits.input_shape), False
