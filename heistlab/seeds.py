"""Seeds as a vector: N surrogates trained by one compiled program, one per PRNG key.

An extraction result is worth reporting over several seeds; trained one after another, N seeds cost N
dispatches of the training program and N initialisations. ``train_classifiers`` maps ``heistlab.training``'s
own training loop over a vector of keys (``jax.vmap``) inside one ``jit``; with several devices the seed axis
is sharded across them, each device training its share of the seeds. Seed ``i`` comes out equal (to float
rounding) to ``train_classifier(model, inputs, targets, keys[i], config)``, the sequential run it replaces.

``train_classifiers_per_seed`` does the same with each seed's own data: the transfer sets that
``num_seeds`` experiments collect, one fresh API per seed (``heistlab.experiment.execute_seeds``).

On 2 CPU cores it gives no reliable gain: ``benchmarks/test_seed_vectors.py`` (8 seeds of the default
surrogate) measured 0.9x to 2.1x the sequential speed across runs, the larger figures while other work loaded
the machine (README, Performance). It pays on accelerators and across devices.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from heistlab.models import trains_in_compiled_loop
from heistlab.training import (
    DEFAULT_TRAINING,
    Params,
    TrainConfig,
    _probability_program,
    _training_program,
    capacity_for,
    epoch_order,
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
def _seeded_programs(
    model: nn.Module,
    config: TrainConfig,
    input_shape: tuple[int, ...],
    mesh: Mesh | None,
    per_seed_data: bool,
):
    """The vmapped initialisation, whole training loop (dense models) and training step (stepped models).

    With ``per_seed_data`` the data arguments (inputs, targets, row counts, steps per epoch) carry a leading
    seed axis; otherwise every seed trains on the same data.
    """
    optimizer, run_all, run_one, _ = _training_program(model, config.batch_size, float(config.learning_rate))
    data_axis = 0 if per_seed_data else None
    by_seed = NamedSharding(mesh, PartitionSpec(SEED_AXIS)) if mesh is not None else None
    replicated = NamedSharding(mesh, PartitionSpec()) if mesh is not None else None
    data_sharding = by_seed if per_seed_data else replicated

    def start(key):
        init_key, shuffle_key = jax.random.split(key)
        params = init_params(model, input_shape, init_key)
        return params, optimizer.init(params), shuffle_key

    def train_all(keys, inputs, targets, count, steps_per_epoch, epochs):
        params, _, shuffle_keys = jax.vmap(start)(keys)
        axes = (0, data_axis, data_axis, data_axis, data_axis, None, 0)
        return jax.vmap(run_all, in_axes=axes)(
            params, inputs, targets, count, steps_per_epoch, epochs, shuffle_keys
        )

    def orders_all(shuffle_keys, epoch, count, capacity):
        one = lambda key, rows: epoch_order(key, epoch, rows, capacity)
        return jax.vmap(one, in_axes=(0, data_axis))(shuffle_keys, count)

    def step_all(carries, position, orders, inputs, targets, count, steps_per_epoch):
        def step_one(carry, order, seed_inputs, seed_targets, seed_count, seed_steps):
            stepped = run_one(carry, position, order, seed_inputs, seed_targets, seed_count)
            return jax.tree_util.tree_map(
                lambda new, old: jnp.where(position < seed_steps, new, old), stepped, carry
            )

        axes = (0, 0, data_axis, data_axis, data_axis, data_axis)
        return jax.vmap(step_one, in_axes=axes)(carries, orders, inputs, targets, count, steps_per_epoch)

    if mesh is None:
        return (
            jax.jit(train_all),
            jax.jit(jax.vmap(start)),
            jax.jit(orders_all, static_argnames="capacity"),
            jax.jit(step_all),
        )
    data = (data_sharding,) * 4
    return (
        jax.jit(train_all, in_shardings=(by_seed, *data, replicated), out_shardings=by_seed),
        jax.jit(jax.vmap(start), in_shardings=by_seed, out_shardings=by_seed),
        jax.jit(
            orders_all,
            static_argnames="capacity",
            in_shardings=(by_seed, replicated, data_sharding),
            out_shardings=by_seed,
        ),
        jax.jit(step_all, in_shardings=(by_seed, replicated, by_seed, *data), out_shardings=by_seed),
    )


def _check_keys(keys: jax.Array) -> jax.Array:
    keys = jnp.asarray(keys)
    if not jnp.issubdtype(keys.dtype, jax.dtypes.prng_key) or keys.ndim != 1 or len(keys) == 0:
        raise ValueError(
            f"seeds: keys must be a non-empty 1-D array of typed PRNG keys (jax.random.key), got "
            f"dtype {keys.dtype} and shape {keys.shape}"
        )
    return keys


def _devices(devices: Sequence[jax.Device] | None) -> tuple[jax.Device, ...]:
    devices = tuple(jax.devices() if devices is None else devices)
    if not devices:
        raise ValueError("seeds: devices must name at least one device, got an empty sequence")
    return devices


def _pad_seed_axis(array, padded_seeds: int):
    """Repeats the last seed's entry until the seed axis is ``padded_seeds`` long."""
    extra = padded_seeds - len(array)
    return jnp.concatenate([array, jnp.repeat(array[-1:], extra, axis=0)]) if extra else array


def _train_stacked(model, inputs, targets, counts, keys, config, devices, per_seed_data) -> Params:
    """One classifier per key; ``inputs``, ``targets``, ``counts`` are per seed with ``per_seed_data``."""
    seeds = len(keys)
    mesh = _seed_mesh(devices) if len(devices) > 1 else None
    padded_seeds = -(-seeds // len(devices)) * len(devices)
    keys = _pad_seed_axis(keys, padded_seeds)
    steps_per_epoch = -(-counts // config.batch_size)
    data = (inputs, targets, jnp.asarray(counts, jnp.int32), jnp.asarray(steps_per_epoch, jnp.int32))
    if per_seed_data:
        data = tuple(_pad_seed_axis(jnp.asarray(array), padded_seeds) for array in data)
    input_shape = tuple(inputs.shape[2:] if per_seed_data else inputs.shape[1:])
    train_all, start_all, orders_all, step_all = _seeded_programs(
        model, config, input_shape, mesh, per_seed_data
    )
    if trains_in_compiled_loop(model, input_shape):
        stacked = train_all(keys, *data, np.int32(config.epochs))
    else:
        params, opt_state, shuffle_keys = start_all(keys)
        carries = (params, opt_state)
        capacity = inputs.shape[1] if per_seed_data else inputs.shape[0]
        for epoch in range(config.epochs):
            orders = orders_all(shuffle_keys, np.int32(epoch), data[2], capacity=capacity)
            for position in range(int(np.max(steps_per_epoch))):
                carries = step_all(carries, np.int32(position), orders, *data)
        stacked = carries[0]
    return jax.tree_util.tree_map(lambda leaf: leaf[:seeds], stacked)


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
    config, keys, devices = config.validated(), _check_keys(keys), _devices(devices)
    count = len(inputs)
    if count == 0:
        raise ValueError("seeds: cannot train on an empty data set")
    if len(targets) != count:
        raise ValueError(f"seeds: inputs hold {count} rows but targets hold {len(targets)}")
    capacity = capacity_for(count + config.batch_size)
    padded_inputs = jnp.asarray(pad_rows(np.asarray(inputs, np.float32), capacity))
    padded_targets = jnp.asarray(pad_rows(np.asarray(targets, np.float32), capacity))
    return _train_stacked(model, padded_inputs, padded_targets, count, keys, config, devices, False)


def train_classifiers_per_seed(
    model: nn.Module,
    inputs: Sequence[np.ndarray],
    targets: Sequence[np.ndarray],
    keys: jax.Array,
    config: TrainConfig = DEFAULT_TRAINING,
    devices: Sequence[jax.Device] | None = None,
) -> Params:
    """Trains classifier ``i`` on ``(inputs[i], targets[i])`` from ``keys[i]``, all in one program.

    Each seed's data may hold a different number of rows (an API that refused some queries); all are padded
    to the capacity of the largest. Seed ``i`` equals ``train_classifier(model, inputs[i], targets[i],
    keys[i], config)`` whenever its rows fall in the same power-of-two capacity bucket as the largest seed's
    (always, when every seed has the same number of rows); the shuffle depends on the capacity.
    """
    config, keys, devices = config.validated(), _check_keys(keys), _devices(devices)
    if not len(inputs) == len(targets) == len(keys):
        raise ValueError(
            f"seeds: got {len(inputs)} input sets, {len(targets)} target sets and {len(keys)} keys; "
            "one of each per seed"
        )
    counts = np.array([len(rows) for rows in inputs])
    for index, (rows, answers) in enumerate(zip(inputs, targets, strict=True)):
        if len(rows) == 0:
            raise ValueError(f"seeds: seed {index} has an empty data set")
        if len(answers) != len(rows):
            raise ValueError(
                f"seeds: seed {index}'s inputs hold {len(rows)} rows but its targets {len(answers)}"
            )
    capacity = capacity_for(int(counts.max()) + config.batch_size)
    stack = lambda arrays: jnp.asarray(
        np.stack([pad_rows(np.asarray(a, np.float32), capacity) for a in arrays])
    )
    return _train_stacked(model, stack(inputs), stack(targets), counts, keys, config, devices, True)


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
