"""Defenses a prediction API can deploy, as composable pure transforms (see ``defenses.base``)."""

from defenses.base import (
    ADMIT,
    DefenderData,
    Defense,
    EmptyState,
    Evidence,
    QueryContext,
    Request,
    Verdict,
    chain,
    identity,
    stateless,
)
from defenses.label_only import label_only
from defenses.noise import gaussian_noise, laplace_noise
from defenses.reverse_sigmoid import reverse_sigmoid
from defenses.rounding import rounding
from defenses.top_k import top_k

__all__ = [
    "ADMIT",
    "DefenderData",
    "Defense",
    "EmptyState",
    "Evidence",
    "QueryContext",
    "Request",
    "Verdict",
    "chain",
    "gaussian_noise",
    "identity",
    "label_only",
    "laplace_noise",
    "reverse_sigmoid",
    "rounding",
    "stateless",
    "top_k",
]
