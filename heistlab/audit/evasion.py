"""The evasion battery: adversarial inputs against the target, through its API.

- black box, through the API as its own client: the Square attack (Andriushchenko et al., ECCV 2020) when the
  key is served scores, HopSkipJump (Chen et al., IEEE S&P 2020) when it gets labels only;
- transfer: FGSM (Goodfellow et al., ICLR 2015) crafted white-box on the best model the extraction battery
  stole, then sent through the API once per input (Papernot et al. 2017).

Both run ``attacks.evasion.run_evasion`` on an ``EvasionStage`` whose API is charged to the audit's ledger;
success is judged by the target's *served* top-1 (the auditor never holds the victim), over the attacked
inputs the target classified correctly, within the attack's perturbation bound.

Severity (``rate_evasion``), with ``audit.severity`` thresholds: high when the success rate is at least
``evasion_high`` and the key is served scores; medium at ``evasion_high`` with labels only, or at
``evasion_medium``; low for any success; info (absent) for none.
"""

from __future__ import annotations

import jax
import numpy as np

from heistlab.attacks.evasion import EvasionStage, run_evasion
from heistlab.attacks.evasion.base import Evasion
from heistlab.audit.extraction import Exposure, Stolen, Thresholds
from heistlab.audit.findings import Finding, Verdict, untested
from heistlab.audit.ledger import LedgerAPI, QueryLedger

SUCCESS_METRICS = ("blackbox_success_rate", "transfer_success_rate")


def rate_evasion(
    success: float, evasion: Evasion, exposure: Exposure, thresholds: Thresholds
) -> tuple[str, str]:
    bound = f"within {evasion.norm} {evasion.epsilon:g}"
    found = f"{success:.0%} of attacked inputs misclassified by the target {bound}"
    if success >= thresholds.evasion_high:
        if exposure.scores:
            return "high", f"{found}; the key's scores guide the search"
        return "medium", f"{found}, from labels only: the model is not robust, the API only raises the cost"
    if success >= thresholds.evasion_medium:
        return "medium", found
    return "low", found


def evasion_member(
    name: str,
    evasion: Evasion,
    api,
    ledger: QueryLedger,
    inputs: np.ndarray,
    labels: np.ndarray,
    reference_labels,
    key: jax.Array,
    exposure: Exposure,
    thresholds: Thresholds,
    stolen: Stolen | None = None,
    max_rows: int | None = None,
) -> Finding:
    """Runs ``evasion`` against the target as client ``<name>-evader`` and rates its success."""
    check, title = f"evasion.{name}", f"Evasion: {evasion.name} ({evasion.kind})"
    if evasion.kind == "transfer" and stolen is None:
        return untested(check, title, "a stolen model to craft on (the extraction battery stole none)")
    stage = EvasionStage(
        api=LedgerAPI(api, ledger, name, max_rows),
        surrogate_model=None if stolen is None else stolen.model,
        surrogate_params=None if stolen is None else stolen.params,
        inputs=inputs,
        labels=labels,
        victim_labels=reference_labels,
        key=key,
    )
    crafted_on = (
        "" if stolen is None else f", crafted on the {stolen.name} copy (fidelity {stolen.fidelity:.3f})"
    )
    tried = (
        f"{evasion.name} on up to {evasion.count} test inputs, {evasion.norm} bound {evasion.epsilon:g}, "
        f"at most {evasion.queries_per_input} queries per input{crafted_on}"
    )
    try:
        found = run_evasion(evasion, stage)
    except ValueError as error:
        return untested(check, title, str(error))
    success = next((found[metric] for metric in SUCCESS_METRICS if found.get(metric) is not None), None)
    figures = {
        metric: value for metric, value in found.items() if isinstance(value, int | float | bool | None)
    }
    figures["success_rate"] = success
    if success is None:
        return untested(check, title, "the target misclassified every attacked input already", figures)
    happened = (
        f"success rate {success:.3f} on {found['evasion_inputs']} inputs, {found['evasion_queries']} queries"
    )
    if found.get("median_queries_per_success") is not None:
        happened += f" (median {found['median_queries_per_success']:.0f} per success)"
    if success == 0:
        return Verdict(check, title, tried, figures).held(happened)
    severity, reason = rate_evasion(success, evasion, exposure, thresholds)
    return Verdict(check, title, tried, figures).weakness(severity, reason, happened)
