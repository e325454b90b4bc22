"""A model server speaking the Open Inference Protocol, seen as the prediction API attacks use (``api=oip``).

``OIPAPI`` has the interface of the in-process ``heistlab.api.PredictionAPI`` and of the remote
``heistlab.serving.client.RemoteAPI`` (``query``, ``oracle``, ``served``, ``refused``, ``remaining``...), so
attacks, evasion and the audit run against any OIP server (MLServer, KServe, Triton, heistlab's own ``/v2``)
unchanged. It checks ``GET /v2/health/ready`` and ``GET /v2/models/{model}`` before the first query, sends
batches of at most ``max_batch`` rows to ``POST /v2/models/{model}/infer``, and checks every answer: the
named output, its shape ``(rows, classes)`` for probabilities (finite, in [0, 1], each row's sum in
(0, 1.05]) or ``(rows,)`` for labels (integers below the class count).

The budget is enforced here as well as by the server: a query that would take a client past ``budget``
rows is refused whole (``QueryRefused``) before anything is sent. A 429 is waited out while its
``Retry-After`` (seconds) keeps the query's total wait within ``max_wait_s``, then refused. Every other
failure is one ``OIPError`` naming the URL and what happened: unreachable, a 4xx or 5xx answer (401 and 403
are ``PermissionError``), or an answer that is malformed or wrongly shaped.

Credentials never sit in the config: ``auth.token_env`` names an environment variable and
``auth.token_file`` a file holding the token, sent as ``auth.header: auth.scheme token``.

``OIPVictim`` is the victim as the evaluation needs it when it is only reachable through the API: its own
client on the same endpoint, without a budget, whose rows are counted apart (``evaluation_queries``) and
never charged to the attacker.
"""

from __future__ import annotations

import hashlib
import math
import os
import time
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import NamedTuple
from urllib.parse import quote

import httpx
import numpy as np

from heistlab.api import InvalidQuery, Oracle, QueryRefused, identity_names, spread_oracle
from heistlab.serving.oip import MalformedTensor, check_datatype, infer_request, output_named
from heistlab.serving.tls import client_context

OUTPUTS = ("probabilities", "labels")
# Rows of probabilities rounded by a server (a defense) may sum a little over 1; a top-k view sums under 1.
SUM_TOLERANCE = 0.05
MAX_ATTEMPTS = 1000


class OIPError(RuntimeError):
    """The OIP server could not be reached, refused a request, or answered something unusable."""


class Endpoint(NamedTuple):
    """Where and how to query: ``api.url``, ``api.model`` (and ``api.version``), the input tensor's name and
    datatype, the output tensor's name and what it holds (``probabilities`` or ``labels``), and the shape of
    one input row as the model takes it (``api.row_shape``; None: the data's, e.g. ``(64,)`` sends 8x8x1
    digits flat to a scikit-learn model)."""

    url: str
    model: str
    version: str | None = None
    input_name: str = "input-0"
    datatype: str = "FP32"
    output_name: str = "predict_proba"
    output: str = "probabilities"
    row_shape: tuple[int, ...] | None = None

    @property
    def model_path(self) -> str:
        path = f"/v2/models/{quote(self.model, safe='')}"
        return path if self.version is None else f"{path}/versions/{quote(self.version, safe='')}"


def check_endpoint(endpoint: Endpoint) -> Endpoint:
    """The endpoint, or a ``ValueError`` naming the bad field and what is accepted."""
    if not isinstance(endpoint.url, str) or not endpoint.url.startswith(("http://", "https://")):
        raise ValueError(f"api.url must be an http:// or https:// URL, got {endpoint.url!r}")
    if not isinstance(endpoint.model, str) or not endpoint.model:
        raise ValueError(f"api.model must name the served model, got {endpoint.model!r}")
    for field in ("input_name", "output_name"):
        if not isinstance(getattr(endpoint, field), str) or not getattr(endpoint, field):
            raise ValueError(f"api.{field} must be a tensor name, got {getattr(endpoint, field)!r}")
    check_datatype(endpoint.datatype, "api.datatype")
    if endpoint.row_shape is not None and (
        not endpoint.row_shape
        or not all(
            isinstance(size, int) and not isinstance(size, bool) and size >= 1 for size in endpoint.row_shape
        )
    ):
        raise ValueError(f"api.row_shape must be a list of sizes >= 1 or null, got {endpoint.row_shape!r}")
    if endpoint.output not in OUTPUTS:
        raise ValueError(f"api.output must be one of {', '.join(OUTPUTS)}; got {endpoint.output!r}")
    return endpoint._replace(url=endpoint.url.rstrip("/"))


def auth_headers(
    header: str = "Authorization",
    scheme: str | None = "Bearer",
    token_env: str | None = None,
    token_file: str | Path | None = None,
    environ: Mapping[str, str] = os.environ,
) -> dict[str, str]:
    """The credential header, its token read from the environment variable ``token_env`` or the file
    ``token_file`` (never from the config); no header when neither is named."""
    if token_env and token_file:
        raise ValueError("name either api.auth.token_env or api.auth.token_file, not both")
    if token_env:
        if token_env not in environ:
            raise ValueError(f"api.auth.token_env: the environment variable {token_env} is not set")
        token = environ[token_env].strip()
    elif token_file:
        path = Path(os.path.expanduser(str(token_file)))
        if not path.is_file():
            raise ValueError(
                f"api.auth.token_file={token_file} is not a file; accepted: a file holding the token"
            )
        token = path.read_text().strip()
    else:
        return {}
    if not token:
        raise ValueError(f"the token in {token_env or token_file} is empty")
    return {header: f"{scheme} {token}" if scheme else token}


def retry_after_seconds(value: str | None) -> float:
    """A ``Retry-After`` in seconds (an HTTP date, or none, is never waited for: infinity)."""
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        return math.inf
    return seconds if seconds >= 0 and math.isfinite(seconds) else math.inf


def _message(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:200] or response.reason_phrase
    if isinstance(body, dict):
        return str(body.get("error") or body.get("message") or body.get("detail") or body)[:200]
    return str(body)[:200]


def check_answer(array: np.ndarray, rows: int, num_classes: int, endpoint: Endpoint) -> np.ndarray:
    """The answer as attacks receive it (float32 probabilities or int32 labels), or ``MalformedTensor``."""
    where = f"output {endpoint.output_name!r}"
    if endpoint.output == "labels":
        if array.ndim == 2 and array.shape[1] == 1:
            array = array[:, 0]
        if array.shape != (rows,):
            raise MalformedTensor(f"{where} must be shaped ({rows},) labels, got {array.shape}")
        if array.dtype.kind not in "iu" and not np.all(np.mod(array, 1) == 0):
            raise MalformedTensor(f"{where} must hold integer labels, got {array.dtype}")
        if array.size and (array.min() < 0 or array.max() >= num_classes):
            raise MalformedTensor(f"{where} holds labels outside 0..{num_classes - 1}")
        return array.astype(np.int32)
    if array.shape != (rows, num_classes):
        raise MalformedTensor(
            f"{where} must be shaped ({rows}, {num_classes}) probabilities, got {array.shape}"
        )
    probs = array.astype(np.float64)
    if not np.all(np.isfinite(probs)) or probs.min() < 0 or probs.max() > 1:
        raise MalformedTensor(f"{where} must hold probabilities in [0, 1]; it holds other values")
    sums = probs.sum(axis=-1)
    if np.any(sums <= 0) or np.any(sums > 1 + SUM_TOLERANCE):
        worst = float(sums[np.argmax(np.abs(sums - 1))])
        raise MalformedTensor(
            f"{where}: a row sums to {worst:.4g}; probabilities sum to at most 1 (a little over when the "
            f"server rounds them, 0 < sum <= {1 + SUM_TOLERANCE:g}): if it holds labels set api.output=labels"
        )
    return probs.astype(np.float32)


class OIPAPI:
    """An OIP model server as an experiment sees the in-process ``PredictionAPI`` (see the module docstring).

    input_shape, num_classes: what the model takes and answers (the data's; checked against the model's
    metadata where the server publishes shapes). budget: rows each client may be served (None: no limit).
    max_batch: rows per request. max_wait_s: seconds one query may wait on 429 answers. headers: sent with
    every request (``auth_headers``). ca_file: the CA certificate of an https:// server (None: the system's).
    request_hooks: httpx request hooks run before every request, the first included (the audit's guard).
    trust_env: whether proxy settings are read from the environment (an audit sets False).
    transport: an httpx transport (tests; None: the network).
    """

    def __init__(
        self,
        endpoint: Endpoint,
        input_shape: tuple[int, ...],
        num_classes: int,
        *,
        budget: int | None = None,
        max_batch: int = 256,
        timeout_s: float = 30.0,
        max_wait_s: float = 10.0,
        headers: Mapping[str, str] | None = None,
        ca_file: str | Path | None = None,
        request_hooks: Sequence[Callable] = (),
        trust_env: bool = True,
        sleep: Callable[[float], None] = time.sleep,
        transport: httpx.BaseTransport | None = None,
    ):
        self.endpoint = check_endpoint(endpoint)
        if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int) or budget < 0):
            raise ValueError(f"api.budget must be an integer >= 0 or null, got {budget!r}")
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise ValueError(f"api.max_batch must be an integer >= 1, got {max_batch!r}")
        if isinstance(max_wait_s, bool) or not isinstance(max_wait_s, int | float) or not max_wait_s >= 0:
            raise ValueError(f"api.max_wait_s must be a number >= 0, got {max_wait_s!r}")
        self.input_shape, self.num_classes = tuple(input_shape), int(num_classes)
        self.row_shape = self.endpoint.row_shape or self.input_shape
        if math.prod(self.row_shape) != math.prod(self.input_shape):
            raise ValueError(
                f"api.row_shape {list(self.row_shape)} holds {math.prod(self.row_shape)} values; the data's "
                f"rows, shaped {list(self.input_shape)}, hold {math.prod(self.input_shape)}"
            )
        self.budget, self.max_batch, self.max_wait_s = budget, max_batch, float(max_wait_s)
        self.output, self._sleep = self.endpoint.output, sleep
        https = self.endpoint.url.startswith("https://")
        self.http = httpx.Client(
            base_url=self.endpoint.url,
            verify=client_context(ca_file) if https else True,
            timeout=timeout_s,
            headers={"User-Agent": "heistlab-oip-client", **(headers or {})},
            event_hooks={"request": list(request_hooks), "response": []},
            trust_env=trust_env,
            transport=transport,
        )
        self._served: dict[str, int] = defaultdict(int)
        self._refused: dict[str, int] = defaultdict(int)
        self._waited: dict[str, float] = defaultdict(float)
        self.metadata = self._check_ready()

    def _send(self, method: str, path: str, **kwargs) -> httpx.Response:
        try:
            return self.http.request(method, path, **kwargs)
        except httpx.TimeoutException:
            raise OIPError(f"{method} {self.endpoint.url}{path}: no answer within the timeout") from None
        except httpx.TransportError as error:
            raise OIPError(f"the OIP server at {self.endpoint.url} is unreachable ({error})") from None

    def _failed(self, method: str, path: str, response: httpx.Response) -> Exception:
        what = f"{method} {self.endpoint.url}{path} answered {response.status_code}: {_message(response)}"
        if response.status_code in (401, 403):
            return PermissionError(f"{what} (credentials: api.auth.token_env or api.auth.token_file)")
        return OIPError(what)

    def _check_ready(self) -> dict:
        """The model's metadata, after the server said it is ready; shapes it publishes must match."""
        response = self._send("GET", "/v2/health/ready")
        if response.status_code != 200:
            raise self._failed("GET", "/v2/health/ready", response)
        path = self.endpoint.model_path
        response = self._send("GET", path)
        if response.status_code != 200:
            raise self._failed("GET", path, response)
        try:
            metadata = response.json()
        except ValueError:
            raise OIPError(f"GET {self.endpoint.url}{path} answered no JSON metadata") from None
        if not isinstance(metadata, dict):
            raise OIPError(f"GET {self.endpoint.url}{path} answered {type(metadata).__name__}, not an object")
        for tensor in metadata.get("inputs") or ():
            if isinstance(tensor, dict) and tensor.get("name") == self.endpoint.input_name:
                self._check_published_shape(tensor.get("shape"))
        return metadata

    def _check_published_shape(self, shape) -> None:
        """Sizes the server publishes (-1: any) must match the rows sent, batch first."""
        if not isinstance(shape, list) or not shape:
            return
        sent = [-1, *self.row_shape]
        if len(shape) != len(sent) or any(
            size not in (-1, wanted) for size, wanted in zip(shape[1:], sent[1:], strict=True)
        ):
            raise OIPError(
                f"model {self.endpoint.model!r} takes {self.endpoint.input_name!r} shaped {shape}; rows "
                f"would be sent shaped {sent}: set api.row_shape, or choose the data it was trained on"
            )

    def served(self, client: str) -> int:
        return self._served[client]

    def refused(self, client: str) -> int:
        return self._refused[client]

    def remaining(self, client: str = "attacker") -> int | None:
        return None if self.budget is None else self.budget - self._served[client]

    def simulated_seconds(self, client: str) -> float:
        """Seconds this client really waited on 429 answers (the in-process API simulates them)."""
        return self._waited[client]

    def clients(self) -> list[str]:
        return sorted(set(self._served) | set(self._refused))

    def report(self, evidence) -> dict:
        """An OIP server publishes no defense reports."""
        return {}

    def query(self, inputs, client: str = "attacker") -> np.ndarray:
        """One batch for ``client``, sent in requests of at most ``max_batch`` rows. The client-side budget
        refuses the whole batch before any request; a server refusing a later request leaves the earlier
        ones served and counted (the server answered them)."""
        try:
            array = np.asarray(inputs, dtype=np.float32)
        except (TypeError, ValueError) as error:
            raise InvalidQuery(f"inputs could not be read as an array: {error}") from None
        if array.ndim == len(self.input_shape):
            array = array[None]
        if array.shape[1:] != self.input_shape or len(array) == 0:
            raise InvalidQuery(f"inputs must be shaped (batch, *{self.input_shape}), got {array.shape}")
        rows, left = len(array), self.remaining(client)
        if left is not None and rows > left:
            self._refused[client] += rows
            raise QueryRefused(client, rows, left, f"the client-side budget of {self.budget} rows", math.inf)
        answers = [
            self._infer(array[start : start + self.max_batch], client)
            for start in range(0, rows, self.max_batch)
        ]
        return np.concatenate(answers)

    def _infer(self, batch: np.ndarray, client: str) -> np.ndarray:
        path = f"{self.endpoint.model_path}/infer"
        body = infer_request(
            batch.reshape(len(batch), *self.row_shape),
            self.endpoint.input_name,
            self.endpoint.datatype,
            [self.endpoint.output_name],
        )
        waited = 0.0
        for _ in range(MAX_ATTEMPTS):
            response = self._send("POST", path, json=body)
            if response.status_code == 200:
                try:
                    array = output_named(response.json(), self.endpoint.output_name)
                    answer = check_answer(array, len(batch), self.num_classes, self.endpoint)
                except ValueError as error:  # MalformedTensor, or a body that is not JSON
                    raise OIPError(f"POST {self.endpoint.url}{path}: unusable answer: {error}") from None
                self._served[client] += len(batch)
                return answer
            if response.status_code != 429:
                raise self._failed("POST", path, response)
            delay = retry_after_seconds(response.headers.get("retry-after"))
            if waited + delay > self.max_wait_s:
                self._refused[client] += len(batch)
                raise QueryRefused(client, len(batch), self.remaining(client), _message(response), delay)
            self._sleep(delay)
            waited += delay
            self._waited[client] += delay
        raise OIPError(f"POST {self.endpoint.url}{path}: still answered 429 after {MAX_ATTEMPTS} attempts")

    def oracle(self, client: str = "attacker", identities: int = 1) -> Oracle:
        """The attack's handle; ``identities > 1`` spreads it over names with a client-side budget each
        (the server cannot tell them apart: they share the endpoint's credentials)."""
        return spread_oracle(self, identity_names(client, identities))

    def close(self) -> None:
        self.http.close()


class OIPVictim:
    """The served model as the evaluation sees it: ``predict_proba`` through its own budget-free client.

    ``queries`` counts the rows it sent (``evaluation_queries``); the same inputs asked twice are answered
    from memory rather than sent again. Labels-only endpoints answer one-hot rows.
    """

    def __init__(self, api: OIPAPI, client: str = "evaluation"):
        self.api, self.client = api, client
        self._answers: dict[str, np.ndarray] = {}

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self.api.input_shape

    @property
    def num_classes(self) -> int:
        return self.api.num_classes

    @property
    def queries(self) -> int:
        return self.api.served(self.client)

    def predict_proba(self, inputs: np.ndarray) -> np.ndarray:
        array = np.ascontiguousarray(inputs, dtype=np.float32)
        digest = hashlib.sha256(repr(array.shape).encode() + array.tobytes()).hexdigest()
        if digest not in self._answers:
            answers = self.api.query(array, self.client)
            if self.api.output == "labels":
                answers = np.eye(self.num_classes, dtype=np.float32)[answers]
            self._answers[digest] = answers
        return self._answers[digest]


def api_from_config(
    spec: Mapping,
    input_shape: tuple[int, ...],
    num_classes: int,
    *,
    budget: int | None,
    environ: Mapping[str, str] = os.environ,
    request_hooks: Sequence[Callable] = (),
    trust_env: bool = True,
) -> OIPAPI:
    """An ``OIPAPI`` from the ``api=oip`` config (configs/api/oip.yaml) and the data's shapes."""
    auth = spec.get("auth") or {}
    endpoint = Endpoint(
        url=spec.get("url"),
        model=spec.get("model"),
        version=None if spec.get("version") is None else str(spec.get("version")),
        input_name=spec.get("input_name", "input-0"),
        datatype=spec.get("datatype", "FP32"),
        output_name=spec.get("output_name", "predict_proba"),
        output=spec.get("output", "probabilities"),
        row_shape=None if spec.get("row_shape") is None else tuple(spec.get("row_shape")),
    )
    headers = auth_headers(
        auth.get("header", "Authorization"),
        auth.get("scheme", "Bearer"),
        auth.get("token_env"),
        auth.get("token_file"),
        environ,
    )
    return OIPAPI(
        endpoint,
        input_shape,
        num_classes,
        budget=budget,
        max_batch=spec.get("max_batch") or 256,
        timeout_s=spec.get("timeout_s", 30.0),
        max_wait_s=spec.get("max_wait_s", 10.0),
        headers=headers,
        ca_file=None if spec.get("ca_file") is None else Path(str(spec.get("ca_file"))).expanduser(),
        request_hooks=request_hooks,
        trust_env=trust_env,
    )


def check_undefended(defense_target: str) -> None:
    """``api=oip`` attacks an endpoint as deployed: its defenses run on the server, none can be added here."""
    if defense_target != "heistlab.defenses.identity":
        raise ValueError(
            f"api=oip attacks the endpoint as it is deployed, so its defenses are the server's own; "
            f"defense must be none, got {defense_target!r}"
        )
