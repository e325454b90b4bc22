"""What sharing PRADA's state between server workers costs per request: the state's size after N queries of
one key, and the milliseconds to store it and to load it (``heistlab.serving.shared_defense``).

Each request a worker serves with a stateful chain is one transaction: decode the state if another worker
wrote it since (``load``), run the defense, encode and write the new state (``store``). The worst case, timed
here, is a key whose requests alternate between two workers, so every request both loads and stores (the
median of 20 requests; the defense itself is not run, only the synchronisation). The
states are PRADA's after one key's stream of N queries: digits-shaped rows (8x8, what the default server
serves) near natural digits, and 28x28 rows of uniform noise (every query joins its class's growing set:
the largest state per query).

    python -m pytest benchmarks/test_shared_defense_benchmark.py -q -s
"""

from __future__ import annotations

import time

import jax
import numpy as np

from defenses import QueryContext, prada
from heistlab.data import load_digits
from heistlab.serving.audit import AuditLog
from heistlab.serving.shared_defense import DefenseStateStore, ServingState, encode_tree

QUERIES = (250, 1000, 4000)
BATCH = 50
REPEATS = 20  # requests timed per cell; the median is reported


def digits_like(count: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    digits = load_digits()
    picked = rng.integers(0, len(digits.x), count)
    rows = np.clip(digits.x[picked] + rng.normal(0, 0.05, (count, *digits.x.shape[1:])), 0, 1)
    return rows.astype(np.float32), digits.y[picked]


def mnist_shaped_noise(count: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    return rng.random((count, 28, 28, 1), dtype=np.float32), rng.integers(0, 10, count)


def prada_state_after(rows: np.ndarray, labels: np.ndarray):
    detector = prada(delta=0.85)
    state = detector.init()
    for start in range(0, len(rows), BATCH):
        probs = np.eye(10, dtype=np.float32)[labels[start : start + BATCH]]
        context = QueryContext(rows[start : start + BATCH], jax.random.key(0), client="attacker")
        _, state = detector.apply(probs, state, context)
    return state


def next_request(state: ServingState) -> tuple[None, ServingState]:
    return None, state._replace(batches=state.batches + 1)


def median_ms(stores: list[DefenseStateStore]) -> float:
    """The median milliseconds of one synchronised request (the defense itself not run) through ``stores``."""
    times = []
    for store in stores:
        started = time.perf_counter()
        store.update(next_request)
        times.append(time.perf_counter() - started)
    return float(np.median(times)) * 1e3


def test_shared_prada_state_cost_per_request(tmp_path):
    rng = np.random.default_rng(0)
    lines = [
        "| stream | queries | state KiB | store ms | load + store ms |",
        "|---|---|---|---|---|",
    ]
    for name, make in (("digits 8x8", digits_like), ("noise 28x28", mnist_shaped_noise)):
        for count in QUERIES:
            state = ServingState(prada_state_after(*make(count, rng)))
            size = len(encode_tree(state))
            path = AuditLog(tmp_path / f"{name.split()[0]}-{count}.sqlite").path  # WAL, as a server's
            first, second = DefenseStateStore(path, state), DefenseStateStore(path, state)
            first.update(next_request)
            store_ms = median_ms([first] * REPEATS)  # the same worker again: nothing to load
            both_ms = median_ms([first, second] * (REPEATS // 2))  # alternating: every request loads
            assert second.loads >= REPEATS // 2
            lines.append(f"| {name} | {count} | {size / 1024:.0f} | {store_ms:.1f} | {both_ms:.1f} |")
            first.close()
            second.close()
    print("\n" + "\n".join(lines))
