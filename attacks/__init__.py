"""Extraction attacks: each sees only the prediction API's handle (``heistlab.api.Oracle``)."""

from heistlab.attacks.activethief import activethief
from heistlab.attacks.base import Attack, AttackResult, Surrogate, TransferSet, VictimFamily
from heistlab.attacks.cloudleak import cloudleak
from heistlab.attacks.dfme import dfme
from heistlab.attacks.equation_solving import equation_solving
from heistlab.attacks.functional_equivalence import functional_equivalence
from heistlab.attacks.jbda import jbda
from heistlab.attacks.knockoff import knockoff
from heistlab.attacks.maze import maze

__all__ = [
    "Attack",
    "AttackResult",
    "Surrogate",
    "TransferSet",
    "VictimFamily",
    "activethief",
    "cloudleak",
    "dfme",
    "equation_solving",
    "functional_equivalence",
    "jbda",
    "knockoff",
    "maze",
]
