"""What sharing PRADA's state between server workers costs per request (``heistlab.serving.shared_defense``):
the state's size, the bytes a request writes, and its milliseconds with and without the synchronisation.

Each request a worker serves with a stateful chain is one transaction: decode what another worker changed
since (if it did), run the defense, encode and write what changed. Here a request is PRADA's ``apply`` on 8
more rows of one key, the key having sent ``queries`` rows before, beside ``others`` keys that sent 250 rows
each. It is timed three ways (medians of ``REQUESTS``): PRADA alone, through one store (the same worker
again: nothing to load), and through two stores taking turns (every request loads the other's change: the
worst case). Rows are digits-shaped (8x8, what the default server serves) near natural digits, or 28x28
uniform noise (every query joins its class's growing set: the largest state per query).

    python -m pytest benchmarks/test_shared_defense_benchmark.py -q -s
"""

from __future__ import annotations

import time

import jax
import numpy as np

from heistlab.data import load_digits
from heistlab.defenses import QueryContext, prada
from heistlab.serving.audit import AuditLog
from heistlab.serving.shared_defense import DefenseStateStore, ServingState

ROWS, REQUESTS, OTHER_QUERIES = 8, 20, 250
CASES = (  # input rows, the key's queries before, other keys
    ("digits 8x8", 1000, 0),
    ("digits 8x8", 4000, 0),
    ("digits 8x8", 1000, 20),
    ("noise 28x28", 1000, 0),
    ("noise 28x28", 4000, 0),
)
DETECTOR = prada(delta=0.85)


def rows_of(kind: str, count: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    if kind == "noise 28x28":
        return rng.random((count, 28, 28, 1), dtype=np.float32), rng.integers(0, 10, count)
    digits = load_digits()
    picked = rng.integers(0, len(digits.x), count)
    rows = np.clip(digits.x[picked] + rng.normal(0, 0.05, (count, *digits.x.shape[1:])), 0, 1)
    return rows.astype(np.float32), digits.y[picked]


def serve(state, client: str, rows: np.ndarray, labels: np.ndarray):
    for start in range(0, len(rows), 50):
        probs = np.eye(10, dtype=np.float32)[labels[start : start + 50]]
        context = QueryContext(rows[start : start + 50], jax.random.key(0), client=client)
        _, state = DETECTOR.apply(probs, state, context)
    return state


def median_ms(run, count: int) -> float:
    times = []
    for index in range(count):
        started = time.perf_counter()
        run(index)
        times.append(time.perf_counter() - started)
    return float(np.median(times)) * 1e3


def measure(path, kind: str, queries: int, others: int, rng: np.random.Generator) -> str:
    """One row of the table: a store at ``path`` under one key's requests, beside ``others`` keys."""
    state = serve(DETECTOR.init(), "attacker", *rows_of(kind, queries, rng))
    for other in range(others):
        state = serve(state, f"benign-{other}", *rows_of(kind, OTHER_QUERIES, rng))
    batches, labels = rows_of(kind, 3 * REQUESTS * ROWS, rng)
    requests = [(batches[at : at + ROWS], labels[at : at + ROWS]) for at in range(0, len(batches), ROWS)]
    stores = [DefenseStateStore(path, ServingState(state)) for _ in range(2)]
    written = []

    def through(count: int, offset: int):
        def run(index: int) -> None:
            def next_state(shared: ServingState) -> tuple[None, ServingState]:
                defense = serve(shared.defense, "attacker", *requests[offset + index])
                return None, shared._replace(defense=defense, batches=shared.batches + 1)

            store = stores[index % count]
            store.update(next_state)
            written.append(store.written_bytes)

        return run

    alone = median_ms(lambda index: serve(state, "attacker", *requests[index]), REQUESTS)
    through(1, 0)(0)  # the first store holds the state from here
    one = median_ms(through(1, 0), REQUESTS)  # the same worker again: nothing to load
    two = median_ms(through(2, REQUESTS), REQUESTS)  # taking turns: every request loads the other's
    assert stores[1].loads >= REQUESTS // 2
    row = (
        f"| {kind} | {queries} | {others} | {stores[0].state_bytes / 1024:.0f} | "
        f"{np.median(written) / 1024:.0f} | {alone:.2f} | {one:.2f} | {two:.2f} |"
    )
    for store in stores:
        store.close()
    return row


def test_shared_prada_state_cost_per_request(tmp_path):
    lines = [
        "| rows | key's queries | other keys | state KiB | written KiB per request | PRADA ms | PRADA "
        "+ store ms | PRADA + load + store ms |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for case, (kind, queries, others) in enumerate(CASES):
        path = AuditLog(tmp_path / f"case-{case}.sqlite").path  # a WAL database, as a server's
        lines.append(measure(path, kind, queries, others, np.random.default_rng(case)))
    print("\n" + "\n".join(lines))
