"""The extraction battery: how much of the model one client steals, and at what cost in queries.

Each configured attack (Knockoff Nets, Orekondy et al. CVPR 2019; JBDA, Papernot et al. AsiaCCS 2017;
equation solving, Tramer et al. USENIX Security 2016, run only where the answers allow it: scores served)
runs through the target's API as its own client, charged to the audit's ledger. Fidelity is top-1
agreement between the stolen model and the target's *served* top-1 on held-out inputs (the auditor never
holds the victim); the curve of fidelity against queries retrains the attack's surrogate on the first
``n`` answers of its transcript (soft targets where scores were served), the last point being the attack's
own result.

Severity (``rate_extraction``), with ``audit.severity`` thresholds:

- high: fidelity >= ``fidelity_high`` and the key is served scores, or no quota or rate limit bounds it;
- medium: fidelity >= ``fidelity_high`` with labels only under a quota or rate limit (controls slow
  extraction, they do not prevent it), or fidelity >= ``fidelity_medium``;
- low: a weaker copy; info (absent): the target served the attack nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import numpy as np

from heistlab import metrics
from heistlab.attacks.base import Attack, Surrogate
from heistlab.audit.findings import Finding, Verdict, held, untested
from heistlab.audit.ledger import QueryLedger, Transcript, budgeted_oracle
from heistlab.training import predict_labels, train_classifier

log = logging.getLogger("heistlab.audit")


class Thresholds(NamedTuple):
    fidelity_high: float = 0.9
    fidelity_medium: float = 0.75
    evasion_high: float = 0.5
    evasion_medium: float = 0.2


def check_thresholds(thresholds: Thresholds) -> Thresholds:
    for name, value in thresholds._asdict().items():
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
            raise ValueError(f"audit.severity.{name} must be a number in [0, 1], got {value!r}")
    for high, medium in (("fidelity_high", "fidelity_medium"), ("evasion_high", "evasion_medium")):
        if getattr(thresholds, medium) > getattr(thresholds, high):
            raise ValueError(f"audit.severity.{medium} must not exceed audit.severity.{high}")
    return thresholds


class Exposure(NamedTuple):
    """What the target gives the auditing client: its default ``output``, and the per-key limits."""

    output: str
    limited: bool
    limits: str

    @property
    def scores(self) -> bool:
        return self.output != "labels"


class Evaluation(NamedTuple):
    """Held-out inputs and the target's served top-1 on them (what fidelity is measured against)."""

    inputs: np.ndarray
    labels: np.ndarray


class Stolen(NamedTuple):
    name: str
    model: Any
    params: Any
    fidelity: float
    queries: int


def fidelity(model, params, evaluation: Evaluation) -> float:
    return metrics.agreement(predict_labels(model, params, evaluation.inputs), evaluation.labels)


def curve_points(count: int, points: int) -> list[int]:
    """Query counts at which the curve is measured: ``points`` evenly spaced prefixes, the last being all."""
    if isinstance(points, bool) or not isinstance(points, int) or points < 1:
        raise ValueError(f"audit.extraction.curve_points must be an integer >= 1, got {points!r}")
    return sorted({max(1, round(count * step / points)) for step in range(1, points + 1)})


def fidelity_curve(
    transcript: Transcript,
    targets: Callable[[np.ndarray], np.ndarray],
    surrogate: Surrogate,
    key: jax.Array,
    evaluation: Evaluation,
    points: int,
    final: tuple[int, float],
) -> list[list[float]]:
    """``[queries, fidelity]``: the surrogate retrained on prefixes of the transcript, then ``final``."""
    curve = []
    if len(transcript):
        inputs, answers = transcript.arrays()
        for count in curve_points(len(inputs), points)[:-1]:
            params = train_classifier(
                surrogate.model,
                inputs[:count],
                targets(answers[:count]),
                jax.random.fold_in(key, count),
                surrogate.train,
            )
            curve.append([count, fidelity(surrogate.model, params, evaluation)])
    curve.append([final[0], final[1]])
    return curve


def rate_extraction(
    value: float, queries: int, exposure: Exposure, thresholds: Thresholds
) -> tuple[str, str]:
    """The severity of a stolen copy with fidelity ``value``, and the reason (see the module docstring)."""
    copy = f"a copy agreeing with the target on {value:.1%} of held-out inputs, for {queries} queries"
    if value >= thresholds.fidelity_high:
        if exposure.scores:
            return "high", f"{copy}; the key is served {exposure.output}, which makes the theft cheap"
        if not exposure.limited:
            return "high", f"{copy}; nothing ({exposure.limits}) bounds how much one key extracts"
        return (
            "medium",
            f"{copy}, with labels only under {exposure.limits}: they slow extraction, not stop it",
        )
    if value >= thresholds.fidelity_medium:
        return "medium", copy
    return "low", copy


def extraction_member(
    name: str,
    attack: Attack,
    api,
    ledger: QueryLedger,
    pool: np.ndarray,
    surrogate: Surrogate,
    key: jax.Array,
    evaluation: Evaluation,
    exposure: Exposure,
    thresholds: Thresholds,
    *,
    points: int = 3,
    max_rows: int | None = None,
    detection: Callable[[str], dict | None] = lambda client: None,
) -> tuple[Finding, Stolen | None]:
    """Runs ``attack`` as client ``audit-<name>`` and rates what it stole."""
    check, client = f"extraction.{name}", f"audit-{name}"
    transcript = Transcript()
    oracle = budgeted_oracle(api.oracle(client), ledger, name, max_rows, transcript)
    attack_key, curve_key = jax.random.split(key)
    tried = f"{attack.name} with a budget of {attack.budget} queries, as client {client}"
    try:
        result = attack.run(oracle, pool, surrogate, attack_key)
    except ValueError as error:
        if len(transcript):
            raise
        return untested(check, f"Extraction: {attack.name}", str(error)), None
    except RuntimeError as error:
        if len(transcript):
            raise
        return held(check, f"Extraction: {attack.name}", tried, f"nothing was served: {error}"), None
    model = result.model or surrogate.model
    reached = fidelity(model, result.params, evaluation)
    if result.model is None:
        curve = fidelity_curve(
            transcript, oracle.targets, surrogate, curve_key, evaluation, points, (result.queries, reached)
        )
    else:
        curve = [[result.queries, reached]]
    severity, reason = rate_extraction(reached, result.queries, exposure, thresholds)
    figures = {
        "queries": result.queries,
        "fidelity": reached,
        "fidelity_curve": curve,
        "fidelity_per_1000_queries": [[count / 1000, value] for count, value in curve],
        "output": oracle.output,
        "refused_rows": api.refused(client),
        "seconds_throttled": api.simulated_seconds(client),
        "rounds": len(result.rounds),
    }
    detected = detection(client)
    if detected is not None:
        figures.update(detected)
    happened = (
        f"fidelity {reached:.3f} on {len(evaluation.inputs)} held-out inputs after {result.queries} queries"
    )
    if detected is not None:
        happened += (
            f"; detected after {detected['queries_to_detection']} queries"
            if detected.get("detected")
            else "; not detected"
        )
    stolen = Stolen(name, model, result.params, reached, result.queries)
    return Verdict(check, f"Extraction: {attack.name}", tried, figures).weakness(
        severity, reason, happened
    ), stolen
