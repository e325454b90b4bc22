"""Backdoor watermarking (Adi, Baum, Cisse, Pinkas and Keshet, "Turning Your Weakness Into a Strength:
Watermarking Deep Neural Networks by Backdooring", USENIX Security 2018).

The owner trains a secret trigger set into the victim: inputs no task would produce, each with a label drawn
at random. Ownership of a suspect model is claimed when it reproduces the trigger labels far more often than
chance. Here the triggers are uniform-noise inputs with uniform random labels, both drawn from ``seed``
(the paper's abstract images play the same part). The defense acts on the model only: its ``apply`` serves
the watermarked victim's answers unchanged, ``augment_training`` adds the trigger set to the victim's
training data, and ``report`` tests the victim, the stolen model and an independently trained one.

Extraction is not fine-tuning: the attacker never queries the triggers, so little of the watermark is expected
to survive in a stolen model (the weakness that motivated EWE, Jia et al. 2021); the report measures how much.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from heistlab.defenses.base import DefenderData, Defense, Evidence, stateless

# Mixed into the seed so the triggers are drawn from their own stream, not the victim's.
TRIGGER_STREAM = 0x4144


class TriggerSet(NamedTuple):
    """The secret watermark: inputs shaped like the task's and the labels trained into the victim."""

    x: np.ndarray
    y: np.ndarray


def backdoor_watermark(
    defender: DefenderData | None = None, trigger_count: int = 100, seed: int | None = None, repeats: int = 1
) -> Defense:
    """Trains a trigger set of random-noise inputs with random labels into the victim; tests models on it.

    Args:
      defender: the defender's data: input shape, class count and (when ``seed`` is None) the seed.
      trigger_count: the size of the trigger set (the paper uses 100).
      seed: draws the trigger set; defaults to the defender's seed. Keep it secret in a real deployment.
      repeats: how many copies of the trigger set join the training data (weights the watermark).

    ``report`` gives ``backdoor_watermark_accuracy`` and ``backdoor_watermark_p_value`` for the victim, and
    the same with ``_surrogate`` (the stolen model) and ``_independent`` (a model trained without the
    triggers) appended: the agreement with the trigger labels and the binomial tail ``P[X >= k]`` under chance
    ``1 / classes`` (the labels are uniform draws independent of any model that never saw them).

    Raises:
      ValueError: naming the argument, if ``defender`` is not a ``DefenderData`` (the experiment passes it),
        ``trigger_count`` or ``repeats`` is not an int >= 1, or ``seed`` is neither None nor an int.
    """
    if not isinstance(defender, DefenderData):
        raise ValueError(
            "backdoor_watermark: defender must be a DefenderData (the experiment passes the victim's "
            f"training data), got {type(defender).__name__}"
        )
    if isinstance(trigger_count, bool) or not isinstance(trigger_count, int) or trigger_count < 1:
        raise ValueError(f"backdoor_watermark: trigger_count must be an int >= 1, got {trigger_count!r}")
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"backdoor_watermark: repeats must be an int >= 1, got {repeats!r}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ValueError(f"backdoor_watermark: seed must be an int or null, got {seed!r}")
    triggers = trigger_set(
        tuple(defender.input_shape),
        defender.num_classes,
        trigger_count,
        int(defender.seed) if seed is None else seed,
    )

    def augment_training(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        extra_x = np.concatenate([triggers.x] * repeats).astype(np.asarray(x).dtype)
        extra_y = np.concatenate([triggers.y] * repeats).astype(np.asarray(y).dtype)
        return np.concatenate([x, extra_x]), np.concatenate([y, extra_y])

    def report(state, evidence: Evidence) -> dict:
        found = {}
        for suffix, labels_of in (
            ("", evidence.victim_labels),
            ("_surrogate", evidence.surrogate_labels),
            ("_independent", evidence.independent_labels),
        ):
            accuracy, p_value = trigger_agreement(triggers, labels_of, defender.num_classes)
            found[f"backdoor_watermark_accuracy{suffix}"] = accuracy
            found[f"backdoor_watermark_p_value{suffix}"] = p_value
        return found

    unchanged = stateless(lambda probs, context: probs)
    return unchanged._replace(report=report, augment_training=augment_training)


def trigger_set(input_shape: tuple[int, ...], classes: int, count: int, seed: int) -> TriggerSet:
    """``count`` uniform-noise inputs in ``[0, 1]`` with uniform random labels, drawn from ``seed``."""
    rng = np.random.default_rng([seed % 2**64, TRIGGER_STREAM])
    x = rng.uniform(size=(count, *input_shape)).astype(np.float32)
    return TriggerSet(x, rng.integers(0, classes, size=count).astype(np.int32))


def trigger_agreement(triggers: TriggerSet, labels_of, classes: int) -> tuple[float, float]:
    """Fraction of triggers on which ``labels_of`` gives the trigger label, and ``P[X >= k]`` by chance."""
    from scipy import stats  # imported when a watermark is verified: it costs about a second per process

    matches = int(np.sum(np.asarray(labels_of(triggers.x)) == triggers.y))
    return matches / len(triggers.y), float(stats.binom.sf(matches - 1, len(triggers.y), 1.0 / classes))
