"""victim=onnx, victim=callable and victim=flax in experiments: third-party exports (scikit-learn through
skl2onnx, PyTorch through torch.onnx) served behind the prediction API, attacked from the command line, and
shape mismatches stopped before anything trains."""

from __future__ import annotations

import functools
import warnings

import flax.linen as nn
import numpy as np
import pytest
from flax import serialization
from omegaconf.errors import MissingMandatoryValue

from heistlab import compose, data, experiment, external_victims, training, victims
from heistlab.checks import ConfigError
from heistlab.external_victims import VictimShapeError
from heistlab.results import read_results
from tests.conftest import SMALL_MLP
from tests.test_configs import composed
from tests.test_end_to_end import TINY, run_cli


@functools.cache
def digit_centroids() -> np.ndarray:
    splits = data.make_splits(data.load_digits(), seed=0)
    train = splits.victim_train
    return np.stack([train.x[train.y == label].mean(axis=0) for label in range(10)])


def nearest_centroid(inputs: np.ndarray) -> np.ndarray:
    """A victim for victim=callable: a softmax over minus squared distances to each digit's mean image."""
    distances = ((inputs[:, None] - digit_centroids()[None]) ** 2).sum(axis=(2, 3, 4))
    scores = np.exp(-(distances - distances.min(axis=1, keepdims=True)))
    return scores / scores.sum(axis=1, keepdims=True)


# Imported by name in the run, as a user's own module would be.
TARGET = "tests.test_external_victims_runs:nearest_centroid"
CALLABLE = ["victim=callable", f"victim.target={TARGET}", "victim.input_shape=[8,8,1]"]
CALLABLE += ["victim.num_classes=10"]


@pytest.fixture(scope="module")
def digits_splits_cli():
    return compose.build_splits(composed())


@pytest.fixture(scope="module")
def sklearn_onnx(tmp_path_factory, digits_splits_cli):
    """A scikit-learn MLPClassifier trained on the digits victim split, exported by skl2onnx."""
    from skl2onnx import to_onnx
    from sklearn.neural_network import MLPClassifier

    train = digits_splits_cli.victim_train
    flat = train.x.reshape(len(train.x), -1)
    classifier = MLPClassifier(
        hidden_layer_sizes=(64,), max_iter=100, learning_rate_init=0.01, random_state=0
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # not converged after 100 iterations: accurate enough (0.96)
        classifier.fit(flat, train.y)
    exported = to_onnx(classifier, flat[:1], options={id(classifier): {"zipmap": False}})
    path = tmp_path_factory.mktemp("onnx") / "sklearn_mlp.onnx"
    path.write_bytes(exported.SerializeToString())
    return classifier, path


def no_defense(cfg, splits):
    return compose.build_defense(cfg.defense, compose.defender_data(cfg, splits))


@pytest.mark.slow
def test_a_sklearn_export_serves_sklearns_own_probabilities(sklearn_onnx, digits_splits_cli):
    classifier, path = sklearn_onnx
    cfg = composed("victim=onnx", f"victim.path={path}")
    victim, from_cache = compose.load_victim(cfg, digits_splits_cli, no_defense(cfg, digits_splits_cli))
    test = digits_splits_cli.test
    expected = classifier.predict_proba(test.x.reshape(len(test.x), -1))
    np.testing.assert_allclose(victim.predict_proba(test.x), expected, atol=1e-5)
    assert not from_cache and victim.num_classes == 10 and victim.input_shape == (8, 8, 1)
    from skl2onnx import to_onnx

    zipmap = path.with_name("zipmap.onnx")  # skl2onnx's default: probabilities as a sequence of dicts
    zipmap.write_bytes(to_onnx(classifier, test.x[:1].reshape(1, -1)).SerializeToString())
    with pytest.raises(
        ValueError, match=r"has 0 floating-point .* options=\{id\(model\): \{'zipmap': False\}\}"
    ):
        external_victims.load_onnx(zipmap, (8, 8, 1))


@pytest.mark.slow
def test_knockoff_steals_a_sklearn_onnx_victim_from_the_command_line(tmp_path, sklearn_onnx, cache_dir):
    _, path = sklearn_onnx
    finished = run_cli(["victim=onnx", f"victim.path={path}", f"hydra.run.dir={tmp_path}"], cache_dir)
    assert finished.returncode == 0, finished.stderr[-2000:]
    found = read_results(tmp_path)["metrics"]
    assert found["queries_served"] == 1000 and found["victim_accuracy"] > 0.93
    assert found["fidelity_test"] >= 0.9  # the built-in MLP victim: 0.95 with the same settings


@pytest.mark.slow
def test_a_pytorch_export_is_served_channels_first_from_logits(tmp_path, digits_splits_cli):
    torch = pytest.importorskip("torch")  # not in dev (a large download): pip install a CPU build of torch
    torch.manual_seed(0)
    network = torch.nn.Sequential(
        torch.nn.Conv2d(1, 8, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.Flatten(),
        torch.nn.Linear(8 * 8 * 8, 10),
    )
    train = digits_splits_cli.victim_train
    images = torch.from_numpy(np.transpose(train.x, (0, 3, 1, 2)).copy())
    optimizer = torch.optim.Adam(network.parameters(), lr=0.01)
    for _ in range(30):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(network(images), torch.from_numpy(train.y).long()).backward()
        optimizer.step()
    path = tmp_path / "torch_cnn.onnx"
    with warnings.catch_warnings():  # the TorchScript exporter's deprecation (dynamo=True needs onnxscript)
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            network,
            (images[:1],),
            str(path),
            input_names=["image"],
            dynamic_axes={"image": {0: "batch"}},
            dynamo=False,
        )
    cfg = composed(
        "victim=onnx", f"victim.path={path}", "victim.outputs=logits", "victim.channels_first=true"
    )
    victim, _ = compose.load_victim(cfg, digits_splits_cli, no_defense(cfg, digits_splits_cli))
    test = digits_splits_cli.test
    with torch.no_grad():
        logits = network(torch.from_numpy(np.transpose(test.x, (0, 3, 1, 2)).copy()))
    expected = torch.softmax(logits, dim=1).numpy()
    np.testing.assert_allclose(victim.predict_proba(test.x), expected, atol=1e-5)
    assert (expected.argmax(axis=1) == test.y).mean() > 0.9
    channels_last = composed("victim=onnx", f"victim.path={path}", "victim.outputs=logits")
    with pytest.raises(
        VictimShapeError, match=r"shaped \(1, 8, 8\) but the data are shaped \(8, 8, 1\); set"
    ):
        compose.load_victim(channels_last, digits_splits_cli, no_defense(cfg, digits_splits_cli))


@pytest.mark.slow
def test_a_python_function_victim_is_attacked_from_the_command_line(tmp_path, cache_dir):
    finished = run_cli([*CALLABLE, *TINY, f"hydra.run.dir={tmp_path}"], cache_dir)
    assert finished.returncode == 0, finished.stderr[-2000:]
    record = read_results(tmp_path)
    test = data.make_splits(data.load_digits(), seed=0).test
    accuracy = float((nearest_centroid(test.x).argmax(axis=1) == test.y).mean())
    assert record["metrics"]["victim_accuracy"] == pytest.approx(accuracy)
    assert record["metrics"]["queries_served"] == 120 and not record["metrics"]["victim_from_cache"]


@pytest.mark.slow
def test_a_flax_msgpack_checkpoint_is_attacked_from_the_command_line(
    tmp_path, small_victim, digits_splits, cache_dir
):
    checkpoint = tmp_path / "victim.msgpack"
    checkpoint.write_bytes(serialization.to_bytes(small_victim.params))
    overrides = ["victim=flax", "+victim.module.hidden=[32]", f"victim.params={checkpoint}"]
    finished = run_cli([*overrides, *TINY, f"hydra.run.dir={tmp_path / 'run'}"], cache_dir)
    assert finished.returncode == 0, finished.stderr[-2000:]
    labels = small_victim.predict_proba(digits_splits.test.x).argmax(axis=1)
    expected = float((labels == digits_splits.test.y).mean())
    assert read_results(tmp_path / "run")["metrics"]["victim_accuracy"] == pytest.approx(expected)


class TinyNet(nn.Module):
    """A user's own Flax module for victim=flax: nothing heistlab-specific in it."""

    classes: int
    width: int = 16

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(self.width)(x.reshape((x.shape[0], -1))))
        return nn.Dense(self.classes)(x)


@pytest.mark.slow
def test_a_users_flax_module_without_params_is_trained_and_cached(tmp_path, digits_splits_cli):
    module = ["victim.module._target_=tests.test_external_victims_runs.TinyNet", "+victim.module.classes=10"]
    cfg = composed("victim=flax", *module, "victim.train.epochs=1", f"cache_dir={tmp_path}")
    first, from_cache = compose.load_victim(cfg, digits_splits_cli, no_defense(cfg, digits_splits_cli))
    again, cached = compose.load_victim(cfg, digits_splits_cli, no_defense(cfg, digits_splits_cli))
    assert isinstance(first, victims.Victim) and (from_cache, cached) == (False, True)
    assert first.model.width == 16 and first.num_classes == 10
    test = digits_splits_cli.test
    np.testing.assert_array_equal(again.predict_proba(test.x), first.predict_proba(test.x))
    wrong = composed("victim=flax", module[0], "+victim.module.classes=3", f"cache_dir={tmp_path}")
    with pytest.raises(VictimShapeError, match="the victim TinyNet has 3 classes but the data have 10"):
        compose.load_victim(wrong, digits_splits_cli, no_defense(cfg, digits_splits_cli))


def test_a_shape_mismatch_stops_the_run_before_any_training(tmp_path, monkeypatch):
    overrides = [*CALLABLE, "victim.input_shape=[28,28,1]", "defense=adaptive_misinformation"]
    cfg = composed(*overrides, f"cache_dir={tmp_path}")  # a defense that trains when it is built

    def trains(*args, **kwargs):
        raise AssertionError("something was trained before the victim's shape was checked")

    monkeypatch.setattr(experiment, "build_defense", trains)
    monkeypatch.setattr(training, "train_classifier", trains)
    message = f"the victim {TARGET} takes inputs shaped (28, 28, 1) (victim.input_shape) "
    message += "but the data are shaped (8, 8, 1)"
    with pytest.raises(ConfigError) as raised:
        experiment.run_experiment(cfg, tmp_path)
    assert str(raised.value) == f"victim: {message}"
    assert isinstance(raised.value.__cause__, VictimShapeError)
    record = read_results(tmp_path)
    assert record["status"] == "refused" and message in record["error"]


def test_a_loaded_victim_refuses_a_defense_that_changes_its_training(digits_splits_cli):
    cfg = composed(*CALLABLE, "defense=backdoor_watermark")
    with pytest.raises(ValueError, match="changes the victim's training data.*victim=callable is loaded"):
        compose.load_victim(cfg, digits_splits_cli, no_defense(cfg, digits_splits_cli))


def test_external_victim_configs_name_what_they_need():
    with pytest.raises(MissingMandatoryValue, match="victim.path"):
        external_victims.load_configured(composed("victim=onnx").victim, None, trains_victim=False)
    with pytest.raises(MissingMandatoryValue, match="victim.target"):
        external_victims.load_configured(composed("victim=callable").victim, None, trains_victim=False)
    with pytest.raises(ValueError, match="victim.outputs must be one of probabilities, logits; got 'scores'"):
        external_victims.load_callable(TARGET, [8, 8, 1], 10, outputs="scores")


@pytest.mark.slow
def test_the_independent_model_of_a_victim_that_is_not_flax_is_the_default_mlp(digits_splits_cli):
    cfg = composed(*CALLABLE)
    victim, _ = compose.load_victim(cfg, digits_splits_cli, no_defense(cfg, digits_splits_cli))
    evidence = experiment.evidence_for(cfg, digits_splits_cli, victim, SMALL_MLP, None, ("attacker",), ())
    model, config = external_victims.independent_model(victim, 10)
    assert model.hidden == (256, 256) and config.epochs == 100
    test = digits_splits_cli.test
    assert (evidence.independent_labels(test.x) == test.y).mean() > 0.9
