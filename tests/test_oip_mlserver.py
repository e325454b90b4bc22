"""``api=oip`` and ``target=oip`` against a real third-party server: MLServer's scikit-learn runtime serving
an MLPClassifier trained on the digits victim split, started here as a process on loopback (free ports, a
bounded wait for readiness) and killed at the end.

MLServer pins versions of FastAPI, Starlette and protobuf older than heistlab's, so it lives in its own
virtual environment, ``.cache/mlserver-venv`` (or ``$HEISTLAB_MLSERVER_VENV``), made by ``.ci/run`` with
``pip install mlserver==1.7.1 mlserver-sklearn==1.7.1``. Without it these tests are skipped, saying so. The
model is trained by that environment's own scikit-learn, so the pickle MLServer loads matches its version.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from hydra import compose, initialize_config_dir

from heistlab import data
from heistlab.audit.battery import run_audit
from heistlab.experiment import run_experiment
from heistlab.serving.oip_client import OIPAPI, Endpoint

REPO = Path(__file__).resolve().parent.parent
VENV = Path(os.environ.get("HEISTLAB_MLSERVER_VENV", REPO / ".cache" / "mlserver-venv"))
MLSERVER = VENV / "bin" / "mlserver"
MODEL = "digits-mlp"
READY_WITHIN_S = 90.0

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not MLSERVER.exists(),
        reason=f"MLServer is not installed in {VENV} (.ci/run makes it: pip install mlserver-sklearn)",
    ),
]

TRAIN = """
import sys, joblib, numpy as np
from sklearn.neural_network import MLPClassifier
split = np.load(sys.argv[1])
model = MLPClassifier(hidden_layer_sizes=(64,), max_iter=500, random_state=0)
model.fit(split["x"], split["y"])
joblib.dump(model, sys.argv[2])
print(model.score(split["x_test"], split["y_test"]))
"""


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for each in sockets:
        each.bind(("127.0.0.1", 0))
    ports = [each.getsockname()[1] for each in sockets]
    for each in sockets:
        each.close()
    return ports


def model_folder(folder: Path, http_port: int, grpc_port: int, metrics_port: int) -> float:
    """Writes MLServer's settings and the trained model into ``folder``; returns the model's test accuracy."""
    splits = data.make_splits(data.load_digits(), seed=0)
    split_file = folder / "split.npz"
    np.savez(
        split_file,
        x=splits.victim_train.x.reshape(len(splits.victim_train.x), -1),
        y=splits.victim_train.y,
        x_test=splits.test.x.reshape(len(splits.test.x), -1),
        y_test=splits.test.y,
    )
    trained = subprocess.run(
        [str(VENV / "bin" / "python"), "-c", TRAIN, str(split_file), str(folder / "model.joblib")],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    settings = {
        "host": "127.0.0.1",
        "http_port": http_port,
        "grpc_port": grpc_port,
        "metrics_port": metrics_port,
        "parallel_workers": 0,  # its inference pool fails to start on this Python (see DESIGN.md)
    }
    (folder / "settings.json").write_text(json.dumps(settings))
    model_settings = {
        "name": MODEL,
        "implementation": "mlserver_sklearn.SKLearnModel",
        "parameters": {"uri": "./model.joblib"},
    }
    (folder / "model-settings.json").write_text(json.dumps(model_settings))
    return float(trained.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def mlserver(tmp_path_factory):
    """The URL of a running MLServer serving the digits MLP, and the model's own test accuracy."""
    folder = tmp_path_factory.mktemp("mlserver")
    http_port, grpc_port, metrics_port = free_ports(3)
    accuracy = model_folder(folder, http_port, grpc_port, metrics_port)
    log = (folder / "mlserver.log").open("w")  # closed after the server stops
    process = subprocess.Popen(
        [str(MLSERVER), "start", "."],
        cwd=folder,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{http_port}"
    try:
        deadline = time.monotonic() + READY_WITHIN_S
        while True:
            if process.poll() is not None:
                pytest.fail(
                    f"MLServer exited with {process.returncode}: {(folder / 'mlserver.log').read_text()}"
                )
            try:
                if httpx.get(f"{url}/v2/models/{MODEL}/ready", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(
                    f"MLServer not ready within {READY_WITHIN_S} s: {(folder / 'mlserver.log').read_text()}"
                )
            time.sleep(0.5)
        yield url, accuracy
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=20)
        log.close()


def composed(config_name: str, *overrides: str):
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        return compose(config_name=config_name, overrides=list(overrides))


def test_the_client_reads_mlserver_probabilities_and_labels(mlserver):
    url, accuracy = mlserver
    splits = data.make_splits(data.load_digits(), seed=0)
    x = splits.test.x[:300]
    probabilities = OIPAPI(Endpoint(url, MODEL, row_shape=(64,)), splits.input_shape, 10, max_batch=128)
    labels = OIPAPI(
        Endpoint(url, MODEL, output_name="predict", output="labels", row_shape=(64,)),
        splits.input_shape,
        10,
        budget=300,
    )
    probs, predicted = probabilities.query(x), labels.query(x)
    assert probs.shape == (300, 10) and predicted.shape == (300,)
    np.testing.assert_allclose(probs.sum(axis=1), 1, atol=1e-5)
    assert np.array_equal(probs.argmax(axis=1), predicted)  # one model behind both outputs
    assert probabilities.served("attacker") == 300 and labels.remaining() == 0
    assert accuracy > 0.9


def test_knockoff_at_1000_queries_steals_the_mlserver_model(mlserver, tmp_path, cache_dir):
    url, _ = mlserver
    cfg = composed(
        "config",
        "api=oip",
        f"api.url={url}",
        f"api.model={MODEL}",
        "api.row_shape=[64]",
        "attack=knockoff",
        "attack.budget=1000",
        f"cache_dir={cache_dir}",
    )
    metrics = run_experiment(cfg, tmp_path)
    record = json.loads((tmp_path / "results.json").read_text())
    assert record["status"] == "complete"
    assert metrics["fidelity_test"] >= 0.9, metrics
    assert metrics["queries_served"] == 1000
    # The evaluation's own rows: the test split (fidelity, served accuracy) and the uniform-noise inputs.
    test_inputs = len(data.make_splits(data.load_digits(), seed=0).test.x)
    assert metrics["evaluation_queries"] == test_inputs + cfg.eval.uniform_samples
    assert metrics["served_accuracy"] == metrics["victim_accuracy"] > 0.9


def test_square_evasion_runs_through_mlserver_as_its_own_client(mlserver, tmp_path, cache_dir):
    url, _ = mlserver
    cfg = composed(
        "config",
        "api=oip",
        f"api.url={url}",
        f"api.model={MODEL}",
        "api.row_shape=[64]",
        "attack.budget=300",
        "evasion=square",
        "evasion.count=8",
        "evasion.max_queries=50",
        "eval.uniform_samples=100",
        f"cache_dir={cache_dir}",
    )
    metrics = run_experiment(cfg, tmp_path)
    assert metrics["queries_served"] == 300  # the evader's rows are not the attacker's
    assert 0 < metrics["evasion_queries"] <= 8 * 50
    assert metrics["evasion_clean_accuracy"] > 0.5 and metrics["blackbox_success_rate"] > 0


def test_audit_of_the_undefended_mlserver_finds_the_model_stolen(mlserver, tmp_path, cache_dir):
    url, _ = mlserver
    cfg = composed(
        "audit",
        "target=oip",
        "api=oip",
        f"api.url={url}",
        f"api.model={MODEL}",
        "api.row_shape=[64]",
        f"cache_dir={cache_dir}",
        f"audit.out_dir={tmp_path}",
        "audit.extraction.eval_inputs=100",
        "audit.extraction.curve_points=2",
        "audit.extraction.attacks.jbda=null",
        "audit.evasion.score.count=4",
        "audit.evasion.transfer.count=20",
    )
    result = run_audit(cfg)
    findings = {item.check: item for item in result.findings}
    knockoff = findings["extraction.knockoff"]
    assert knockoff.present and knockoff.severity == "high", knockoff
    assert knockoff.figures["fidelity"] >= 0.9
    # Served scores and no limit: evasion through the API succeeds, as against any undefended deployment.
    assert findings["evasion.blackbox"].present and findings["evasion.blackbox"].severity == "high"
    assert not findings["abuse.probes"].tested and not findings["detection.monitoring"].tested
    assert result.target == url
    assert sum(result.spent.values()) <= result.budget
