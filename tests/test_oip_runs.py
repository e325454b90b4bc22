"""``api=oip`` runs that cannot go ahead: results.json says why (failed or refused), with no metrics."""

from __future__ import annotations

import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from heistlab.checks import ConfigError
from heistlab.experiment import run_experiment
from tests.test_configs import composed


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_an_unreachable_server_fails_the_run_with_the_reason(tmp_path, cache_dir):
    url = f"http://127.0.0.1:{free_port()}"
    cfg = composed("api=oip", f"api.url={url}", "api.model=m", f"cache_dir={cache_dir}")
    with pytest.raises(Exception, match="unreachable"):
        run_experiment(cfg, tmp_path)
    record = json.loads((tmp_path / "results.json").read_text())
    assert record["status"] == "failed" and f"the OIP server at {url} is unreachable" in record["error"]
    assert record["metrics"] == {}


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("defense=rounding", "defense must be none"),
        ("api.model=null", "api.model must name the served model"),
        ("api.datatype=FP8", "api.datatype must be one of"),
        ("api.auth.token_env=HEISTLAB_NO_SUCH_VARIABLE", "HEISTLAB_NO_SUCH_VARIABLE is not set"),
    ],
)
def test_configs_an_oip_run_cannot_use_are_refused_before_any_request(override, message, tmp_path, cache_dir):
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens: a refusal must come before any request
    cfg = composed("api=oip", f"api.url={url}", "api.model=m", override, f"cache_dir={cache_dir}")
    with pytest.raises(ConfigError, match=message):
        run_experiment(cfg, tmp_path)
    record = json.loads((tmp_path / "results.json").read_text())
    assert record["status"] == "refused" and message.split(" (")[0] in record["error"]


def broken_server(infer_status: int, infer_body: dict):
    """A loopback OIP server that is ready and has metadata, but answers every infer request badly."""

    class Handler(BaseHTTPRequestHandler):
        def answer(self, status: int, body: dict) -> None:
            payload = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def do_GET(self):
            self.answer(200, {"ready": True} if "health" in self.path else {"name": "m", "inputs": []})

        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            self.answer(infer_status, infer_body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    return server


@pytest.mark.parametrize(
    ("status", "body", "reason"),
    [
        (503, {"error": "model unavailable"}, "answered 503: model unavailable"),
        (400, {"error": "bad tensor"}, "answered 400: bad tensor"),
        (
            200,
            {"outputs": [{"name": "predict_proba", "shape": [1], "datatype": "FP32", "data": [1]}]},
            "shaped",
        ),
        (200, {"no": "outputs"}, "'outputs' list"),
    ],
)
def test_a_server_answering_badly_fails_the_run_with_the_reason_and_nothing_else(
    status, body, reason, tmp_path, cache_dir
):
    server = broken_server(status, body)
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        cfg = composed("api=oip", f"api.url={url}", "api.model=m", f"cache_dir={cache_dir}")
        with pytest.raises(Exception, match=reason):
            run_experiment(cfg, tmp_path / "run")
    finally:
        server.shutdown()
        server.server_close()
    record = json.loads((tmp_path / "run" / "results.json").read_text())
    assert record["status"] == "failed" and reason in record["error"] and record["metrics"] == {}
    assert [path.name for path in (tmp_path / "run").iterdir()] == ["results.json"]
