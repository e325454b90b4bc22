"""Evasion attacks: adversarial inputs crafted on the stolen surrogate, or found through the API itself."""

from attacks.evasion.base import EvasionStage

__all__ = ["EvasionStage"]
