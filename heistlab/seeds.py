"""Seeds as a vector: N surrogates trained by one compiled program, one per PRNG key.

An extraction result is worth reporting over several seeds; trained one after another, N seeds cost N
dispatches of the training program and N initialisations. ``train_classifiers`` maps ``heistlab.training``'s
own training loop over a vector of keys (``jax.vmap``) inside one ``jit``; with several devices the seed axis
is sharded across them, each device training its share of the seeds. Seed ``i`` comes out equal (to float
rounding) to ``train_classifier(model, inputs, targets, keys[i], config)``, the sequential run it replaces.

On 2 CPU cores it gives no reliable gain: ``benchmarks/test_seed_vectors.py`` (8 seeds of the default
surrogate) measured 1.0x to 2.1x the sequential speed across runs, the larger figures while other work loaded
the machine (README, Performance). It pays on accelerators and across devices.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from heistlab.training import (
    DEFAULT_TRAINING,
    Params,
    TrainConfig,
    _probability_program,
    _training_program,
    capacity_for,
    init_params,
    pad_rows,
)

SEED_AXIS = "seeds"


def seed_keys(seed: int, count: int) -> jax.Array:
    """``count`` independent keys derived from ``seed`` (``fold_in(key(seed), i)`` for seed ``i``)."""
    if not isinstance(count, int) or count < 1:
        raise ValueError(f"seeds: count must be an integer >= 1, got {count!r}")
    base = jax.random.key(seed)
    return jax.vmap(lambda index: jax.random.fold_in(base, index))(jnp.arange(count))


def params_for_seed(stacked: Params, index: int) -> Params:
    """Seed ``index``'s parameters out of the stacked pytree ``train_classifiers`` returns."""
    return jax.tree_util.tree_map(lambda leaf: leaf[index], stacked)


def _seed_mesh(devices: Sequence[jax.Device]) -> Mesh:
    return Mesh(np.asarray(devices), (SEED_AXIS,))


@functools.lru_cache(maxsize=32)
def _seeded_programs(model: nn.Module, config: TrainConfig, input_shape: tuple[int, ...], mesh: Mesh | None):
    """The vmapped initialisation + training loop (dense models) and training step (stepped models)."""
    optimizer, run_all, run_one = _training_program(model, config.batch_size, float(config.learning_rate))
    by_seed = NamedSharding(mesh, PartitionSpec(SEED_AXIS)) if mesh is not None else None
    replicated = NamedSharding(mesh, PartitionSpec()) if mesh is not None else None

    def start(key):
        init_key, shuffle_key = jax.random.split(key)
        params = init_params(model, input_shape, init_key)
        return params, optimizer.init(params), shuffle_key

    def train_all(keys, inputs, targets, count, steps_per_epoch, total_steps):
        params, _, shuffle_keys = jax.vmap(start)(keys)
        train_one = lambda p, k: run_all(p, inputs, targets, count, steps_per_epoch, total_steps, k)
        return jax.vmap(train_one)(params, shuffle_keys)

    def step_all(carries, step_index, inputs, targets, count, steps_per_epoch, shuffle_keys):
        step_one = lambda c, k: run_one(c, step_index, inputs, targets, count, steps_per_epoch, k)
        return jax.vmap(step_one)(carries, shuffle_keys)

    if mesh is None:
        return jax.jit(train_all), jax.jit(jax.vmap(start)), jax.jit(step_all)
    data = (replicated,) * 5
    return (
        jax.jit(train_all, in_shardings=(by_seed, *data), out_shardings=by_seed),
        jax.jit(jax.vmap(start), in_shardings=by_seed, out_shardings=by_seed),
        jax.jit(step_all, in_shardings=(by_seed, replicated, *data[:4], by_seed), out_shardings=by_seed),
    )


def train_classifiers(
    model: nn.Module,
    inputs: np.ndarray,
    targets: np.ndarray,
    keys: jax.Array,
    config: TrainConfig = DEFAULT_TRAINING,
    devices: Sequence[jax.Device] | None = None,
) -> Params:
    """Trains one classifier per key in ``keys`` on the same data; returns their parameters stacked on axis 0.

    Seed ``i`` equals ``heistlab.training.train_classifier(model, inputs, targets, keys[i], config)``. With
    more than one device (``devices``, default all of JAX's) the seed axis is sharded across them; a seed
    count that does not divide evenly is padded with repeated keys, whose results are dropped.
    """
    config = config.validated()
    keys = jnp.asarray(keys)
    if not jnp.issubdtype(keys.dtype, jax.dtypes.prng_key) or keys.ndim != 1 or len(keys) == 0:
        raise ValueError(
            f"seeds: keys must be a non-empty 1-D array of typed PRNG keys (jax.random.key), got "
            f"dtype {keys.dtype} and shape {keys.shape}"
        )
    count = len(inputs)
    if count == 0:
        raise ValueError("seeds: cannot train on an empty data set")
    if len(targets) != count:
        raise ValueError(f"seeds: inputs hold {count} rows but targets hold {len(targets)}")
    devices = tuple(jax.devices() if devices is None else devices)
    if not devices:
        raise ValueError("seeds: devices must name at least one device, got an empty sequence")
    mesh = _seed_mesh(devices) if len(devices) > 1 else None
    seeds = len(keys)
    padded_seeds = -(-seeds // len(devices)) * len(devices)
    keys = jnp.concatenate([keys, jnp.repeat(keys[-1:], padded_seeds - seeds)])

    capacity = capacity_for(count + config.batch_size)
    padded_inputs = jnp.asarray(pad_rows(np.asarray(inputs, np.float32), capacity))
    padded_targets = jnp.asarray(pad_rows(np.asarray(targets, np.float32), capacity))
    steps_per_epoch = math.ceil(count / config.batch_size)
    total_steps = config.epochs * steps_per_epoch
    dynamic = (jnp.int32(count), jnp.int32(steps_per_epoch))
    train_all, start_all, step_all = _seeded_programs(model, config, tuple(inputs.shape[1:]), mesh)
    if model.compiled_loop:
        stacked = train_all(keys, padded_inputs, padded_targets, *dynamic, jnp.int32(total_steps))
    else:
        params, opt_state, shuffle_keys = start_all(keys)
        carries = (params, opt_state)
        for step_index in range(total_steps):
            carries = step_all(
                carries, jnp.int32(step_index), padded_inputs, padded_targets, *dynamic, shuffle_keys
            )
        stacked = carries[0]
    return jax.tree_util.tree_map(lambda leaf: leaf[:seeds], stacked)


@functools.lru_cache(maxsize=32)
def _per_seed_probability_program(model: nn.Module):
    return jax.jit(jax.vmap(_probability_program(model), in_axes=(0, None)))


def predict_proba_per_seed(model: nn.Module, stacked: Params, inputs: np.ndarray) -> np.ndarray:
    """Class probabilities of every seed's classifier, ``(seeds, batch, classes)``, in one program.

    Inputs are padded to a power-of-two bucket, as ``heistlab.training.predict_proba`` pads them.
    """
    if len(inputs) == 0:
        raise ValueError("seeds: cannot predict on an empty batch")
    padded = pad_rows(np.asarray(inputs, np.float32), capacity_for(len(inputs), minimum=8))
    return np.asarray(_per_seed_probability_program(model)(stacked, padded))[:, : len(inputs)]
