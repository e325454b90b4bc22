"""Equation-solving extraction of softmax regression (Tramer et al., "Stealing Machine Learning Models via
Prediction APIs", USENIX Security 2016, section 4.1).

A softmax-regression victim answers ``p = softmax(W x + b)``, so for every pair of classes
``log(p_j / p_0) = (w_j - w_0) . x + (b_j - b_0)``: each answered query is a set of equations that are linear
in the weights. With ``d + 1`` queries in general position (uniform noise in ``[0, 1]^d``) the system has one
solution, found here by least squares. Softmax is shift-invariant, so the weights are identified only up to
adding one vector to every class; class 0's row is fixed to zero.

Rounded answers (the paper's 5, 4, 3 and 2 decimals) make small probabilities zero, and the log of zero is
not a number, not an equation. Such answers (anything at or below ``floor``) are censored: their equations are
dropped rather than invented. Each remaining equation is weighted by the inverse variance of its ``log p``:
rounding to a step ``delta`` (read off the answers) perturbs it by about ``delta / p``, float32 by a relative
epsilon. The per-query log-partition is eliminated as a weighted mean over the classes that query kept, so
queries that kept only a few classes (top-k answers too) still count. Every extra query adds equations: with
rounding, a larger budget buys back accuracy.

Censoring can leave fewer independent equations than unknowns: a class whose probability rounds to 0 on
every query gives no equation for its weights (on digits at 2 decimals, 650 uniform-noise queries determine
363 of the 585 unknowns; at 7 decimals, 65 queries determine 394, since 12.5% of the answers round to 0).
The undetermined directions are then set to zero, the minimum-norm least-squares solution, and the model
differs from the victim wherever they matter. The attack says so rather than failing silently: a warning,
and the metrics ``unknowns_determined``, ``unknowns`` and ``answers_censored``.
"""

from __future__ import annotations

import logging
import math

import jax
import numpy as np

from heistlab.api import Oracle
from heistlab.attacks.base import (
    Attack,
    AttackResult,
    Surrogate,
    VictimFamily,
    affordable,
    check_budget,
    query_in_batches,
)
from heistlab.models import SoftmaxRegression

GRAM_CHUNK = 256
SOFTMAX_REGRESSION = VictimFamily(
    "a softmax-regression victim (victim=softmax_regression)",
    lambda model: isinstance(model, SoftmaxRegression),
)
log = logging.getLogger("heistlab.attacks")


def require_probabilities(attack: str, oracle: Oracle) -> None:
    """Raises ``ValueError`` unless the oracle serves scores: exact extraction solves equations in them."""
    if oracle.output == "labels":
        raise ValueError(
            f"{attack}: needs probability answers (api.output=probabilities, or top_k with k >= 2) to solve "
            "for the victim's weights; the API serves labels only (api.output=labels)"
        )


def uniform_queries(key: jax.Array, count: int, input_shape: tuple[int, ...]) -> np.ndarray:
    """``count`` inputs drawn uniformly from ``[0, 1]^d``, the paper's query distribution."""
    return np.asarray(jax.random.uniform(key, (count, *input_shape)), np.float32)


def decimal_step(probabilities: np.ndarray, max_decimals: int = 7) -> float:
    """The coarsest decimal grid ``10**-k`` every answer sits on (``0.0`` when they sit on none)."""
    values = np.asarray(probabilities, np.float64)
    for decimals in range(max_decimals + 1):
        scaled = values * 10.0**decimals
        if np.all(np.abs(scaled - np.round(scaled)) <= 1e-6 * scaled + 1e-9):
            return 10.0**-decimals
    return 0.0


def answer_precision_weights(probabilities: np.ndarray) -> np.ndarray:
    """Inverse variances of ``log p``: float32's relative rounding plus the answers' own decimal rounding.

    Answers rounded to a step ``delta`` carry an error of about ``delta / p`` in ``log p``; unrounded float32
    answers carry a relative error near float32's epsilon whatever their size, so all weigh alike.
    """
    step = decimal_step(probabilities)
    variance_times_p2 = step**2 + (np.finfo(np.float32).eps * probabilities) ** 2
    return np.divide(
        probabilities**2, variance_times_p2, out=np.zeros_like(probabilities), where=variance_times_p2 > 0
    )


def symmetric_least_squares(gram: np.ndarray, moment: np.ndarray) -> tuple[np.ndarray, int]:
    """The minimum-norm solution of normal equations ``gram @ theta = moment``, and the system's rank.

    A well-conditioned system is solved by Cholesky; a (near) singular one, too few queries or too many
    censored answers, by an eigendecomposition that drops the null space.
    """
    import scipy.linalg  # imported on first use: scipy costs a fresh process a second

    try:
        factor = scipy.linalg.cho_factor(gram)
        pivots = np.abs(np.diagonal(factor[0]))
        if pivots.min() ** 2 > pivots.max() ** 2 * len(gram) * np.finfo(np.float64).eps:
            return scipy.linalg.cho_solve(factor, moment), len(gram)
    except np.linalg.LinAlgError:
        pass
    eigenvalues, eigenvectors = np.linalg.eigh(gram)
    cutoff = eigenvalues.max(initial=0.0) * len(gram) * np.finfo(np.float64).eps
    inverse = np.where(eigenvalues > cutoff, 1.0 / np.where(eigenvalues > cutoff, eigenvalues, 1.0), 0.0)
    return eigenvectors @ (inverse * (eigenvectors.T @ moment)), int((eigenvalues > cutoff).sum())


def solve_softmax_regression(
    inputs: np.ndarray, answers: np.ndarray, floor: float = 0.0
) -> tuple[np.ndarray, np.ndarray, dict]:
    """Least-squares weights ``(d, C)`` and biases ``(C,)`` of a softmax regression from its answers.

    Minimises ``sum_ij v_ij (log p_ij - (w_j . x_i + b_j) - c_i)^2`` over the answers ``p_ij > floor``, where
    ``c_i`` is query ``i``'s log-partition (eliminated in closed form) and ``v_ij`` the inverse variance of
    ``log p_ij`` (``answer_precision_weights``). Class 0's weights and bias are zero.
    Works in float64 through the normal equations, whose size does not grow with the number of queries.
    Returns the weights, the biases and a record: equations used, rank of the system and the RMS residual.
    """
    features = np.concatenate([inputs.reshape(len(inputs), -1), np.ones((len(inputs), 1))], axis=1)
    features = features.astype(np.float64)
    probabilities = np.asarray(answers, np.float64)
    kept = probabilities > floor
    weights = np.where(kept, answer_precision_weights(probabilities), 0.0)
    log_probs = np.log(np.where(kept, probabilities, 1.0))
    totals = weights.sum(axis=1, keepdims=True)
    usable = (kept.sum(axis=1) >= 2)[:, None]
    weights = np.where(usable, weights, 0.0)
    share = weights / np.where(totals > 0, totals, 1.0)
    centred = np.where(kept, log_probs - (share * log_probs).sum(axis=1, keepdims=True), 0.0)
    classes, width = weights.shape[1], features.shape[1]
    gram = np.zeros((classes, classes, width, width))
    for start in range(0, len(features), GRAM_CHUNK):
        rows = slice(start, start + GRAM_CHUNK)
        # Query i couples classes through diag(w_i) - w_i w_i^T / sum(w_i): the log-partition eliminated.
        coupling = weights[rows, :, None] * np.eye(classes) - weights[rows, :, None] * share[rows, None, :]
        outer = features[rows, :, None] * features[rows, None, :]
        gram += (coupling.reshape(-1, classes**2).T @ outer.reshape(-1, width**2)).reshape(gram.shape)
    gram = gram.transpose(0, 2, 1, 3)
    moment = (weights * centred).T @ features
    free = slice(1, classes)
    gram = gram[free, :, free, :].reshape((classes - 1) * width, (classes - 1) * width)
    solution, rank = symmetric_least_squares(gram, moment[free].reshape(-1))
    theta = np.concatenate([np.zeros((1, width)), solution.reshape(classes - 1, width)])
    predicted = features @ theta.T
    offsets = (share * (log_probs - predicted)).sum(axis=1, keepdims=True)
    residual = np.where(weights > 0, log_probs - predicted - offsets, 0.0)
    equations = int((weights > 0).sum())
    record = {
        "answers_censored": int((~kept).sum()),
        "equations": equations,
        "rank": int(rank),
        "unknowns": (classes - 1) * width,
        "rms_residual": float(math.sqrt((residual**2).sum() / max(equations, 1))),
    }
    return theta[:, :-1].T, theta[:, -1], record


def equation_solving(budget: int = 650, floor: float = 0.0, query_batch: int = 1024) -> Attack:
    """Builds the equation-solving attack, spending ``budget`` uniform-noise queries.

    ``d + 1`` queries determine a ``d``-feature softmax regression exactly from unrounded answers (65 on
    digits, whose 10 classes make 650 unknowns, 585 once class 0 is fixed); the paper's budgets are
    multiples of the unknowns. ``floor``: answers at or below it are censored (their equations dropped).
    The recovered model is returned as ``SoftmaxRegression`` parameters, so fidelity is measured on it.
    """
    check_budget("equation_solving", budget)
    if not (isinstance(floor, int | float) and 0.0 <= floor < 1.0):
        raise ValueError(f"equation_solving: floor must be a number in [0, 1), got {floor!r}")
    if not isinstance(query_batch, int) or query_batch < 1:
        raise ValueError(f"equation_solving: query_batch must be an integer >= 1, got {query_batch!r}")

    def run(oracle: Oracle, pool: np.ndarray, surrogate: Surrogate, key: jax.Array) -> AttackResult:
        require_probabilities("equation_solving", oracle)
        queries = uniform_queries(key, affordable(oracle, budget), tuple(oracle.input_shape))
        inputs, answers = query_in_batches(oracle, queries, query_batch)
        if len(inputs) == 0:
            raise RuntimeError("equation_solving: the API served no queries, so there are no equations")
        kernel, bias, record = solve_softmax_regression(inputs, answers, floor)
        if record["equations"] == 0:
            raise RuntimeError(
                "equation_solving: no answer kept two classes above the floor, so there are no equations "
                f"(floor {floor}, api.output={oracle.output}); top-1 answers cannot be solved for weights"
            )
        if record["rank"] < record["unknowns"]:
            log.warning(
                "equation_solving: %d queries determine %d of the %d unknowns (%d answers at or below the "
                "floor %s were dropped); the other directions are set to zero, so the extracted model "
                "differs from the victim. More queries, or answers with more decimals, determine them.",
                len(inputs), record["rank"], record["unknowns"], record["answers_censored"], floor,
            )  # fmt: skip
        model = SoftmaxRegression(num_classes=oracle.num_classes)
        params = {
            "params": {"Dense_0": {"kernel": kernel.astype(np.float32), "bias": bias.astype(np.float32)}}
        }
        rounds = ({"round": 0, "queries": len(inputs), **record},)
        solved = {
            "unknowns_determined": record["rank"],
            "unknowns": record["unknowns"],
            "answers_censored": record["answers_censored"],
        }
        return AttackResult(params, len(inputs), rounds, model, solved)

    return Attack("equation_solving", budget, run, extracts=SOFTMAX_REGRESSION)
