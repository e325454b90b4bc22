"""Feature squeezing (Xu, Evans and Qi, "Feature Squeezing: Detecting Adversarial Examples in Deep Neural
Networks", NDSS 2018).

Squeezers shrink the input space an adversary can search: bit-depth reduction rounds each pixel to one of
``2 ** bits`` levels, median smoothing replaces each pixel by the median of its ``window x window``
neighbourhood. Natural inputs barely move under squeezing; adversarial and synthetic ones (crafted with small,
targeted perturbations) often do, so the L1 distance between the model's predictions on the raw and the
squeezed input is the detection score, flagged above a threshold chosen on legitimate inputs.

Here the API runs the victim on the squeezed inputs (``preprocess``) and serves that prediction, and the host
side scores each row against the victim's prediction on the raw input (``QueryContext.raw_probs``), counting
flagged rows per client. Deviation from the paper: its joint detector scores each squeezer on its own and
takes the maximum; the API runs the victim once on preprocessed inputs, so here the squeezers are composed
(bit depth, then median) into one squeezer, which is also what is served.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from heistlab.defenses.base import Defense, Evidence, QueryContext

MAX_BIT_DEPTH = 16
# Calibrated on digits for bit depth 4 without smoothing (configs/defense/feature_squeezing.yaml): 3.8% of the
# attacker's natural pool and 5.6% of the test split score above it, the paper's rule (5% false positives on
# legitimate inputs). With a 2x2 median on 8x8 digits most benign rows score near 2: recalibrate for that.
DEFAULT_THRESHOLD = 0.05


class Tally(NamedTuple):
    rows: int
    flagged: int
    score_sum: float


class SqueezingState(NamedTuple):
    tallies: Mapping[str, Tally]


@functools.partial(jax.jit, static_argnums=1)
def reduce_bit_depth(inputs: jax.Array, bits: int) -> jax.Array:
    """Rounds values in ``[0, 1]`` to the nearest of ``2 ** bits`` evenly spaced levels (as the paper)."""
    levels = 2**bits - 1
    return jnp.round(inputs * levels) / levels


@functools.partial(jax.jit, static_argnums=1)
def median_smooth(inputs: jax.Array, window: int) -> jax.Array:
    """Median over each ``window x window`` neighbourhood of ``(batch, height, width, channels)`` images.

    Matches ``scipy.ndimage.median_filter(x, size=(1, window, window, 1), mode='reflect')``, what the
    authors' code calls: the window covers rows ``i - window // 2`` to ``i - window // 2 + window - 1`` (a 2x2
    window reaches up and left), edges are mirrored, and an even window takes the upper of its middle values.
    """
    if inputs.ndim != 4:
        raise ValueError(
            f"feature_squeezing: median smoothing needs (batch, height, width, channels) inputs, "
            f"got shape {inputs.shape}"
        )
    return sorted_by_exchanges(neighbourhood(inputs, window))[window * window // 2]


def neighbourhood(images: jax.Array, window: int) -> list[jax.Array]:
    """The ``window * window`` images shifted so that each pixel sees one member of its neighbourhood
    (``median_smooth``'s window, edges mirrored)."""
    before, after = window // 2, window - 1 - window // 2
    padded = jnp.pad(images, ((0, 0), (before, after), (before, after), (0, 0)), mode="symmetric")
    height, width = images.shape[1:3]
    return [
        padded[:, row : row + height, column : column + width]
        for row in range(window)
        for column in range(window)
    ]


def sorted_by_exchanges(values: list[jax.Array]) -> list[jax.Array]:
    """``values`` sorted elementwise in ascending order by odd-even transposition (``n`` rounds of
    compare-exchanges of neighbours, ``jnp.minimum`` and ``jnp.maximum`` on whole arrays): the values of
    ``jnp.sort(jnp.stack(values), axis=0)``. XLA on CPU sorts each pixel's few neighbours with a comparator
    call per comparison; the exchanges are elementwise and fuse (benchmarks/test_ranking_benchmark.py)."""
    values = list(values)
    for round_ in range(len(values)):
        for low in range(round_ % 2, len(values) - 1, 2):
            values[low], values[low + 1] = (
                jnp.minimum(values[low], values[low + 1]),
                jnp.maximum(values[low], values[low + 1]),
            )
    return values


def squeezing_score(raw_probs, squeezed_probs) -> np.ndarray:
    """The detection score per row: L1 distance between predictions on the raw and the squeezed input."""
    difference = np.asarray(raw_probs, np.float64) - np.asarray(squeezed_probs, np.float64)
    return np.sum(np.abs(difference), axis=-1)


def feature_squeezing(
    bit_depth: int | None = 4, median_window: int | None = 2, threshold: float = DEFAULT_THRESHOLD
) -> Defense:
    """Serves the victim's prediction on squeezed inputs and flags rows whose score exceeds ``threshold``.

    bit_depth: bits per value after squeezing (1 to 16), or None for no bit-depth reduction.
    median_window: side of the median filter over height and width (>= 1; 1 or None for no smoothing).
    threshold: L1 score in [0, 2] above which a row is flagged. The default was calibrated on digits for 4
        bits without smoothing (the preset in configs/defense/feature_squeezing.yaml); on 8x8 digits a 2x2
        median alone moves most benign rows' scores near 2, so recalibrate it for other squeezers and data.

    ``report`` gives ``squeezing_flagged_fraction_attack`` and ``squeezing_flagged_fraction_benign`` (flagged
    rows over rows served to the attacking, and to the benign, clients; None when a side sent none) and the
    mean scores ``squeezing_mean_score_attack`` and ``squeezing_mean_score_benign``. A batch served without
    raw probabilities (``apply`` called outside an API that runs ``preprocess``) has no score, so is not
    counted.

    Raises:
      ValueError: if a parameter is out of range, or both squeezers are off.
    """
    if bit_depth is not None and (
        isinstance(bit_depth, bool) or not isinstance(bit_depth, int) or not 1 <= bit_depth <= MAX_BIT_DEPTH
    ):
        raise ValueError(
            f"feature_squeezing: bit_depth must be an int in [1, {MAX_BIT_DEPTH}] or None, got {bit_depth!r}"
        )
    if median_window is not None and (
        isinstance(median_window, bool) or not isinstance(median_window, int) or median_window < 1
    ):
        raise ValueError(
            f"feature_squeezing: median_window must be an int >= 1 or None, got {median_window!r}"
        )
    if (
        isinstance(threshold, bool)
        or not isinstance(threshold, int | float)
        or not math.isfinite(threshold)
        or not 0 <= threshold <= 2
    ):
        raise ValueError(
            f"feature_squeezing: threshold must be a number in [0, 2] (an L1 score), got {threshold!r}"
        )
    smoothing = median_window is not None and median_window > 1
    if bit_depth is None and not smoothing:
        raise ValueError("feature_squeezing: bit_depth is None and median_window is off; enable a squeezer")

    def preprocess(inputs: jax.Array) -> jax.Array:
        squeezed = reduce_bit_depth(inputs, bit_depth) if bit_depth is not None else inputs
        return median_smooth(squeezed, median_window) if smoothing else squeezed

    def init() -> SqueezingState:
        return SqueezingState(tallies={})

    def apply(probs: jax.Array, state: SqueezingState, context: QueryContext):
        if context.raw_probs is None:
            return probs, state
        scores = squeezing_score(context.raw_probs, probs)
        client = context.client or "anonymous"
        tally = state.tallies.get(client, Tally(0, 0, 0.0))
        tally = Tally(
            rows=tally.rows + len(scores),
            flagged=tally.flagged + int(np.sum(scores > threshold)),
            score_sum=tally.score_sum + float(np.sum(scores)),
        )
        return probs, SqueezingState({**state.tallies, client: tally})

    def report(state: SqueezingState, evidence: Evidence) -> dict:
        found = {}
        for side, names in (("attack", evidence.attackers), ("benign", evidence.benign)):
            tallies = [state.tallies[name] for name in names if name in state.tallies]
            rows = sum(tally.rows for tally in tallies)
            flagged = sum(tally.flagged for tally in tallies)
            scores = sum(tally.score_sum for tally in tallies)
            found[f"squeezing_flagged_fraction_{side}"] = flagged / rows if rows else None
            found[f"squeezing_mean_score_{side}"] = scores / rows if rows else None
        return found

    return Defense(init=init, apply=apply, report=report, host=True, preprocess=preprocess)
