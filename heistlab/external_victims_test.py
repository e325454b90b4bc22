"""Victims from outside: ONNX graphs, Python functions and Flax checkpoints served with their outputs checked,
and every shape mismatch stopped with both shapes named."""

from __future__ import annotations

import jax
import numpy as np
import onnx
import pytest
from flax import serialization
from onnx import TensorProto, helper, numpy_helper

from heistlab import external_victims, training
from heistlab.api import PredictionAPI, QueryRefused
from heistlab.defenses import identity
from heistlab.external_victims import VictimOutputError, VictimShapeError
from heistlab.models import MLP
from heistlab.victims import Classifier


def linear_onnx(path, weights, input_shape, *, softmax=True, extra_output=False):
    """An ONNX graph ``softmax(flatten(x) @ weights)`` (or the logits), built with onnx.helper."""
    nodes = [
        helper.make_node("Flatten", ["x"], ["flat"], axis=1),
        helper.make_node("MatMul", ["flat", "w"], ["logits"]),
    ]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [None, weights.shape[1]])]
    if softmax:
        nodes.append(helper.make_node("Softmax", ["logits"], ["probs"], axis=1))
        outputs = [helper.make_tensor_value_info("probs", TensorProto.FLOAT, [None, weights.shape[1]])]
    if extra_output:
        nodes.append(helper.make_node("Identity", ["logits"], ["scores"]))
        outputs.append(helper.make_tensor_value_info("scores", TensorProto.FLOAT, [None, weights.shape[1]]))
    graph = helper.make_graph(
        nodes,
        "linear",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(input_shape))],
        outputs,
        initializer=[numpy_helper.from_array(weights.astype(np.float32), "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


def softmax(logits):
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


def test_logits_get_a_softmax_and_probabilities_are_checked_on_the_simplex():
    probs = external_victims.as_probabilities([[0.0, np.log(3.0)]], (1, 2), "logits", "m", 1e-3)
    np.testing.assert_allclose(probs, [[0.25, 0.75]], rtol=1e-6)
    kept = external_victims.as_probabilities([[0.2, 0.8000001]], (1, 2), "probabilities", "m", 1e-3)
    np.testing.assert_allclose(kept.sum(), 1.0, rtol=1e-6)
    with pytest.raises(VictimOutputError, match=r"m returned outputs that are not probabilities: row 1 sums"):
        external_victims.as_probabilities([[0.5, 0.5], [0.9, 0.3]], (2, 2), "probabilities", "m", 1e-3)
    with pytest.raises(VictimOutputError, match=r"shaped \(2, 3\); expected \(2, 2\)"):
        external_victims.as_probabilities(np.zeros((2, 3)), (2, 2), "logits", "m", 1e-3)
    with pytest.raises(VictimOutputError, match="NaN or infinite outputs \\(first in row 1\\)"):
        external_victims.as_probabilities([[0.5, 0.5], [np.nan, 1]], (2, 2), "probabilities", "m", 1e-3)


def test_an_onnx_graph_is_served_with_its_own_values_and_shape(tmp_path):
    weights = np.random.default_rng(0).normal(size=(4, 3))
    path = linear_onnx(tmp_path / "m.onnx", weights, [None, 4])
    victim = external_victims.load_onnx(path, (2, 2, 1))
    assert isinstance(victim, Classifier) and victim.num_classes == 3 and victim.input_shape == (2, 2, 1)
    inputs = np.random.default_rng(1).uniform(size=(5, 2, 2, 1)).astype(np.float32)
    expected = softmax(inputs.reshape(5, 4) @ weights)
    np.testing.assert_allclose(victim.predict_proba(inputs), expected, rtol=1e-5)


def test_logits_from_onnx_and_a_chosen_output_among_several(tmp_path):
    weights = np.arange(6, dtype=np.float32).reshape(2, 3) / 6
    path = linear_onnx(tmp_path / "m.onnx", weights, [None, 2], softmax=False, extra_output=True)
    with pytest.raises(ValueError, match=r"has 2 floating-point \(batch, classes\) outputs \(logits tensor"):
        external_victims.load_onnx(path, (2, 1, 1), outputs="logits")
    victim = external_victims.load_onnx(path, (2, 1, 1), outputs="logits", output_name="scores")
    inputs = np.array([[[[1.0]], [[0.5]]]], np.float32)
    np.testing.assert_allclose(
        victim.predict_proba(inputs), softmax(np.array([[1.0, 0.5]]) @ weights), rtol=1e-6
    )
    with pytest.raises(VictimOutputError, match="not probabilities.*victim.outputs=logits"):
        external_victims.load_onnx(path, (2, 1, 1), output_name="scores").predict_proba(inputs)


def test_a_channels_first_graph_gets_transposed_inputs(tmp_path):
    weights = np.zeros((12, 3), np.float32)
    weights[np.ravel_multi_index((2, 0, 1), (3, 2, 2)), 0] = 5.0  # channel 2, row 0, column 1 -> class 0
    path = linear_onnx(tmp_path / "m.onnx", weights, ["batch", 3, 2, 2])
    with pytest.raises(
        VictimShapeError, match=r"shaped \(3, 2, 2\) but the data are shaped \(2, 2, 3\); set"
    ):
        external_victims.load_onnx(path, (2, 2, 3))
    victim = external_victims.load_onnx(path, (2, 2, 3), channels_first=True)
    inputs = np.zeros((2, 2, 2, 3), np.float32)
    inputs[0, 0, 1, 2] = 1.0  # the same pixel in heistlab's (H, W, C) layout
    probs = victim.predict_proba(inputs)
    np.testing.assert_allclose(probs[0], softmax(np.array([5.0, 0, 0])), rtol=1e-6)
    np.testing.assert_allclose(probs[1], [1 / 3] * 3, rtol=1e-6)


def test_a_graph_with_a_fixed_batch_size_answers_any_batch(tmp_path):
    weights = np.random.default_rng(0).normal(size=(4, 3))
    path = linear_onnx(tmp_path / "m.onnx", weights, [2, 4])
    victim = external_victims.load_onnx(path, (4, 1, 1))
    inputs = np.random.default_rng(1).uniform(size=(5, 4, 1, 1)).astype(np.float32)
    np.testing.assert_allclose(
        victim.predict_proba(inputs), softmax(inputs.reshape(5, 4) @ weights), rtol=1e-5
    )


def test_an_onnx_shape_mismatch_names_both_shapes(tmp_path):
    path = linear_onnx(tmp_path / "m.onnx", np.ones((30, 2)), [None, 30])
    with pytest.raises(
        VictimShapeError, match=r"takes inputs shaped \(30,\) but the data are shaped \(8, 8, 1\)$"
    ):
        external_victims.load_onnx(path, (8, 8, 1))


def test_a_victim_from_outside_is_held_by_the_api_with_budget_and_records(tmp_path):
    path = linear_onnx(tmp_path / "m.onnx", np.eye(4, 3), [None, 4])
    victim = external_victims.load_onnx(path, (4, 1, 1))
    api = PredictionAPI(victim, identity(), key=jax.random.key(0), budget=3, output="labels")
    inputs = np.eye(4, dtype=np.float32)[:3].reshape(3, 4, 1, 1)
    np.testing.assert_array_equal(api.oracle().query(inputs), [0, 1, 2])
    with pytest.raises(QueryRefused):
        api.query(inputs[:1])
    assert api.num_classes == 3 and [record.served for record in api.records] == [True] * 3 + [False]


def test_the_prediction_server_serves_a_victim_from_outside(tmp_path):
    from heistlab.serving.audit import AuditLog
    from heistlab.serving.service import build_core

    victim = external_victims.load_onnx(linear_onnx(tmp_path / "m.onnx", np.eye(4, 3), [None, 4]), (4, 1, 1))
    core = build_core(victim, identity(), audit=AuditLog(tmp_path / "audit.sqlite"), quota=5)
    inputs = np.eye(4, dtype=np.float32)[:2].reshape(2, 4, 1, 1)
    served = core.predict("key-1", inputs, "labels")
    np.testing.assert_array_equal(served.answers, [0, 1])
    assert served.remaining == 3 and core.served("key-1") == 2


def halves(inputs):
    """A two-class victim for the tests: class 1 when the mean pixel exceeds one half."""
    above = (inputs.reshape(len(inputs), -1).mean(axis=1) > 0.5).astype(np.float32)
    return np.stack([1 - above, above], axis=1)


def test_a_python_function_is_a_victim_with_declared_shape_and_checked_answers():
    victim = external_victims.load_callable("heistlab.external_victims_test:halves", [2, 2, 1], 2)
    inputs = np.stack([np.full((2, 2, 1), 0.2), np.full((2, 2, 1), 0.9)]).astype(np.float32)
    np.testing.assert_array_equal(victim.predict_proba(inputs), [[1, 0], [0, 1]])
    wrong_classes = external_victims.load_callable("heistlab.external_victims_test:halves", [2, 2, 1], 3)
    with pytest.raises(VictimOutputError, match=r"shaped \(2, 2\); expected \(2, 3\)"):
        wrong_classes.predict_proba(inputs)


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ("heistlab.external_victims_test.halves", "must be written package.module:function"),
        ("heistlab.no_such_module:f", "module 'heistlab.no_such_module' cannot be imported"),
        ("heistlab.external_victims_test:absent", "has no attribute 'absent'"),
        ("heistlab.external_victims:OUTPUT_KINDS", "names a tuple, not a function"),
    ],
)
def test_bad_callable_targets_are_named(target, message):
    with pytest.raises(ValueError, match=message):
        external_victims.load_callable(target, [2, 2, 1], 2)


@pytest.mark.slow
def test_a_flax_msgpack_checkpoint_is_served_and_a_wrong_one_is_named(tmp_path):
    model = MLP(num_classes=3, hidden=(5,))
    params = training.init_params(model, (4, 1, 1), jax.random.key(1))
    (tmp_path / "full.msgpack").write_bytes(serialization.to_bytes(params))
    (tmp_path / "inner.msgpack").write_bytes(serialization.to_bytes(params["params"]))
    inputs = np.random.default_rng(0).uniform(size=(3, 4, 1, 1)).astype(np.float32)
    expected = training.predict_proba(model, params, inputs)
    for name in ("full.msgpack", "inner.msgpack"):
        victim = external_victims.load_flax(model, tmp_path / name, (4, 1, 1))
        np.testing.assert_allclose(victim.predict_proba(inputs), expected, rtol=1e-6)
        assert victim.num_classes == 3
    with pytest.raises(
        VictimShapeError, match=r"holds params/Dense_0/kernel shaped \(4, 5\) but the module on "
    ):
        external_victims.load_flax(model, tmp_path / "full.msgpack", (6, 1, 1))


def test_a_flax_orbax_checkpoint_is_served(tmp_path):
    import orbax.checkpoint as ocp

    model = MLP(num_classes=3, hidden=(5,))
    params = training.init_params(model, (4, 1, 1), jax.random.key(2))
    ocp.PyTreeCheckpointer().save(str(tmp_path / "ckpt"), params)
    victim = external_victims.load_flax(model, tmp_path / "ckpt", (4, 1, 1))
    inputs = np.random.default_rng(0).uniform(size=(3, 4, 1, 1)).astype(np.float32)
    np.testing.assert_allclose(
        victim.predict_proba(inputs), training.predict_proba(model, params, inputs), rtol=1e-6
    )


def test_a_flax_module_is_named_by_target_and_checked_on_the_data_shape():
    model = external_victims.flax_module({"_target_": "heistlab.models.MLP", "hidden": [7]}, num_classes=4)
    assert model == MLP(num_classes=4, hidden=(7,))
    external_victims.check_flax_fits(model, (8, 8, 1), 4, declared_shape=None)
    with pytest.raises(VictimShapeError, match=r"MLP has 4 classes but the data have 10"):
        external_victims.check_flax_fits(model, (8, 8, 1), 10, declared_shape=None)
    with pytest.raises(
        VictimShapeError, match=r"\(28, 28, 1\) \(victim.input_shape\) but the data are shaped"
    ):
        external_victims.check_flax_fits(model, (8, 8, 1), 4, declared_shape=[28, 28, 1])
    with pytest.raises(ValueError, match="is not a flax.linen.Module class"):
        external_victims.flax_module({"_target_": "heistlab.api.PredictionAPI"}, num_classes=4)
