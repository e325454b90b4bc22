"""What an evasion attack receives after extraction: the stolen model, the victim's API, inputs to perturb."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import numpy as np

from heistlab.api import PredictionAPI


class EvasionStage(NamedTuple):
    """The evasion stage of an experiment.

    api: the defended prediction API; evasion attacks query it through ``api.oracle(client)``, so every
        query is counted, capped and defended.
    surrogate_model, surrogate_params: the stolen model (white-box to the attacker).
    inputs, labels: clean test inputs and their true labels, to be perturbed.
    victim_labels: the undefended victim's top-1, for measuring success (evaluation only, never the attacker).
    key: PRNG key for the stage.
    """

    api: PredictionAPI
    surrogate_model: nn.Module
    surrogate_params: Any
    inputs: np.ndarray
    labels: np.ndarray
    victim_labels: Callable[[np.ndarray], np.ndarray]
    key: jax.Array
