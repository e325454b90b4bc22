"""Adaptive batching of concurrent predictions: requests that arrive while a batch is being served wait and
are served together next, in one trip to a worker thread, in their arrival order.

As dedicated model servers batch (Clipper, Crankshaw et al., NSDI 2017; Triton's dynamic batcher), but with
no wait window: a request that finds the server idle is served at once, and a batch is whatever arrived
while the one before it ran, at most ``max_batch`` requests. Under load the per-request costs of handing work
to a thread (a hop to the event loop's default executor, a lock, a wake-up) are paid once per batch. The
server coalesces its predictions and its audit rows (a group commit: ``AuditLog.record_in_turn``) this way.

Nothing about each request's fate is shared: ``serve_in_turn`` gets the calls in arrival order and returns one
outcome per call (its answer, or the exception it raised), so each request keeps its own admission, budget,
defense-state update and refusal, exactly as if the requests had been served one after another.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

Call = TypeVar("Call")
Answer = TypeVar("Answer")


class Coalescer(Generic[Call, Answer]):
    """Serves calls submitted on one event loop in batches of those that arrived while the last batch ran.

    serve_in_turn: serves a batch of calls in the order given (on a worker thread); one outcome per call, an
        answer or the exception that call raised. max_batch: the most calls in one batch.
    """

    def __init__(
        self,
        serve_in_turn: Callable[[Sequence[Call]], Sequence[Answer | BaseException]],
        *,
        max_batch: int = 64,
    ):
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise ValueError(f"max_batch must be an integer >= 1, got {max_batch!r}")
        self._serve_in_turn, self.max_batch = serve_in_turn, max_batch
        self._waiting: list[tuple[Call, asyncio.Future]] = []
        self._serving = False
        self._server: asyncio.Task | None = None
        self.batches = self.calls = 0

    async def submit(self, call: Call) -> Answer:
        """The answer to ``call`` once its batch is served; raises what serving it raised."""
        answer = asyncio.get_running_loop().create_future()
        self._waiting.append((call, answer))
        if not self._serving:
            self._serving = True
            self._server = asyncio.get_running_loop().create_task(
                self._serve_waiting()
            )  # kept: not collected
        return await answer

    async def _serve_waiting(self) -> None:
        try:
            while self._waiting:
                batch, self._waiting = self._waiting[: self.max_batch], self._waiting[self.max_batch :]
                self.batches, self.calls = self.batches + 1, self.calls + len(batch)
                try:
                    calls = [call for call, _ in batch]
                    loop = asyncio.get_running_loop()
                    outcomes = await loop.run_in_executor(None, self._serve_in_turn, calls)
                    if len(outcomes) != len(batch):
                        raise RuntimeError(
                            f"serve_in_turn gave {len(outcomes)} outcomes for {len(batch)} calls"
                        )
                except Exception as error:
                    outcomes = [error] * len(batch)
                for (_, answer), outcome in zip(batch, outcomes, strict=True):
                    if answer.done():  # its request was cancelled (the client went away)
                        continue
                    if isinstance(outcome, BaseException):
                        answer.set_exception(outcome)
                    else:
                        answer.set_result(outcome)
        finally:
            self._serving = False
