"""Which floating-point behaviour a machine has: a digest of a small training run, and the CPU it ran on.

Trained results depend on the last bits of every matrix product, and those depend on the kernels XLA picks
for the host (AVX2 or AVX-512, the CPU generation). Two machines that give the same digest here trained the
probe bit for bit alike, so a published benchmark mean can be checked on them exactly; on a machine with
another digest, a rerun is a fresh draw and its means are not comparable to the published ones.
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from heistlab.models import MLP

# The ISA extensions that change which kernels XLA-CPU generates.
VECTOR_FLAGS = (
    "sse4_2",
    "avx",
    "avx2",
    "fma",
    "avx512f",
    "avx512bw",
    "avx512vl",
    "avx512_vnni",
    "avx512_bf16",
)
PROBE_STEPS = 20
PROBE_BATCH = 64


def probe_digest() -> str:
    """SHA-256 (16 hex digits) of a float32 MLP (64-256-256-10, the default victim's shape) after
    ``PROBE_STEPS`` Adam steps at batch ``PROBE_BATCH`` on fixed pseudo-random data, and of its logits at
    batch 1, 64 and 512: the products the experiments train and serve with."""
    data_key, init_key = jax.random.split(jax.random.key(20261201))
    inputs = jax.random.uniform(data_key, (512, 64), jnp.float32)
    labels = jnp.arange(512) % 10
    model = MLP(10)
    optimizer = optax.adam(1e-3)
    params = model.init(init_key, inputs[:1])
    trained = _train(model, optimizer, params, inputs, labels)
    digest = hashlib.sha256()
    for leaf in jax.tree_util.tree_leaves(trained):
        digest.update(np.asarray(leaf).tobytes())
    for rows in (1, PROBE_BATCH, len(inputs)):
        digest.update(np.asarray(model.apply(trained, inputs[:rows])).tobytes())
    return digest.hexdigest()[:16]


def _train(model: MLP, optimizer, params, inputs: jax.Array, labels: jax.Array):
    def loss(params, x, y):
        return optax.softmax_cross_entropy_with_integer_labels(model.apply(params, x), y).mean()

    def step(carry, start):
        params, opt_state = carry
        x = jax.lax.dynamic_slice_in_dim(inputs, start, PROBE_BATCH)
        y = jax.lax.dynamic_slice_in_dim(labels, start, PROBE_BATCH)
        updates, opt_state = optimizer.update(jax.grad(loss)(params, x, y), opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), None

    starts = (jnp.arange(PROBE_STEPS) * PROBE_BATCH) % (len(inputs) - PROBE_BATCH)
    run = jax.jit(lambda params: jax.lax.scan(step, (params, optimizer.init(params)), starts)[0][0])
    return run(params)


def cpu_description(cpuinfo: Path = Path("/proc/cpuinfo")) -> dict:
    """The CPU's model name, its extensions among ``VECTOR_FLAGS``, and the cores this process may use."""
    model, flags = platform.processor() or platform.machine(), set()
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and value.strip():
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
    return {
        "cpu": model,
        "vector_flags": [flag for flag in VECTOR_FLAGS if flag in flags],
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
    }


@functools.cache
def machine() -> dict:
    """This machine as a published result names it: the probe's digest, the CPU, JAX's version and backend."""
    return {
        "numerics": probe_digest(),
        **cpu_description(),
        "jax": jax.__version__,
        "backend": jax.default_backend(),
    }


def describe(found: dict) -> str:
    """One line for documents: ``AMD EPYC (avx2, fma), 2 cores, JAX 0.10.2 on cpu, numerics 0123...``."""
    flags = ", ".join(found.get("vector_flags", [])) or "no vector flags read"
    return (
        f"{found.get('cpu', 'unknown CPU')} ({flags}), {found.get('cores', '?')} cores, "
        f"JAX {found.get('jax', '?')} on {found.get('backend', '?')}, numerics {found.get('numerics', '?')}"
    )
