"""``target=oip``: the audit's traffic stays on the loopback OIP server that ``api.url`` names."""

from __future__ import annotations

import httpx
import numpy as np
import pytest

from heistlab.audit.target import OIP, TargetRefused, TargetViolation, check_target, request_guard
from heistlab.serving.oip_client import OIPAPI, Endpoint

LOOPBACK = lambda host, port: ["127.0.0.1"]


def test_target_oip_is_the_server_at_api_url_and_must_be_loopback():
    target = check_target("oip", oip_url="http://localhost:8080/", resolver=LOOPBACK)
    assert (target.kind, target.url, target.host, target.port) == (
        OIP,
        "http://localhost:8080",
        "localhost",
        8080,
    )
    with pytest.raises(TargetRefused, match="not only loopback"):
        check_target("oip", oip_url="http://models.example:8080", resolver=lambda host, port: ["10.1.2.3"])
    remote = check_target(
        "oip", True, oip_url="https://models.example", resolver=lambda host, port: ["10.1.2.3"]
    )
    assert remote.port == 443
    with pytest.raises(ValueError, match="set api=oip"):
        check_target("oip", resolver=LOOPBACK)
    with pytest.raises(ValueError, match="http:// or https://"):
        check_target("oip", oip_url="ftp://127.0.0.1", resolver=LOOPBACK)


def test_the_guard_stops_an_oip_client_leaving_the_target_before_its_first_request():
    target = check_target("oip", oip_url="http://127.0.0.1:8080", resolver=LOOPBACK)
    sent: list[httpx.Request] = []

    def server(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        return httpx.Response(200, json={"ready": True})

    guard = [request_guard(target)]
    with pytest.raises(TargetViolation, match="refusing to send a request to http://127.0.0.1:9090"):
        OIPAPI(
            Endpoint("http://127.0.0.1:9090", "m"),
            (2,),
            2,
            request_hooks=guard,
            transport=httpx.MockTransport(server),
        )
    assert sent == []
    answer = {"outputs": [{"name": "predict_proba", "shape": [1, 2], "datatype": "FP32", "data": [0.5, 0.5]}]}
    on_target = OIPAPI(
        Endpoint("http://127.0.0.1:8080", "m"),
        (2,),
        2,
        request_hooks=guard,
        transport=httpx.MockTransport(
            lambda request: httpx.Response(200, json=answer if request.method == "POST" else {})
        ),
    )
    assert np.array_equal(on_target.query(np.zeros((1, 2))), [[0.5, 0.5]])
