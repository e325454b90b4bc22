"""The default knockoff experiment in IBM ART: the peer that heistlab's speed is compared against.

Same data split (digits, ``data.split_seed=0``), same networks (MLP 64-256-256-10), same training (Adam 1e-3,
batch 64; victim 100 epochs, knockoff 50), same budget (1000 queries of the attacker's pool, walked again when
the budget exceeds it), same evaluation (test accuracy and fidelity on the test split and on 2000 uniform
inputs). ART's ``KnockoffNets`` (Orekondy et al. 2019, random strategy) with a ``PyTorchClassifier`` on the
CPU. ART's KnockoffNets assumes a victim that outputs logits and would train the thief on them as if they were
probabilities; the victim is therefore queried behind a softmax, so the thief learns the served probabilities
as heistlab's soft-label knockoff does.

    python -m benchmarks.art_knockoff            # a fresh process: what the fresh-process benchmark times

The victim is trained once and cached (``HEISTLAB_CACHE_DIR/art``), as heistlab caches its own.
"""

from __future__ import annotations

import itertools
import json
import os
import time
from pathlib import Path

import numpy as np

from heistlab import data

VICTIM_EPOCHS, KNOCKOFF_EPOCHS, BATCH_SIZE, LEARNING_RATE, BUDGET = 100, 50, 64, 1e-3, 1000
UNIFORM_SAMPLES = 2000


def art_cache_dir() -> Path:
    root = Path(os.path.expanduser(os.environ.get("HEISTLAB_CACHE_DIR", "~/.cache/heistlab")))
    return root / "art"


def flat(inputs: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(inputs.reshape(len(inputs), -1), dtype=np.float32)


def mlp_classifier(seed: int, hidden: tuple[int, ...] = (256, 256), model=None):
    """ART's ``PyTorchClassifier`` around ``model`` or a ReLU MLP 64-256-256-10 (logits out), Adam 1e-3."""
    import torch
    from art.estimators.classification import PyTorchClassifier

    torch.manual_seed(seed)
    if model is None:
        widths = (64, *hidden)
        layers: list[torch.nn.Module] = []
        for width_in, width_out in itertools.pairwise(widths):
            layers += [torch.nn.Linear(width_in, width_out), torch.nn.ReLU()]
        model = torch.nn.Sequential(*layers, torch.nn.Linear(widths[-1], 10))
    return PyTorchClassifier(
        model=model,
        loss=torch.nn.CrossEntropyLoss(),
        optimizer=torch.optim.Adam(model.parameters(), lr=LEARNING_RATE),
        input_shape=(64,),
        nb_classes=10,
        clip_values=(0.0, 1.0),
        device_type="cpu",
    )


def load_or_train_victim(splits: data.Splits, cache_dir: Path | None = None):
    """The victim classifier: trained on the victim split (100 epochs), then cached as a state dict."""
    import torch

    classifier = mlp_classifier(seed=0)
    path = (cache_dir or art_cache_dir()) / "victim.pt"
    if path.exists():
        classifier.model.load_state_dict(torch.load(path))
        return classifier
    victim_train = splits.victim_train
    classifier.fit(flat(victim_train.x), victim_train.y, batch_size=BATCH_SIZE, nb_epochs=VICTIM_EPOCHS)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(classifier.model.state_dict(), path)
    return classifier


def serving_probabilities(victim):
    """The victim behind a softmax, so that ART's ``use_probability`` serves probabilities, not logits."""
    import torch

    return mlp_classifier(seed=0, model=torch.nn.Sequential(victim.model, torch.nn.Softmax(dim=-1)))


def run_knockoff(victim, splits: data.Splits, seed: int = 0) -> dict:
    """ART's KnockoffNets (random) with the experiment's budget, then the experiment's measurements.

    The thief trains on the served probabilities (``CrossEntropyLoss`` with probability targets), as
    heistlab's soft-label knockoff does.
    """
    from art.attacks.extraction import KnockoffNets

    np.random.seed(seed)  # ART samples its queries from NumPy's global generator
    thief = mlp_classifier(seed=seed + 1)
    pool = flat(splits.pool)
    walked_again = np.concatenate([pool] * -(-BUDGET // len(pool)))
    attack = KnockoffNets(
        serving_probabilities(victim),
        batch_size_fit=BATCH_SIZE,
        batch_size_query=256,
        nb_epochs=KNOCKOFF_EPOCHS,
        nb_stolen=BUDGET,
        sampling_strategy="random",
        use_probability=True,
        verbose=False,
    )
    thief = attack.extract(walked_again, thieved_classifier=thief)
    test_x = flat(splits.test.x)
    noise = np.random.default_rng(seed).uniform(size=(UNIFORM_SAMPLES, test_x.shape[1])).astype(np.float32)
    victim_labels, stolen_labels = victim.predict(test_x).argmax(-1), thief.predict(test_x).argmax(-1)
    return {
        "victim_accuracy": float(np.mean(victim_labels == splits.test.y)),
        "surrogate_accuracy": float(np.mean(stolen_labels == splits.test.y)),
        "fidelity_test": float(np.mean(stolen_labels == victim_labels)),
        "fidelity_uniform": float(
            np.mean(victim.predict(noise).argmax(-1) == thief.predict(noise).argmax(-1))
        ),
        "queries_served": BUDGET,
    }


def main() -> None:
    started = time.perf_counter()
    splits = data.make_splits(data.load_digits(), seed=0)
    victim = load_or_train_victim(splits)
    metrics = run_knockoff(victim, splits)
    metrics["wall_seconds"] = time.perf_counter() - started
    print(json.dumps(metrics))


if __name__ == "__main__":
    main()
