"""The remote oracle: a prediction server seen through HTTPS as the same ``heistlab.api.Oracle`` attacks use.

``http_oracle(url, key_file, ca_file)`` discovers the input shape, classes, output and quota left from
``GET /v1/info``, exchanges the key for OAuth bearer tokens (client credentials, renewed before they expire)
and sends each batch as one ``POST /v1/predict``. A 429 becomes ``QueryRefused`` (after waiting out
rate-limit refusals whose Retry-After fits in ``max_wait_s``); a 428 carrying a proof-of-work puzzle is
solved and the batch sent again (the solving time counts as waiting); a 4xx about the inputs becomes
``InvalidQuery``; 401/403 become ``PermissionError``. Same queries, same answers as in-process: float32 inputs
and answers travel as JSON numbers, which round-trip them exactly.

``remote_api`` is the API-side view an experiment needs besides the oracle (queries served and refused per
key, seconds waited), so ``heistlab.experiment.execute`` can run any attack against a server unchanged.

A key file (written by ``python -m experiments.keys create --out FILE``, mode 0600) holds one or more
credentials: ``{"format": "heistlab-credentials/1", "credentials": [{"key_id": ..., "key": ...}]}``;
several keys make a Sybil attacker (``identities``).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path

import httpx
import numpy as np

from heistlab.api import InvalidQuery, Oracle, QueryRefused, identity_names, spread_oracle
from heistlab.serving.auth import Credential
from heistlab.serving.puzzle import NONCE_HEADER, SOLUTION_HEADER, solve
from heistlab.serving.tls import client_context

CREDENTIALS_FORMAT = "heistlab-credentials/1"
TOKEN_MARGIN_S = 5.0
MAX_ATTEMPTS = 1000


class ServerError(RuntimeError):
    """The server answered with an error that is neither about the inputs, credentials nor throttling."""


def write_credentials(path: Path | str, credentials: Sequence[Credential], append: bool = False) -> None:
    """Writes (or, with ``append``, extends) a client key file readable by its owner only."""
    path = Path(path)
    existing = list(read_credentials(path)) if append and path.exists() else []
    document = {
        "format": CREDENTIALS_FORMAT,
        "credentials": [{"key_id": c.key_id, "key": c.key} for c in [*existing, *credentials]],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        json.dump(document, handle, indent=2)
    os.replace(temporary, path)


def read_credentials(path: Path | str) -> tuple[Credential, ...]:
    try:
        document = json.loads(Path(path).read_text())
        if document.get("format") != CREDENTIALS_FORMAT:
            raise ValueError(f"format must be {CREDENTIALS_FORMAT!r}, got {document.get('format')!r}")
        credentials = tuple(Credential(str(c["key_id"]), str(c["key"])) for c in document["credentials"])
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise ValueError(f"api.key_file {path} is not a heistlab key file: {error}") from None
    if not credentials:
        raise ValueError(f"api.key_file {path} holds no credentials")
    return credentials


def _body(response: httpx.Response) -> dict:
    try:
        body = response.json()
    except ValueError:
        return {"message": response.text[:200]}
    return body if isinstance(body, dict) else {"message": str(body)[:200]}


class KeySession:
    """One key's bearer tokens: fetched from ``/oauth/token`` and renewed shortly before they expire."""

    def __init__(
        self, http: httpx.Client, credential: Credential, clock: Callable[[], float] = time.monotonic
    ):
        self.http, self.credential, self.clock = http, credential, clock
        self._token: str | None = None
        self._expires = -math.inf

    def headers(self) -> dict[str, str]:
        if self._token is None or self.clock() >= self._expires:
            form = {
                "grant_type": "client_credentials",
                "client_id": self.credential.key_id,
                "client_secret": self.credential.key,
            }
            response = self.http.post("/oauth/token", data=form)
            if response.status_code != 200:
                message = _body(response).get("message", response.reason_phrase)
                raise PermissionError(f"key {self.credential.key_id}: token refused ({message})")
            answer = response.json()
            self._token = answer["access_token"]
            self._expires = self.clock() + max(0.0, float(answer["expires_in"]) - TOKEN_MARGIN_S)
        return {"Authorization": f"Bearer {self._token}"}

    def forget_token(self) -> None:
        self._token = None


class RemoteAPI:
    """A prediction server as an experiment sees an in-process ``PredictionAPI``: queries, counts, oracles.

    Clients have the names an experiment gives them (``attacker``, ``evader``, a Sybil's ``attacker-0``...);
    ``oracle`` routes each name to a key of the key file (identity ``i`` to key ``i``; one identity to the
    first key), and counts are kept per name, as in-process. output: what to ask for (None: the keys' role
    default; it must be one their role may receive). max_wait_s: the most seconds one query may wait on
    rate-limit refusals before it raises ``QueryRefused``. trust_env: whether proxy settings and the like are
    read from the environment (False: every request goes straight to ``url``, as an auditor needs).
    """

    def __init__(
        self,
        url: str,
        credentials: Sequence[Credential],
        ca_file: Path | str | None = None,
        *,
        output: str | None = None,
        timeout_s: float = 30.0,
        max_wait_s: float = 0.0,
        sleep: Callable[[float], None] = time.sleep,
        trust_env: bool = True,
    ):
        if not str(url).startswith("https://"):
            raise ValueError(f"api.url must be an https:// URL, got {url!r}")
        if isinstance(max_wait_s, bool) or not isinstance(max_wait_s, int | float) or not max_wait_s >= 0:
            raise ValueError(f"api.max_wait_s must be a number >= 0, got {max_wait_s!r}")
        self.url, self.max_wait_s, self._sleep = str(url).rstrip("/"), float(max_wait_s), sleep
        self.http = httpx.Client(
            base_url=self.url,
            verify=client_context(ca_file),
            timeout=timeout_s,
            headers={"User-Agent": "heistlab-remote-oracle"},
            trust_env=trust_env,
        )
        self.sessions = {credential.key_id: KeySession(self.http, credential) for credential in credentials}
        self.keys = tuple(self.sessions)
        infos = {key_id: self._info(key_id) for key_id in self.keys}
        first = infos[self.keys[0]]
        self.input_shape = tuple(first["input_shape"])
        self.num_classes = int(first["num_classes"])
        self.top_k = int(first["top_k"])
        for key_id, info in infos.items():
            wanted = output if output is not None else info["output"]
            if wanted not in info["outputs"]:
                raise ValueError(
                    f"key {key_id} (role {info['role']}) may receive "
                    f"{', '.join(info['outputs']) or 'nothing'}; api.output {wanted!r} is not among them"
                )
        outputs = {output if output is not None else info["output"] for info in infos.values()}
        if len(outputs) != 1:
            raise ValueError(f"the keys' roles serve different outputs {sorted(outputs)}; set api.output")
        self.output = outputs.pop()
        self._routes: dict[str, str] = {}
        self._served: dict[str, int] = defaultdict(int)
        self._refused: dict[str, int] = defaultdict(int)
        self._waited: dict[str, float] = defaultdict(float)

    def _request(
        self, method: str, path: str, key_id: str, headers: dict | None = None, **kwargs
    ) -> httpx.Response:
        session = self.sessions[key_id]
        response = self.http.request(method, path, headers={**session.headers(), **(headers or {})}, **kwargs)
        if response.status_code == 401:  # the token expired or the server restarted with a new secret
            session.forget_token()
            response = self.http.request(
                method, path, headers={**session.headers(), **(headers or {})}, **kwargs
            )
        return response

    def key_for(self, client: str) -> str:
        """The key ``client`` queries with: as ``oracle`` routed it; ``attacker`` and key ids by default."""
        if client in self._routes:
            return self._routes[client]
        if client == "attacker" or client in self.sessions:
            return client if client in self.sessions else self.keys[0]
        raise ValueError(
            f"client {client!r} has no key: a server knows its clients by their keys, and only oracles "
            "(attackers, evaders) are routed to the key file's keys; with api=http set eval.benign_clients=0"
        )

    def _info(self, key_id: str) -> dict:
        response = self._request("GET", "/v1/info", key_id)
        if response.status_code in (401, 403):
            raise PermissionError(f"key {key_id}: {_body(response).get('message', 'refused')}")
        if response.status_code != 200:
            raise ServerError(f"GET /v1/info answered {response.status_code}: {_body(response)}")
        return response.json()

    def info(self, client: str = "attacker") -> dict:
        """``GET /v1/info`` as ``client``'s key sees it (quota left, limits, shapes)."""
        return self._info(self.key_for(client))

    def remaining(self, client: str = "attacker") -> int | None:
        return self.info(client)["remaining"]

    def served(self, client: str) -> int:
        return self._served[client]

    def refused(self, client: str) -> int:
        return self._refused[client]

    def simulated_seconds(self, client: str) -> float:
        """Seconds this client really waited on rate-limit refusals and spent solving proof-of-work puzzles
        (the in-process API simulates both)."""
        return self._waited[client]

    def clients(self) -> list[str]:
        return sorted(set(self._served) | set(self._refused))

    def report(self, evidence) -> dict:
        """A server's defense reports are read by its operator (``GET /admin/alarms``), not by clients."""
        return {}

    def query(self, inputs, client: str = "attacker") -> np.ndarray:
        """One batch with ``client``'s key; ``QueryRefused`` on 429, ``InvalidQuery`` on bad inputs."""
        key_id = self.key_for(client)
        try:
            array = np.asarray(inputs, dtype=np.float32)
        except (TypeError, ValueError) as error:
            raise InvalidQuery(f"inputs could not be read as an array: {error}") from None
        rows = len(array) if array.ndim else 1
        payload = json.dumps({"inputs": array.tolist(), "output": self.output}).encode()
        headers = {"Content-Type": "application/json"}
        waited = 0.0
        for _ in range(MAX_ATTEMPTS):
            response = self._request("POST", "/v1/predict", key_id, content=payload, headers=headers)
            body = _body(response)
            if response.status_code == 200:
                self._served[client] += rows
                dtype = np.int32 if body["output"] == "labels" else np.float32
                return np.asarray(body["outputs"], dtype=dtype)
            message = body.get("message", response.reason_phrase)
            if response.status_code == 428 and "puzzle" in body:
                headers = {**headers, **self._solved(body["puzzle"], client)}
                continue
            if response.status_code == 429:
                retry_after = body.get("retry_after")
                delay = math.inf if retry_after is None else float(retry_after)
                if waited + delay <= self.max_wait_s:
                    self._sleep(delay)
                    waited += delay
                    self._waited[client] += delay
                    continue
                self._refused[client] += rows
                raise QueryRefused(client, rows, body.get("remaining"), message, delay)
            if response.status_code in (400, 413, 415, 422):
                raise InvalidQuery(message)
            if response.status_code in (401, 403):
                raise PermissionError(f"key {key_id}: {message}")
            raise ServerError(f"POST /v1/predict answered {response.status_code}: {message}")
        raise ServerError(f"POST /v1/predict: still rate limited after {MAX_ATTEMPTS} attempts")

    def _solved(self, puzzle: dict, client: str) -> dict[str, str]:
        """Headers carrying the solution of a proof-of-work puzzle; the seconds spent count as waiting."""
        started = time.monotonic()
        solution = solve(puzzle)
        self._waited[client] += time.monotonic() - started
        return {NONCE_HEADER: puzzle["nonce"], SOLUTION_HEADER: solution}

    def oracle(self, client: str = "attacker", identities: int = 1) -> Oracle:
        """The attack's handle, as ``PredictionAPI.oracle`` gives it: ``identities > 1`` is a Sybil whose
        identities ``client-0 ... client-(n-1)`` use the first ``n`` keys of the key file."""
        names = identity_names(client, identities)
        if identities > len(self.keys):
            raise ValueError(
                f"identities={identities} needs as many keys; the key file holds {len(self.keys)}"
            )
        self._routes.update(zip(names, self.keys, strict=False))
        return spread_oracle(self, names)

    def close(self) -> None:
        self.http.close()


def remote_api(
    url: str,
    key_file: Path | str,
    ca_file: Path | str | None = None,
    *,
    output: str | None = None,
    timeout_s: float = 30.0,
    max_wait_s: float = 0.0,
    trust_env: bool = True,
) -> RemoteAPI:
    """The server at ``url`` as the keys in ``key_file`` see it, verified against ``ca_file``."""
    return RemoteAPI(
        url,
        read_credentials(key_file),
        ca_file,
        output=output,
        timeout_s=timeout_s,
        max_wait_s=max_wait_s,
        trust_env=trust_env,
    )


def http_oracle(
    url: str,
    key_file: Path | str,
    ca_file: Path | str | None = None,
    *,
    output: str | None = None,
    identities: int = 1,
    timeout_s: float = 30.0,
    max_wait_s: float = 0.0,
) -> Oracle:
    """An ``Oracle`` on the prediction server at ``url`` (see the module docstring)."""
    api = remote_api(url, key_file, ca_file, output=output, timeout_s=timeout_s, max_wait_s=max_wait_s)
    return api.oracle(identities=identities)
