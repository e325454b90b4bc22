"""Victims: trained once per configuration and cached on disk behind a SHA-256 digest.

A cache entry is a folder named by the digest of the victim's canonical configuration (model, training,
data split), holding ``params.msgpack`` and ``manifest.json``. The manifest records the configuration and the
SHA-256 of the parameter bytes; a checkpoint whose bytes no longer match is refused, never loaded.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import numpy as np
from flax import serialization

from heistlab import training
from heistlab.data import Splits

CHECKPOINT_FORMAT = 1


class TamperedCheckpointError(RuntimeError):
    """A checkpoint whose bytes do not match the digest its manifest recorded."""


class Victim(NamedTuple):
    """A trained model: its Flax module and parameters (held by the prediction API, never by an attack)."""

    model: nn.Module
    params: Any
    input_shape: tuple[int, ...]

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


def save_checkpoint(folder: Path, params: Any, config: dict) -> None:
    payload = serialization.to_bytes(params)
    atomic_write_bytes(folder / "params.msgpack", payload)
    manifest = {"config": config, "sha256": hashlib.sha256(payload).hexdigest(), "format": CHECKPOINT_FORMAT}
    atomic_write_bytes(folder / "manifest.json", json.dumps(manifest, indent=2, default=str).encode())


def load_checkpoint(folder: Path, template: Any) -> Any:
    """Loads parameters shaped like ``template`` after verifying their SHA-256 against the manifest."""
    manifest = json.loads((folder / "manifest.json").read_text())
    payload = (folder / "params.msgpack").read_bytes()
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
) -> tuple[Victim, bool]:
    """Returns the victim for ``identity`` (its configuration) and whether it came from the cache.

    ``augment_training(x, y)`` extends the training data first (a model-side defense, such as a watermark).
    """
    key = jax.random.key(seed)
    folder = cache_dir / "victims" / config_digest(identity) if cache_dir is not None else None
    template = training.init_params(model, splits.input_shape, key)
    if folder is not None and (folder / "manifest.json").exists():
        return Victim(model, load_checkpoint(folder, template), splits.input_shape), True
    x, y = splits.victim_train.x, splits.victim_train.y
    if augment_training is not None:
        x, y = augment_training(x, y)
    params = training.train_classifier(model, x, training.one_hot(y, splits.num_classes), key, train_config)
    if folder is not None:
        save_checkpoint(folder, params, identity)
    return Victim(model, params, splits.input_shape), False
