"""heistlab beside IBM ART (adversarial-robustness-toolbox + PyTorch on the CPU), in the same session.

The default knockoff experiment in ART (``benchmarks.art_knockoff``: same split, networks, epochs, batch size,
budget and measurements) warm in-process and as a fresh process, and FGSM/PGD throughput on the MLP against
ART's ``FastGradientMethod`` and ``ProjectedGradientDescent``. PyTorch runs with 1 and with 2 intra-op threads
and the report compares heistlab with the faster. Skipped when the ``peers`` extra is not installed.

Per call, the prediction API with every check on (validation, a budget, row digests, the record; no defense)
beside the bare compiled victim and ART's ``PyTorchClassifier.predict`` at batches 1, 128 and 4096; and the
black-box attacks through the API (Square, HopSkipJump) beside ART's ``SquareAttack`` and ``HopSkipJump`` on
the same victim: ART gets a PyTorch twin holding heistlab's trained weights.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from benchmarks import art_knockoff, workloads
from benchmarks.conftest import BENCH_CACHE, REPO
from heistlab.api import PredictionAPI
from heistlab.attacks.evasion.base import perturbation_norms
from heistlab.attacks.evasion.hopskipjump import hopskipjump_search
from heistlab.attacks.evasion.square import square_search
from heistlab.defenses import identity
from heistlab.training import _probability_program, capacity_for, pad_rows

pytest.importorskip("art", reason="the peers extra (adversarial-robustness-toolbox, torch) is not installed")
torch = pytest.importorskip("torch")

THREADS = (1, 2)
FGSM_EPSILON, PGD_EPSILON, PGD_STEP, PGD_STEPS = 0.3, 0.25, 0.025, 20
PREDICT_BATCHES = (1, 128, 4096)
# Square (L-inf) and HopSkipJump (L2) as the evasion configs run them; ART's HopSkipJump counts iterations,
# not queries: 4 iterations of 100 * sqrt(t) evaluations plus its searches come near the 1000 queries.
SQUARE = dict(epsilon=0.25, max_queries=500, p_init=0.3)
HOPSKIPJUMP = dict(epsilon=1.0, norm="l2", max_queries=1000, initial_evaluations=100, max_evaluations=10_000,
                   gamma=1.0, init_trials=100)  # fmt: skip
ART_HOPSKIPJUMP_ITERATIONS = 4
BLACK_BOX_INPUTS = {"square": 100, "hopskipjump": 20}


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


class AsFloat32(torch.nn.Module):
    """ART's HopSkipJump hands the model float64 arrays; the twin computes in float32 as heistlab does."""

    def forward(self, inputs):
        return inputs.float()


@pytest.fixture(scope="module")
def art_twin(default_victim):
    """ART's ``PyTorchClassifier`` around a PyTorch MLP holding heistlab's victim weights (NCHW 1x8x8 input,
    flattened in heistlab's order since the image has one channel)."""
    layers = []
    dense = sorted(default_victim.params["params"].items(), key=lambda item: int(item[0].split("_")[-1]))
    for index, (_, weights) in enumerate(dense):
        linear = torch.nn.Linear(*np.asarray(weights["kernel"]).shape)
        with torch.no_grad():
            linear.weight.copy_(torch.from_numpy(np.asarray(weights["kernel"]).T.copy()))
            linear.bias.copy_(torch.from_numpy(np.asarray(weights["bias"]).copy()))
        layers += [linear] if index == len(dense) - 1 else [linear, torch.nn.ReLU()]
    model = torch.nn.Sequential(AsFloat32(), torch.nn.Flatten(), *layers)
    classifier = art_knockoff.mlp_classifier(seed=0, model=model)
    classifier._input_shape = (1, 8, 8)
    return classifier


def nchw(inputs: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.transpose(inputs, (0, 3, 1, 2)), dtype=np.float32)


def predict_info(benchmark, system: str, path: str, batch: int, **extra) -> None:
    benchmark.group = "predict"
    benchmark.extra_info.update(
        kind="predict", name=f"{path}, batch {batch}", system=system, path=path, batch=batch,
        items_per_round=batch, **extra,
    )  # fmt: skip


@pytest.mark.parametrize("batch", PREDICT_BATCHES)
def test_heistlab_api_predict(benchmark, default_victim, splits, batch):
    """The whole API path, one client under a budget (never reached), every row digested and recorded."""
    api = PredictionAPI(default_victim, identity(), key=jax.random.key(0), budget=2**62)
    inputs = np.resize(splits.test.x, (batch, *splits.input_shape))
    api.query(inputs)
    predict_info(benchmark, "heistlab", "heistlab API", batch)
    benchmark(api.query, inputs)


@pytest.mark.parametrize("batch", PREDICT_BATCHES)
def test_heistlab_bare_victim_predict(benchmark, default_victim, splits, batch):
    """The floor under the API: the compiled victim on a padded batch, probabilities back on the host."""
    program = _probability_program(default_victim.model)
    inputs = np.resize(splits.test.x, (batch, *splits.input_shape)).astype(np.float32)
    padded = pad_rows(inputs, capacity_for(batch, minimum=8))
    run = lambda: np.asarray(program(default_victim.params, padded))
    run()
    predict_info(benchmark, "heistlab", "heistlab bare victim", batch)
    benchmark(run)


@pytest.mark.parametrize("torch_threads", THREADS, indirect=True)
@pytest.mark.parametrize("batch", PREDICT_BATCHES)
def test_art_predict(benchmark, art_twin, splits, batch, torch_threads):
    inputs = nchw(np.resize(splits.test.x, (batch, *splits.input_shape)))
    art_twin.predict(inputs, batch_size=batch)
    predict_info(benchmark, "art", f"ART predict ({torch_threads} thread(s))", batch, threads=torch_threads)
    benchmark(art_twin.predict, inputs, batch_size=batch)


def attacked_inputs(predict_labels, splits, count: int) -> tuple[np.ndarray, np.ndarray]:
    """The first ``count`` test inputs the victim classifies correctly, and their labels."""
    right = np.flatnonzero(predict_labels(splits.test.x) == splits.test.y)[:count]
    return splits.test.x[right], splits.test.y[right]


def black_box_success(adversarial, clean, labels, predict_labels, norm: str, epsilon: float) -> float:
    """Share of inputs whose adversarial point fools the victim within the attack's bound."""
    inside = perturbation_norms(adversarial, clean, norm) <= epsilon * (1 + 1e-5)
    return float(np.mean(inside & (predict_labels(adversarial) != labels)))


def black_box_info(benchmark, method, system, name, count, success, **extra) -> None:
    benchmark.group = "black-box evasion"
    benchmark.extra_info.update(
        kind="evasion", method=method, system=system, name=f"{method}, {name} ({count} inputs)",
        items_per_round=count, success_rate=success, **extra,
    )  # fmt: skip


@pytest.mark.parametrize("method", ["square", "hopskipjump"])
def test_heistlab_black_box_evasion(benchmark, default_victim, splits, method):
    """Square or HopSkipJump through the prediction API (no defense, queries recorded), every attacked
    input's queries in one batch per step."""
    predict_labels = lambda x: default_victim.predict_proba(x).argmax(-1)
    inputs, labels = attacked_inputs(predict_labels, splits, BLACK_BOX_INPUTS[method])
    api = PredictionAPI(default_victim, identity(), key=jax.random.key(0), budget=None)
    if method == "square":
        search = lambda key: square_search(api.oracle(), inputs, labels, key, query_batch=4096, **SQUARE)
        norm, epsilon = "linf", SQUARE["epsilon"]
    else:
        search = lambda key: hopskipjump_search(
            api.oracle(), inputs, labels, key, query_batch=4096, **HOPSKIPJUMP
        )
        norm, epsilon = HOPSKIPJUMP["norm"], HOPSKIPJUMP["epsilon"]
    keys = (jax.random.key(seed) for seed in itertools.count())
    found = {}
    benchmark.pedantic(
        lambda: found.update(result=search(next(keys))), rounds=3, iterations=1, warmup_rounds=1
    )
    result = found["result"]
    success = black_box_success(result.adversarial, inputs, labels, predict_labels, norm, epsilon)
    black_box_info(
        benchmark, method, "heistlab", "heistlab through the API", len(inputs), success,
        mean_queries=float(np.mean(result.queries)),
    )  # fmt: skip


@pytest.mark.parametrize("torch_threads", THREADS, indirect=True)
@pytest.mark.parametrize("method", ["square", "hopskipjump"])
def test_art_black_box_evasion(benchmark, art_twin, splits, method, torch_threads):
    from art.attacks.evasion import HopSkipJump, SquareAttack

    predict_labels = lambda x: art_twin.predict(nchw(x)).argmax(-1)
    inputs, labels = attacked_inputs(predict_labels, splits, BLACK_BOX_INPUTS[method])
    if method == "square":
        attack = SquareAttack(
            art_twin, norm=np.inf, eps=SQUARE["epsilon"], max_iter=SQUARE["max_queries"],
            p_init=SQUARE["p_init"], nb_restarts=1, batch_size=len(inputs), verbose=False,
        )  # fmt: skip
        norm, epsilon = "linf", SQUARE["epsilon"]
    else:
        attack = HopSkipJump(
            art_twin, targeted=False, norm=2, max_iter=ART_HOPSKIPJUMP_ITERATIONS,
            max_eval=HOPSKIPJUMP["max_evaluations"], init_eval=HOPSKIPJUMP["initial_evaluations"],
            init_size=HOPSKIPJUMP["init_trials"], batch_size=4096, verbose=False,
        )  # fmt: skip
        norm, epsilon = HOPSKIPJUMP["norm"], HOPSKIPJUMP["epsilon"]
    seeds = itertools.count()
    found = {}

    def run():
        np.random.seed(next(seeds))  # ART draws from NumPy's global generator
        found["adversarial"] = attack.generate(nchw(inputs), y=np.eye(10, dtype=np.float32)[labels])

    benchmark.pedantic(run, rounds=3, iterations=1, warmup_rounds=1)
    adversarial = np.transpose(found["adversarial"], (0, 2, 3, 1))
    success = black_box_success(adversarial, inputs, labels, predict_labels, norm, epsilon)
    black_box_info(
        benchmark, method, "art", f"ART ({torch_threads} thread(s))", len(inputs), success,
        threads=torch_threads,
    )  # fmt: skip
