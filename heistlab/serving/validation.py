"""The request schema of ``POST /v1/predict`` and its checks: a bad request gets a 4xx and a clear message.

A body is JSON ``{"inputs": [...], "output": "labels" | "top_k" | "probabilities" | null}``: ``inputs`` a
rectangular nested list of JSON numbers shaped ``(batch, *input_shape)``. Checked, in this order, before any
model runs:

- size: at most ``max_body_bytes`` (413), content type ``application/json`` (415), valid JSON (400; an
  integer literal past Python's 4,300-digit conversion limit is invalid JSON here too);
- structure: an object with ``inputs`` and optionally ``output``, nothing else (422);
- batch size: 1 to ``max_batch`` rows (422);
- dtype: numbers only, no strings, booleans or nulls (422);
- shape: ``(batch, *input_shape)`` (422);
- finiteness and range: no NaN or infinity, every value in ``input_range`` (422).

Valid inputs become a float32 array (JSON numbers of float32 inputs round-trip exactly).

Parsing a large body holds the GIL for its whole length (the C JSON scanner never lets go: about 90 ms for
4 MB of numbers here), so ``BodyParser`` parses bodies over ``in_thread_bytes`` in a worker process, where
the server's event loop cannot feel it; smaller ones are parsed in a thread.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import multiprocessing
import threading
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Literal, NamedTuple

import numpy as np
from pydantic import BaseModel, Field

OUTPUT_KINDS = ("probabilities", "top_k", "labels")
JSON_TYPES = ("application/json",)


class BadRequest(Exception):
    """A request the server will not answer: ``status`` is the 4xx code, ``code`` a short error name."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message

    def __reduce__(self):  # raised in a parsing process, re-raised in the server
        return BadRequest, (self.status, self.code, self.message)


class InputSchema(NamedTuple):
    """What a valid prediction request looks like for one served model."""

    input_shape: tuple[int, ...]
    input_range: tuple[float, float] = (0.0, 1.0)
    max_batch: int = 256
    max_body_bytes: int = 4 * 2**20


class PredictRequest(NamedTuple):
    inputs: np.ndarray
    output: str | None


def input_schema(
    input_shape,
    input_range=(0.0, 1.0),
    max_batch: int = 256,
    max_body_bytes: int = 4 * 2**20,
) -> InputSchema:
    """Validates the schema's own parameters, naming the bad one."""
    shape = tuple(input_shape)
    if not shape or not all(isinstance(size, int) and size >= 1 for size in shape):
        raise ValueError(f"input_shape must be a tuple of positive ints, got {input_shape!r}")
    low, high = (float(value) for value in input_range)
    if not (math.isfinite(low) and math.isfinite(high) and low < high):
        raise ValueError(f"input_range must be two finite numbers, low < high; got {input_range!r}")
    if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
        raise ValueError(f"max_batch must be an integer >= 1, got {max_batch!r}")
    if isinstance(max_body_bytes, bool) or not isinstance(max_body_bytes, int) or max_body_bytes < 1024:
        raise ValueError(f"max_body_bytes must be an integer >= 1024, got {max_body_bytes!r}")
    return InputSchema(shape, (low, high), max_batch, max_body_bytes)


def check_body_size(declared_length: str | None, max_body_bytes: int) -> None:
    """Refuses a body whose declared Content-Length is over the limit before reading it (413)."""
    if declared_length is None:
        return
    try:
        length = int(declared_length)
    except ValueError:
        raise BadRequest(400, "invalid_request", "Content-Length must be an integer") from None
    if length > max_body_bytes:
        raise BadRequest(
            413, "body_too_large", f"body of {length} bytes exceeds the limit of {max_body_bytes}"
        )


def check_json_content_type(content_type: str | None) -> None:
    media_type = (content_type or "").split(";")[0].strip().lower()
    if media_type not in JSON_TYPES:
        raise BadRequest(415, "unsupported_media_type", f"body must be application/json, got {media_type!r}")


def parse_json(body: bytes) -> Any:
    """The JSON document in ``body``, which must be UTF-8 (RFC 8259), or ``BadRequest(400)``."""
    try:
        return json.loads(body.decode("utf-8"))
    except UnicodeDecodeError:
        raise BadRequest(400, "invalid_json", "body is not UTF-8 text") from None
    except json.JSONDecodeError as error:
        raise BadRequest(400, "invalid_json", f"body is not valid JSON: {error.msg} at {error.pos}") from None
    except RecursionError:
        raise BadRequest(400, "invalid_json", "body nests JSON too deeply") from None
    except ValueError as error:  # an integer literal past sys.get_int_max_str_digits() (4300 by default)
        raise BadRequest(400, "invalid_json", f"body is not valid JSON: {error_summary(error)}") from None


def error_summary(error: ValueError) -> str:
    """The first clause of ``error``'s message, without the advice meant for the server's programmer."""
    return str(error).split(";", 1)[0][:200]


def _invalid(message: str) -> BadRequest:
    return BadRequest(422, "invalid_input", message)


def check_inputs(inputs: Any, schema: InputSchema) -> np.ndarray:
    """The float32 array of a decoded ``inputs`` value, or ``BadRequest(422)`` naming what is wrong."""
    expected = ("batch", *schema.input_shape)
    if not isinstance(inputs, list):
        raise _invalid(f"inputs must be a list of rows shaped {expected}, got {type(inputs).__name__}")
    if not inputs:
        raise _invalid("inputs hold an empty batch")
    if len(inputs) > schema.max_batch:
        raise _invalid(f"batch of {len(inputs)} exceeds the maximum batch size {schema.max_batch}")
    try:
        cells = np.array(inputs, dtype=object)
    except (ValueError, TypeError, RecursionError):
        raise _invalid(f"inputs must be a rectangular nested list shaped {expected}") from None
    kinds = set(map(type, cells.ravel().tolist()))
    if not kinds <= {int, float}:
        found = ", ".join(sorted(kind.__name__ for kind in kinds - {int, float}))
        raise _invalid(
            f"inputs must be a rectangular nested list of numbers shaped {expected}; found {found}"
        )
    if cells.shape[1:] != schema.input_shape:
        raise _invalid(f"inputs must be shaped {expected}, got {cells.shape}")
    try:
        values = cells.astype(np.float64)
    except OverflowError:
        raise _invalid("inputs hold a number too large to represent") from None
    if not np.all(np.isfinite(values)):
        raise _invalid("inputs contain NaN or infinite values")
    low, high = schema.input_range
    if values.min() < low or values.max() > high:
        raise _invalid(
            f"inputs must lie in [{low:g}, {high:g}], got values in [{values.min():.4g}, {values.max():.4g}]"
        )
    return values.astype(np.float32)


def parse_predict_body(body: bytes, content_type: str | None, schema: InputSchema) -> PredictRequest:
    """Validates a raw ``/v1/predict`` body against ``schema`` (see the module docstring for the order)."""
    if len(body) > schema.max_body_bytes:
        raise BadRequest(
            413, "body_too_large", f"body of {len(body)} bytes exceeds the limit of {schema.max_body_bytes}"
        )
    check_json_content_type(content_type)
    document = parse_json(body)
    if not isinstance(document, dict):
        raise _invalid(f"body must be a JSON object with 'inputs', got {type(document).__name__}")
    unknown = sorted(set(document) - {"inputs", "output"})
    if unknown:
        raise _invalid(f"unknown fields {unknown}; a request has 'inputs' and optionally 'output'")
    if "inputs" not in document:
        raise _invalid("body must have 'inputs'")
    output = document.get("output")
    if output is not None and output not in OUTPUT_KINDS:
        raise _invalid(f"output must be one of {', '.join(OUTPUT_KINDS)} or null; got {output!r}")
    return PredictRequest(check_inputs(document["inputs"], schema), output)


IN_THREAD_BYTES = 64 * 1024


class BodyParser:
    """Runs ``parse_predict_body`` off the event loop: bodies up to ``in_thread_bytes`` in a thread, larger
    ones in ``workers`` spawned worker processes (started on first use), whose parsing no request on the
    event loop waits behind. A worker that dies is replaced, and its body parsed in a thread instead."""

    def __init__(self, workers: int = 1, in_thread_bytes: int = IN_THREAD_BYTES):
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
            raise ValueError(f"workers must be an integer >= 1, got {workers!r}")
        if isinstance(in_thread_bytes, bool) or not isinstance(in_thread_bytes, int) or in_thread_bytes < 0:
            raise ValueError(f"in_thread_bytes must be an integer >= 0, got {in_thread_bytes!r}")
        self.workers, self.in_thread_bytes = workers, in_thread_bytes
        self._pool: ProcessPoolExecutor | None = None
        self._lock = threading.Lock()

    def _processes(self) -> ProcessPoolExecutor:
        with self._lock:
            if self._pool is None:
                context = multiprocessing.get_context("spawn")  # never fork a process that runs XLA threads
                self._pool = ProcessPoolExecutor(self.workers, mp_context=context)
            return self._pool

    def warm(self) -> None:
        """Starts the worker processes now (a spawned worker imports the server's modules: seconds), rather
        than on the first large body."""
        self._processes().submit(int)

    def _discard(self, pool: ProcessPoolExecutor) -> None:
        with self._lock:
            if self._pool is pool:
                self._pool = None
        pool.shutdown(wait=False, cancel_futures=True)

    async def parse(self, body: bytes, content_type: str | None, schema: InputSchema) -> PredictRequest:
        """``parse_predict_body(body, content_type, schema)``, awaited without blocking the event loop."""
        from starlette.concurrency import run_in_threadpool

        if len(body) <= self.in_thread_bytes:
            return await run_in_threadpool(parse_predict_body, body, content_type, schema)
        pool = self._processes()
        try:
            return await asyncio.wrap_future(pool.submit(parse_predict_body, body, content_type, schema))
        except BrokenProcessPool:
            self._discard(pool)
            return await run_in_threadpool(parse_predict_body, body, content_type, schema)

    def close(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)


_shared_parser: list[BodyParser] = []


def shared_body_parser() -> BodyParser:
    """One ``BodyParser`` for every app of this process (its worker starts on the first large body)."""
    if not _shared_parser:
        _shared_parser.append(BodyParser())
    return _shared_parser[0]


def inputs_digest(inputs: np.ndarray) -> str:
    """SHA-256 of a validated batch: its shape and its float32 bytes (the audit log's input digest)."""
    array = np.ascontiguousarray(inputs, np.float32)
    return hashlib.sha256(repr(array.shape).encode() + array.tobytes()).hexdigest()


def body_digest(body: bytes) -> str:
    """SHA-256 of a raw body: the audit digest of a request refused before its inputs could be read."""
    return hashlib.sha256(body).hexdigest()


# -- the published schema (FastAPI writes these into /openapi.json) -----------------------------------------


def predict_body_schema(schema: InputSchema) -> dict:
    """The JSON Schema of a ``/v1/predict`` body that ``schema`` accepts: exactly the checks above that JSON
    Schema can state (1 to ``max_batch`` rows, each shaped ``input_shape``, numbers in ``input_range``)."""
    low, high = schema.input_range
    cell: dict = {"type": "number", "minimum": low, "maximum": high}
    for size in reversed(schema.input_shape):
        cell = {"type": "array", "minItems": size, "maxItems": size, "items": cell}
    inputs = {
        "type": "array",
        "minItems": 1,
        "maxItems": schema.max_batch,
        "items": cell,
        "description": "Rows shaped (batch, *input_shape) of numbers in input_range (see /v1/info)",
    }
    output = {
        "anyOf": [{"type": "string", "enum": list(OUTPUT_KINDS)}, {"type": "null"}],
        "default": None,
        "description": "What to receive; null: the role's default. Asking more than the role allows: 403.",
    }
    return {
        "title": "PredictBody",
        "type": "object",
        "properties": {"inputs": inputs, "output": output},
        "required": ["inputs"],
        "additionalProperties": False,
    }


class PredictAnswer(BaseModel):
    outputs: list[Any] = Field(description="(batch, classes) scores, or (batch,) int labels")
    output: Literal["probabilities", "top_k", "labels"]
    remaining: int | None = Field(description="Queries (input rows) left in the key's quota; null: unlimited")
    request_id: str


class ServiceInfo(BaseModel):
    key_id: str
    role: str
    outputs: list[str] = Field(description="What this key may receive; the first is its default")
    output: str | None
    input_shape: list[int]
    input_range: list[float]
    num_classes: int
    top_k: int
    max_batch: int
    max_body_bytes: int
    remaining: int | None
    quota: int | None
    rate: float | None = Field(description="Token-bucket refill in input rows per second; null: no limit")
    burst: int | None = Field(description="Token-bucket capacity: the largest batch ever admitted")


class TokenAnswer(BaseModel):
    access_token: str
    token_type: Literal["Bearer"]
    expires_in: int


class ErrorBody(BaseModel):
    error: str = Field(description="A short error code")
    message: str = Field(description="What was wrong, for a person")
    request_id: str
