"""Defenses a prediction API can deploy, as composable pure transforms (see ``defenses.base``)."""

from heistlab.defenses.adaptive_misinformation import adaptive_misinformation
from heistlab.defenses.backdoor_watermark import backdoor_watermark
from heistlab.defenses.base import (
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
from heistlab.defenses.blacklight import blacklight
from heistlab.defenses.budget import budget
from heistlab.defenses.dawn import dawn
from heistlab.defenses.edm import edm
from heistlab.defenses.feature_squeezing import feature_squeezing
from heistlab.defenses.high_confidence import high_confidence
from heistlab.defenses.label_only import label_only
from heistlab.defenses.mad import mad, mad_argmax
from heistlab.defenses.noise import gaussian_noise, laplace_noise
from heistlab.defenses.prada import prada
from heistlab.defenses.proof_of_work import proof_of_work
from heistlab.defenses.rate_limit import progressive_delay, rate_limit
from heistlab.defenses.reverse_sigmoid import reverse_sigmoid
from heistlab.defenses.rounding import rounding
from heistlab.defenses.top_k import top_k

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
    "blacklight",
    "budget",
    "chain",
    "dawn",
    "edm",
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
    "proof_of_work",
    "rate_limit",
    "reverse_sigmoid",
    "rounding",
    "stateless",
    "top_k",
]
