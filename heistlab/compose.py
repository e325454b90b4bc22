"""Composition: data, victims, defenses and APIs built from configs, for every entry point.

The experiment (``heistlab.experiment``), the prediction server (``heistlab.serving.app``) and the audit
(``heistlab.audit.battery``) build what they run through these functions, so a new source of data, victims or
APIs is one module plus one config group: ``load_data``/``load_pool`` (built-in data sets, ``.npz`` files,
image folders), ``load_victim`` (trained and cached, or loaded: Flax, ONNX, a callable, an Open Inference
Protocol server), ``build_defense`` (any defense config or chain) and ``build_api`` (in-process, HTTPS or
OIP).
"""

from __future__ import annotations

import hashlib
import inspect
import os
from pathlib import Path

import jax
import numpy as np
from hydra.utils import get_method, instantiate
from omegaconf import DictConfig, OmegaConf

from heistlab import data, defenses, external_data, external_victims, models, protection, training, victims
from heistlab.api import PredictionAPI
from heistlab.checks import building
from heistlab.defenses import DefenderData, Defense, chain
from heistlab.models import build_model


def enable_compilation_cache(cache_dir: Path) -> None:
    """Persists compiled programs under ``cache_dir/jax`` so a fresh process skips most compilation."""
    jax.config.update("jax_compilation_cache_dir", str(cache_dir / "jax"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def cache_directory(cfg: DictConfig) -> Path:
    return Path(os.path.expanduser(str(cfg.cache_dir)))


def build_splits(cfg: DictConfig) -> data.Splits:
    spec = cfg.data
    dataset = load_data(spec)
    pool_dataset = None
    if spec.pool not in data.POOL_SOURCES:
        pool_dataset = load_pool(spec, dataset.input_shape)
    return data.make_splits(
        dataset,
        seed=spec.split_seed,
        test_fraction=spec.test_fraction,
        victim_fraction=spec.victim_fraction,
        pool_source=spec.pool,
        pool_size=spec.pool_size,
        pool_dataset=pool_dataset,
    )


def load_data(spec: DictConfig) -> data.Dataset:
    """The configured data set: a built-in one by name, or a user's ``.npz`` file or image folder."""
    if spec.name == "arrays":
        return external_data.load_arrays(spec.path, num_classes=spec.get("num_classes"))
    if spec.name == "image_folder":
        return external_data.load_image_folder(spec.root, tuple(spec.image_shape))
    synthetic = OmegaConf.to_container(spec.synthetic) if "synthetic" in spec else None
    return data.load_dataset(spec.name, data_dir=spec.data_dir, download=spec.download, synthetic=synthetic)


def load_pool(spec: DictConfig, input_shape: tuple[int, ...]) -> data.Dataset:
    """The attacker's pool from another built-in data set, or from a ``.npz`` file or image folder."""
    if spec.pool in data.DATASETS:
        return data.load_dataset(spec.pool, data_dir=spec.data_dir, download=spec.download)
    if Path(os.path.expanduser(str(spec.pool))).exists():
        shape = tuple(spec.image_shape) if spec.get("image_shape") else input_shape
        inputs = external_data.load_pool_inputs(spec.pool, shape)
        return data.Dataset(inputs, np.zeros(len(inputs), np.int32), 0, str(spec.pool))
    accepted = ", ".join(data.POOL_SOURCES + data.DATASETS)
    raise ValueError(
        f"data.pool must be one of {accepted}, or an existing .npz file or image folder; got {spec.pool!r}"
    )


def build_model_from(spec: DictConfig, num_classes: int):
    if spec.family == "flax":
        return external_victims.flax_module(spec.module, num_classes)
    options = OmegaConf.to_container(spec.options, resolve=True) if "options" in spec else {}
    return build_model(spec.family, num_classes, **(options or {}))


def train_config_from(spec: DictConfig) -> training.TrainConfig:
    return training.TrainConfig(**OmegaConf.to_container(spec, resolve=True))


def defender_data(cfg: DictConfig, splits: data.Splits) -> DefenderData:
    train = splits.victim_train
    return DefenderData(train.x, train.y, splits.input_shape, splits.num_classes, cfg.victim.seed)


def build_defense(spec: DictConfig, defender: DefenderData) -> Defense:
    """Instantiates the defense config, handing ``defender`` to factories that declare that argument.

    ``_target_: heistlab.defenses.chain`` with a ``members`` list builds each member the same way and chains
    them.
    """
    if spec._target_ == "heistlab.defenses.chain":
        if not spec.get("members"):
            raise ValueError("defense chain needs a non-empty `members` list of defense configs")
        return chain(*(build_defense(member, defender) for member in spec.members))
    factory = get_method(spec._target_)
    wants_defender = "defender" in inspect.signature(factory).parameters
    return instantiate(spec, defender=defender) if wants_defender else instantiate(spec)


def at_rest_from(cfg: DictConfig) -> victims.AtRest:
    """Checkpoint protection from ``cfg.protection``: key files and environment variables, never keys."""
    spec = cfg.get("protection") or {}
    key = protection.load_key(spec.get("encryption_key_file"), spec.get("encryption_key_env"))
    signing = protection.load_signing_keys(spec.get("signing_key_file"), spec.get("verify_key_file"))
    return victims.AtRest(key, signing)


def source_digest(paths: list[Path]) -> str:
    """SHA-256 over source files: a cached victim is retrained when the code that made it changes."""
    digest = hashlib.sha256()
    for path in sorted(paths):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


VICTIM_SOURCES = [Path(module.__file__) for module in (data, training, models)]


def load_victim(cfg: DictConfig, splits: data.Splits, defense: Defense) -> tuple[victims.Classifier, bool]:
    """Loads or trains the victim; a model-side defense extends its training data and joins its identity.

    The identity also holds a digest of the code that trains victims (and of the defenses package when a
    defense changes the training data), so editing that code never reuses a stale cached victim. Victims
    loaded whole (``victim=onnx``, ``callable``, ``flax`` with ``params``) are checked against the data and
    never cached (the second value, "from the cache", is False).
    """
    if (cfg.get("api") or {}).get("kind") == "oip":  # the server's config has no api
        return oip_victim(cfg, splits), False
    loaded = external_victims.load_configured(cfg.victim, splits, defense.augment_training is not None)
    if loaded is not None:
        return loaded, False
    identity = {
        "victim": OmegaConf.to_container(cfg.victim, resolve=True),
        "data": OmegaConf.to_container(cfg.data, resolve=True),
    }
    identity["data"].pop("data_dir", None)
    identity["data"].pop("download", None)
    sources = list(VICTIM_SOURCES)
    if defense.augment_training is not None:
        identity["defense"] = OmegaConf.to_container(cfg.defense, resolve=True)
        package = Path(defenses.__file__).parent
        sources += [path for path in package.glob("*.py") if not path.name.endswith("_test.py")]
    model = build_model_from(cfg.victim, splits.num_classes)
    sources.append(Path(inspect.getsourcefile(type(model))))
    identity["code"] = source_digest(sorted(set(sources)))
    return victims.load_or_train(
        model,
        splits,
        train_config_from(cfg.victim.train),
        cfg.victim.seed,
        identity,
        cache_directory(cfg),
        augment_training=defense.augment_training,
        at_rest=at_rest_from(cfg),
    )


def oip_victim(cfg: DictConfig, splits: data.Splits):
    """The served model of ``api=oip``, reached through its own budget-free evaluation client."""
    from heistlab.serving.oip_client import OIPVictim, api_from_config, check_undefended

    with building("api"):
        check_undefended(cfg.defense.get("_target_"))
        evaluation = api_from_config(cfg.api, splits.input_shape, splits.num_classes, budget=None)
    return OIPVictim(evaluation)


def build_api(cfg: DictConfig, victim: victims.Classifier, defense: Defense):
    """The API the attack queries: in-process, a prediction server over HTTPS (``api=http``) or an Open
    Inference Protocol server (``api=oip``, whose victim is the served model: ``oip_victim``)."""
    if cfg.api.get("kind") == "oip":
        from heistlab.serving.oip_client import api_from_config

        return api_from_config(cfg.api, victim.input_shape, victim.num_classes, budget=cfg.api.budget)
    if cfg.api.get("kind", "inprocess") == "http":
        from heistlab.serving.client import remote_api

        return remote_api(
            cfg.api.url,
            cfg.api.key_file,
            cfg.api.ca_file,
            output=cfg.api.output,
            timeout_s=cfg.api.timeout_s,
            max_wait_s=cfg.api.max_wait_s,
        )
    return PredictionAPI(
        victim,
        defense,
        key=jax.random.key(cfg.seed),
        budget=cfg.api.budget,
        output=cfg.api.output,
        top_k=cfg.api.top_k,
        max_batch=cfg.api.max_batch,
    )
