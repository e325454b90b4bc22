"""The OIP client against a scripted server (httpx.MockTransport): budget, batching, 429 waits, credentials,
and one clear error for each way a server can fail or answer badly."""

from __future__ import annotations

import json

import httpx
import numpy as np
import pytest

from heistlab.api import QueryRefused
from heistlab.serving.oip_client import (
    OIPAPI,
    Endpoint,
    OIPError,
    OIPVictim,
    api_from_config,
    auth_headers,
    retry_after_seconds,
)

SHAPE, CLASSES = (2, 2, 1), 3


def probabilities_for(inputs: np.ndarray) -> np.ndarray:
    """A deterministic 'model': class scores from the row sums, softmaxed."""
    sums = inputs.reshape(len(inputs), -1).sum(axis=1, keepdims=True)
    logits = sums * np.arange(CLASSES)
    exp = np.exp(logits - logits.max(axis=1, keepdims=True))
    return exp / exp.sum(axis=1, keepdims=True)


class Scripted:
    """A fake OIP server: answers infer requests with ``answer(inputs)`` unless ``status`` says otherwise."""

    def __init__(self, answer=None, statuses=(), metadata=None):
        self.answer = answer or (lambda x: {"name": "predict_proba", "tensor": probabilities_for(x)})
        self.statuses = list(statuses)
        self.metadata = metadata or {"name": "m", "inputs": [{"name": "input-0", "shape": [-1, 2, 2, 1]}]}
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if request.url.path == "/v2/health/ready":
            return httpx.Response(200, json={"ready": True})
        if request.method == "GET":
            return httpx.Response(200, json=self.metadata)
        if self.statuses:
            status, headers = self.statuses.pop(0)
            return httpx.Response(status, json={"error": f"status {status}"}, headers=headers)
        tensor = json.loads(request.content)["inputs"][0]
        inputs = np.asarray(tensor["data"], np.float32).reshape(tensor["shape"])
        answer = self.answer(inputs)
        if not isinstance(answer, dict) or "tensor" not in answer:
            return httpx.Response(200, json=answer)
        values = np.asarray(answer["tensor"])
        output = {"name": answer["name"], "shape": list(values.shape), "datatype": "FP64"}
        return httpx.Response(200, json={"outputs": [{**output, "data": values.ravel().tolist()}]})

    def infers(self) -> list[httpx.Request]:
        return [request for request in self.requests if request.method == "POST"]


def client(server: Scripted, sleeps=None, **options) -> OIPAPI:
    endpoint = Endpoint("http://oip.test", "m", output=options.pop("output", "probabilities"))
    endpoint = endpoint._replace(**options.pop("endpoint", {}))
    return OIPAPI(
        endpoint,
        SHAPE,
        CLASSES,
        transport=httpx.MockTransport(server),
        sleep=(sleeps.append if sleeps is not None else lambda seconds: None),
        **options,
    )


def rows(count: int) -> np.ndarray:
    return np.random.default_rng(count).uniform(size=(count, *SHAPE)).astype(np.float32)


def test_answers_are_the_servers_probabilities_sent_in_batches_of_max_batch():
    server = Scripted()
    api = client(server, max_batch=4)
    x = rows(10)
    np.testing.assert_allclose(api.query(x), probabilities_for(x), rtol=1e-6)
    sent = [json.loads(request.content)["inputs"][0]["shape"] for request in server.infers()]
    assert sent == [[4, 2, 2, 1], [4, 2, 2, 1], [2, 2, 2, 1]]
    assert api.served("attacker") == 10


def test_a_batch_that_would_cross_the_budget_is_refused_whole_before_sending():
    server = Scripted()
    api = client(server, budget=10)
    api.query(rows(8))
    with pytest.raises(QueryRefused, match="client-side budget"):
        api.query(rows(3))
    assert len(server.infers()) == 1  # nothing of the refused batch was sent
    assert (api.served("attacker"), api.refused("attacker"), api.remaining()) == (8, 3, 2)
    api.query(rows(2))
    assert api.remaining() == 0


def test_429_is_waited_out_within_max_wait_s_then_refused():
    sleeps: list[float] = []
    server = Scripted(statuses=[(429, {"Retry-After": "2"}), (429, {"Retry-After": "3"})])
    api = client(server, sleeps, max_wait_s=5)
    assert api.query(rows(1)).shape == (1, CLASSES)
    assert sleeps == [2.0, 3.0] and api.simulated_seconds("attacker") == 5.0

    server.statuses = [(429, {"Retry-After": "4"}), (429, {"Retry-After": "4"})]
    with pytest.raises(QueryRefused):
        api.query(rows(1))
    assert sleeps == [2.0, 3.0, 4.0]  # the second wait would pass max_wait_s: refused instead
    assert api.refused("attacker") == 1


def test_retry_after_dates_and_garbage_are_never_waited_for():
    assert retry_after_seconds("1.5") == 1.5
    assert retry_after_seconds("Wed, 21 Oct 2015 07:28:00 GMT") == float("inf")
    assert retry_after_seconds(None) == float("inf") and retry_after_seconds("-1") == float("inf")


@pytest.mark.parametrize(
    ("status", "error", "message"),
    [(500, OIPError, "answered 500"), (400, OIPError, "answered 400"), (401, PermissionError, "credentials")],
)
def test_error_statuses_are_one_clear_error_each(status, error, message):
    api = client(Scripted(statuses=[(status, {})]))
    with pytest.raises(error, match=message):
        api.query(rows(1))
    assert api.served("attacker") == 0


@pytest.mark.parametrize(
    ("answer", "message"),
    [
        (lambda x: {"name": "predict_proba", "tensor": probabilities_for(x)[:, :2]}, r"shaped \(3, 3\)"),
        (lambda x: {"name": "predict_proba", "tensor": probabilities_for(x) * 2}, r"in \[0, 1\]"),
        (lambda x: {"name": "predict_proba", "tensor": np.full((len(x), CLASSES), 0.7)}, "sums to 2.1"),
        (lambda x: {"name": "other", "tensor": probabilities_for(x)}, "no output named 'predict_proba'"),
        (
            lambda x: {"outputs": [{"name": "predict_proba", "shape": [3, 3], "datatype": "FP32"}]},
            "lacks data",
        ),
        (lambda x: {"outputs": "none"}, "'outputs' list"),
        (
            lambda x: {
                "outputs": [{"name": "predict_proba", "shape": [3, 3], "datatype": "FP32", "data": [1]}]
            },
            "holds 9 values, data holds 1",
        ),
    ],
)
def test_malformed_or_wrongly_shaped_answers_are_refused_with_the_reason(answer, message):
    api = client(Scripted(answer=answer))
    with pytest.raises(OIPError, match=message):
        api.query(rows(3))
    assert api.served("attacker") == 0


def test_labels_outputs_are_checked_integers_below_the_class_count():
    labels = lambda x: {"name": "predict", "tensor": probabilities_for(x).argmax(axis=1)}
    api = client(Scripted(answer=labels), output="labels", endpoint={"output_name": "predict"})
    x = rows(5)
    assert np.array_equal(api.query(x), probabilities_for(x).argmax(axis=1))
    assert api.query(x).dtype == np.int32
    too_large = lambda x: {"name": "predict", "tensor": np.full(len(x), CLASSES)}
    api = client(Scripted(answer=too_large), output="labels", endpoint={"output_name": "predict"})
    with pytest.raises(OIPError, match="outside 0..2"):
        api.query(x)


def test_an_unreachable_server_is_named():
    def refuse(request):
        raise httpx.ConnectError("connection refused", request=request)

    with pytest.raises(OIPError, match="http://oip.test is unreachable"):
        OIPAPI(Endpoint("http://oip.test", "m"), SHAPE, CLASSES, transport=httpx.MockTransport(refuse))


def test_a_published_input_shape_that_differs_from_the_rows_sent_stops_before_any_query():
    server = Scripted(metadata={"inputs": [{"name": "input-0", "shape": [-1, 64]}]})
    with pytest.raises(OIPError, match=r"shaped \[-1, 64\]; rows would be sent shaped \[-1, 2, 2, 1\]"):
        client(server)
    flat = Scripted(metadata={"inputs": [{"name": "input-0", "shape": [-1, 4]}]})
    assert client(flat, endpoint={"row_shape": (4,)}).query(rows(2)).shape == (2, CLASSES)


def test_row_shape_sends_rows_flat_and_must_hold_as_many_values():
    server = Scripted(metadata={"inputs": []})
    api = client(server, endpoint={"row_shape": (4,)})
    x = rows(3)
    np.testing.assert_allclose(api.query(x), probabilities_for(x), rtol=1e-6)
    assert json.loads(server.infers()[0].content)["inputs"][0]["shape"] == [3, 4]
    with pytest.raises(ValueError, match=r"row_shape \[5\] holds 5 values"):
        client(server, endpoint={"row_shape": (5,)})


def test_credentials_come_from_the_environment_or_a_file_and_are_sent(tmp_path):
    assert auth_headers(token_env="OIP_TOKEN", environ={"OIP_TOKEN": "s3cret\n"}) == {
        "Authorization": "Bearer s3cret"
    }
    token_file = tmp_path / "token"
    token_file.write_text("from-file\n")
    assert auth_headers("X-API-Key", None, token_file=token_file) == {"X-API-Key": "from-file"}
    assert auth_headers() == {}
    with pytest.raises(ValueError, match="OIP_TOKEN is not set"):
        auth_headers(token_env="OIP_TOKEN", environ={})
    with pytest.raises(ValueError, match="not both"):
        auth_headers(token_env="A", token_file=token_file)
    server = Scripted()
    api = client(server, headers=auth_headers(token_env="T", environ={"T": "abc"}))
    api.query(rows(1))
    assert all(request.headers["Authorization"] == "Bearer abc" for request in server.requests)


def test_the_evaluation_victim_is_counted_apart_and_asks_each_input_once():
    server = Scripted()
    attacker, evaluation = client(server, budget=2), client(server)
    victim = OIPVictim(evaluation)
    x = rows(6)
    np.testing.assert_allclose(victim.predict_proba(x), probabilities_for(x), rtol=1e-6)
    victim.predict_proba(x)
    assert victim.queries == 6 and attacker.served("attacker") == 0 and attacker.remaining() == 2


def test_config_values_are_checked_with_what_is_accepted():
    base = {"url": "http://oip.test", "model": "m"}
    for bad, message in [
        ({"url": "ftp://x"}, "http:// or https://"),
        ({"model": ""}, "api.model"),
        ({"datatype": "FP8"}, "api.datatype must be one of"),
        ({"output": "top_k"}, "probabilities, labels"),
    ]:
        with pytest.raises(ValueError, match=message):
            api_from_config({**base, **bad}, SHAPE, CLASSES, budget=None)
