"""HopSkipJump (Chen, Jordan and Wainwright, "HopSkipJumpAttack: A Query-Efficient Decision-Based Attack",
IEEE S&P 2020), untargeted: decision-based, through the prediction API, needing only each answer's top-1.

1. Start from uniform noise the API misclassifies, pulled toward the clean input by a binary search on the
   blend (the paper's initialisation).
2. Binary search between the clean input and the current point to the decision boundary, to precision
   ``theta = gamma / d^1.5`` (L2) or ``gamma / d^2`` (L-inf), ``d`` the input dimension.
3. At the boundary, estimate the gradient's direction from the signs of ``initial_evaluations * sqrt(t)``
   random probes at radius ``delta`` (baseline-corrected Monte Carlo, Theorem 2), step along it (its sign
   for L-inf) with the geometric step search: from ``distance / sqrt(t)``, halve until the step lands
   on the adversarial side; then repeat 2.

Every input has its own budget of ``max_queries``; it stops when that would be exceeded or once its
distance is at most ``epsilon`` (success). Each phase sends one batch for all inputs still in it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import numpy as np

from heistlab.api import Oracle, QueryRefused
from heistlab.attacks.evasion.base import (
    DECISION,
    Evasion,
    OutOfBudget,
    SearchResult,
    ask,
    check_count,
    check_norm,
    check_positive,
    numpy_rng,
    perturbation_norms,
    top1,
)

# The initial blend's binary search stops at this precision (the reference code's 0.001).
BLEND_PRECISION = 1e-3
# The geometric step search gives up on an input after this many halvings.
MAX_HALVINGS = 30


def _rows(values: np.ndarray) -> np.ndarray:
    """Per-example scalars shaped to broadcast against ``(N, H, W, C)`` inputs."""
    return np.asarray(values, np.float32).reshape(-1, 1, 1, 1)


class Decisions:
    """The API's verdicts on candidate points, each charged to the input it belongs to."""

    def __init__(self, oracle: Oracle, labels: np.ndarray, max_queries: int, query_batch: int, rng=None):
        self.oracle, self.labels, self.query_batch = oracle, labels, query_batch
        self.max_queries = max_queries
        self.queries = np.zeros(len(labels), np.int64)

    def probe(self, probes: np.ndarray, owners: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Verdicts on a gradient estimate's probes, and the points actually sent (here the probes)."""
        return self.adversarial(probes, owners), probes

    def diagnostics(self) -> dict:
        """Numbers for the metrics beside HopSkipJump's own (none for plain decisions)."""
        return {}

    def left(self, owners: np.ndarray | None = None) -> np.ndarray:
        """Queries each input (or each of ``owners``) may still spend."""
        left = self.max_queries - self.queries
        return left if owners is None else left[owners]

    def adversarial(self, candidates: np.ndarray, owners: np.ndarray) -> np.ndarray:
        """Whether the API's top-1 on each candidate differs from its owner's true label."""
        answers = ask(self.oracle, np.clip(candidates, 0.0, 1.0), self.query_batch)
        np.add.at(self.queries, owners, 1)
        return top1(self.oracle, answers) != self.labels[owners]


def project(clean: np.ndarray, perturbed: np.ndarray, alphas: np.ndarray, norm: str) -> np.ndarray:
    """The point a fraction ``alphas`` of the way from ``clean`` to ``perturbed`` (L2), or ``perturbed``
    clipped to the L-inf ball of radius ``alphas`` around ``clean``."""
    if norm == "l2":
        return (1 - _rows(alphas)) * clean + _rows(alphas) * perturbed
    return np.clip(perturbed, clean - _rows(alphas), clean + _rows(alphas))


def initial_points(decisions: Decisions, clean: np.ndarray, trials: int, rng) -> tuple[np.ndarray, ...]:
    """Adversarial starting points: misclassified uniform noise, blended toward ``clean`` by binary search.

    Returns ``(points, found)``; an input whose noise never fooled the API within ``trials`` keeps its
    clean point and ``found`` False.
    """
    count = len(clean)
    noise = np.zeros_like(clean)
    found = np.zeros(count, bool)
    for _ in range(trials):
        searching = np.flatnonzero(~found & (decisions.left() > 0))
        if len(searching) == 0:
            break
        candidates = rng.uniform(size=clean[searching].shape).astype(np.float32)
        hits = decisions.adversarial(candidates, searching)
        noise[searching[hits]], found[searching[hits]] = candidates[hits], True
    started = np.flatnonzero(found)
    ones = np.ones(len(started))
    high = bisect(decisions, clean[started], noise[started], started, ones, BLEND_PRECISION, "l2")
    points = clean.copy()
    points[started] = project(clean[started], noise[started], high, "l2")
    return points, found


def bisect(decisions, clean, perturbed, owners, high, precision, norm) -> np.ndarray:
    """Binary search on ``project``'s ``alphas`` in ``[0, high]`` (``perturbed`` adversarial at ``high``)
    until each interval is at most ``precision`` wide or its owner's budget is spent; returns each
    interval's adversarial end."""
    low = np.zeros(len(owners))
    while True:
        searching = np.flatnonzero((high - low > precision) & (decisions.left(owners) > 0))
        if len(searching) == 0:
            return high
        middle = (low[searching] + high[searching]) / 2
        candidates = project(clean[searching], perturbed[searching], middle, norm)
        hits = decisions.adversarial(candidates, owners[searching])
        high[searching[hits]], low[searching[~hits]] = middle[hits], middle[~hits]


def boundary_search(decisions, clean, perturbed, owners, theta, norm) -> np.ndarray:
    """Binary search from ``clean`` to adversarial ``perturbed`` down to precision ``theta`` (L2), or to
    ``min(theta * distance, theta)`` on the L-inf radius; returns the adversarial end of each interval."""
    if norm == "l2":
        high, precision = np.ones(len(owners)), np.full(len(owners), theta)
    else:
        high = perturbation_norms(perturbed, clean, "linf")
        precision = np.minimum(high * theta, theta)
    high = bisect(decisions, clean, perturbed, owners, high, precision, norm)
    return project(clean, perturbed, high, norm).astype(np.float32)


def gradient_direction(decisions, points, owners, evaluations, radii, norm, rng) -> np.ndarray:
    """Monte Carlo estimate of the boundary's normal at each point from ``evaluations[i]`` sign queries."""
    probe_owner = np.repeat(np.arange(len(owners)), evaluations)
    shape = (len(probe_owner), *points.shape[1:])
    directions = rng.standard_normal(shape) if norm == "l2" else rng.uniform(-1.0, 1.0, shape)
    directions /= np.sqrt(np.sum(directions**2, axis=(1, 2, 3), keepdims=True))
    radius = _rows(radii[probe_owner])
    probes = np.clip(points[probe_owner] + radius * directions, 0.0, 1.0)
    hits, sent = decisions.probe(probes, owners[probe_owner])
    directions = (sent - points[probe_owner]) / radius
    signs = np.where(hits, 1.0, -1.0)
    mean_sign = np.bincount(probe_owner, signs, minlength=len(owners)) / evaluations
    # The baseline (mean sign) is subtracted unless every probe agreed (Theorem 2 of the paper).
    baseline = np.where(np.abs(mean_sign) < 1.0, mean_sign, 0.0)
    weighted = (signs - baseline[probe_owner])[:, None] * directions.reshape(len(probe_owner), -1)
    starts = np.concatenate([[0], np.cumsum(evaluations)[:-1]])
    gradient = np.add.reduceat(weighted, starts, axis=0) / evaluations[:, None]
    gradient /= np.maximum(np.linalg.norm(gradient, axis=1, keepdims=True), 1e-12)
    return gradient.reshape(points.shape)


def geometric_step(decisions, points, owners, update, distances, iteration) -> np.ndarray:
    """From step ``distance / sqrt(iteration)``, halve until ``point + step * update`` is adversarial.

    Inputs whose search runs out of budget or halvings keep their point unchanged.
    """
    steps = distances / np.sqrt(iteration)
    moved = points.copy()
    searching = np.arange(len(owners))
    for _ in range(MAX_HALVINGS):
        searching = searching[decisions.left(owners[searching]) > 0]
        if len(searching) == 0:
            break
        candidates = np.clip(points[searching] + _rows(steps[searching]) * update[searching], 0.0, 1.0)
        hits = decisions.adversarial(candidates, owners[searching])
        moved[searching[hits]] = candidates[hits]
        steps[searching[~hits]] /= 2
        searching = searching[~hits]
    return moved.astype(np.float32)


def hopskipjump_search(
    oracle: Oracle,
    inputs: np.ndarray,
    labels: np.ndarray,
    key: jax.Array,
    *,
    epsilon: float,
    norm: str,
    max_queries: int,
    initial_evaluations: int,
    max_evaluations: int,
    gamma: float,
    init_trials: int,
    query_batch: int,
    decisions_factory: Callable[..., Decisions] = Decisions,
) -> SearchResult:
    """Runs untargeted HopSkipJump on ``inputs`` (shaped ``(N, H, W, C)``) through ``oracle``.

    ``decisions_factory(oracle, labels, max_queries, query_batch, rng)`` builds what asks the API for
    verdicts (``Decisions``, or the adaptive variant of ``attacks.evasion.adaptive``).
    """
    rng = numpy_rng(key)
    clean = np.asarray(inputs, np.float32)
    dimension = int(np.prod(clean.shape[1:]))
    theta = gamma / (np.sqrt(dimension) * dimension) if norm == "l2" else gamma / dimension**2
    decisions = decisions_factory(oracle, np.asarray(labels), max_queries, query_batch, rng)
    points, found = clean.copy(), np.zeros(len(clean), bool)
    queries_at_success = np.full(len(clean), -1)
    stopped = False
    try:
        points, found = initial_points(decisions, clean, init_trials, rng)
        started = np.flatnonzero(found)
        points[started] = boundary_search(decisions, clean[started], points[started], started, theta, norm)
        distances = perturbation_norms(points, clean, norm)
        iteration = 0
        while True:
            done = found & (distances <= epsilon) & (queries_at_success < 0)
            queries_at_success[done] = decisions.queries[done]
            iteration += 1
            evaluations = min(int(initial_evaluations * np.sqrt(iteration)), max_evaluations)
            # An input goes on while it can pay for a full gradient estimate and at least one step query.
            active = np.flatnonzero(found & (queries_at_success < 0) & (decisions.left() > evaluations))
            if len(active) == 0:
                break
            if iteration == 1:
                radii = np.full(len(active), 0.1)
            else:
                scale = np.sqrt(dimension) if norm == "l2" else dimension
                radii = scale * theta * distances[active]
            per_input = np.full(len(active), evaluations)
            direction = gradient_direction(decisions, points[active], active, per_input, radii, norm, rng)
            update = direction if norm == "l2" else np.sign(direction)
            stepped = geometric_step(decisions, points[active], active, update, distances[active], iteration)
            points[active] = boundary_search(decisions, clean[active], stepped, active, theta, norm)
            distances[active] = perturbation_norms(points[active], clean[active], norm)
    except (OutOfBudget, QueryRefused):
        stopped = True
    queries = np.where(queries_at_success >= 0, queries_at_success, decisions.queries)
    diagnostics = {
        "hopskipjump_start_found_rate": float(np.mean(found)),
        "evasion_stopped_early": stopped,
        **decisions.diagnostics(),
    }
    return SearchResult(points, queries, found, diagnostics)


class Settings(NamedTuple):
    """HopSkipJump's search settings: ``hopskipjump_search``'s keyword arguments but ``query_batch`` and
    ``decisions_factory``."""

    epsilon: float
    norm: str
    max_queries: int
    initial_evaluations: int
    max_evaluations: int
    gamma: float
    init_trials: int

    def checked(self, attack: str) -> Settings:
        """These settings, numbers as floats; a ``ValueError`` naming ``attack`` and the first bad one."""
        epsilon = check_positive(attack, "epsilon", self.epsilon)
        check_norm(attack, self.norm)
        check_count(attack, "max_queries", self.max_queries, minimum=2)
        check_count(attack, "initial_evaluations", self.initial_evaluations)
        check_count(attack, "max_evaluations", self.max_evaluations)
        gamma = check_positive(attack, "gamma", self.gamma)
        check_count(attack, "init_trials", self.init_trials)
        return self._replace(epsilon=epsilon, gamma=gamma)

    def evasion(self, attack: str, count: int, query_batch: int, decisions_factory=Decisions) -> Evasion:
        """The ``Evasion`` called ``attack`` that runs ``hopskipjump_search`` with these settings."""
        search = functools.partial(
            hopskipjump_search, **self._asdict(), query_batch=query_batch, decisions_factory=decisions_factory
        )
        budget, norm, epsilon = self.max_queries, self.norm, self.epsilon
        return Evasion(attack, DECISION, count, budget, norm, epsilon, query_batch, search)


def hopskipjump(
    epsilon: float = 1.0,
    norm: str = "l2",
    max_queries: int = 1000,
    initial_evaluations: int = 100,
    max_evaluations: int = 10_000,
    gamma: float = 1.0,
    init_trials: int = 100,
    count: int = 100,
    query_batch: int = 4096,
) -> Evasion:
    """Builds untargeted HopSkipJump with the paper's defaults (100 initial evaluations, gamma 1,
    geometric step search); success is a misclassified point within ``epsilon`` in ``norm``."""
    settings = Settings(epsilon, norm, max_queries, initial_evaluations, max_evaluations, gamma, init_trials)
    settings = settings.checked("hopskipjump")
    check_count("hopskipjump", "count", count)
    check_count("hopskipjump", "query_batch", query_batch)
    return settings.evasion("hopskipjump", count, query_batch)
