"""Extraction attacks: each sees only the prediction API's handle (``heistlab.api.Oracle``)."""

from attacks.activethief import activethief
from attacks.base import Attack, AttackResult, Surrogate, TransferSet, VictimFamily
from attacks.dfme import dfme
from attacks.equation_solving import equation_solving
from attacks.functional_equivalence import functional_equivalence
from attacks.jbda import jbda
from attacks.knockoff import knockoff

__all__ = [
    "Attack",
    "AttackResult",
    "Surrogate",
    "TransferSet",
    "VictimFamily",
    "activethief",
    "dfme",
    "equation_solving",
    "functional_equivalence",
    "jbda",
    "knockoff",
]
