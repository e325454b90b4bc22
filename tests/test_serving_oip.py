"""heistlab's own server answering the Open Inference Protocol (``/v2``) to a third-party client
(tritonclient's HTTP client) and to heistlab's OIP client: the same keys, roles, quota, defense and audit
rows as ``/v1``.

Each test starts its own HTTPS server on a free port of 127.0.0.1 (``tests/test_serving.py``'s ``deploy``).
"""

from __future__ import annotations

import ssl

import numpy as np
import pytest

from heistlab.api import QueryRefused
from heistlab.serving.oip_client import OIPAPI, Endpoint, auth_headers
from tests import test_serving
from tests.test_serving import predict

deploy, tls_pair = test_serving.deploy, test_serving.tls_pair  # the HTTPS server fixtures

httpclient = pytest.importorskip("tritonclient.http", reason="pip install 'tritonclient[http]'")
from tritonclient.utils import InferenceServerException  # noqa: E402


def triton(server) -> httpclient.InferenceServerClient:
    host = server.url.removeprefix("https://")
    return httpclient.InferenceServerClient(
        host,
        ssl=True,
        ssl_options={"ca_certs": server.ca_file},
        ssl_context_factory=ssl.create_default_context,
        network_timeout=30,
    )


def infer(client, x: np.ndarray, credential, output: str | None = "probabilities"):
    tensor = httpclient.InferInput("input-0", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x.astype(np.float32), binary_data=False)
    outputs = None if output is None else [httpclient.InferRequestedOutput(output, binary_data=False)]
    return client.infer("heistlab", [tensor], outputs=outputs, headers={"X-API-Key": credential.api_key})


def test_tritonclient_is_served_what_v1_serves_under_the_same_key_and_defense(deploy, digits_splits):
    server = deploy()  # the rounding(2) defense
    credential, x = server.key("probabilities"), digits_splits.test.x[:5]
    client = triton(server)
    try:
        assert client.is_server_ready()
        answer = infer(client, x, credential).as_numpy("probabilities")
        metadata = client.get_model_metadata("heistlab", headers={"X-API-Key": credential.api_key})
    finally:
        client.close()
    https = server.https()
    v1 = predict(https, server.url, x, {"X-API-Key": credential.api_key}, output="probabilities")
    assert np.array_equal(answer, np.asarray(v1.json()["outputs"], np.float32))
    np.testing.assert_allclose(answer, np.round(answer, 2), atol=1e-6)  # the defense ran
    assert metadata["inputs"][0]["shape"] == [-1, *digits_splits.input_shape]
    assert {output["name"] for output in metadata["outputs"]} == {"probabilities", "top_k", "labels"}
    rows = server.audit.requests(10, credential.key_id)
    v2_rows = [row for row in rows if row["path"] == "/v2/models/heistlab/infer"]
    assert len(v2_rows) == 1 and v2_rows[0]["rows"] == 5 and v2_rows[0]["outcome"] == "served"


def test_roles_quota_and_credentials_hold_on_v2(deploy, digits_splits):
    server = deploy(quota=6)
    labels_key, client_key = server.key("labels"), server.key("probabilities")
    x = digits_splits.test.x[:4]
    client = triton(server)
    try:
        labels = infer(client, x, labels_key, output=None).as_numpy("labels")
        assert labels.dtype == np.int32 and labels.shape == (4,)
        with pytest.raises(InferenceServerException) as forbidden:
            infer(client, x, labels_key, output="probabilities")
        assert forbidden.value.status() == "403"
        infer(client, x, client_key)
        with pytest.raises(InferenceServerException) as quota:  # 4 + 4 rows cross the quota of 6
            infer(client, x, client_key)
        assert quota.value.status() == "429"
    finally:
        client.close()
    https = server.https()
    body = {"inputs": [{"name": "input-0", "shape": [1, 8, 8, 1], "datatype": "FP32", "data": [0.0] * 64}]}
    assert https.post(f"{server.url}/v2/models/heistlab/infer", json=body).status_code == 401
    headers = {"X-API-Key": client_key.api_key}
    assert https.post(f"{server.url}/v2/models/other/infer", json=body, headers=headers).status_code == 404
    # The quota is the key's, whichever protocol spends it: /v1 is refused now too.
    refused = predict(https, server.url, x[:3], headers)
    assert refused.status_code == 429


def test_heistlabs_oip_client_queries_heistlabs_own_server(deploy, digits_splits, tmp_path):
    server = deploy(quota=10)
    credential = server.key("probabilities")
    token_file = tmp_path / "token"
    token_file.write_text(credential.api_key)
    api = OIPAPI(
        Endpoint(server.url, "heistlab", output_name="probabilities"),
        digits_splits.input_shape,
        digits_splits.num_classes,
        budget=8,
        headers=auth_headers("X-API-Key", None, token_file=token_file),
        ca_file=server.ca_file,
        max_wait_s=0,
    )
    try:
        answers = api.query(digits_splits.test.x[:8])
        assert answers.shape == (8, 10)
        np.testing.assert_allclose(answers.sum(axis=1), 1, atol=0.06)  # rounded to 2 decimals
        with pytest.raises(QueryRefused, match="client-side budget"):
            api.query(digits_splits.test.x[:1])
    finally:
        api.close()
    assert server.core.remaining(credential.key_id) == 2  # the refused row never reached the server


@pytest.mark.slow
def test_the_oip_client_waits_out_the_servers_rate_limit_on_v2(deploy, digits_splits):
    server = deploy(rate=20.0, burst=4)
    credential = server.key("probabilities")
    api = OIPAPI(
        Endpoint(server.url, "heistlab", output_name="probabilities"),
        digits_splits.input_shape,
        digits_splits.num_classes,
        max_batch=4,
        headers={"X-API-Key": credential.api_key},
        ca_file=server.ca_file,
        max_wait_s=5.0,
    )
    try:
        assert api.query(digits_splits.test.x[:12]).shape == (12, 10)  # 3 requests past a burst of 4 rows
    finally:
        api.close()
    assert 0 < api.simulated_seconds("attacker") <= 5.0 and api.refused("attacker") == 0
    refusals = [row for row in server.audit.requests(50, credential.key_id) if row["status"] == 429]
    assert refusals  # the server did refuse, and the client waited rather than failing
