"""PRADA: detecting model extraction from the distribution of distances between a client's queries (Juuti,
Szyller, Marchal and Asokan, "PRADA: Protecting Against DNN Model Stealing Attacks", EuroS&P 2019).

Benign clients query natural samples, whose distances to each other are roughly normally distributed;
extraction attacks that synthesise queries (JBDA's small Jacobian steps from a few seeds) produce many tiny
distances beside large ones, a distribution far from normal. Per client and per predicted class, PRADA keeps
a growing set of past queries. Each new query's minimum L2 distance to its class set is recorded; the query
joins the set if that distance exceeds the class threshold, which then becomes the larger of itself and
``mean - std`` of the set's distances. Every ``check_every`` queries the recorded distances (of classes with
at least ``MIN_CLASS_DISTANCES`` of them, as the authors' released code does) lose their 3-sigma outliers,
and once more than ``min_distances`` remain, the Shapiro-Wilk statistic ``W`` is computed: ``W < delta``
raises the alarm.

Details follow the authors' released code: a class's first query starts its set with distance 0 and records no
distance; outliers are removed before the size check. Unlike that code, an alarm here is sticky: once raised
for a client it stays, so that an action (refuse, switch) can be taken from then on.

``delta`` should be calibrated on benign traffic of the data set at hand. With ``delta=None`` the factory does
so on the defender's own data (the experiment passes the victim's training split, which no evaluation client
ever sends): ``delta`` is the smallest ``W`` that any of ``calibration_streams`` benign streams reached,
less ``calibration_margin``. Each stream is at most ``calibration_queries`` defender inputs in a fresh seeded
order, each input's class its true label.

A known limit of the test: honest clients that re-send near-duplicates (the same few inputs, slightly
perturbed, as a client retrying with re-encoded images does) produce many tiny distances beside natural
ones, the very signature of a synthetic-query attack, and are alarmed.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Mapping
from typing import NamedTuple

import jax
import numpy as np

from heistlab.defenses.base import (
    ADMIT,
    DefenderData,
    Defense,
    Evidence,
    QueryContext,
    Request,
    Verdict,
    distinct_rows,
)

ACTIONS = ("log", "refuse", "switch")
MIN_CLASS_DISTANCES = 10
OUTLIER_SIGMAS = 3.0
ANONYMOUS = "anonymous"
CALIBRATION_STREAM = 0x5072  # mixed into the defender's seed for the calibration streams' orders
# The fixed threshold for a detector built without calibration (the authors' code uses 0.9), chosen on
# digits before calibration existed, from benign streams that included the test split the experiment's benign
# clients send: over 500 of them the smallest W was 0.893; JBDA streams fell to W ~0.71 within their first
# augmentation round; Knockoff's natural-sample streams stayed at W ~0.92, like benign ones (the paper, too,
# reports natural-sample queries evading PRADA). Experiments calibrate instead (configs/defense/prada.yaml).
DEFAULT_DELTA = 0.85


class Alarm(NamedTuple):
    """When a client's alarm was raised: its query count, the W that did it, and every client's count then."""

    queries: int
    shapiro_w: float
    counts: Mapping[str, int]


class ClientTrace(NamedTuple):
    """One client's detector state (host arrays; a new trace is built per batch, old ones never mutate)."""

    growing_sets: Mapping[int, np.ndarray]
    set_distances: Mapping[int, tuple[float, ...]]
    thresholds: Mapping[int, float]
    distances: Mapping[int, tuple[float, ...]]
    queries: int
    min_shapiro_w: float
    alarm: Alarm | None


class PradaState(NamedTuple):
    traces: Mapping[str, ClientTrace]
    fallback_state: object


def empty_trace() -> ClientTrace:
    return ClientTrace({}, {}, {}, {}, 0, math.inf, None)


def prada(
    delta: float | None = DEFAULT_DELTA,
    action: str = "log",
    fallback: Defense | None = None,
    check_every: int = 10,
    min_distances: int = 100,
    defender: DefenderData | None = None,
    calibration_streams: int = 50,
    calibration_queries: int = 1000,
    calibration_margin: float = 0.05,
) -> Defense:
    """Builds PRADA's detector: alarm when the Shapiro-Wilk ``W`` of a client's distances is below ``delta``.

    delta: the alarm threshold, or None to calibrate it on ``defender`` (see ``calibrate_delta``; the
        calibration arguments are used only then).

    action: what an alarm does to the client from then on: ``log`` (nothing; reported only), ``refuse``
        (admission refuses it with reason ``prada alarm``), or ``switch`` (its answers go through
        ``fallback``, a ``Defense`` such as ``label_only()``, from the query after the alarm on; the
        fallback's admission, if it has one, applies to switched clients).
    check_every, min_distances: the test runs every ``check_every`` queries of a client once more than
        ``min_distances`` distances remain after outlier removal (10 and 100 in the paper's code).

    ``report`` gives ``detected`` (any attacking identity alarmed), ``queries_to_detection`` (queries the
    attacking identities had been served, together, when the first of them was alarmed; None without alarm),
    ``false_positive_rate`` (fraction of the benign clients alarmed; None without benign clients), and the
    smallest ``W`` seen over the attacking and the benign clients (``prada_min_w_attack``,
    ``prada_min_w_benign``), and the threshold used (``prada_delta``).

    Raises:
      ValueError: if ``delta`` is not in (0, 1], ``action`` is unknown, ``fallback`` is missing for
        ``switch`` (or given for another action, or not a response-side Defense), or the counts are not ints
        >= 1 (``min_distances`` >= 3, Shapiro-Wilk's minimum sample), or, for ``delta=None``, what
        ``calibrate_delta`` rejects.
    """
    if delta is not None and not _is_number(delta, above=0, at_most=1):
        raise ValueError(
            f"prada: delta must be a number in (0, 1] (a Shapiro-Wilk W) or null to calibrate, got {delta!r}"
        )
    if action not in ACTIONS:
        raise ValueError(f"prada: action must be one of {', '.join(ACTIONS)}; got {action!r}")
    if action == "switch" and not isinstance(fallback, Defense):
        raise ValueError(f"prada: action 'switch' needs fallback to be a Defense, got {fallback!r}")
    if action != "switch" and fallback is not None:
        raise ValueError(f"prada: fallback is only used with action 'switch', got action {action!r}")
    if fallback is not None and (fallback.preprocess is not None or fallback.augment_training is not None):
        raise ValueError("prada: fallback must act on answers or admission, not on inputs or the model")
    if isinstance(check_every, bool) or not isinstance(check_every, int) or check_every < 1:
        raise ValueError(f"prada: check_every must be an int >= 1, got {check_every!r}")
    if isinstance(min_distances, bool) or not isinstance(min_distances, int) or min_distances < 3:
        raise ValueError(f"prada: min_distances must be an int >= 3, got {min_distances!r}")
    if delta is None:
        delta = calibrate_delta(
            defender,
            calibration_streams,
            calibration_queries,
            calibration_margin,
            check_every,
            min_distances,
        )

    def init() -> PradaState:
        return PradaState(traces={}, fallback_state=fallback.init() if fallback is not None else None)

    def apply(probs: jax.Array, state: PradaState, context: QueryContext) -> tuple[jax.Array, PradaState]:
        client = context.client or ANONYMOUS
        trace = state.traces.get(client, empty_trace())
        was_alarmed = trace.alarm is not None
        rows = np.asarray(context.inputs, np.float64).reshape(len(probs), -1)
        labels = np.asarray(probs).argmax(axis=-1)
        counts = {name: other.queries for name, other in state.traces.items()}
        trace, alarm_row = observe_batch(
            trace, rows, labels, delta, check_every, min_distances, counts, client
        )
        state = state._replace(traces={**state.traces, client: trace})
        if action != "switch" or trace.alarm is None:
            return probs, state
        switch_from = 0 if was_alarmed else alarm_row + 1
        if switch_from >= len(probs):
            return probs, state
        tail_context = context._replace(inputs=context.inputs[switch_from:])
        tail, fallback_state = fallback.apply(probs[switch_from:], state.fallback_state, tail_context)
        served = np.concatenate([np.asarray(probs[:switch_from]), np.asarray(tail, dtype=probs.dtype)])
        return served, state._replace(fallback_state=fallback_state)

    def admit(state: PradaState, request: Request) -> tuple[Verdict, PradaState]:
        trace = state.traces.get(request.client)
        if trace is None or trace.alarm is None:
            return ADMIT, state
        if action == "refuse":
            return Verdict(admitted=False, delay=math.inf, reason="prada alarm"), state
        if fallback.admit is None:
            return ADMIT, state
        verdict, fallback_state = fallback.admit(state.fallback_state, request)
        return verdict, state._replace(fallback_state=fallback_state)

    def report(state: PradaState, evidence: Evidence) -> dict:
        found = {**detection_report(state.traces, evidence.attackers, evidence.benign), "prada_delta": delta}
        if fallback is not None and fallback.report is not None:
            found.update(fallback.report(state.fallback_state, evidence))
        return found

    return Defense(
        init=init,
        apply=apply,
        admit=admit if action != "log" else None,
        report=report,
        host=True,
    )


def calibrate_delta(
    defender: DefenderData | None,
    streams: int,
    queries: int,
    margin: float,
    check_every: int = 10,
    min_distances: int = 100,
) -> float:
    """The smallest ``W`` that ``streams`` benign streams of the defender's data reach, less ``margin``.

    Each stream is the defender's inputs in a fresh order drawn from ``defender.seed``, cut to ``queries``
    rows, each row's class its true label (the victim's top-1 on its own training data, nearly always). The
    detector runs on each exactly as on a client, so the smallest ``W`` covers every check of every stream.

    Raises:
      ValueError: if ``defender`` is missing, ``streams`` or ``queries`` is not an int >= 1, ``margin`` is
        not a number in [0, 1), or the streams are too short to reach the test (more than ``min_distances``
        distances), or the margin leaves no threshold above 0.
    """
    if not isinstance(defender, DefenderData):
        raise ValueError(
            "prada: delta=null calibrates on the defender's data, so defender must be a DefenderData "
            f"(the experiment passes the victim's training split); got {defender!r}"
        )
    for name, value in (("calibration_streams", streams), ("calibration_queries", queries)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"prada: {name} must be an int >= 1, got {value!r}")
    if not _is_number(margin, at_least=0, below=1):
        raise ValueError(f"prada: calibration_margin must be a number in [0, 1), got {margin!r}")
    rows = np.asarray(defender.x, np.float64).reshape(len(defender.x), -1)
    labels = np.asarray(defender.y).astype(int)
    rng = np.random.default_rng([defender.seed, CALIBRATION_STREAM])
    smallest = math.inf
    for _ in range(streams):
        order = rng.permutation(len(rows))[:queries]
        trace, _ = observe_batch(
            empty_trace(), rows[order], labels[order], 0.0, check_every, min_distances, {}, "calibration"
        )
        smallest = min(smallest, trace.min_shapiro_w)
    if math.isinf(smallest):
        raise ValueError(
            f"prada: calibration streams of {min(queries, len(rows))} defender inputs never reach the test "
            f"(more than min_distances={min_distances} distances); give more defender data or a number as "
            "delta"
        )
    if smallest - margin <= 0:
        raise ValueError(
            f"prada: calibration_margin {margin} leaves no threshold: benign streams reached "
            f"W = {smallest:.3f}"
        )
    return smallest - margin


def observe_batch(
    trace: ClientTrace,
    rows: np.ndarray,
    labels: np.ndarray,
    delta: float,
    check_every: int,
    min_distances: int,
    counts: Mapping[str, int],
    client: str,
) -> tuple[ClientTrace, int | None]:
    """Runs the detector over a batch as if row by row; returns the new trace and the alarm-raising row.

    Classes are independent until the test pools them, so each class's rows are scanned on their own
    (``scan_class``), then the test runs at every ``check_every``-th query on the distances recorded by then.
    Every distance, threshold and ``W`` is the one a row-by-row scan computes, bit for bit.
    """
    members = {label: np.flatnonzero(labels == label) for label in dict.fromkeys(labels.tolist())}
    growing_sets, thresholds = dict(trace.growing_sets), dict(trace.thresholds)
    set_distances, distances = dict(trace.set_distances), dict(trace.distances)
    recorded_at = {}
    for label, indices in members.items():
        scan = scan_class(
            rows[indices],
            growing_sets.get(label),
            set_distances.get(label, ()),
            thresholds.get(label, 0.0),
        )
        if len(scan.joined):
            joined, old = rows[indices[scan.joined]], growing_sets.get(label)
            growing_sets[label] = joined if old is None else np.concatenate([old, joined])
        set_distances[label], thresholds[label] = scan.set_distances, scan.threshold
        distances[label] = distances.get(label, ()) + tuple(scan.distances.tolist())
        recorded_at[label] = indices[scan.recorded]
    min_w, alarm, alarm_row = trace.min_shapiro_w, trace.alarm, None
    for index, w in pooled_checks(trace, distances, recorded_at, len(rows), check_every, min_distances):
        min_w = min(min_w, w)
        if alarm is None and w < delta:
            queries = trace.queries + index + 1
            alarm, alarm_row = Alarm(queries, w, {**counts, client: queries}), index
    new_trace = ClientTrace(
        growing_sets=growing_sets,
        set_distances=set_distances,
        thresholds=thresholds,
        distances=distances,
        queries=trace.queries + len(rows),
        min_shapiro_w=min_w,
        alarm=alarm,
    )
    return new_trace, alarm_row


class ClassScan(NamedTuple):
    """One class's rows of a batch, scanned: the rows that joined its set (positions among the class's rows,
    in order), the distance recorded for each row but a class's very first, and the set's distances and
    threshold after the batch."""

    joined: np.ndarray
    recorded: np.ndarray
    distances: np.ndarray
    set_distances: tuple[float, ...]
    threshold: float


def scan_class(
    class_rows: np.ndarray, known: np.ndarray | None, set_distances: tuple[float, ...], threshold: float
) -> ClassScan:
    """The detector's pass over one class's rows in order, ``known`` its set before them (None: none yet).

    Rows are taken as distinct values: an exact repeat of an earlier row never joins the set (its distance is
    0 if that row joined, else at most that row's, which the threshold, never falling, already reached), so
    only first occurrences are scanned one by one. When one joins, its squared distances to the distinct rows
    still to come lower their running minima; a repeat's distance is its distinct row's running minimum as
    it stood when the repeat came. Each is the minimum over the same squared distances, summed in the same
    order, that a row-by-row scan takes, so every distance is bit for bit the same.
    """
    first, occurrence = distinct_rows(class_rows, np.float64)
    values = class_rows[first]
    last = np.zeros(len(values), np.int64)
    np.maximum.at(last, occurrence, np.arange(len(class_rows)))
    # The distinct rows from reach[k] on include every one seen after distinct row k first came.
    reach = np.searchsorted(np.maximum.accumulate(last), first, side="right")
    nearest = np.full(len(values), np.inf) if known is None else squared_distances_to_set(known, values)
    repeated = np.flatnonzero(np.bincount(occurrence, minlength=len(values)) > 1)
    # The repeated rows' running minima after 0, 1, 2, ... joins: (joins + 1) x repeated floats in all.
    snapshots = [nearest[repeated]]
    set_values = Buffer(set_distances, len(values) + 1)
    joins, first_distances = [], np.full(len(values), np.nan)
    pairwise = None
    if len(values) ** 2 * values.shape[1] <= PAIRWISE_ELEMENTS:  # few distinct rows: all pairs at once
        pairwise = np.add.reduce((values[:, None, :] - values[None, :, :]) ** 2, axis=2)
    for value, low in enumerate(reach.tolist()):
        if known is None and value == 0:
            set_values, threshold = Buffer((0.0,), len(values)), 0.0
        else:
            distance = math.sqrt(nearest[value])
            first_distances[value] = distance
            if not distance > threshold:
                continue
            set_values.append(distance)
            mean, std = _mean_and_std(set_values.values())
            threshold = max(threshold, mean - std)
        if pairwise is None:
            later = np.add.reduce((values[value] - values[low:]) ** 2, axis=1)
        else:
            later = pairwise[value, low:]
        np.minimum(nearest[low:], later, out=nearest[low:])
        joins.append(value)
        if len(repeated):
            snapshots.append(nearest[repeated])
    row_distances = _row_distances(first, occurrence, first_distances, first[joins], snapshots, repeated)
    recorded = np.arange(1 if known is None else 0, len(class_rows))
    return ClassScan(
        joined=first[joins],
        recorded=recorded,
        distances=row_distances[recorded],
        set_distances=set_values.as_tuple(),
        threshold=threshold,
    )


def _row_distances(first, occurrence, first_distances, join_positions, snapshots, repeated) -> np.ndarray:
    """Every row's distance: a first occurrence's as scanned; a repeat's from its distinct row's running
    minimum after the joins that came before it."""
    distances = np.empty(len(occurrence))
    distances[first] = first_distances
    is_repeat = np.ones(len(occurrence), bool)
    is_repeat[first] = False
    repeats = np.flatnonzero(is_repeat)
    if len(repeats):
        column = np.empty(len(first_distances), np.int64)
        column[repeated] = np.arange(len(repeated))
        joins_before = np.searchsorted(join_positions, repeats)
        distances[repeats] = np.sqrt(np.stack(snapshots)[joins_before, column[occurrence[repeats]]])
    return distances


# Rows whose differences to a class set are taken together: bounds the (rows, set, features) block's size.
DISTANCE_BLOCK_ELEMENTS = 1 << 22
# Up to this many (distinct rows)^2 x features, a class's distinct rows' distances to each other are taken
# at once rather than from each joining row to the later ones (the same sums, in the same order).
PAIRWISE_ELEMENTS = 1 << 20


def squared_distances_to_set(known: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Each row's smallest squared L2 distance to the rows of ``known``."""
    nearest = np.empty(len(rows))
    block = max(1, DISTANCE_BLOCK_ELEMENTS // max(1, known.size))
    for start in range(0, len(rows), block):
        differences = known[None, :, :] - rows[start : start + block][:, None, :]
        nearest[start : start + block] = np.min(np.sum(differences**2, axis=2), axis=1)
    return nearest


def pooled_checks(
    trace: ClientTrace,
    distances: Mapping[int, tuple[float, ...]],
    recorded_at: Mapping[int, np.ndarray],
    batch_size: int,
    check_every: int,
    min_distances: int,
):
    """``(row, W)`` for each test in the batch that had enough distances: at every ``check_every``-th query,
    the distances each class had recorded by then, pooled in the classes' order."""
    checks = np.arange((-trace.queries - 1) % check_every, batch_size, check_every)
    pools = [np.asarray(values, np.float64) for values in distances.values()]
    sizes = np.zeros((len(checks), len(pools)), np.int64)  # each class's distances at each test
    for column, (label, values) in enumerate(distances.items()):
        batch_rows = recorded_at.get(label, np.empty(0, np.int64))
        sizes[:, column] = len(values) - len(batch_rows) + np.searchsorted(batch_rows, checks, "right")
    sizes[sizes < MIN_CLASS_DISTANCES] = 0
    testable = sizes.sum(axis=1) > min_distances  # else too few distances even before outliers go
    for index, sizes_then in zip(checks[testable].tolist(), sizes[testable].tolist(), strict=True):
        pooled = np.concatenate([pool[:size] for pool, size in zip(pools, sizes_then, strict=True) if size])
        w = pooled_shapiro_w(pooled, min_distances)
        if w is not None:
            yield index, w


def _mean_and_std(values: np.ndarray) -> tuple[float, float]:
    """``values.mean()`` and ``values.std()``, bit for bit (the same sums numpy takes), without the wrappers'
    per-call cost."""
    mean = np.add.reduce(values) / len(values)
    centred = values - mean
    return float(mean), math.sqrt(np.add.reduce(centred * centred) / len(values))


class Buffer:
    """A growing float64 sequence with room for ``extra`` more values, viewed as an array without copies."""

    __slots__ = ("_data", "_size")

    def __init__(self, values, extra: int):
        self._size = len(values)
        self._data = np.empty(self._size + extra, np.float64)
        self._data[: self._size] = values

    def append(self, value: float) -> None:
        self._data[self._size] = value
        self._size += 1

    def values(self) -> np.ndarray:
        return self._data[: self._size]

    def as_tuple(self) -> tuple[float, ...]:
        return tuple(self.values().tolist())


@functools.cache
def _shapiro_routines():
    """scipy's Shapiro-Wilk test, unwrapped, and the routine it calls (Royston's AS R94), whose coefficients
    can then be kept per size; ``None`` for the routine on another scipy layout (the public test computes the
    same W). Imported on first use: scipy.stats costs a fresh process about a second."""
    from scipy import stats

    # scipy's axis and NaN-policy wrapper costs four times the test on these samples, which are already 1-D
    # finite float64 arrays; the function it wraps computes the same W.
    shapiro = getattr(stats.shapiro, "__wrapped__", stats.shapiro)
    try:
        from scipy.stats._ansari_swilk_statistics import swilk
    except ImportError:  # pragma: no cover - another scipy layout
        swilk = None
    return shapiro, swilk


def pooled_shapiro_w(values: np.ndarray, min_distances: int) -> float | None:
    """W of pooled distances after 3-sigma outlier removal; None while too few remain to test."""
    mean = np.add.reduce(values) / len(values)
    centred = values - mean  # _mean_and_std's steps, the centred values kept for the outliers' test
    std = math.sqrt(np.add.reduce(centred * centred) / len(values))
    kept = values[np.abs(centred) < OUTLIER_SIGMAS * std]
    if len(kept) <= min_distances:
        return None
    swilk = _shapiro_routines()[1]
    if swilk is None:
        return _public_shapiro_w(kept)
    middle = kept[len(kept) // 2]  # scipy's shapiro centres the sorted sample on this, taken before sorting
    kept.sort()
    if kept[0] == kept[-1]:
        return None
    kept -= middle
    w, _, _ = swilk(kept, shapiro_coefficients(len(kept)), 1)
    return float(w)


@functools.lru_cache(maxsize=1024)
def shapiro_coefficients(size: int) -> np.ndarray:
    """Royston's coefficients for a sample of ``size``, as scipy's shapiro computes them on every call (they
    depend on the size alone; reused, they give the same W bit for bit). ``size // 2`` floats each: the
    cache holds at most 1024 sizes, 8 MiB for samples of 2000."""
    coefficients = np.zeros(size // 2)
    _shapiro_routines()[1](np.arange(size, dtype=np.float64), coefficients, 0)
    return coefficients


def _public_shapiro_w(kept: np.ndarray) -> float | None:
    if kept.max() == kept.min():
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # scipy's p-value warning past 5000 samples; W is fine
        return float(_shapiro_routines()[0](kept).statistic)


def detection_report(
    traces: Mapping[str, ClientTrace], attackers: tuple[str, ...], benign: tuple[str, ...]
) -> dict:
    """PRADA's metrics: detection, queries to detection, false-positive rate, smallest W per side."""
    alarms = [traces[name].alarm for name in attackers if name in traces and traces[name].alarm is not None]
    first = min(alarms, key=lambda alarm: sum(alarm.counts.values()), default=None)
    benign_alarmed = [name for name in benign if name in traces and traces[name].alarm is not None]

    def smallest_w(names):
        seen = [traces[name].min_shapiro_w for name in names if name in traces]
        smallest = min(seen, default=math.inf)
        return None if math.isinf(smallest) else smallest

    return {
        "detected": first is not None,
        "queries_to_detection": None
        if first is None
        else sum(first.counts.get(name, 0) for name in attackers),
        "false_positive_rate": len(benign_alarmed) / len(benign) if benign else None,
        "prada_min_w_attack": smallest_w(attackers),
        "prada_min_w_benign": smallest_w(benign),
    }


def _is_number(value, *, above=None, at_least=None, below=None, at_most=None) -> bool:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return False
    return (
        (above is None or value > above)
        and (at_least is None or value >= at_least)
        and (below is None or value < below)
        and (at_most is None or value <= at_most)
    )
