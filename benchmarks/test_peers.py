"""heistlab beside IBM ART (adversarial-robustness-toolbox + PyTorch on the CPU), in the same session.

The default knockoff experiment in ART (``benchmarks.art_knockoff``: same split, networks, epochs, batch size,
budget and measurements) warm in-process and as a fresh process, and FGSM/PGD throughput on the MLP against
ART's ``FastGradientMethod`` and ``ProjectedGradientDescent``. PyTorch runs with 1 and with 2 intra-op threads
and the report compares heistlab with the faster. Skipped when the ``peers`` extra is not installed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from benchmarks import art_knockoff, workloads
from benchmarks.conftest import BENCH_CACHE, REPO

pytest.importorskip("art", reason="the peers extra (adversarial-robustness-toolbox, torch) is not installed")
torch = pytest.importorskip("torch")

THREADS = (1, 2)
FGSM_EPSILON, PGD_EPSILON, PGD_STEP, PGD_STEPS = 0.3, 0.25, 0.025, 20


@pytest.fixture
def torch_threads(request):
    previous = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def art_victim(splits, bench_cache):
    return art_knockoff.load_or_train_victim(splits, bench_cache / "art")


@pytest.mark.parametrize("torch_threads", THREADS, indirect=True)
def test_art_knockoff_steady_state(benchmark, art_victim, splits, torch_threads):
    found = {}
    benchmark.group = "experiment"
    benchmark.pedantic(
        lambda: found.update(art_knockoff.run_knockoff(art_victim, splits)),
        rounds=3,
        iterations=1,
        warmup_rounds=1,
    )
    benchmark.extra_info.update(
        kind="experiment", name=f"knockoff, warm in-process, ART ({torch_threads} thread(s))", system="art",
        mode="steady", threads=torch_threads, fidelity_test=found["fidelity_test"],
        surrogate_accuracy=found["surrogate_accuracy"], items_per_round=1,
    )  # fmt: skip


@pytest.mark.parametrize("threads", THREADS)
def test_art_knockoff_fresh_process(benchmark, art_victim, threads):
    environment = {**os.environ, "HEISTLAB_CACHE_DIR": str(BENCH_CACHE), "OMP_NUM_THREADS": str(threads)}
    found = {}

    def fresh_run():
        finished = subprocess.run(
            [sys.executable, "-m", "benchmarks.art_knockoff"],
            cwd=REPO, env=environment, capture_output=True, text=True, timeout=600, check=True,
        )  # fmt: skip
        found.update(json.loads(finished.stdout.strip().splitlines()[-1]))

    benchmark.group = "experiment"
    benchmark.pedantic(fresh_run, rounds=2, iterations=1)
    benchmark.extra_info.update(
        kind="experiment", name=f"knockoff, fresh process, ART ({threads} thread(s))", system="art",
        mode="fresh", threads=threads, fidelity_test=found["fidelity_test"], items_per_round=1,
    )  # fmt: skip


def success_rate(predict, adversarial: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(predict(adversarial) != labels))


@pytest.mark.parametrize("method", ["fgsm", "pgd"])
def test_heistlab_evasion_throughput(benchmark, default_victim, splits, method):
    """heistlab's FGSM/PGD crafting on the MLP (white-box), as adversarial examples per second."""
    if method == "pgd":
        source, _, craft = workloads.evasion_crafters(PGD_EPSILON, PGD_STEP, PGD_STEPS)
    else:
        source, craft, _ = workloads.evasion_crafters(FGSM_EPSILON, PGD_STEP, PGD_STEPS)
    inputs, labels = splits.test.x, splits.test.y
    key = jax.random.key(0)
    adversarial = {}
    run = lambda: adversarial.update(
        x=craft(default_victim.model, default_victim.params, inputs, labels, key)
    )
    benchmark.group = "evasion"
    benchmark.pedantic(run, rounds=5, iterations=1, warmup_rounds=1)
    predict = lambda x: default_victim.predict_proba(x).argmax(-1)
    benchmark.extra_info.update(
        kind="evasion", name=f"{method}, heistlab ({source})", system="heistlab", method=method,
        implementation=source, items_per_round=len(inputs),
        success_rate=success_rate(predict, adversarial["x"], labels),
    )  # fmt: skip


@pytest.mark.parametrize("torch_threads", THREADS, indirect=True)
@pytest.mark.parametrize("method", ["fgsm", "pgd"])
def test_art_evasion_throughput(benchmark, art_victim, splits, method, torch_threads):
    from art.attacks.evasion import FastGradientMethod, ProjectedGradientDescent

    inputs, labels = art_knockoff.flat(splits.test.x), splits.test.y
    if method == "fgsm":
        attack = FastGradientMethod(art_victim, norm=np.inf, eps=FGSM_EPSILON, batch_size=len(inputs))
    else:
        attack = ProjectedGradientDescent(
            art_victim, norm=np.inf, eps=PGD_EPSILON, eps_step=PGD_STEP, max_iter=PGD_STEPS,
            num_random_init=1, batch_size=len(inputs), verbose=False,
        )  # fmt: skip
    targets = np.eye(10, dtype=np.float32)[labels]
    adversarial = {}
    benchmark.group = "evasion"
    benchmark.pedantic(
        lambda: adversarial.update(x=attack.generate(inputs, y=targets)),
        rounds=5,
        iterations=1,
        warmup_rounds=1,
    )
    predict = lambda x: art_victim.predict(x).argmax(-1)
    benchmark.extra_info.update(
        kind="evasion", name=f"{method}, ART ({torch_threads} thread(s))", system="art", method=method,
        threads=torch_threads, items_per_round=len(inputs),
        success_rate=success_rate(predict, adversarial["x"], labels),
    )  # fmt: skip
