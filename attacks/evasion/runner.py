"""Runs an evasion attack against the victim behind its API and measures what the field reports.

Transfer attacks craft on the stolen surrogate and send their adversarial inputs through the API as the
client ``evader``; black-box attacks query the API as that client from the start. Either way every query is
counted and defended, and the evader's budget (the API's per-client budget) caps how many inputs are
attacked. Rates are taken over the attacked inputs the undefended victim classified correctly
(``EvasionStage.victim_labels``, evaluation only).

- ``transfer_success_rate``: the API's one answer per adversarial input has a wrong top-1 (the definition of
  Papernot et al. 2017; a defense that changes top-1 answers counts). ``transfer_success_rate_undefended``:
  the undefended victim misclassifies the same inputs.
- ``blackbox_success_rate``: the final input lies within the perturbation bound and the undefended victim
  misclassifies it. The attacker's own last answer is not used here: it stops as soon as an answer looks
  wrong, so under noisy or misinforming defenses (noise, MAD) that answer is biased toward errors.
  ``blackbox_fooled_api_rate`` reports it beside. Queries and perturbation sizes are over the successes.
"""

from __future__ import annotations

import jax
import numpy as np

from heistlab.api import Oracle
from heistlab.attacks.base import query_in_batches
from heistlab.attacks.evasion.base import (
    KINDS,
    TRANSFER,
    Evasion,
    EvasionStage,
    numpy_rng,
    perturbation_norms,
    top1,
)
from heistlab.training import predict_labels

EVADER = "evader"
# Perturbations are computed in float32; a point on the ball's surface may read a hair outside it.
NORM_SLACK = 1e-5


def rate(hits: np.ndarray, among: np.ndarray) -> float | None:
    """Fraction of ``among`` rows that are ``hits``; None when there are none to count."""
    return float(np.mean(hits[among])) if np.any(among) else None


def mean_or_none(values: np.ndarray) -> float | None:
    return float(np.mean(values)) if len(values) else None


def affordable_inputs(evasion: Evasion, oracle: Oracle, available: int) -> int:
    """How many inputs the attack can pay for: ``count``, the inputs available, and the evader's budget."""
    wanted = min(evasion.count, available)
    remaining = oracle.remaining
    if remaining is not None:
        wanted = min(wanted, remaining // evasion.queries_per_input)
    if wanted < 1:
        raise ValueError(
            f"{evasion.name}: the evader's API budget ({remaining} queries left) cannot pay for one input "
            f"at up to {evasion.queries_per_input} queries each; raise api.budget"
        )
    return wanted


def run_evasion(evasion: Evasion, stage: EvasionStage) -> dict:
    """Attacks up to ``evasion.count`` test inputs and returns the evasion metrics for the results record."""
    if evasion.kind not in KINDS:
        raise ValueError(f"{evasion.name}: kind must be one of {', '.join(KINDS)}; got {evasion.kind!r}")
    oracle = stage.api.oracle(EVADER)
    choose_key, craft_key = jax.random.split(stage.key)
    count = affordable_inputs(evasion, oracle, len(stage.inputs))
    chosen = numpy_rng(choose_key).permutation(len(stage.inputs))[:count]
    inputs, labels = stage.inputs[chosen], np.asarray(stage.labels)[chosen]
    clean_correct = np.asarray(stage.victim_labels(inputs)) == labels
    if evasion.kind == TRANSFER:
        found = transfer(evasion, stage, oracle, inputs, labels, clean_correct, craft_key)
    else:
        found = black_box(evasion, stage, oracle, inputs, labels, clean_correct, craft_key)
    return {
        "evasion_inputs": count,
        "evasion_clean_accuracy": float(np.mean(clean_correct)),
        **found,
        "evasion_queries": stage.api.served(EVADER),
        "evasion_queries_refused": stage.api.refused(EVADER),
    }


def transfer(evasion, stage, oracle, inputs, labels, clean_correct, key) -> dict:
    """Crafts on the surrogate, then asks the API once per adversarial input."""
    adversarial = evasion.craft(stage.surrogate_model, stage.surrogate_params, inputs, labels, key)
    sent, answers = query_in_batches(oracle, adversarial, evasion.query_batch)
    answered = np.arange(len(inputs)) < len(sent)
    served_labels = np.full(len(inputs), -1)
    served_labels[: len(sent)] = top1(oracle, answers)
    fools_api = served_labels != labels
    fools_victim = np.asarray(stage.victim_labels(adversarial)) != labels
    surrogate_clean = predict_labels(stage.surrogate_model, stage.surrogate_params, inputs) == labels
    surrogate_fooled = predict_labels(stage.surrogate_model, stage.surrogate_params, adversarial) != labels
    return {
        "transfer_success_rate": rate(fools_api, clean_correct & answered),
        "transfer_success_rate_undefended": rate(fools_victim, clean_correct),
        "surrogate_success_rate": rate(surrogate_fooled, surrogate_clean),
        "mean_perturbation_linf": float(np.mean(perturbation_norms(adversarial, inputs, "linf"))),
        "mean_perturbation_l2": float(np.mean(perturbation_norms(adversarial, inputs, "l2"))),
    }


def black_box(evasion, stage, oracle, inputs, labels, clean_correct, key) -> dict:
    """Searches through the API; success: the victim now misclassifies, inside the perturbation bound."""
    result = evasion.craft(oracle, inputs, labels, key)
    within = perturbation_norms(result.adversarial, inputs, evasion.norm) <= evasion.epsilon + NORM_SLACK
    fools_victim = np.asarray(stage.victim_labels(result.adversarial)) != labels
    success = clean_correct & within & fools_victim
    linf = perturbation_norms(result.adversarial, inputs, "linf")[success]
    l2 = perturbation_norms(result.adversarial, inputs, "l2")[success]
    queries = result.queries[success]
    return {
        "blackbox_success_rate": rate(success, clean_correct),
        "blackbox_fooled_api_rate": rate(result.fooled & within, clean_correct),
        "median_queries_per_success": float(np.median(queries)) if len(queries) else None,
        "mean_queries_per_input": float(np.mean(result.queries)),
        "mean_perturbation_linf": mean_or_none(linf),
        "mean_perturbation_l2": mean_or_none(l2),
        **result.diagnostics,
    }
