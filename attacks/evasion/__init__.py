"""Evasion attacks: adversarial inputs crafted on the stolen surrogate, or found through the API itself."""

from heistlab.attacks.evasion.adaptive import adaptive_hopskipjump, adaptive_square
from heistlab.attacks.evasion.base import (
    DECISION,
    KINDS,
    SCORE,
    TRANSFER,
    Evasion,
    EvasionStage,
    SearchResult,
)
from heistlab.attacks.evasion.fgsm import fgsm
from heistlab.attacks.evasion.hopskipjump import hopskipjump
from heistlab.attacks.evasion.pgd import pgd
from heistlab.attacks.evasion.runner import EVADER, run_evasion
from heistlab.attacks.evasion.square import square

__all__ = [
    "DECISION",
    "EVADER",
    "KINDS",
    "SCORE",
    "TRANSFER",
    "Evasion",
    "EvasionStage",
    "SearchResult",
    "adaptive_hopskipjump",
    "adaptive_square",
    "fgsm",
    "hopskipjump",
    "pgd",
    "run_evasion",
    "square",
]
