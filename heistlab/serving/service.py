"""The served model: ``heistlab.api.PredictionAPI`` behind one lock, with quotas, rate limits and monitoring.

Every prediction goes through ``ServingCore.predict``, which holds one lock from admission to answer:

1. the admission defenses decide on the real clock (``throttle.server_admission``: the key's quota with
   ``defenses.budget``, its ledger seeded from the audit log; ``defenses.rate_limit``; any other ``admit``);
2. the prediction API validates, runs the victim and the defense chain (one state, the key id as client);
3. only then is the admission state committed, so a refused or failed batch costs nothing;
4. the defense chain's ``report`` (PRADA or any detector) is read for the key; alarms go to the audit log.

One lock makes every budget exact however many requests arrive at once, and keeps the defense state's
sequence the same as in-process (same queries in the same order give the same answers).

With several worker processes (``serve.workers``), step 1 is ``shared.SharedAdmission``: the quota and rate
limit are decided and committed in one SQLite transaction shared by every worker (exact across processes),
and refunded if the answer then fails. Steps 2 and 4 run inside one transaction of
``shared_defense.DefenseStateStore`` when the defense chain has state: each worker continues from the newest
shared state (PRADA's histories, the batch count that draws each batch's key, the alarms already raised), so
a detector sees each key's whole stream, whichever worker serves it, and raises each alarm once.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Collection, Iterable, Sequence
from typing import NamedTuple

import jax
import numpy as np

from heistlab.api import PredictionAPI, QueryRefused
from heistlab.defenses.base import Defense, Evidence, Request, State
from heistlab.serving.audit import AuditLog
from heistlab.serving.shared import SharedAdmission
from heistlab.serving.shared_defense import DefenseStateStore, ServingState
from heistlab.serving.throttle import real_clock_verdict, server_admission
from heistlab.victims import Victim

log = logging.getLogger("heistlab.serving")
ALARM_WORDS = ("alarm", "detect", "flag")


class RaisedAlarm(NamedTuple):
    name: str
    value: object
    report: dict


class Call(NamedTuple):
    """One prediction request as ``ServingCore.predict`` takes it."""

    key_id: str
    inputs: np.ndarray
    output: str


class Served(NamedTuple):
    answers: np.ndarray
    output: str
    remaining: int | None


def client_view(probs: np.ndarray, output: str, top_k: int) -> np.ndarray:
    """What a client receives: probabilities, the ``top_k`` largest scores (zeros elsewhere) or int32 labels.

    The same views as ``PredictionAPI`` with ``output`` set, chosen per request by the key's role.
    """
    if output == "labels":
        return probs.argmax(axis=-1).astype(np.int32)
    if output == "top_k":
        kept = np.argsort(-probs, axis=-1, kind="stable")[:, :top_k]
        view = np.zeros_like(probs)
        np.put_along_axis(view, kept, np.take_along_axis(probs, kept, axis=-1), axis=-1)
        return view
    return probs


def alarms_in(report: dict) -> dict:
    """The entries of a defense report that raise an alarm: true flags named like an alarm or a detection
    (PRADA's ``detected``); the rest of the report is kept beside the alarm as its detail."""
    return {
        name: bool(value)
        for name, value in report.items()
        if isinstance(value, bool | np.bool_) and value and any(word in name.lower() for word in ALARM_WORDS)
    }


def report_numbers(report: dict) -> dict[str, float]:
    """The finite numbers and flags (as 0 or 1) of a defense report, by name; everything else dropped."""
    numbers = {}
    for name, value in report.items():
        number = isinstance(value, bool | np.bool_ | int | float | np.integer | np.floating)
        if number and np.isfinite(float(value)):
            numbers[str(name)] = float(value)
    return numbers


def _unavailable(what: str) -> Callable[[np.ndarray], np.ndarray]:
    def labels(inputs: np.ndarray) -> np.ndarray:
        raise LookupError(f"a live server has no {what}")

    return labels


def online_evidence(key_id: str, victim_labels: Callable[[np.ndarray], np.ndarray]) -> Evidence:
    """Evidence for reading a detector online about one key: the key is the suspect, no models are stolen."""
    return Evidence(
        surrogate_labels=_unavailable("stolen model"),
        independent_labels=_unavailable("independently trained model"),
        victim_labels=victim_labels,
        attackers=(key_id,),
        benign=(),
    )


class ServingCore:
    """The defended victim as one server process serves it (thread-safe; see the module docstring).

    quota: the most input rows one key is ever served (None: unlimited), enforced by ``admission``; ``spent``
    seeds the count of rows each key was served. admission, admission_state: a defense whose ``admit`` runs on
    ``clock`` (real seconds) before each batch, and its state (None: admit everything).
    top_k: how many scores the ``top_k`` output keeps. monitor_every: read the defense report for a key
    after every this many of its served requests (0: never). shared, defense_store: the quota, rate limit and
    defense state shared by the workers of ``serve.workers`` (None: this process's own).
    """

    def __init__(
        self,
        api: PredictionAPI,
        *,
        defense: Defense,
        audit: AuditLog,
        top_k: int = 3,
        quota: int | None = None,
        admission: Defense | None = None,
        admission_state: State = None,
        spent: dict[str, int] | None = None,
        monitor_every: int = 1,
        victim_labels: Callable[[np.ndarray], np.ndarray] | None = None,
        clock: Callable[[], float] = time.monotonic,
        shared: SharedAdmission | None = None,
        defense_store: DefenseStateStore | None = None,
    ):
        if quota is not None and (isinstance(quota, bool) or not isinstance(quota, int) or quota < 0):
            raise ValueError(f"quota must be a non-negative integer or null, got {quota!r}")
        if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= api.num_classes:
            raise ValueError(f"top_k must be an integer in [1, {api.num_classes}], got {top_k!r}")
        if isinstance(monitor_every, bool) or not isinstance(monitor_every, int) or monitor_every < 0:
            raise ValueError(f"monitor_every must be an integer >= 0, got {monitor_every!r}")
        if admission is not None and admission.admit is None:
            raise ValueError("admission must be a defense with an admit part (a quota or rate limit)")
        if admission is not None and shared is not None:
            raise ValueError("admission and shared are exclusive: shared admission decides for every worker")
        if defense_store is not None and shared is None:
            raise ValueError("defense_store is the workers' shared defense state: it needs shared admission")
        self.api, self.audit, self.top_k, self.quota = api, audit, top_k, quota
        self.admission, self.clock, self.monitor_every = admission, clock, monitor_every
        self._admission_state = admission_state
        self._reports = defense.report is not None and monitor_every > 0
        self._victim_labels = victim_labels or _unavailable("victim labels")
        self._served: dict[str, int] = dict(spent or {})
        self._requests: dict[str, int] = {}
        self._raised: set[tuple[str, str]] = set()
        self._statistics: dict[str, dict[str, float]] = {}
        self._report_failed = False
        self._lock = threading.Lock()
        self.shared, self.defense_store = shared, defense_store

    def remaining(self, key_id: str) -> int | None:
        if self.shared is not None:
            return self.shared.remaining(key_id)
        return None if self.quota is None else max(0, self.quota - self._served.get(key_id, 0))

    def served(self, key_id: str) -> int:
        return self._served.get(key_id, 0)

    def statistics(self) -> dict[str, dict[str, float]]:
        """The numbers of the defense report last read for each key in this process (PRADA's minimum W,
        ``detected``, a watermark's counters...): what ``heistlab.serving.metrics`` exports."""
        return dict(self._statistics)

    def predict(self, key_id: str, inputs: np.ndarray, output: str) -> Served:
        """Answers a validated batch for ``key_id``; ``QueryRefused`` (with a retry_after) if not admitted."""
        rows = len(inputs)
        if self.shared is not None:
            return self._predict_shared(key_id, inputs, output)
        with self._lock:
            admission_state = self._admission_state
            if self.admission is not None:
                request = Request(key_id, rows, self.clock())
                verdict, admission_state = self.admission.admit(self._admission_state, request)
                verdict = real_clock_verdict(verdict)
                if not verdict.admitted:
                    raise QueryRefused(key_id, rows, self.remaining(key_id), verdict.reason, verdict.delay)
            try:
                probs = self.api.query(inputs, client=key_id)
            finally:
                self.api.records.clear()  # the audit log keeps the record; a server must not grow without end
            self._admission_state = admission_state
            self._served[key_id] = self._served.get(key_id, 0) + rows
            self._after_answer(key_id)
            return Served(client_view(np.asarray(probs), output, self.top_k), output, self.remaining(key_id))

    def serve_in_turn(self, calls: Sequence[Call]) -> list[Served | Exception]:
        """Serves ``calls`` one after another in the order given, each exactly as ``predict`` serves it alone
        (its own admission, budget, defense-state update and refusal); one outcome per call, its answer or
        the exception it raised. What ``heistlab.serving.batching.Coalescer`` runs for a batch."""
        outcomes: list[Served | Exception] = []
        for call in calls:
            try:
                outcomes.append(self.predict(call.key_id, call.inputs, call.output))
            except Exception as error:
                outcomes.append(error)
        return outcomes

    def _predict_shared(self, key_id: str, inputs: np.ndarray, output: str) -> Served:
        """``predict`` with the admission committed first in the workers' store, refunded on failure, and the
        defense run on the workers' shared state when it has one."""
        rows = len(inputs)
        verdict, remaining = self.shared.admit(key_id, rows, self.clock())
        if not verdict.admitted:
            raise QueryRefused(key_id, rows, remaining, verdict.reason, verdict.delay)
        with self._lock:
            try:
                if self.defense_store is None:
                    probs = self.api.query(inputs, client=key_id)
                    alarms = self._count_request(key_id)
                else:
                    probs, alarms = self.defense_store.update(
                        lambda state: self._answer_in_turn(state, key_id, inputs)
                    )
            except BaseException:
                self.shared.refund(key_id, rows)
                raise
            finally:
                self.api.records.clear()
            self._served[key_id] = self._served.get(key_id, 0) + rows
        self._record_alarms(key_id, alarms)
        return Served(client_view(np.asarray(probs), output, self.top_k), output, remaining)

    def _answer_in_turn(
        self, state: ServingState, key_id: str, inputs: np.ndarray
    ) -> tuple[tuple[np.ndarray, list[RaisedAlarm]], ServingState]:
        """Answers from the workers' newest shared state; the answer, new alarms and the next shared state."""
        self.api.restore_defense_state(state.defense, state.batches)
        probs = self.api.query(inputs, client=key_id)
        defense_state, batches = self.api.defense_state()
        requests = state.requests.get(key_id, 0) + 1
        raised = tuple(state.raised.get(key_id, ()))
        alarms = self._new_alarms(key_id, requests, raised)
        next_state = ServingState(
            defense=defense_state,
            batches=batches,
            requests={**state.requests, key_id: requests},
            raised={**state.raised, key_id: raised + tuple(alarm.name for alarm in alarms)}
            if alarms
            else state.raised,
        )
        return (probs, alarms), next_state

    def _after_answer(self, key_id: str) -> None:
        self._record_alarms(key_id, self._count_request(key_id))

    def _count_request(self, key_id: str) -> list[RaisedAlarm]:
        """Counts a served request of ``key_id`` in this process; the alarms it raises for the first time."""
        self._requests[key_id] = self._requests.get(key_id, 0) + 1
        raised = {name for key, name in self._raised if key == key_id}
        alarms = self._new_alarms(key_id, self._requests[key_id], raised)
        self._raised.update((key_id, alarm.name) for alarm in alarms)
        return alarms

    def _new_alarms(self, key_id: str, requests: int, raised: Collection[str]) -> list[RaisedAlarm]:
        """The alarms the defense report raises for ``key_id`` after its ``requests``-th served request (read
        every ``monitor_every`` of them), less those already ``raised``."""
        if not self._reports or requests % self.monitor_every != 0:
            return []
        try:
            report = self.api.report(online_evidence(key_id, self._victim_labels))
        except Exception as error:
            if not self._report_failed:
                log.warning("the defense report cannot be read online (%s); alarms are off", error)
            self._report_failed = True
            return []
        self._statistics[key_id] = report_numbers(report)
        return [
            RaisedAlarm(name, value, report)
            for name, value in alarms_in(report).items()
            if name not in raised
        ]

    def _record_alarms(self, key_id: str, alarms: list[RaisedAlarm]) -> None:
        for alarm in alarms:
            log.warning("alarm %s=%r for key %s", alarm.name, alarm.value, key_id)
            self.audit.record_alarm(key_id, alarm.name, alarm.value, alarm.report)


def build_core(
    victim: Victim,
    defense: Defense,
    *,
    audit: AuditLog,
    seed: int = 0,
    top_k: int = 3,
    quota: int | None = None,
    rate: float | None = None,
    burst: int | None = None,
    extra_admission: Iterable[Defense] = (),
    max_batch: int | None = 256,
    input_range: tuple[float, float] = (0.0, 1.0),
    monitor_every: int = 1,
    clock: Callable[[], float] = time.monotonic,
    shared: SharedAdmission | None = None,
    defense_store: DefenseStateStore | None = None,
    key_stream: int | None = None,
) -> ServingCore:
    """A ``ServingCore`` for ``victim`` behind ``defense``, its quota ledger seeded from ``audit``.

    The prediction API is built as in-process experiments build it (``key=jax.random.key(seed)``), serving
    probabilities; each request's view (labels, top-k, probabilities) is cut from them by the key's role.
    shared: the workers' shared quota and rate limit (``serve.workers`` > 1), in place of ``quota``, ``rate``
    and ``burst`` here; ``extra_admission`` cannot be shared and is refused with it.
    defense_store: the workers' shared defense state (``serve.workers`` > 1 and a stateful chain).
    key_stream: a worker's index when its chain is not shared (stateless): folded into the API's key, so
    that no two workers draw the same batch keys (None: the key of an in-process experiment).
    """
    extra_admission = list(extra_admission)
    if shared is not None and extra_admission:
        raise ValueError(
            "serve.extra_admission keeps its state in one process; with serve.workers > 1 only serve.quota, "
            "serve.rate and serve.burst are shared: leave serve.extra_admission empty or use one worker"
        )
    if defense.admit is not None:
        log.warning(
            "the defense's admission runs inside the prediction API on its simulated clock: its refusals "
            "answer 429, its delays are not waited; real-clock limits belong in serve.rate / extra_admission"
        )
    api = PredictionAPI(
        victim,
        defense,
        key=jax.random.key(seed)
        if key_stream is None
        else jax.random.fold_in(jax.random.key(seed), key_stream),
        budget=None,
        output="probabilities",
        input_range=input_range,
        max_batch=max_batch,
    )
    spent = audit.served_rows()
    if shared is None:
        admission, admission_state = server_admission(quota, rate, burst, spent, extra_admission)
    else:
        admission, admission_state = None, None
    return ServingCore(
        api,
        defense=defense,
        audit=audit,
        top_k=top_k,
        quota=quota,
        admission=admission,
        admission_state=admission_state,
        spent=spent,
        monitor_every=monitor_every,
        victim_labels=lambda x: victim.predict_proba(x).argmax(axis=-1),
        clock=clock,
        shared=shared,
        defense_store=defense_store,
    )
