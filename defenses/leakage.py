"""How much a client learns from the answers it is served: the leakage measures that calibrate a
proof-of-work's difficulty (Dziedzic et al., "Increasing the Cost of Model Extraction with Calibrated Proof of
Work", ICLR 2022).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np

# Renyi orders at which PATE's privacy cost is accumulated (the orders PATE's own analysis scans, trimmed).
DEFAULT_ORDERS = (1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0)


class Leakage(NamedTuple):
    """How much a client learns from its answers.

    per_answer: ``(batch, classes)`` probabilities -> ``(batch, m)`` non-negative costs that add up over a
        client's stream (Renyi divergences at ``m`` orders for PATE; ``m = 1`` for entropy).
    total: the summed ``(m,)`` costs -> the client's leakage as one number (epsilon for PATE).
    name: what the number is, for reports.
    """

    per_answer: Callable[[np.ndarray], np.ndarray]
    total: Callable[[np.ndarray], float]
    name: str


def answer_entropy() -> Leakage:
    """Leakage as the Shannon entropy (nats) of each answer, summed: the paper's entropy-based alternative to
    the privacy cost. A confident answer leaks little beyond its label; a spread one leaks the model's
    uncertainty, which is what extraction attacks harvest."""

    def per_answer(probs: np.ndarray) -> np.ndarray:
        probs = np.clip(np.asarray(probs, np.float64), 0.0, 1.0)
        logs = np.log(np.where(probs > 0, probs, 1.0))
        return -(probs * logs).sum(axis=-1, keepdims=True)

    return Leakage(per_answer, lambda summed: float(summed[0]), "entropy_nats")


def pate_privacy_cost(
    teachers: int = 250, sigma: float = 40.0, delta: float = 1e-5, orders: Sequence[float] = DEFAULT_ORDERS
) -> Leakage:
    """Leakage as PATE's data-dependent privacy cost (Papernot et al., "Scalable Private Learning with PATE",
    ICLR 2018), the measure the calibrated proof-of-work paper uses.

    Each answer is treated as the GNMax aggregate of a ``teachers``-vote histogram with Gaussian noise
    ``sigma``: its Renyi-DP cost at each order is the data-dependent bound (Theorem 6 there) where it
    applies, else the data-independent ``order / sigma**2``. Costs add up over the client's answers, and the
    total is the (epsilon, ``delta``)-DP epsilon: the smallest over the orders of
    ``rdp + log(1 / delta) / (order - 1)``.

    Simplification: the paper trains a teacher ensemble on disjoint parts of the defender's data; here the
    votes are the victim's own probabilities times ``teachers``, so the cost needs no extra models. An answer
    with a large top-1 margin costs almost nothing, a split one costs up to the data-independent bound.

    Raises:
      ValueError: if ``teachers`` is not an int >= 2, ``sigma`` not > 0, ``delta`` not in (0, 1), or an
        order is not > 1.
    """
    if isinstance(teachers, bool) or not isinstance(teachers, int) or teachers < 2:
        raise ValueError(f"pate_privacy_cost: teachers must be an int >= 2, got {teachers!r}")
    if not (_is_finite_number(sigma) and sigma > 0):
        raise ValueError(f"pate_privacy_cost: sigma must be a finite number > 0 (vote noise), got {sigma!r}")
    if not (_is_finite_number(delta) and 0 < delta < 1):
        raise ValueError(f"pate_privacy_cost: delta must be a number in (0, 1), got {delta!r}")
    orders = np.asarray(list(orders), np.float64)
    if orders.ndim != 1 or len(orders) == 0 or not np.all(np.isfinite(orders)) or np.any(orders <= 1):
        raise ValueError(f"pate_privacy_cost: orders must be finite numbers > 1, got {list(orders)!r}")

    def per_answer(probs: np.ndarray) -> np.ndarray:
        votes = np.asarray(probs, np.float64) * teachers
        distinct, rows = unique_rows(votes)
        return gnmax_rdp_batch(log_probabilities_not_top(distinct, sigma), sigma, orders)[rows]

    def total(summed: np.ndarray) -> float:
        return float(np.min(summed + math.log(1 / delta) / (orders - 1)))

    return Leakage(per_answer, total, "pate_epsilon")


def log_probability_not_top(votes: np.ndarray, sigma: float) -> float:
    """Log of the bound on GNMax answering other than the top vote: sum over i of erfc(gap_i / (2 sigma)) / 2,
    capped at log(1 - 1/classes) (beyond it the data-dependent bound is no use)."""
    from scipy.special import erfc  # imported on first use: scipy costs a fresh process a second

    top = int(np.argmax(votes))
    gaps = votes[top] - np.delete(votes, top)
    bound = float(np.sum(0.5 * erfc(gaps / (2.0 * sigma))))
    cap = 1.0 - 1.0 / len(votes)
    return math.log(min(max(bound, 1e-300), cap))


def gnmax_rdp(log_q: float, sigma: float, orders: np.ndarray) -> np.ndarray:
    """Renyi-DP of one GNMax answer at ``orders``: Theorem 6 of Papernot et al. (2018) where its conditions
    hold (q small enough, order below mu1), else the data-independent ``order / sigma**2``."""
    independent = orders / sigma**2
    mu2 = sigma * math.sqrt(-log_q)
    mu1 = mu2 + 1.0
    if mu2 <= 1.0:
        return independent
    eps1, eps2 = mu1 / sigma**2, mu2 / sigma**2
    # q must sit where the bound increases in q: q <= e^{(mu2 - 1) eps2} / ((mu1/(mu1-1)) (mu2/(mu2-1)))^mu2.
    limit = (mu2 - 1.0) * eps2 - mu2 * (math.log(mu1 / (mu1 - 1.0)) + math.log(mu2 / (mu2 - 1.0)))
    if log_q > limit or -log_q <= eps2:
        return independent
    log_1mq = math.log1p(-math.exp(log_q))
    log_a = (orders - 1.0) * (log_1mq - _log1mexp((log_q + eps2) * (1.0 - 1.0 / mu2)))
    log_b = (orders - 1.0) * (eps1 - log_q / (mu1 - 1.0))
    dependent = np.logaddexp(log_1mq + log_a, log_q + log_b) / (orders - 1.0)
    return np.where(orders <= mu1, np.minimum(independent, dependent), independent)


def unique_rows(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The rows of a 2-D array that differ in some byte, and each row's index into them (a repeated answer
    is costed once)."""
    values = np.ascontiguousarray(values)
    if values.size == 0:
        return values, np.zeros(len(values), np.int64)
    as_bytes = values.view(np.dtype((np.void, values.dtype.itemsize * values.shape[1]))).reshape(-1)
    _, first, rows = np.unique(as_bytes, return_index=True, return_inverse=True)
    return values[first], rows.reshape(-1)


def log_probabilities_not_top(votes: np.ndarray, sigma: float) -> list[float]:
    """``log_probability_not_top`` of every row of a ``(batch, classes)`` vote array, the same numbers."""
    from scipy.special import erfc

    rows, classes = votes.shape
    top = np.argmax(votes, axis=1)
    others = np.ones(votes.shape, bool)
    others[np.arange(rows), top] = False
    gaps = votes[np.arange(rows), top][:, None] - votes[others].reshape(rows, classes - 1)
    bounds = np.sum(0.5 * erfc(gaps / (2.0 * sigma)), axis=1).tolist()
    cap = 1.0 - 1.0 / classes
    return [math.log(min(max(bound, 1e-300), cap)) for bound in bounds]


def gnmax_rdp_batch(log_qs: list[float], sigma: float, orders: np.ndarray) -> np.ndarray:
    """``gnmax_rdp`` of every answer (one ``log_q`` each) as a ``(batch, orders)`` array, the same numbers:
    the conditions are checked per answer, the bound at every order computed for all answers at once."""
    costs = np.tile(orders / sigma**2, (len(log_qs), 1))
    terms = [(row, *_dependent_terms(log_q, sigma)) for row, log_q in enumerate(log_qs)]
    terms = [term for term in terms if term[1] is not None]
    if not terms:
        return costs
    rows, log_q, log_1mq, shrink, log_b_rate, mu1 = (np.array(column) for column in zip(*terms, strict=True))
    columns = lambda values: values[:, None]
    log_a = (orders - 1.0) * columns(log_1mq - shrink)
    log_b = (orders - 1.0) * columns(log_b_rate)
    dependent = np.logaddexp(columns(log_1mq) + log_a, columns(log_q) + log_b) / (orders - 1.0)
    independent = costs[rows]
    costs[rows] = np.where(orders <= columns(mu1), np.minimum(independent, dependent), independent)
    return costs


def _dependent_terms(log_q: float, sigma: float) -> tuple:
    """The scalars of ``gnmax_rdp``'s data-dependent bound for one answer: (log_q, log(1 - q),
    log(1 - e^((log_q + eps2)(1 - 1/mu2))), eps1 - log_q / (mu1 - 1), mu1), or Nones where it does not
    apply."""
    mu2 = sigma * math.sqrt(-log_q)
    mu1 = mu2 + 1.0
    if mu2 <= 1.0:
        return (None,) * 5
    eps1, eps2 = mu1 / sigma**2, mu2 / sigma**2
    limit = (mu2 - 1.0) * eps2 - mu2 * (math.log(mu1 / (mu1 - 1.0)) + math.log(mu2 / (mu2 - 1.0)))
    if log_q > limit or -log_q <= eps2:
        return (None,) * 5
    log_1mq = math.log1p(-math.exp(log_q))
    return log_q, log_1mq, _log1mexp((log_q + eps2) * (1.0 - 1.0 / mu2)), eps1 - log_q / (mu1 - 1.0), mu1


def _log1mexp(x: float) -> float:
    """log(1 - e^x) for x < 0."""
    return math.log(-math.expm1(x)) if x > -0.693 else math.log1p(-math.exp(x))


def _is_finite_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
