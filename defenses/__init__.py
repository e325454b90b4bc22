"""Defenses a prediction API can deploy, as composable pure transforms (see ``defenses.base``)."""

from defenses.adaptive_misinformation import adaptive_misinformation
from defenses.backdoor_watermark import backdoor_watermark
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
from defenses.budget import budget
from defenses.dawn import dawn
from defenses.feature_squeezing import feature_squeezing
from defenses.high_confidence import high_confidence
from defenses.label_only import label_only
from defenses.mad import mad, mad_argmax
from defenses.noise import gaussian_noise, laplace_noise
from defenses.prada import prada
from defenses.rate_limit import progressive_delay, rate_limit
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
    "adaptive_misinformation",
    "backdoor_watermark",
    "budget",
    "chain",
    "dawn",
    "feature_squeezing",
    "gaussian_noise",
    "high_confidence",
    "identity",
    "label_only",
    "laplace_noise",
    "mad",
    "mad_argmax",
    "prada",
    "progressive_delay",
    "rate_limit",
    "reverse_sigmoid",
    "rounding",
    "stateless",
    "top_k",
]
