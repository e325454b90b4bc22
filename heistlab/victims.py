"""Victims: trained once per configuration and cached on disk behind a SHA-256 digest.

A cache entry is a folder named by the digest of the victim's canonical configuration (model, training,
data split), holding ``params.msgpack`` and ``manifest.json``. The manifest records the configuration, its
digest, the entry it belongs to and the SHA-256 of the parameter bytes. The loader recomputes the digest of
the configuration it is asked to load and refuses a manifest made for another configuration or another entry
(another victim's files copied in), and a checkpoint whose bytes no longer match.

With ``AtRest`` protection the parameters are stored AES-256-GCM encrypted (bound to their cache entry) and
the manifest, binding included, is signed with Ed25519; a verify key makes unsigned or mis-signed manifests a
refusal, and an encryption key makes a checkpoint stored in the clear a refusal. Without a verify key the
checks guard against mistakes only: whoever can write the cache can rewrite a manifest to match.
"""

from __future__ import annotations

import functools
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

# Part of every configuration digest: changing it renames (so retrains) every cached victim.
CHECKPOINT_FORMAT = 1
# 1: config and sha256; 2: also the entry (folder name) and configuration digest it is bound to.
MANIFEST_FORMAT = 2
MANIFEST_FORMATS = (1, 2)


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
        leaves, tree = jax.tree_util.tree_flatten(self.params)
        shapes = tuple(jax.ShapeDtypeStruct(np.shape(leaf), leaf.dtype) for leaf in leaves)
        return _output_width(self.model, tree, shapes, tuple(self.input_shape))

    def predict_proba(self, inputs: np.ndarray) -> np.ndarray:
        return training.predict_proba(self.model, self.params, inputs)


@functools.lru_cache(maxsize=64)
def _output_width(model: nn.Module, tree, shapes: tuple, input_shape: tuple[int, ...]) -> int:
    """The output width of ``model`` with parameters of these shapes, traced once per process."""
    params = jax.tree_util.tree_unflatten(tree, shapes)
    probe = jax.ShapeDtypeStruct((1, *input_shape), jnp.float32)
    return int(jax.eval_shape(model.apply, params, probe).shape[-1])


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
    """Writes ``params`` and a manifest bound to ``folder`` (the cache entry) and to ``config``."""
    payload = serialization.to_bytes(params)
    stored = payload
    if at_rest.encryption_key is not None:
        stored = protection.encrypt(payload, at_rest.encryption_key, associated_data=folder.name.encode())
    atomic_write_bytes(folder / "params.msgpack", stored)
    manifest = {
        "format": MANIFEST_FORMAT,
        "entry": folder.name,
        "config": config,
        "config_digest": config_digest(config),
        "sha256": hashlib.sha256(payload).hexdigest(),
        "encrypted": at_rest.encryption_key is not None,
    }
    if at_rest.signing.private is not None:
        manifest = protection.sign_manifest(manifest, at_rest.signing.private)
    atomic_write_bytes(folder / "manifest.json", json.dumps(manifest, indent=2, default=str).encode())


def read_manifest(path: Path) -> dict:
    try:
        manifest = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise TamperedCheckpointError(
            f"refusing checkpoint manifest {path}: it is not JSON ({error})"
        ) from None
    missing = [
        name for name in ("config", "sha256") if not isinstance(manifest, dict) or name not in manifest
    ]
    if missing or manifest.get("format") not in MANIFEST_FORMATS:
        raise TamperedCheckpointError(
            f"refusing checkpoint manifest {path}: expected a heistlab manifest of format "
            f"{' or '.join(map(str, MANIFEST_FORMATS))} with config and sha256"
        )
    return manifest


def check_binding(manifest: dict, folder: Path, config: dict, source: str) -> None:
    """Refuses a manifest made for another configuration or another cache entry than the one being loaded.

    The configuration's digest is recomputed from ``config`` (what the caller is loading), never taken from
    the manifest. A format-1 manifest (written before manifests named their entry) is checked by its
    configuration alone, which also names its entry, since an entry is named by its configuration's digest.
    """
    expected, recorded = config_digest(config), config_digest(manifest["config"])
    if recorded != expected:
        raise TamperedCheckpointError(
            f"refusing checkpoint {source}: its manifest was made for another victim (configuration digest "
            f"{recorded}, expected {expected}): another cache entry's files were copied into {folder}. "
            f"Delete the folder {folder} to retrain the victim."
        )
    if manifest["format"] >= 2 and (
        manifest.get("entry") != folder.name or manifest.get("config_digest") != expected
    ):
        raise TamperedCheckpointError(
            f"refusing checkpoint {source}: its manifest belongs to cache entry {manifest.get('entry')!r} "
            f"with configuration digest {manifest.get('config_digest')!r}, not to {folder.name!r} with "
            f"{expected!r}. Delete the folder {folder} to retrain the victim."
        )


def load_checkpoint(folder: Path, template: Any, config: dict, at_rest: AtRest = UNPROTECTED) -> Any:
    """Loads parameters shaped like ``template`` for the victim configured by ``config``.

    Checked in order: the manifest's signature (when ``at_rest`` has a verify key), its binding to ``folder``
    and ``config``, encryption (required when ``at_rest`` has an encryption key), then the SHA-256 of the
    parameter bytes. Raises ``protection.ProtectionError`` or ``TamperedCheckpointError`` naming the file.
    """
    manifest_path, params_path = folder / "manifest.json", folder / "params.msgpack"
    manifest = read_manifest(manifest_path)
    if at_rest.signing.public is not None:
        protection.verify_manifest(manifest, at_rest.signing.public, str(manifest_path))
    check_binding(manifest, folder, config, str(manifest_path))
    payload = params_path.read_bytes()
    encrypted = protection.is_encrypted(payload)
    if at_rest.encryption_key is not None and not (encrypted and manifest.get("encrypted") is True):
        raise protection.ProtectionError(
            f"refusing checkpoint {params_path}: an encryption key is configured but the checkpoint is "
            f"stored in the clear. Delete the folder {folder} to retrain (and encrypt) the victim."
        )
    if encrypted != bool(manifest.get("encrypted", False)):
        raise TamperedCheckpointError(
            f"refusing checkpoint {params_path}: its manifest says encrypted={manifest.get('encrypted')} "
            f"but the file is {'encrypted' if encrypted else 'in the clear'}. Delete the folder {folder} "
            "to retrain the victim."
        )
    if encrypted:
        payload = protection.decrypt(payload, at_rest.encryption_key, str(params_path), folder.name.encode())
    actual = hashlib.sha256(payload).hexdigest()
    if actual != manifest["sha256"]:
        raise TamperedCheckpointError(
            f"refusing checkpoint {params_path}: its SHA-256 is {actual} but the manifest "
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
        return Victim(model, load_checkpoint(folder, template, identity, at_rest), splits.input_shape), True
    x, y = splits.victim_train.x, splits.victim_train.y
    if augment_training is not None:
        x, y = augment_training(x, y)
    params = training.train_classifier(model, x, training.one_hot(y, splits.num_classes), key, train_config)
    if folder is not None:
        save_checkpoint(folder, params, identity, at_rest)
    return Victim(model, params, splits.input_shape), False
