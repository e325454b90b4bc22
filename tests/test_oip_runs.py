"""``api=oip`` runs that cannot go ahead: results.json says why (failed or refused), with no metrics."""

from __future__ import annotations

import json
import socket

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
