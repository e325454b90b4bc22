"""Evasion attacks: adversarial inputs crafted on the stolen surrogate, or found through the API itself."""

from attacks.evasion.adaptive import adaptive_hopskipjump, adaptive_square
from attacks.evasion.base import DECISION, KINDS, SCORE, TRANSFER, Evasion, EvasionStage, SearchResult
from attacks.evasion.fgsm import fgsm
from attacks.evasion.hopskipjump import hopskipjump
from attacks.evasion.pgd import pgd
from attacks.evasion.runner import EVADER, run_evasion
from attacks.evasion.square import square

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
