"""Square and HopSkipJump adapted to stateful detectors, after the Oracle-guided Adaptive Rejection Sampling
(OARS) of Feng, Hooda, Mangaokar, Fawaz, Jha and Prakash, "Stateful Defenses for Machine Learning Models Are
Not Yet Secure Against Black-box Attacks" (2023).

A stateful detector such as Blacklight refuses a query that looks like an earlier one. OARS uses that
refusal as an oracle. Adaptive proposal: each time a query is refused, the scale of the attack's random
proposal grows by ``growth`` (until queries pass again), and the grown scale is used for the queries that
follow. Rejection sampling: a refused query is not lost; a new one is drawn from the grown proposal in its
place, at most ``max_resamples`` times. Every query sent counts against the input's ``max_queries``, refused
ones included, so a refusal costs the attacker as much as an answer.

Which scale grows:

- ``adaptive_square``: how many squares a Square proposal redraws (each with its own sign; the plain attack
  redraws one), from 1 up to one per pixel; the square's side follows the plain schedule. An answered proposal
  shrinks the count again (by ``growth ** 0.25``), so it settles where about one proposal in five is refused
  instead of only growing: redrawing many squares at once is close to a random restart. Feng et al. grow the
  square's side instead; on single-channel inputs such as digits a square holds one value, so a larger square
  makes proposals fewer and more alike, not less alike (measured on digits, 20 inputs, the side grown twofold
  per refusal and never shrunk: 97% of the adaptive attack's queries were still refused). The perturbation
  stays within ``epsilon``.
- ``adaptive_hopskipjump``: the spread of the gradient estimate's probes (the paper's delta). Once a probe of
  an input is refused, its probes carry uniform noise of ``+-scale`` per pixel, ``scale`` starting at
  ``initial_scale``, grown by ``growth`` at each refused probe and shrunk by ``growth ** 0.25`` at each
  answered one (never below ``initial_scale``); the estimate uses the displacement actually sent, noise
  included. Binary-search and step points go out as HopSkipJump made them; a refused one is redrawn with noise
  of ``+-initial_scale``, grown by ``growth`` per further refusal. The point HopSkipJump keeps is always the
  noiseless one: the noise costs it accuracy in some decisions, never size in its result.

A refusal is judged per request, so the adaptive attacks send each query as its own request (the plain
attacks batch them, and one flagged row refuses the whole batch). A refusal that says the client will never be
served again (``retry_after`` infinite: a ban) ends the attack, as any refusal ends the plain ones.

Differences from Feng et al.: besides Square's count of squares in place of its size (above), the HopSkipJump
adaptation here (noise that widens the probes, sized by the one-fifth rule, and noise on redrawn search
points) is this module's reading of their method description, not a port of their code; the scales adapt
online from refusals alone, with no calibration queries before the attack.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator

import jax
import numpy as np

from heistlab.api import Oracle, QueryRefused
from heistlab.attacks.evasion.base import (
    SCORE,
    Evasion,
    OutOfBudget,
    SearchResult,
    check_count,
    check_positive,
    numpy_rng,
    top1,
)
from heistlab.attacks.evasion.hopskipjump import Decisions, Settings
from heistlab.attacks.evasion.square import (
    check_square_settings,
    margin_loss,
    propose,
    refuse_labels,
    schedule,
    stripes,
)

# An answered proposal shrinks the scale by growth ** SHRINK_POWER, a refused one grows it by growth: the
# scale settles where about one proposal in five is refused (Rechenberg's one-fifth rule).
SHRINK_POWER = 0.25


def ask_one(oracle: Oracle, row: np.ndarray) -> np.ndarray:
    """The answer to one query sent as its own request; ``QueryRefused`` when refused.

    Raises ``OutOfBudget`` (nothing sent) when the budget left cannot pay for it.
    """
    remaining = oracle.remaining
    if remaining is not None and remaining < 1:
        raise OutOfBudget("1 query wanted, none left")
    return oracle.query(np.asarray(row, np.float32)[None])[0]


def is_ban(refusal: QueryRefused) -> bool:
    """A refusal that says the client will never be served again; adapting cannot help."""
    return math.isinf(refusal.retry_after)


def attempts(queries: np.ndarray, owner: int, max_queries: int, max_resamples: int) -> Iterator[int]:
    """Rejection sampling's tries for input ``owner``: at most ``max_resamples + 1``, each charged to
    ``queries[owner]`` before it is made, none once ``max_queries`` are spent."""
    for attempt in range(max_resamples + 1):
        if queries[owner] >= max_queries:
            return
        queries[owner] += 1
        yield attempt


def answer_unless_refused(oracle: Oracle, row: np.ndarray) -> np.ndarray | None:
    """``ask_one``'s answer, or None when the query was refused; a ban is raised."""
    try:
        return ask_one(oracle, row)
    except QueryRefused as refusal:
        if is_ban(refusal):
            raise
        return None


def check_adaptation(attack: str, growth, max_resamples) -> float:
    growth = check_positive(attack, "growth", growth)
    if growth <= 1:
        raise ValueError(
            f"{attack}: growth must be a number > 1 (the proposal grows after a refusal), got {growth!r}"
        )
    check_count(attack, "max_resamples", max_resamples, minimum=0)
    return growth


def adaptive_square_search(
    oracle: Oracle,
    inputs: np.ndarray,
    labels: np.ndarray,
    key: jax.Array,
    *,
    epsilon: float,
    max_queries: int,
    p_init: float,
    growth: float,
    max_resamples: int,
) -> SearchResult:
    """Square (see ``attacks.evasion.square``) whose proposals redraw more squares after each refusal; one
    query per request, a refused proposal redrawn at most ``max_resamples`` times."""
    refuse_labels(oracle, "adaptive_square", "adaptive_hopskipjump")
    rng = numpy_rng(key)
    clean = np.asarray(inputs, np.float32)
    count, height, width, _ = clean.shape
    best = clean.copy()
    best_margin = np.full(count, np.inf)
    queries = np.zeros(count, np.int64)
    scales = np.ones(count)
    most_squares = height * width
    refused = 0
    stopped = False

    def draw(index: int, proposal_for) -> tuple[np.ndarray, np.ndarray] | None:
        """Sends proposals for input ``index`` until one is answered: (proposal, answer), or None."""
        nonlocal refused
        for _ in attempts(queries, index, max_queries, max_resamples):
            candidate = proposal_for(index)
            answer = answer_unless_refused(oracle, candidate)
            if answer is None:
                refused += 1
                scales[index] = min(scales[index] * growth, most_squares)
                continue
            scales[index] = max(scales[index] / growth**SHRINK_POWER, 1.0)
            return candidate, answer
        return None

    def start(index: int) -> np.ndarray:
        return stripes(clean[index : index + 1], epsilon, rng)[0]

    try:
        for index in range(count):
            found = draw(index, start)
            if found is not None:
                best[index] = found[0]
                best_margin[index] = margin_loss(found[1][None], labels[index : index + 1])[0]
        for active, side in schedule(best_margin, queries, max_queries, p_init, clean.shape):

            def square_proposal(index: int, side=side) -> np.ndarray:
                proposal = best[index : index + 1]
                for _ in range(int(scales[index])):
                    proposal = propose(clean[index : index + 1], proposal, epsilon, side, rng)
                return proposal[0]

            for index in active:
                found = draw(index, square_proposal)
                if found is None:
                    continue
                margin = margin_loss(found[1][None], labels[index : index + 1])[0]
                if margin < best_margin[index]:
                    best[index], best_margin[index] = found[0], margin
    except (OutOfBudget, QueryRefused):
        stopped = True
    diagnostics = {
        "adaptive_refused_rate": refused / int(queries.sum()) if queries.sum() else None,
        "adaptive_mean_scale": float(np.mean(scales)),
        "evasion_stopped_early": stopped,
    }
    fooled = np.isfinite(best_margin) & (best_margin < 0)
    return SearchResult(best, queries, fooled, diagnostics)


class AdaptiveDecisions(Decisions):
    """HopSkipJump's verdicts through a detector that refuses, each query its own request.

    Adaptive proposal: once a probe of input ``i``'s gradient estimates has been refused, every later probe
    carries uniform noise of ``+-probe_noise[i]`` per pixel (a wider, noisier probe distribution), starting at
    ``initial_scale``, grown by ``growth`` at each refused probe and shrunk by ``growth ** SHRINK_POWER`` at
    each answered one (never below ``initial_scale``). Rejection sampling: a refused query is redrawn with
    fresh noise (probes at their grown scale; binary-search and step points, sent noiseless first, at
    ``initial_scale`` grown by ``growth`` per further refusal), at most ``max_resamples`` times; a query
    refused every time counts as not adversarial (HopSkipJump then searches on the clean side, the cautious
    reading).
    """

    def __init__(
        self, oracle, labels, max_queries, query_batch, rng, *, initial_scale, growth, max_resamples
    ):
        super().__init__(oracle, labels, max_queries, query_batch)
        self.rng, self.initial_scale, self.growth = rng, initial_scale, growth
        self.max_resamples = max_resamples
        self.probe_noise = np.zeros(len(labels))
        self.refused = 0

    def noised(self, candidate: np.ndarray, scale: float) -> np.ndarray:
        if scale == 0:
            return candidate
        return np.clip(candidate + self.rng.uniform(-scale, scale, candidate.shape), 0.0, 1.0)

    def adversarial(self, candidates: np.ndarray, owners: np.ndarray) -> np.ndarray:
        return self.decide(candidates, owners, probing=False)[0]

    def probe(self, probes: np.ndarray, owners: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.decide(probes, owners, probing=True)

    def decide(self, candidates, owners, probing: bool) -> tuple[np.ndarray, np.ndarray]:
        """Verdicts on ``candidates`` and the points actually sent for them (noised where they were)."""
        verdicts, sent = np.zeros(len(owners), bool), np.array(candidates, np.float32, copy=True)
        for row, (candidate, owner) in enumerate(zip(candidates, owners, strict=True)):
            scale = self.probe_noise[owner] if probing else 0.0
            for _ in attempts(self.queries, owner, self.max_queries, self.max_resamples):
                sent[row] = self.noised(candidate, scale)
                answer = answer_unless_refused(self.oracle, sent[row])
                if answer is None:
                    self.refused += 1
                    scale = self.initial_scale if scale == 0 else min(scale * self.growth, 1.0)
                    if probing:
                        self.probe_noise[owner] = scale
                    continue
                verdicts[row] = top1(self.oracle, answer[None])[0] != self.labels[owner]
                if probing and scale > 0:
                    shrunk = scale / self.growth**SHRINK_POWER
                    self.probe_noise[owner] = max(shrunk, self.initial_scale)
                break
        return verdicts, sent

    def diagnostics(self) -> dict:
        sent = int(self.queries.sum())
        return {
            "adaptive_refused_rate": self.refused / sent if sent else None,
            "adaptive_mean_scale": float(np.mean(self.probe_noise)),
        }


def adaptive_square(
    epsilon: float = 0.25,
    max_queries: int = 500,
    p_init: float = 0.3,
    growth: float = 2.0,
    max_resamples: int = 10,
    count: int = 100,
) -> Evasion:
    """Builds the adaptive L-inf Square attack: Square's settings, how the number of squares a proposal
    redraws grows after a refusal (``growth``) and how often a refused proposal is redrawn
    (``max_resamples``)."""
    epsilon, p_init = check_square_settings("adaptive_square", epsilon, max_queries, p_init)
    growth = check_adaptation("adaptive_square", growth, max_resamples)
    check_count("adaptive_square", "count", count)
    search = functools.partial(
        adaptive_square_search,
        epsilon=epsilon,
        max_queries=max_queries,
        p_init=p_init,
        growth=growth,
        max_resamples=max_resamples,
    )
    return Evasion("adaptive_square", SCORE, count, max_queries, "linf", epsilon, 1, search)


def adaptive_hopskipjump(
    epsilon: float = 1.0,
    norm: str = "l2",
    max_queries: int = 1000,
    initial_evaluations: int = 100,
    max_evaluations: int = 10_000,
    gamma: float = 1.0,
    init_trials: int = 100,
    initial_scale: float = 0.15,
    growth: float = 1.5,
    max_resamples: int = 10,
    count: int = 100,
) -> Evasion:
    """Builds adaptive untargeted HopSkipJump: HopSkipJump's settings, the noise scale set at the first
    refusal (``initial_scale``, per pixel), its ``growth`` after each refusal and the redraws of a refused
    query."""
    settings = Settings(epsilon, norm, max_queries, initial_evaluations, max_evaluations, gamma, init_trials)
    settings = settings.checked("adaptive_hopskipjump")
    initial_scale = check_positive("adaptive_hopskipjump", "initial_scale", initial_scale)
    if initial_scale > 1:
        raise ValueError(f"adaptive_hopskipjump: initial_scale must be in (0, 1], got {initial_scale!r}")
    growth = check_adaptation("adaptive_hopskipjump", growth, max_resamples)
    check_count("adaptive_hopskipjump", "count", count)
    decisions = functools.partial(
        AdaptiveDecisions, initial_scale=initial_scale, growth=growth, max_resamples=max_resamples
    )
    return settings.evasion("adaptive_hopskipjump", count, 1, decisions)
