"""The prediction API: the only door to a victim model.

An attack holds an ``Oracle`` (one client's view of the API) and nothing else. The API validates every
query, enforces each client's query budget as a hard cap (a batch that would pass it is refused whole, never
served, and the caller is told by ``QueryRefused``), runs the defense chain over the victim's probabilities,
turns them into what the client may see (probabilities, top-k scores or labels), and records every query:
client, per-client sequence number, SHA-256 of the input, served or refused and why.

The API holds one defense state for all clients (defenses that track clients key their state by the client
name) and a simulated clock per client: admission control (rate limits, progressive delays) makes a client
wait simulated seconds before a batch is served, so "how long would stealing take" is measured, not slept.
"""

from __future__ import annotations

import bisect
import functools
import hashlib
import math
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from heistlab.defenses import Defense, Evidence, QueryContext, Request, identity
from heistlab.defenses.base import State
from heistlab.training import capacity_for, pad_rows
from heistlab.victims import Classifier, Victim

OUTPUT_KINDS = ("probabilities", "top_k", "labels")
# The largest batch the fused program serves in one call (the victim's own prediction chunk); larger
# batches take the victim's chunked path.
FUSED_MAX_ROWS = 4096
# The victim's smallest padded batch (``training.predict_proba`` pads to at least this many rows).
VICTIM_MIN_ROWS = 8


class InvalidQuery(ValueError):
    """A query the API cannot answer: wrong shape or dtype, NaN/inf, or values outside the input range."""


class QueryRefused(RuntimeError):
    """A well-formed query that the API declined to serve (for example, past the client's budget)."""

    def __init__(
        self, client: str, requested: int, remaining: int | None, reason: str, retry_after: float = 0.0
    ):
        self.client, self.requested, self.remaining, self.reason = client, requested, remaining, reason
        self.retry_after = retry_after
        super().__init__(
            f"client {client!r}: {requested} queries refused ({reason}); {remaining} left in its budget"
        )


class QueryRecord(NamedTuple):
    client: str
    sequence: int
    input_digest: str
    served: bool
    reason: str


class QueryLog(Sequence):
    """Every query row's ``QueryRecord``, in order, stored as one entry per batch.

    A batch's rows share client, outcome and consecutive sequence numbers, so the log keeps those once and
    the row digests as a list; records are built when read. It reads like a list of ``QueryRecord`` (index,
    slice, iterate, compare with a list) and ``clear()`` empties it.
    """

    def __init__(self):
        self._batches: list[tuple[str, int, list[str], bool, str]] = []
        self._ends: list[int] = []

    def add(self, client: str, first_sequence: int, digests: list[str], served: bool, reason: str) -> None:
        if digests:
            self._batches.append((client, first_sequence, digests, served, reason))
            self._ends.append(len(self) + len(digests))

    def clear(self) -> None:
        self._batches.clear()
        self._ends.clear()

    def __len__(self) -> int:
        return self._ends[-1] if self._ends else 0

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[position] for position in range(*index.indices(len(self)))]
        position = index + len(self) if index < 0 else index
        if not 0 <= position < len(self):
            raise IndexError(f"query log index {index} out of range for {len(self)} records")
        batch = bisect.bisect_right(self._ends, position)
        client, first, digests, served, reason = self._batches[batch]
        offset = position - (self._ends[batch] - len(digests))
        return QueryRecord(client, first + offset, digests[offset], served, reason)

    def __iter__(self) -> Iterator[QueryRecord]:
        for client, first, digests, served, reason in self._batches:
            for offset, digest in enumerate(digests):
                yield QueryRecord(client, first + offset, digest, served, reason)

    def __eq__(self, other) -> bool:
        if isinstance(other, QueryLog | list | tuple):
            return list(self) == list(other)
        return NotImplemented

    __hash__ = None

    def __repr__(self) -> str:
        return f"QueryLog({list(self)!r})"


_EMPTY_SHA256 = hashlib.sha256()


def row_digests(inputs: np.ndarray) -> list[str]:
    """SHA-256 of each row's bytes, over one contiguous copy of the batch.

    Each row's hash starts as a copy of one empty SHA-256 object: the same digest as ``hashlib.sha256(row)``,
    without setting up a new hash context per row (the most of a 256-byte row's cost).
    """
    batch = memoryview(np.ascontiguousarray(inputs).tobytes())
    size = len(batch) // len(inputs) if len(inputs) else 0
    digests = []
    for row in range(len(inputs)):
        sha256 = _EMPTY_SHA256.copy()
        sha256.update(batch[row * size : (row + 1) * size])
        digests.append(sha256.hexdigest())
    return digests


class PredictionAPI:
    """A defended victim behind per-client budgets, with every query recorded.

    victim: anything with ``predict_proba``, ``input_shape`` and ``num_classes`` (``victims.Classifier``): a
        built-in victim, or a Flax, ONNX or Python-function victim from ``heistlab.external_victims``.

    budget: the most queries (input rows) one client is served; ``None`` means unlimited.
    output: what clients receive: ``probabilities``, ``top_k`` (the k largest scores, zeros elsewhere) or
        ``labels`` (int32 class indices).
    """

    def __init__(
        self,
        victim: Classifier,
        defense: Defense,
        *,
        key: jax.Array,
        budget: int | None = None,
        output: str = "probabilities",
        top_k: int = 1,
        input_range: tuple[float, float] = (0.0, 1.0),
        max_batch: int | None = None,
    ):
        if output not in OUTPUT_KINDS:
            raise ValueError(f"api.output must be one of {', '.join(OUTPUT_KINDS)}; got {output!r}")
        if budget is not None and (not isinstance(budget, int) or budget < 0):
            raise ValueError(f"api.budget must be a non-negative integer or null, got {budget!r}")
        if not isinstance(top_k, int) or top_k < 1:
            raise ValueError(f"api.top_k must be an integer >= 1, got {top_k!r}")
        self._victim = victim
        self._defense = defense
        self._apply_defense = jax.jit(defense.apply)
        self._preprocess = jax.jit(defense.preprocess) if defense.preprocess is not None else None
        self._skips_victim = skips_victim(defense)
        self._key = key
        self.budget, self.output, self.top_k = budget, output, top_k
        self.input_range, self.max_batch = input_range, max_batch
        self.input_shape = tuple(victim.input_shape)
        self.num_classes = int(victim.num_classes)
        self.records = QueryLog()
        self._served: dict[str, int] = defaultdict(int)
        self._refused: dict[str, int] = defaultdict(int)
        self._clock: dict[str, float] = defaultdict(float)
        self._state = defense.init()
        self._batches = 0
        self._program = self._defense_program = None
        typed_key = isinstance(key, jax.Array) and jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)
        if isinstance(victim, Victim) and typed_key:
            # Keys cross into the compiled programs as their raw data: cheaper to pass than key arrays.
            self._key_data, self._key_impl = np.asarray(jax.random.key_data(key)), jax.random.key_impl(key)
            self._program = serving_program(victim, defense, self._key_impl)
            self._defense_program = defense_program(defense, self._key_impl)

    def served(self, client: str) -> int:
        return self._served[client]

    def refused(self, client: str) -> int:
        return self._refused[client]

    def remaining(self, client: str) -> int | None:
        return None if self.budget is None else self.budget - self._served[client]

    def simulated_seconds(self, client: str) -> float:
        """The client's simulated clock: the seconds of waiting its admitted batches were made to do."""
        return self._clock[client]

    def clients(self) -> list[str]:
        return sorted(set(self._served) | set(self._refused))

    def defense_state(self) -> tuple[State, int]:
        """The defense chain's state and the count of batches served (each batch's PRNG key folds it in)."""
        return self._state, self._batches

    def restore_defense_state(self, state: State, batches: int) -> None:
        """Continues from what ``defense_state`` returned, here or in another process serving the same API."""
        self._state, self._batches = state, batches

    def report(self, evidence: Evidence) -> dict:
        """The defense's own metrics (detections, watermark tests) from its state after the attack."""
        return {} if self._defense.report is None else self._defense.report(self._state, evidence)

    def query(self, inputs, client: str = "attacker") -> np.ndarray:
        """Answers a ``(batch, *input_shape)`` batch for ``client``; ``QueryRefused`` past its budget."""
        try:
            inputs = self.validate(inputs)
        except InvalidQuery:
            self._record(client, row_digests_or_blank(inputs), served=False, reason="invalid")
            raise
        remaining = self.remaining(client)
        if remaining is not None and len(inputs) > remaining:
            self._record(client, row_digests(inputs), served=False, reason="budget")
            raise QueryRefused(client, len(inputs), remaining, f"budget of {self.budget} queries")
        if self._defense.admit is not None:
            request = Request(client, len(inputs), self._clock[client], inputs)
            verdict, self._state = self._defense.admit(self._state, request)
            if not verdict.admitted:
                self._record(client, row_digests(inputs), served=False, reason=verdict.reason or "refused")
                raise QueryRefused(client, len(inputs), remaining, verdict.reason, verdict.delay)
            self._clock[client] += verdict.delay
        finish = self._serve(inputs, client)
        # The rows are digested while the compiled programs run (JAX dispatches them asynchronously), before
        # a host defense waits for their results.
        digests = row_digests(inputs)
        served = finish()
        self._record(client, digests, served=True, reason="")
        return self._client_view(np.asarray(served)[: len(inputs)])

    def oracle(self, client: str = "attacker", identities: int = 1) -> Oracle:
        """The handle an attack gets: a client's view of the API, and nothing else.

        With ``identities > 1`` the attacker is a Sybil: its queries are spread over the client names
        ``client-0 ... client-(n-1)``, each batch going to the identity with the most budget left, and the
        budget it sees is their sum.
        """
        return spread_oracle(self, identity_names(client, identities))

    def validate(self, inputs) -> np.ndarray:
        """Returns ``inputs`` as float32 or raises ``InvalidQuery`` naming what is wrong."""
        try:
            array = np.asarray(inputs)
        except (TypeError, ValueError) as error:
            raise InvalidQuery(f"inputs could not be read as an array: {error}") from None
        if array.dtype.kind != "f":
            raise InvalidQuery(f"inputs must be floating point, got dtype {array.dtype}")
        expected = ("batch", *self.input_shape)
        if array.ndim != len(expected) or tuple(array.shape[1:]) != self.input_shape:
            raise InvalidQuery(f"inputs must be shaped {expected}, got {tuple(array.shape)}")
        if len(array) == 0:
            raise InvalidQuery("inputs hold an empty batch")
        if self.max_batch is not None and len(array) > self.max_batch:
            raise InvalidQuery(f"batch of {len(array)} exceeds the maximum batch size {self.max_batch}")
        # A NaN anywhere makes the minimum NaN, an infinity makes an extreme infinite: two passes, not three.
        smallest, largest = float(array.min()), float(array.max())
        if not (math.isfinite(smallest) and math.isfinite(largest)):
            raise InvalidQuery("inputs contain NaN or infinite values")
        low, high = self.input_range
        if smallest < low or largest > high:
            raise InvalidQuery(
                f"inputs must lie in [{low}, {high}], got values in [{smallest:.4g}, {largest:.4g}]"
            )
        return array.astype(np.float32, copy=False)

    def _serve(self, inputs: np.ndarray, client: str) -> Callable[[], np.ndarray | jax.Array]:
        """Starts serving a batch; the function returned finishes it and gives the served probabilities
        (their first ``len(inputs)`` rows, maybe still being computed)."""
        if self._program is not None and len(inputs) <= FUSED_MAX_ROWS:
            return self._serve_fused(inputs, client)
        raw_probs = None
        if self._skips_victim:
            probs = np.full((len(inputs), self.num_classes), np.float32(1.0) / self.num_classes, np.float32)
        elif self._preprocess is None:
            probs = self._victim.predict_proba(inputs)
        else:
            raw_probs = self._victim.predict_proba(inputs)
            probs = self._victim.predict_proba(np.asarray(self._preprocess(inputs)))
        key = jax.random.fold_in(self._key, self._batches)
        self._batches += 1
        if self._defense.host:
            context = QueryContext(inputs, key, client, self._clock[client], raw_probs)
            served, self._state = self._defense.apply(probs, self._state, context)
        else:
            served = self._apply_padded(probs, inputs, raw_probs, key)
        served = np.asarray(served)
        return lambda: served

    def _serve_fused(self, inputs: np.ndarray, client: str) -> Callable[[], np.ndarray | jax.Array]:
        """Two compiled calls per batch, no host round trip between them: the victim (with preprocessing,
        padding and the batch key) in one program, the jitted defense on its device arrays in the next.
        They compute exactly what ``_serve``'s separate victim and defense calls compute: fusing the defense
        into the victim's program would let XLA round its arithmetic differently. A host defense runs when
        the returned function is called, so that the caller can work while the victim's program runs."""
        count = len(inputs)
        padded = np.zeros((capacity_for(count, minimum=1), *inputs.shape[1:]), np.float32)
        padded[:count] = inputs
        batch = np.uint32(self._batches)
        self._batches += 1
        params, key_data = self._victim.params, self._key_data
        probs, raw_probs, key_data = self._program(params, padded, np.int32(count), key_data, batch)
        if self._defense is identity():  # the undefended API: no second program to dispatch
            return lambda: probs
        if not self._defense.host:
            served, self._state = self._defense_program(probs, self._state, padded, key_data, raw_probs)
            return lambda: served
        return functools.partial(self._apply_host, inputs, client, probs, raw_probs, key_data)

    def _apply_host(self, inputs: np.ndarray, client: str, probs, raw_probs, key_data) -> np.ndarray:
        """Runs a host defense on the fused program's outputs, once they are computed."""
        count = len(inputs)
        raw_probs = None if raw_probs is None else np.asarray(raw_probs)[:count]
        key = jax.random.wrap_key_data(np.asarray(key_data), impl=self._key_impl)
        context = QueryContext(inputs, key, client, self._clock[client], raw_probs)
        served, self._state = self._defense.apply(np.asarray(probs)[:count], self._state, context)
        return np.asarray(served)

    def _apply_padded(self, probs, inputs, raw_probs, key) -> np.ndarray:
        """Runs a jitted (row-wise) defense on a power-of-two batch, so each bucket compiles once.

        Padding rows are uniform distributions and zero inputs; they are cut off before anything is served.
        """
        count = len(probs)
        capacity = capacity_for(count, minimum=1)
        uniform = np.full((capacity - count, probs.shape[1]), 1.0 / probs.shape[1], probs.dtype)
        padded_raw = None if raw_probs is None else np.concatenate([raw_probs, uniform])
        context = QueryContext(pad_rows(inputs, capacity), key, raw_probs=padded_raw)
        served, self._state = self._apply_defense(np.concatenate([probs, uniform]), self._state, context)
        return np.asarray(served)[:count]

    def _client_view(self, probs: np.ndarray) -> np.ndarray:
        if self.output == "labels":
            return probs.argmax(axis=-1).astype(np.int32)
        if self.output == "top_k":
            kept = np.argsort(-probs, axis=-1, kind="stable")[:, : self.top_k]
            view = np.zeros_like(probs)
            np.put_along_axis(view, kept, np.take_along_axis(probs, kept, axis=-1), axis=-1)
            return view
        return probs

    def _record(self, client: str, digests: list[str], served: bool, reason: str) -> None:
        self.records.add(client, self._served[client] + self._refused[client], digests, served, reason)
        (self._served if served else self._refused)[client] += len(digests)


def serving_program(victim: Victim, defense: Defense, key_impl) -> Callable:
    """The compiled path from a padded batch to what the defense takes, one program per power-of-two bucket:
    ``(probs, raw_probs, key_data)``. APIs around the same model share it (a sweep compiles it once).

    It repeats ``training.predict_proba`` (the victim on at least ``VICTIM_MIN_ROWS`` zero-padded rows) and
    ``PredictionAPI._apply_padded``'s padding (padding rows uniform distributions) and key (folded from the
    API key and the batch count), so the defense sees exactly what the separate calls gave it. For a defense
    that replaces the victim (``skips_victim``) it gives uniform rows and never evaluates the victim.
    """
    return _serving_program(victim.model, defense.preprocess, key_impl, skips_victim(defense))


def skips_victim(defense: Defense) -> bool:
    """Whether the API serves ``defense`` without running the victim: it replaces the victim's answers and
    no ``preprocess`` asks for them."""
    return defense.replaces_victim and defense.preprocess is None


@functools.lru_cache(maxsize=32)
def _serving_program(model, preprocess, key_impl, skip_victim: bool = False) -> Callable:

    def victim_probs(params, padded):
        rows = padded.shape[0]
        extra = max(VICTIM_MIN_ROWS, rows) - rows
        victim_rows = jnp.pad(padded, [(0, extra)] + [(0, 0)] * (padded.ndim - 1))
        return jax.nn.softmax(model.apply(params, victim_rows))[:rows]

    def probabilities(params, padded, count):
        real = (jnp.arange(padded.shape[0]) < count)[:, None]
        uniform_outside = lambda probs: jnp.where(real, probs, jnp.float32(1.0) / probs.shape[-1])
        if skip_victim:
            shape = jax.eval_shape(victim_probs, params, padded)
            return jnp.full(shape.shape, jnp.float32(1.0) / shape.shape[-1], shape.dtype), None
        if preprocess is None:
            return uniform_outside(victim_probs(params, padded)), None
        # One victim evaluation looped over both batches: inlined twice, XLA shares their broadcast constants
        # and compiles each copy into a slower program (on CPU 2.6x one evaluation, against 2x looped).
        both = jnp.stack([preprocess(padded), padded])
        probs, raw_probs = jax.lax.map(functools.partial(victim_probs, params), both)
        return uniform_outside(probs), uniform_outside(raw_probs)

    def program(params, padded, count, api_key_data, batch):
        probs, raw_probs = probabilities(params, padded, count)
        api_key = jax.random.wrap_key_data(api_key_data, impl=key_impl)
        return probs, raw_probs, jax.random.key_data(jax.random.fold_in(api_key, batch))

    return jax.jit(program)


def defense_program(defense: Defense, key_impl) -> Callable:
    """The jitted defense of ``PredictionAPI._apply_padded``, taking its batch key as raw key data. APIs
    around the same ``defense.apply`` (the attack's and the evaluation's in one run) share it."""
    return _defense_program(defense.apply, key_impl)


@functools.lru_cache(maxsize=32)
def _defense_program(apply: Callable, key_impl) -> Callable:

    def defense_apply(probs, state, padded, key_data, raw_probs):
        key = jax.random.wrap_key_data(key_data, impl=key_impl)
        return apply(probs, state, QueryContext(padded, key, raw_probs=raw_probs))

    return jax.jit(defense_apply)


def row_digests_or_blank(inputs) -> list[str]:
    """Digests of a malformed batch where they can be taken, else one digest of its raw representation."""
    try:
        array = np.asarray(inputs)
        if array.ndim >= 1 and len(array) > 0 and array.dtype != object:
            return row_digests(array)
    except (TypeError, ValueError):
        pass
    return [hashlib.sha256(repr(inputs).encode()).hexdigest()]


def identity_names(client: str, identities: int) -> tuple[str, ...]:
    """The client names of an attacker: ``(client,)``, or ``client-0 ... client-(n-1)`` for a Sybil."""
    if isinstance(identities, bool) or not isinstance(identities, int) or identities < 1:
        raise ValueError(f"identities must be an integer >= 1, got {identities!r}")
    return (client,) if identities == 1 else tuple(f"{client}-{index}" for index in range(identities))


def spread_oracle(api, names: tuple[str, ...]) -> Oracle:
    """An ``Oracle`` whose batches go to the identity in ``names`` with the most budget left (the least
    served when budgets are unlimited) and whose budget is their sum.

    ``api`` is anything with ``query(inputs, client)``, ``remaining(client)``, ``served(client)`` and the
    shape attributes: the in-process ``PredictionAPI`` or the remote ``heistlab.serving.client.RemoteAPI``.
    """

    def remaining() -> int | None:
        left = [api.remaining(name) for name in names]
        return None if left[0] is None else sum(left)

    def query(inputs):
        left = {name: api.remaining(name) for name in names}
        if left[names[0]] is None:
            return api.query(inputs, min(names, key=api.served))
        return api.query(inputs, max(names, key=left.__getitem__))

    return Oracle(query, remaining, api.input_shape, api.num_classes, api.output, names)


class Oracle:
    """One client's handle on a prediction API: ``query`` and the budget left, nothing more.

    Attacks receive only this. ``query(x)`` returns ``(batch, classes)`` probabilities (or top-k scores), or
    ``(batch,)`` int32 labels when ``output == 'labels'``, and raises ``QueryRefused`` past the budget.
    """

    __slots__ = ("_query", "_remaining", "clients", "input_shape", "num_classes", "output")

    def __init__(
        self,
        query: Callable[[np.ndarray], np.ndarray],
        remaining: Callable[[], int | None],
        input_shape: tuple[int, ...],
        num_classes: int,
        output: str,
        clients: tuple[str, ...] = ("attacker",),
    ):
        self._query, self._remaining = query, remaining
        self.input_shape, self.num_classes, self.output = input_shape, num_classes, output
        self.clients = clients

    def query(self, inputs: np.ndarray) -> np.ndarray:
        return self._query(inputs)

    @property
    def remaining(self) -> int | None:
        return self._remaining()

    def targets(self, answers: np.ndarray) -> np.ndarray:
        """Answers as training targets: label answers become one-hot rows, scores are renormalised."""
        if self.output == "labels":
            return np.eye(self.num_classes, dtype=np.float32)[answers]
        total = answers.sum(axis=-1, keepdims=True)
        return (answers / np.where(total > 0, total, 1.0)).astype(np.float32)
