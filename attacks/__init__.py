"""Extraction attacks: each sees only the prediction API's handle (``heistlab.api.Oracle``)."""

from attacks.base import Attack, AttackResult, Surrogate
from attacks.jbda import jbda
from attacks.knockoff import knockoff

__all__ = ["Attack", "AttackResult", "Surrogate", "jbda", "knockoff"]
