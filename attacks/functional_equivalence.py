"""Functionally-equivalent extraction of a one-hidden-layer ReLU network (Jagielski et al., "High Accuracy and
High Fidelity Extraction of Neural Networks", USENIX Security 2020; Carlini et al., "Cryptanalytic Extraction
of Neural Network Models", CRYPTO 2020).

The victim computes ``logits = W2 relu(W1 x + b1) + b2``. Its answers give the logits up to softmax's shift:
``g(x) = log p - mean(log p)`` is the centred logit vector, piecewise linear in ``x``, with a kink wherever a
hidden unit's pre-activation ``W1[j] . x + b1[j]`` crosses zero. The attack:

1. walks segments, each from an endpoint already visited to a fresh one: an input of the attacker's pool
   (``pool_fraction``), a vertex of the cube (``vertex_fraction``) or a uniform point of ``[0, 1]^d``, so
   the endpoints are all joined by searched segments. Each segment is bisected wherever the midpoint
   leaves the chord, down to ``resolution``; each kink is then placed where the two adjacent linear pieces
   intersect, and confirmed by one more query there. The change of slope across it (its *turn*) is the
   switching unit's centred output column up to scale and sign, a signature that tells units apart;
2. a kink whose turn matches a recovered unit is a new point on that unit's hyperplane. At a kink of a new
   unit, the Jacobian of ``g`` is measured on both sides by forward differences along every input axis:
   the difference across the kink is ``turn (x) W1[j]`` up to scale, so it gives the unit's weight row, and
   the kink, a point of its hyperplane, gives its bias. A kink no unit can be recovered from (its difference
   far from rank one: two units switching closer together than ``resolution``) is bisected again, once,
   on a stretch ``resolution`` either side. Every later point refines the hyperplane;
3. fixes signs: a unit taken with the wrong sign adds a linear term, ``relu(-z) = relu(z) - z``. The fit of
   ``g`` on ``relu(z_j)``, ``x`` and 1 leaves a linear part; each unit is flipped when that shrinks it;
4. units that never switch on the searched points act linearly there; what linear part remains (rank at
   most ``classes - 1`` for centred logits) is carried by extra units positive on the whole cube, within
   the ``hidden`` width when it is known. The last layer is solved by least squares on the answers on the
   segments and at the Jacobian probes;
5. checks the pool: every pool input the budget affords (a quarter of it at most is kept for this) is
   queried and compared with the extracted network; one that disagrees lies across a unit no segment
   crossed, and becomes the end of new segments until every checked input agrees, or the budget is spent.

Where the result equals the victim. A unit no segment crossed has one state (on or off) at every endpoint,
since the endpoints are joined by segments, so it is on or off on their whole convex hull. When the final
fit's residual is at float32 noise (``rms_logit_error``), no unit left unfound switches among the fitted
points either, and the extracted network equals the victim, up to hidden-unit permutation and positive
scaling, on the convex hull of the fitted points (segment samples, their Jacobian probes) and at every
checked pool input that agrees (``pool_inputs_disagreeing`` counts those that do not). Outside that hull,
a unit that switches only there is missed, and the two differ where it is on: the convex hull of a few
hundred points is a small part of ``[0, 1]^d``, so agreement on uniform noise (``fidelity_uniform``) is
measured, not implied. Always-on units are recovered only as the linear part they contribute (their
linear reparametrisation). A kink is missed when its turn times the bisection interval stays within the
chord ``tolerance``. The attacker's arithmetic is float64; it sends float32 inputs (what the API accepts)
and works with exactly those points.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import numpy as np

from heistlab.api import Oracle, QueryRefused
from heistlab.attacks.base import Attack, AttackResult, Surrogate, VictimFamily, affordable, check_budget
from heistlab.models import MLP

# Largest relative distance of a kink's Jacobian difference from rank one. Two units switching closer
# together than the bisection resolves give rank two: on digits, one unit's kinks measured <= 0.006 and
# merged kinks >= 0.46.
RANK_ONE = 0.05
# A checked pool input disagrees with the extracted network when its logits differ by more than this many
# chord tolerances (relative to the logits' size): far above the fit's float32 noise, far below a missed unit.
DISAGREEMENT = 100
# Segments ended at one disagreeing pool input before it is given up.
POOL_TRIES = 2


class OutOfBudget(Exception):
    """The attack's own budget (or the API's) cannot pay for the next query batch."""


def require_full_probabilities(oracle: Oracle) -> None:
    if oracle.output != "probabilities":
        raise ValueError(
            "functional_equivalence: needs full probability vectors (api.output=probabilities) to read logit "
            f"differences as log-ratios; the API serves {oracle.output}"
        )


def centred_logits(probabilities: np.ndarray) -> np.ndarray:
    """``log p`` minus its mean over classes: the logits up to softmax's shift (``-inf`` rows where p = 0)."""
    with np.errstate(divide="ignore"):
        logs = np.log(np.asarray(probabilities, np.float64))
    return logs - logs.mean(axis=1, keepdims=True)


class CountedQueries:
    """The attack's query log: sends float32 batches, keeps every input, its centred logit vector and
    whether it joins the network's fit (the pool inputs that check the network do not)."""

    def __init__(self, oracle: Oracle, budget: int, query_batch: int):
        self.oracle, self.budget, self.query_batch = oracle, budget, query_batch
        self.inputs: list[np.ndarray] = []
        self.logits: list[np.ndarray] = []
        self.fitted: list[np.ndarray] = []
        self.spent = 0

    def __call__(self, points: np.ndarray, fitted: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """Centred logits at ``points`` (rows); returns the float32-exact points and their logits."""
        points = np.clip(points, 0.0, 1.0).astype(np.float32)
        if affordable(self.oracle, self.budget - self.spent) < len(points):
            raise OutOfBudget
        answers = []
        for start in range(0, len(points), self.query_batch):
            batch = points[start : start + self.query_batch]
            try:
                answers.append(self.oracle.query(batch.reshape(-1, *self.oracle.input_shape)))
            except QueryRefused as refusal:
                raise OutOfBudget from refusal
            self.spent += len(batch)
        exact, logits = points.astype(np.float64), centred_logits(np.concatenate(answers))
        self.inputs.append(exact)
        self.logits.append(logits)
        self.fitted.append(np.full(len(points), fitted))
        return exact, logits

    def data(self) -> tuple[np.ndarray, np.ndarray]:
        """Every queried point that joins the fit and has a finite logit vector (answers holding an exact
        zero are dropped), and its centred logits."""
        if not self.inputs:
            return np.zeros((0, 0)), np.zeros((0, 0))
        inputs, logits = np.concatenate(self.inputs), np.concatenate(self.logits)
        kept = np.concatenate(self.fitted) & np.all(np.isfinite(logits), axis=1)
        return inputs[kept], logits[kept]


class Segment(NamedTuple):
    """The points ``start + t * direction`` for ``t`` in ``[0, 1]``."""

    start: np.ndarray
    direction: np.ndarray

    def at(self, t) -> np.ndarray:
        return self.start + np.multiply.outer(np.atleast_1d(t), self.direction)


def fresh_endpoint(
    rng: np.random.Generator, pool: np.ndarray, pool_fraction: float, vertex_fraction: float, size: int
) -> np.ndarray:
    """A pool input with probability ``pool_fraction`` (when there is a pool), a vertex of the cube with
    probability ``vertex_fraction`` (each coordinate 1 with a probability drawn uniformly for that vertex),
    else a uniform point of the cube; float32-exact, as it will be sent."""
    draw = rng.uniform()
    if len(pool) and draw < pool_fraction:
        point = pool[rng.integers(len(pool))]
    elif draw < pool_fraction + vertex_fraction:
        point = (rng.uniform(size=size) < rng.uniform()).astype(np.float64)
    else:
        point = rng.uniform(size=size)
    return np.asarray(point, np.float32).astype(np.float64)


def pool_rows(pool: np.ndarray, size: int) -> np.ndarray:
    """The attacker's pool as float64 rows of ``size`` inputs in ``[0, 1]``; none when it has no such rows."""
    pool = np.asarray(pool, np.float64)
    if pool.size == 0 or pool.size % size or pool.min() < 0.0 or pool.max() > 1.0:
        return np.zeros((0, size))
    return pool.reshape(-1, size)


def next_segments(
    rng: np.random.Generator,
    visited: list[np.ndarray],
    pool: np.ndarray,
    fractions: tuple[float, float],
    count: int,
) -> list[Segment]:
    """``count`` segments, each from an endpoint already visited to a fresh one (``fresh_endpoint``), which
    joins ``visited``: every endpoint is linked to every other through searched segments."""
    if not visited:
        visited.append(fresh_endpoint(rng, pool, *fractions, pool.shape[1]))
    segments = []
    for _ in range(count):
        start = visited[rng.integers(len(visited))]
        end = fresh_endpoint(rng, pool, *fractions, len(start))
        visited.append(end)
        segments.append(Segment(start, end - start))
    return segments


class Kink(NamedTuple):
    """A critical point: its position on the segment and in input space, how far its two linear pieces
    extend from it (in ``t``), and its unit-norm turn (the change of ``dg/dt``, sign left as found)."""

    t: float
    point: np.ndarray
    reach: float
    turn: np.ndarray


class Unit(NamedTuple):
    """A recovered hidden unit: pre-activation ``weights . x + bias`` up to scale and sign, its signature
    (unit-norm centred output column, up to sign) and the kinks seen on its hyperplane."""

    weights: np.ndarray
    bias: float
    signature: np.ndarray
    points: list[np.ndarray]


def is_linear(left: np.ndarray, middle: np.ndarray, right: np.ndarray, tolerance: float) -> bool:
    """Whether the midpoint's value lies on the chord, within a tolerance relative to the values' size."""
    scale = 1.0 + max(np.abs(left).max(), np.abs(right).max())
    return bool(np.abs(middle - 0.5 * (left + right)).max() <= tolerance * scale)


def bracket_kinks(
    ask: CountedQueries, segments: list[Segment], resolution: float, tolerance: float
) -> list[tuple[dict[float, np.ndarray], list[tuple[float, float]]]]:
    """Bisects every segment over ``t`` in ``[0, 1]``, one batched query per level.

    Returns, per segment, the values seen (by ``t``) and the intervals, in order, that hold a kink: off
    their chord and no wider than ``resolution``, or off their chord while both halves are on theirs (a
    kink so near the midpoint that neither half's chord test can see it).
    """
    _, ends = ask(np.concatenate([segment.at([0.0, 1.0]) for segment in segments]))
    values = [{0.0: ends[2 * index], 1.0: ends[2 * index + 1]} for index in range(len(segments))]
    on_chord: dict[tuple[int, float, float], bool] = {}
    frontier = [(index, 0.0, 1.0) for index in range(len(segments))]
    while frontier:
        middles = [0.5 * (low + high) for _, low, high in frontier]
        points = np.stack(
            [segments[index].at(middle)[0] for (index, _, _), middle in zip(frontier, middles, strict=True)]
        )
        _, logits = ask(points)
        deeper = []
        for (index, low, high), middle, value in zip(frontier, middles, logits, strict=True):
            values[index][middle] = value
            linear = is_linear(values[index][low], value, values[index][high], tolerance)
            on_chord[(index, low, high)] = linear
            if not linear and high - low > resolution:
                deeper += [(index, low, middle), (index, middle, high)]
        frontier = deeper
    kinked: list[list[tuple[float, float]]] = [[] for _ in segments]
    for (index, low, high), linear in on_chord.items():
        middle = 0.5 * (low + high)
        halves_linear = on_chord.get((index, low, middle), False) and on_chord.get(
            (index, middle, high), False
        )
        if not linear and (high - low <= resolution or halves_linear):
            kinked[index].append((low, high))
    return [(values[index], sorted(kinked[index])) for index in range(len(segments))]


def piece_slope(values: dict[float, np.ndarray], ts: list[float], near: int, far: int, tolerance: float):
    """The slope of the linear piece from sample ``near`` towards sample ``far``: over the whole stretch
    when every sample between lies on one line, else from the nearest neighbour alone."""
    step = 1 if far > near else -1
    slope = (values[ts[far]] - values[ts[near]]) / (ts[far] - ts[near])
    for index in range(near + step, far, step):
        predicted = values[ts[near]] + slope * (ts[index] - ts[near])
        if np.abs(values[ts[index]] - predicted).max() > tolerance * (1.0 + np.abs(predicted).max()):
            return (values[ts[near + step]] - values[ts[near]]) / (ts[near + step] - ts[near])
    return slope


def kink_candidate(
    values: dict[float, np.ndarray], kinked: list[tuple[float, float]], position: int, tolerance: float
) -> tuple[float, float, np.ndarray, np.ndarray] | None:
    """Where the linear pieces either side of ``kinked[position]`` intersect (least squares over outputs).

    Each piece runs from the interval to the neighbouring kinked interval (or the segment's end). Returns
    ``(t, reach, turn, predicted value at t)``, or ``None`` when the pieces do not meet inside.
    """
    ts = sorted(values)
    low, high = kinked[position]
    start = kinked[position - 1][1] if position > 0 else 0.0
    stop = kinked[position + 1][0] if position + 1 < len(kinked) else 1.0
    below, above, first, last = ts.index(low), ts.index(high), ts.index(start), ts.index(stop)
    if first >= below or last <= above:
        return None
    left_slope = piece_slope(values, ts, below, first, tolerance)
    right_slope = piece_slope(values, ts, above, last, tolerance)
    turn = left_slope - right_slope
    if not np.any(turn):
        return None
    offset = values[high] - values[low] + left_slope * low - right_slope * high
    t = float(turn @ offset / (turn @ turn))
    if not low <= t <= high:
        return None
    return t, min(t - start, stop - t), turn / np.linalg.norm(turn), values[low] + left_slope * (t - low)


def locate_kinks(
    ask: CountedQueries, segments: list[Segment], brackets: list, tolerance: float
) -> list[list[Kink]]:
    """Each segment's kinks, every candidate intersection confirmed by one (batched) query there."""
    candidates = [
        (index, candidate)
        for index, (values, kinked) in enumerate(brackets)
        for position in range(len(kinked))
        if (candidate := kink_candidate(values, kinked, position, tolerance)) is not None
    ]
    kinks: list[list[Kink]] = [[] for _ in segments]
    if not candidates:
        return kinks
    exact, observed = ask(np.stack([segments[index].at(candidate[0])[0] for index, candidate in candidates]))
    for (index, (t, reach, turn, predicted)), point, value in zip(candidates, exact, observed, strict=True):
        if np.abs(value - predicted).max() <= 10 * tolerance * (1.0 + np.abs(value).max()):
            kinks[index].append(Kink(t, point, reach, turn))
    return kinks


def jacobian_columns(
    ask: CountedQueries, points: np.ndarray, axes: np.ndarray, steps: np.ndarray
) -> tuple[np.ndarray, float]:
    """Forward-difference Jacobian columns ``(points, classes, axes)`` of the centred logits, one signed
    step per point and axis (a step that would leave ``[0, 1]`` is taken the other way), in one query
    batch; also the largest logit seen at ``points``."""
    count, size = points.shape
    ends = points[:, axes] + steps
    steps = np.where((ends >= 0.0) & (ends <= 1.0), steps, -steps)
    probes = np.repeat(points[:, None, :], len(axes), axis=1)
    probes[:, np.arange(len(axes)), axes] += steps
    exact, logits = ask(np.concatenate([points, probes.reshape(-1, size)]))
    base, probed = exact[:count], exact[count:].reshape(count, len(axes), size)
    displacement = probed[:, np.arange(len(axes)), axes] - base[:, axes]
    differences = logits[count:].reshape(count, len(axes), -1) - logits[:count, None, :]
    return (differences / displacement[..., None]).transpose(0, 2, 1), float(np.abs(logits[:count]).max())


def rank_one_row(turn: np.ndarray, difference: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The row ``w`` with ``difference ~ turn (x) w``, and each column's distance from that shape."""
    row = turn @ difference
    return row, np.linalg.norm(difference - np.outer(turn, row), axis=0)


def steps_away_from(point: np.ndarray, centre: np.ndarray, row: np.ndarray, step: float) -> np.ndarray:
    """Per-axis steps from ``point`` that move away from the hyperplane ``row . (x - centre) = 0``; where
    the cube's edge forbids it, towards the hyperplane by at most half the distance left."""
    margin = row @ (point - centre)
    away = np.sign(margin) * np.where(row >= 0, 1.0, -1.0) * step
    inside = (point + away >= 0.0) & (point + away <= 1.0)
    room = 0.5 * abs(margin) / np.maximum(np.abs(row), 1e-12)
    return np.where(inside, away, -np.sign(away) * np.clip(room, step / 1000, step))


def unit_from_kink(
    ask: CountedQueries, segment: Segment, kink: Kink, step: float, tolerance: float, retries: int = 3
) -> tuple[np.ndarray, float] | None:
    """A hidden unit's unit-norm weight row and bias from the Jacobians either side of a kink.

    Across the kink the Jacobian changes by ``turn (x) w`` (rank one), so each input axis's column gives one
    weight. A first pass with steps of ``step / 10`` gives a rough row; the second steps each axis by
    ``step`` away from the unit's own hyperplane, so only other units' kinks can spoil a column. A column
    off the rank-one shape crossed one, and is measured again with ten times smaller steps. Returns
    ``None`` when some column never fits.
    """
    points = segment.at([kink.t - 0.5 * kink.reach, kink.t + 0.5 * kink.reach])
    axes = np.arange(points.shape[1])
    rough, _ = jacobian_columns(ask, points, axes, np.full(points.shape, step / 10))
    row, _ = rank_one_row(kink.turn, rough[1] - rough[0])
    if not np.any(row):
        return None
    row = row / np.linalg.norm(row)
    steps = np.stack([steps_away_from(point, kink.point, row, step) for point in points])
    columns, largest = jacobian_columns(ask, points, axes, steps)
    noise = 2 * tolerance * (1.0 + largest)
    for attempt in range(retries + 1):
        row, residual = rank_one_row(kink.turn, columns[1] - columns[0])
        spoiled = np.flatnonzero(residual > noise / np.abs(steps).min(axis=0))
        if len(spoiled) == 0:
            break
        if attempt == retries:
            return None
        steps[:, spoiled] /= 10
        columns[:, :, spoiled] = jacobian_columns(ask, points, spoiled, steps[:, spoiled])[0]
    if np.linalg.norm(residual) > RANK_ONE * np.linalg.norm(columns[1] - columns[0]):
        return None
    row = row / np.linalg.norm(row)
    return row, float(-row @ kink.point)


def matching_unit(units: list[Unit], turn: np.ndarray, similarity: float) -> int | None:
    """The unit whose signature is parallel to ``turn`` (|cosine| >= ``similarity``), if any."""
    if not units:
        return None
    cosines = np.abs(np.array([unit.signature for unit in units]) @ turn)
    best = int(np.argmax(cosines))
    return best if cosines[best] >= similarity else None


def refined_hyperplane(unit: Unit) -> tuple[np.ndarray, float]:
    """The unit's hyperplane ``(w, b)`` brought through the kinks seen on it, as little moved as they allow.

    Kinks are located to about float32 precision, the Jacobian-difference row only to about
    ``noise / step``. With fewer kinks than unknowns, ``(w, b)`` is projected onto the solutions of
    ``w . p + b = 0`` for its points ``p``; with more, those equations only hold to the kinks' noise and
    the plane is their least-squares solution nearest the first estimate. Both are one step of inverse
    iteration, ``(C^T C + s I)^-1 s (w, b)`` with a shift ``s`` far below the constraints' scale.
    """
    plane = np.append(unit.weights, unit.bias)
    constraints = np.array([np.append(point, 1.0) for point in unit.points])
    gram = constraints.T @ constraints
    shift = 1e-12 * np.trace(gram)
    plane = np.linalg.solve(gram + shift * np.eye(len(plane)), shift * plane)
    norm = np.linalg.norm(plane[:-1])
    return plane[:-1] / norm, float(plane[-1] / norm)


def fit_last_layer(features: np.ndarray, logits: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """Least-squares output weights ``(features, classes)`` and biases for ``logits``; also the RMS error."""
    design = np.concatenate([features, np.ones((len(features), 1))], axis=1)
    solution, *_ = np.linalg.lstsq(design, logits, rcond=None)
    error = float(np.sqrt(np.mean((design @ solution - logits) ** 2)))
    return solution[:-1], solution[-1], error


def orient_units(
    weights: np.ndarray, biases: np.ndarray, inputs: np.ndarray, logits: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Signs for the units, and the linear part ``L`` (``(classes, d)``) of ``g`` they leave unexplained.

    ``g`` is fitted on ``relu(z_j)``, ``x`` and 1. Flipping unit ``j`` keeps its ReLU coefficient ``a_j``
    and adds ``a_j w_j^T`` to ``L`` (``relu(z) = relu(-z) + z``); units are flipped one at a time, largest
    reduction first, while that shrinks ``L``. With every unit switching on the cube the true signs leave
    ``L = 0``.
    """
    hidden = np.maximum(inputs @ weights.T + biases, 0.0)
    coefficients, _, _ = fit_last_layer(np.concatenate([hidden, inputs], axis=1), logits)
    relu_part, linear = coefficients[: len(biases)], coefficients[len(biases) :].T
    signs = np.ones(len(biases))
    while len(biases):
        candidates = [linear + np.outer(relu_part[j], weights[j] * signs[j]) for j in range(len(biases))]
        norms = [np.linalg.norm(candidate) for candidate in candidates]
        best = int(np.argmin(norms))
        if not norms[best] < np.linalg.norm(linear) * (1 - 1e-9):
            break
        # After a flip the unit's contribution is a_j relu(-z_j): same ReLU coefficient, opposite row.
        linear, signs[best] = candidates[best], -signs[best]
    return weights * signs[:, None], biases * signs, linear


def always_active_units(linear: np.ndarray, spare: int, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """Up to ``spare`` units, positive on all of ``[0, 1]^d``, spanning the linear part ``L`` of ``g``.

    A unit active on the whole cube is linear there, so its kink is never seen. Each extra unit is a
    right singular vector of ``L`` above ``threshold`` times the largest, with a bias keeping it >= 1.
    """
    if spare == 0 or not np.any(linear):
        return np.zeros((0, linear.shape[1])), np.zeros(0)
    _, singular, right = np.linalg.svd(linear, full_matrices=False)
    keep = right[: min(spare, int(np.sum(singular > threshold * singular[0])))]
    return keep, 1.0 - np.minimum(keep, 0.0).sum(axis=1)


class Network(NamedTuple):
    """The extracted one-hidden-layer network (float64): ``logits = output_weights^T relu(weights x + biases)
    + output_bias``, centred like the answers; how many of its units are always-active fillers, and the RMS
    error of its fit to the answers on the search segments."""

    weights: np.ndarray
    biases: np.ndarray
    output_weights: np.ndarray
    output_bias: np.ndarray
    always_active: int
    rms_error: float

    @property
    def layers(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        return self.weights, self.biases, self.output_weights, self.output_bias

    def logits(self, inputs: np.ndarray) -> np.ndarray:
        return np.maximum(inputs @ self.weights.T + self.biases, 0.0) @ self.output_weights + self.output_bias

    def disagreement(self, inputs: np.ndarray, logits: np.ndarray, tolerance: float) -> np.ndarray:
        """Rows whose answer leaves the network's logits by more than ``DISAGREEMENT * tolerance``, relative
        to the logits' size."""
        if len(inputs) == 0:
            return np.zeros(0, bool)
        gap = np.abs(self.logits(inputs) - logits).max(axis=1)
        return gap > DISAGREEMENT * tolerance * (1.0 + np.abs(logits).max(axis=1))


def extracted_network(units: list[Unit], inputs: np.ndarray, logits: np.ndarray, spare: int) -> Network:
    """Refined hyperplanes, signs fixed, up to ``spare`` always-active units for the linear part left, and
    the last layer by least squares, all from the answers at ``inputs``."""
    planes = [refined_hyperplane(unit) for unit in units]
    weights = np.array([plane[0] for plane in planes]).reshape(len(units), inputs.shape[1])
    biases = np.array([plane[1] for plane in planes])
    weights, biases, linear = orient_units(weights, biases, inputs, logits)
    extra_weights, extra_biases = always_active_units(linear, spare, threshold=1e-3)
    weights = np.concatenate([weights, extra_weights])
    biases = np.concatenate([biases, extra_biases])
    output_weights, output_bias, error = fit_last_layer(np.maximum(inputs @ weights.T + biases, 0.0), logits)
    return Network(weights, biases, output_weights, output_bias, len(extra_biases), error)


def one_hidden_layer_params(
    weights: np.ndarray, biases: np.ndarray, output_weights: np.ndarray, output_bias: np.ndarray
) -> dict:
    """``MLP(hidden=(h,))`` parameters in Flax's layout (float32); one dead unit when ``h`` would be 0."""
    if len(biases) == 0:
        weights, biases = np.zeros((1, weights.shape[1])), np.zeros(1)
        output_weights = np.zeros((1, len(output_bias)))
    as_float32 = lambda array: np.asarray(array, np.float32)
    return {
        "params": {
            "Dense_0": {"kernel": as_float32(weights.T), "bias": as_float32(biases)},
            "Dense_1": {"kernel": as_float32(output_weights), "bias": as_float32(output_bias)},
        }
    }


ONE_HIDDEN_RELU = VictimFamily(
    "a one-hidden-layer ReLU network (victim=relu_one_hidden)",
    lambda model: isinstance(model, MLP) and len(model.hidden) == 1,
)


def functional_equivalence(
    budget: int = 30000,
    hidden: int | None = None,
    patience: int = 40,
    segments_per_round: int = 8,
    resolution: float = 1.0 / 512,
    tolerance: float = 1e-6,
    step: float = 1e-2,
    similarity: float = 0.999,
    query_batch: int = 4096,
    pool_fraction: float = 0.5,
    vertex_fraction: float = 0.25,
) -> Attack:
    """Builds the functionally-equivalent extraction attack on a one-hidden-layer ReLU victim.

    hidden: the victim's hidden width when known: the search stops once that many units are found, and the
        extracted network is at most that wide. With ``None`` the search stops after ``patience`` segments
        without a new unit (or when the budget is spent) and up to ``classes - 1`` always-active units are
        added to those found.
    segments_per_round: segments bisected together (one query batch per bisection level).
    resolution: bisection stops at intervals this wide (in segment fractions) before intersecting lines.
    tolerance: relative deviation from a chord that counts as a kink (float32 answers carry ~1e-6).
    step: forward-difference step along each input axis for the Jacobians.
    similarity: |cosine| between a kink's turn and a unit's signature that makes the kink that unit's.
    pool_fraction, vertex_fraction: how often a segment's fresh endpoint is a pool input or a vertex of the
        cube (each coordinate 1 with a probability drawn per vertex); the rest are uniform points. Units
        that switch only on real data are found on segments between pool inputs (and by the pool check),
        units that switch near the cube's corners on segments to vertices.

    Besides the model, reports ``hidden_units_found``, ``pool_inputs_checked`` and
    ``pool_inputs_disagreeing`` (module docstring: where the result equals the victim).
    """
    check_budget("functional_equivalence", budget)
    for name, value in (("pool_fraction", pool_fraction), ("vertex_fraction", vertex_fraction)):
        if not (isinstance(value, int | float) and 0.0 <= value <= 1.0):
            raise ValueError(f"functional_equivalence: {name} must be a number in [0, 1], got {value!r}")
    if pool_fraction + vertex_fraction > 1.0:
        raise ValueError(
            "functional_equivalence: pool_fraction + vertex_fraction must be at most 1 (the rest are uniform "
            f"points), got {pool_fraction} + {vertex_fraction}"
        )
    if hidden is not None and (not isinstance(hidden, int) or hidden < 1):
        raise ValueError(f"functional_equivalence: hidden must be an integer >= 1 or null, got {hidden!r}")
    for name, value in (
        ("patience", patience),
        ("segments_per_round", segments_per_round),
        ("query_batch", query_batch),
    ):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"functional_equivalence: {name} must be an integer >= 1, got {value!r}")
    for name, value in (
        ("resolution", resolution),
        ("tolerance", tolerance),
        ("step", step),
        ("similarity", similarity),
    ):
        if not (isinstance(value, int | float) and 0 < value < 1):
            raise ValueError(f"functional_equivalence: {name} must be a number in (0, 1), got {value!r}")

    def explore(
        ask: CountedQueries, units: list[Unit], segments: list[Segment], closer: bool = True
    ) -> list[dict]:
        """Bisects ``segments``, adds each kink to its unit or recovers a new unit from it (in place);
        one record per segment. A kink no unit can be recovered from (two units switching closer than
        ``resolution``) is bisected again on a stretch ``resolution`` either side, once."""
        brackets = bracket_kinks(ask, segments, resolution, tolerance)
        records = []
        for segment, kinks in zip(segments, locate_kinks(ask, segments, brackets, tolerance), strict=True):
            new = unrecovered = 0
            for kink in kinks:
                match = matching_unit(units, kink.turn, similarity)
                if match is not None:
                    units[match] = units[match]._replace(points=[*units[match].points, kink.point])
                    continue
                recovered = unit_from_kink(ask, segment, kink, step, tolerance)
                if recovered is not None:
                    units.append(Unit(*recovered, kink.turn, [kink.point]))
                    new += 1
                elif closer:
                    low, high = max(kink.t - resolution, 0.0), min(kink.t + resolution, 1.0)
                    stretch = Segment(segment.at(low)[0], (high - low) * segment.direction)
                    (record,) = explore(ask, units, [stretch], closer=False)
                    new, unrecovered = new + record["new_units"], unrecovered + record["unrecovered"]
                else:
                    unrecovered += 1
            records.append({"kinks": len(kinks), "new_units": new, "unrecovered": unrecovered})
        return records

    def search(
        ask: CountedQueries, rng: np.random.Generator, pool: np.ndarray, units: list[Unit], visited: list
    ) -> list[dict]:
        """Random segments until ``patience`` of them in a row bring no new unit (or ``hidden`` are found,
        or the budget is spent)."""
        history: list[dict] = []
        idle = 0
        try:
            while idle < patience and (hidden is None or len(units) < hidden):
                segments = next_segments(
                    rng, visited, pool, (pool_fraction, vertex_fraction), segments_per_round
                )
                for record in explore(ask, units, segments):
                    idle = 0 if record["new_units"] else idle + 1
                    history.append({"round": len(history), "phase": "search", **record})
        except OutOfBudget:
            pass
        return history

    def check_pool(
        ask: CountedQueries,
        rng: np.random.Generator,
        pool: np.ndarray,
        units: list[Unit],
        visited: list,
        classes: int,
    ) -> tuple[Network, dict, list[dict]]:
        """Queries the pool (what the budget affords) and compares each answer with the extracted network.

        An input where they disagree lies across a unit the search never crossed: it becomes the end of a
        segment from a visited endpoint, and the network is fitted again, until every checked input agrees,
        each disagreeing input has ended ``POOL_TRIES`` segments, ``hidden`` units are found, or the budget
        is spent.
        """
        history: list[dict] = []
        checked = np.zeros((0, pool.shape[1]))
        answers = np.zeros((0, classes))
        count = min(len(pool), affordable(ask.oracle, ask.budget - ask.spent))
        if count:
            chosen = pool[rng.permutation(len(pool))[:count]]
            checked, answers = ask(chosen, fitted=False)
            finite = np.all(np.isfinite(answers), axis=1)
            checked, answers = checked[finite], answers[finite]
        tries = np.zeros(len(checked), int)
        network = fit_network(ask, units, classes)
        while hidden is None or len(units) < hidden:
            disagreeing = np.flatnonzero(network.disagreement(checked, answers, tolerance))
            candidates = disagreeing[tries[disagreeing] < POOL_TRIES][:segments_per_round]
            if len(candidates) == 0:
                break
            tries[candidates] += 1
            segments = []
            for index in candidates:
                start = visited[rng.integers(len(visited))] if visited else checked[candidates[0]]
                segments.append(Segment(start, checked[index] - start))
                visited.append(checked[index])
            try:
                records = explore(ask, units, segments)
            except OutOfBudget:
                break
            history += [{"round": 0, "phase": "pool check", **record} for record in records]
            network = fit_network(ask, units, classes)
        disagreeing = int(network.disagreement(checked, answers, tolerance).sum())
        return network, {"pool_inputs_checked": len(checked), "pool_inputs_disagreeing": disagreeing}, history

    def fit_network(ask: CountedQueries, units: list[Unit], classes: int) -> Network:
        inputs, logits = ask.data()
        if len(inputs) == 0:
            raise RuntimeError("functional_equivalence: the API served no answer it could take the log of")
        spare = classes - 1 if hidden is None else max(hidden - len(units), 0)
        return extracted_network(units, inputs, logits, spare)

    def run(oracle: Oracle, pool: np.ndarray, surrogate: Surrogate, key: jax.Array) -> AttackResult:
        require_full_probabilities(oracle)
        size = int(np.prod(oracle.input_shape))
        rows = pool_rows(pool, size)
        ask = CountedQueries(oracle, budget - min(len(rows), budget // 4), query_batch)
        rng = np.random.default_rng(np.asarray(jax.random.key_data(key)))
        units: list[Unit] = []
        visited: list[np.ndarray] = []
        history = search(ask, rng, rows, units, visited)
        ask.budget = budget
        network, checks, more = check_pool(ask, rng, rows, units, visited, oracle.num_classes)
        history += more
        for index, record in enumerate(history):
            record["round"] = index
        history.append(
            {
                "round": len(history),
                "units": len(units),
                "kinks_seen": sum(len(unit.points) for unit in units),
                "always_active_units": network.always_active,
                "rms_logit_error": network.rms_error,
                **checks,
            }
        )
        params = one_hidden_layer_params(*network.layers)
        width = params["params"]["Dense_0"]["bias"].shape[0]
        model = MLP(num_classes=oracle.num_classes, hidden=(width,))
        found = {"hidden_units_found": len(units), **checks}
        return AttackResult(params, ask.spent, tuple(history), model, found)

    return Attack("functional_equivalence", budget, run, extracts=ONE_HIDDEN_RELU)
