"""The Square attack, L-inf (Andriushchenko et al., "Square Attack: a query-efficient black-box adversarial
attack via random search", ECCV 2020): score-based, through the prediction API.

Start from vertical stripes of +-epsilon, then repeatedly redraw one random square window of the
perturbation (each channel set to +-epsilon) and keep the proposal when the margin loss
``log p_y - max_{k != y} log p_k``, computed from the API's served scores, drops. The window covers a
fraction ``p`` of the image that halves on the paper's schedule. An input stops as soon as the API's top-1
is wrong (margin < 0) or it has spent ``max_queries`` queries, the stripes' query included. Each step sends
one batch holding every still-active input's proposal.

The margin needs scores: against ``api.output=labels`` the attack refuses to run (use HopSkipJump). Coarse
scores (rounding, label-only one-hot rows) leave many proposals tied with the best margin, which carry no
signal; ``square_uninformative_answer_rate`` reports that share.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator

import jax
import numpy as np

from heistlab.api import Oracle, QueryRefused
from heistlab.attacks.evasion.base import (
    SCORE,
    Evasion,
    OutOfBudget,
    SearchResult,
    ask,
    check_count,
    check_positive,
    numpy_rng,
)

SMALLEST_SCORE = float(np.finfo(np.float32).tiny)
# The proposal must change the current best point; redraws of an unchanged window before giving up.
REDRAWS = 10
# (last iteration out of 10,000, divisor of p_init): the official code's piecewise-constant schedule.
WINDOW_SCHEDULE = (
    (10, 1), (50, 2), (200, 4), (500, 8), (1000, 16), (2000, 32), (4000, 64), (6000, 128), (8000, 256),
    (10_000, 512),
)  # fmt: skip


def margin_loss(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """``log s_y - max_{k != y} log s_k`` on served scores (the logit margin when they are probabilities)."""
    logs = np.log(np.maximum(np.asarray(scores, np.float64), SMALLEST_SCORE))
    rows = np.arange(len(labels))
    correct = logs[rows, labels]
    logs[rows, labels] = -np.inf
    return correct - logs.max(axis=1)


def window_fraction(p_init: float, iteration: int, max_queries: int) -> float:
    """The paper's schedule for the share of pixels a square covers, rescaled from 10,000 iterations."""
    scaled = int(iteration / max_queries * 10_000)
    for last_iteration, divisor in WINDOW_SCHEDULE:
        if scaled <= last_iteration:
            return p_init / divisor
    return p_init


def square_side(p: float, height: int, width: int) -> int:
    """Side of a square covering about a share ``p`` of an image, between 1 and ``min(height, width) - 1``."""
    return int(min(max(round(np.sqrt(p * height * width)), 1), max(min(height, width) - 1, 1)))


def propose(clean, best, epsilon, side, rng) -> np.ndarray:
    """Proposals: each row's best perturbation with one random ``side``-square window redrawn to +-epsilon."""
    count, height, width, channels = clean.shape
    delta = best - clean
    proposal = best
    pending = np.ones(count, bool)
    for _ in range(REDRAWS):
        tops = rng.integers(0, height - side + 1, size=count)[:, None, None, None]
        lefts = rng.integers(0, width - side + 1, size=count)[:, None, None, None]
        rows = np.arange(height)[None, :, None, None]
        columns = np.arange(width)[None, None, :, None]
        window = (rows >= tops) & (rows < tops + side) & (columns >= lefts) & (columns < lefts + side)
        values = rng.choice(np.float32([-epsilon, epsilon]), size=(count, 1, 1, channels))
        drawn = np.clip(clean + np.where(window, values, delta), 0.0, 1.0).astype(np.float32)
        proposal = np.where(pending[:, None, None, None], drawn, proposal)
        pending &= np.all(np.abs(proposal - best) < 1e-7, axis=(1, 2, 3))
        if not pending.any():
            break
    return proposal


def refuse_labels(oracle: Oracle, attack: str, alternative: str) -> None:
    """Square's margin loss needs scores: a ``ValueError`` naming ``alternative`` when ``oracle`` serves
    labels."""
    if oracle.output == "labels":
        raise ValueError(
            f"{attack}: the API serves labels (api.output=labels), but the Square attack needs scores for "
            f"its margin loss; use evasion={alternative}, which needs only the top-1 decision"
        )


def stripes(clean: np.ndarray, epsilon: float, rng) -> np.ndarray:
    """The paper's start: each column of each image shifted by a random +-epsilon per channel."""
    count, _, width, channels = clean.shape
    shifts = rng.choice(np.float32([-epsilon, epsilon]), size=(count, 1, width, channels))
    return np.clip(clean + shifts, 0.0, 1.0).astype(np.float32)


def schedule(best_margin, queries, max_queries, p_init, shape) -> Iterator[tuple[np.ndarray, int]]:
    """Per iteration, the inputs still attacked (margin >= 0, budget left: read from ``best_margin`` and
    ``queries`` as the caller updates them) and the side of the square to redraw, for images of ``shape``."""
    for iteration in range(max_queries - 1):
        active = np.flatnonzero((best_margin >= 0) & (queries < max_queries))
        if len(active) == 0:
            return
        yield active, square_side(window_fraction(p_init, iteration, max_queries), *shape[1:3])


def square_search(
    oracle: Oracle,
    inputs: np.ndarray,
    labels: np.ndarray,
    key: jax.Array,
    *,
    epsilon: float,
    max_queries: int,
    p_init: float,
    query_batch: int,
) -> SearchResult:
    """Runs the L-inf Square attack on ``inputs`` (shaped ``(N, H, W, C)``) through ``oracle``."""
    refuse_labels(oracle, "square", "hopskipjump")
    rng = numpy_rng(key)
    clean = np.asarray(inputs, np.float32)
    best = stripes(clean, epsilon, rng)
    queries = np.zeros(len(clean), np.int64)
    best_margin = np.full(len(clean), np.inf)
    proposals = uninformative = 0
    stopped = False
    try:
        best_margin[:] = margin_loss(ask(oracle, best, query_batch), labels)
        queries += 1
        for active, side in schedule(best_margin, queries, max_queries, p_init, clean.shape):
            proposal = propose(clean[active], best[active], epsilon, side, rng)
            margin = margin_loss(ask(oracle, proposal, query_batch), labels[active])
            queries[active] += 1
            proposals += len(active)
            uninformative += int(np.sum(margin == best_margin[active]))
            improved = margin < best_margin[active]
            best[active[improved]] = proposal[improved]
            best_margin[active[improved]] = margin[improved]
    except (OutOfBudget, QueryRefused):
        stopped = True
    diagnostics = {
        "square_uninformative_answer_rate": uninformative / proposals if proposals else None,
        "evasion_stopped_early": stopped,
    }
    return SearchResult(best, queries, best_margin < 0, diagnostics)


def check_square_settings(attack: str, epsilon, max_queries, p_init) -> tuple[float, float]:
    """``epsilon`` and ``p_init`` as floats; a ``ValueError`` naming ``attack`` and the first bad setting."""
    epsilon = check_positive(attack, "epsilon", epsilon)
    check_count(attack, "max_queries", max_queries, minimum=2)
    p_init = check_positive(attack, "p_init", p_init)
    if p_init > 1:
        raise ValueError(f"{attack}: p_init must be in (0, 1], got {p_init!r}")
    return epsilon, p_init


def square(
    epsilon: float = 0.25,
    max_queries: int = 500,
    p_init: float = 0.3,
    count: int = 100,
    query_batch: int = 4096,
) -> Evasion:
    """Builds the L-inf Square attack: perturbation bound ``epsilon``, ``max_queries`` per input.

    The paper uses p_init 0.05 on ImageNet and 0.8 against robust MNIST models; on 8x8 digits 0.3 starts
    with 4x4 squares.
    """
    epsilon, p_init = check_square_settings("square", epsilon, max_queries, p_init)
    check_count("square", "count", count)
    check_count("square", "query_batch", query_batch)
    search = functools.partial(
        square_search, epsilon=epsilon, max_queries=max_queries, p_init=p_init, query_batch=query_batch
    )
    return Evasion("square", SCORE, count, max_queries, "linf", epsilon, query_batch, search)
