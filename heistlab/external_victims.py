"""Victims from outside heistlab: a Flax module with the user's parameters, an ONNX model, a Python function.

Each is served exactly like a built-in victim: the prediction API holds it (validation, budget, defenses,
records) and attacks only ever see the API. The victim's input shape is read from the model where it can
be (the ONNX graph; a trial initialisation of the Flax module on the data's shape; a callable's declared
shape) and checked against the data before anything is queried or trained; a mismatch is one line naming
both shapes.

Outputs are checked on every call: ``(batch, classes)`` finite values; ``outputs: logits`` get a softmax,
``outputs: probabilities`` must lie on the simplex within ``simplex_tolerance`` (rows are then
renormalised so that defenses see exact distributions).
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import math
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import serialization, traverse_util
from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf

from heistlab import training
from heistlab.data import Splits
from heistlab.models import MLP
from heistlab.victims import Victim

OUTPUT_KINDS = ("probabilities", "logits")
# Victims heistlab cannot train: they are loaded whole, never through the training loop.
LOADED_KINDS = ("onnx", "callable")
ONNX_FLOAT_TYPES = {"tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(float16)": np.float16}

# The "independent" model a watermark test compares against, for victims that are not a trainable Flax
# module (onnx, callable): the default victim=mlp architecture and training.
INDEPENDENT_HIDDEN = (256, 256)
INDEPENDENT_TRAINING = training.TrainConfig(epochs=100, batch_size=64, learning_rate=1e-3)


class VictimShapeError(ValueError):
    """A victim whose inputs or classes do not match the data it is meant to serve."""


class VictimOutputError(ValueError):
    """A victim whose answer is not a ``(batch, classes)`` array of probabilities (or logits)."""


class ExternalVictim(NamedTuple):
    """A model heistlab did not build: a batch function, the input shape it is served at, its classes.

    ``predict`` takes float32 inputs ``(N, *input_shape)`` and returns ``(N, num_classes)`` raw outputs;
    ``predict_proba`` checks them and turns them into probabilities (see the module docstring).
    """

    predict: Callable[[np.ndarray], np.ndarray]
    input_shape: tuple[int, ...]
    num_classes: int
    source: str
    outputs: str = "probabilities"
    simplex_tolerance: float = 1e-3

    def predict_proba(self, inputs: np.ndarray) -> np.ndarray:
        inputs = np.asarray(inputs, np.float32)
        raw = self.predict(inputs)
        return as_probabilities(
            raw, (len(inputs), self.num_classes), self.outputs, self.source, self.simplex_tolerance
        )


def as_probabilities(
    raw: Any, shape: tuple[int, int], outputs: str, source: str, tolerance: float
) -> np.ndarray:
    """``raw`` as float32 probabilities shaped ``shape``: softmax of logits, or checked probabilities."""
    try:
        values = np.asarray(raw, dtype=np.float64)
    except (TypeError, ValueError) as error:
        raise VictimOutputError(f"{source} returned outputs that are not a numeric array: {error}") from None
    if values.shape != shape:
        raise VictimOutputError(f"{source} returned outputs shaped {values.shape}; expected {shape}")
    if not np.all(np.isfinite(values)):
        row = int(np.argwhere(~np.isfinite(values))[0, 0])
        raise VictimOutputError(f"{source} returned NaN or infinite outputs (first in row {row})")
    if outputs == "logits":
        shifted = np.exp(values - values.max(axis=-1, keepdims=True))
        return (shifted / shifted.sum(axis=-1, keepdims=True)).astype(np.float32)
    sums = values.sum(axis=-1)
    bad = (values.min(axis=-1) < -tolerance) | (np.abs(sums - 1.0) > tolerance)
    if np.any(bad):
        row = int(np.argmax(bad))
        raise VictimOutputError(
            f"{source} returned outputs that are not probabilities: row {row} sums to {sums[row]:.6g} with "
            f"minimum {values[row].min():.6g} (tolerance {tolerance}); if the model returns logits, set "
            "victim.outputs=logits"
        )
    clipped = np.clip(values, 0.0, None)
    return (clipped / clipped.sum(axis=-1, keepdims=True)).astype(np.float32)


def check_output_kind(outputs: str) -> str:
    if outputs not in OUTPUT_KINDS:
        raise ValueError(f"victim.outputs must be one of {', '.join(OUTPUT_KINDS)}; got {outputs!r}")
    return outputs


def check_classes(model_classes: int, data_classes: int, source: str) -> None:
    if model_classes != data_classes:
        raise VictimShapeError(
            f"the victim {source} has {model_classes} classes but the data have {data_classes}"
        )


def shape_text(shape: Sequence[int | None]) -> str:
    """A shape as Python prints a tuple, ``?`` standing for a size the model leaves free."""
    sizes = ["?" if size is None else str(size) for size in shape]
    return f"({sizes[0]},)" if len(sizes) == 1 else f"({', '.join(sizes)})"


# ONNX


def input_adapter(
    model_shape: Sequence[int | None], data_shape: tuple[int, ...], channels_first: bool, source: str
) -> Callable[[np.ndarray], np.ndarray]:
    """How a batch shaped ``(N, *data_shape)`` (heistlab's ``H, W, C``) becomes the model's input.

    ``model_shape`` is the model's per-example shape (``None`` for a dimension the graph leaves free). The
    batch is passed as it is, transposed to ``C, H, W`` (``channels_first``), or flattened when the model
    takes flat vectors of the same length; anything else is a ``VictimShapeError`` naming both shapes.
    """
    layout = (data_shape[-1], *data_shape[:-1]) if channels_first and len(data_shape) >= 2 else data_shape
    fits = lambda expected, actual: (
        len(expected) == len(actual)
        and all(size is None or size == other for size, other in zip(expected, actual, strict=True))
    )
    if fits(model_shape, layout):
        if layout == data_shape:
            return lambda batch: batch
        order = (0, len(data_shape), *range(1, len(data_shape)))
        return lambda batch: np.ascontiguousarray(np.transpose(batch, order))
    if len(model_shape) == 1 and model_shape[0] in (None, math.prod(data_shape)):
        return lambda batch: batch.reshape(len(batch), -1)
    transposed = (data_shape[-1], *data_shape[:-1])
    hint = "" if channels_first or not fits(model_shape, transposed) else "; set victim.channels_first=true"
    raise VictimShapeError(
        f"the victim {source} takes inputs shaped {shape_text(model_shape)} but the data are shaped "
        f"{shape_text(data_shape)}{hint}"
    )


def onnx_output_name(session, requested: str | None, source: str) -> str:
    """The output to serve: ``requested``, or the model's only floating-point output of rank 2."""
    outputs = session.get_outputs()
    scores = [o.name for o in outputs if o.type in ONNX_FLOAT_TYPES and len(o.shape) == 2]
    described = ", ".join(f"{o.name} {o.type}" for o in outputs)
    if requested is not None and requested in scores:
        return requested
    if requested is not None:
        raise ValueError(
            f"victim.output_name {requested!r} is not a floating-point (batch, classes) output of {source}; "
            f"its outputs: {described}"
        )
    if len(scores) == 1:
        return scores[0]
    zipmap = any(o.type.startswith("seq(map") for o in outputs)
    hint = (
        "; a scikit-learn export needs to_onnx(..., options={id(model): {'zipmap': False}})" if zipmap else ""
    )
    raise ValueError(
        f"{source} has {len(scores)} floating-point (batch, classes) outputs ({described}); "
        f"name the one to serve with victim.output_name{hint}"
    )


def in_batches_of(size: int | None, predict: Callable[[np.ndarray], np.ndarray]):
    """``predict`` for a model whose graph fixes the batch size: chunks of ``size``, the last one padded."""
    if size is None:
        return predict

    def batched(inputs: np.ndarray) -> np.ndarray:
        answers = []
        for start in range(0, len(inputs), size):
            block = inputs[start : start + size]
            answers.append(np.asarray(predict(training.pad_rows(block, size)))[: len(block)])
        return np.concatenate(answers)

    return batched


def load_onnx(
    path: str | Path,
    data_shape: tuple[int, ...],
    *,
    outputs: str = "probabilities",
    output_name: str | None = None,
    channels_first: bool = False,
    simplex_tolerance: float = 1e-3,
) -> ExternalVictim:
    """An ONNX model run by onnxruntime on the CPU; its input name, shape and type come from its graph."""
    import onnxruntime

    check_output_kind(outputs)
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"victim.path {path} is not a file (an .onnx model is expected)")
    source = str(path)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    inputs = session.get_inputs()
    if len(inputs) != 1:
        raise ValueError(
            f"{source} takes {len(inputs)} inputs {[i.name for i in inputs]}; exactly one is accepted"
        )
    graph_input = inputs[0]
    if graph_input.type not in ONNX_FLOAT_TYPES:
        raise ValueError(
            f"{source}'s input {graph_input.name!r} is {graph_input.type}; "
            f"accepted: {', '.join(ONNX_FLOAT_TYPES)}"
        )
    dims = [size if isinstance(size, int) and size > 0 else None for size in graph_input.shape]
    if not dims:
        raise VictimShapeError(
            f"{source}'s input {graph_input.name!r} is a scalar; a batch of inputs is expected"
        )
    adapt = input_adapter(dims[1:], data_shape, channels_first, source)
    dtype, name = ONNX_FLOAT_TYPES[graph_input.type], onnx_output_name(session, output_name, source)
    run = lambda batch: session.run([name], {graph_input.name: adapt(batch).astype(dtype)})[0]
    predict = in_batches_of(dims[0], run)
    num_classes = int(np.asarray(predict(np.zeros((1, *data_shape), np.float32))).shape[-1])
    return ExternalVictim(predict, tuple(data_shape), num_classes, source, outputs, simplex_tolerance)


# Callables


def resolve_function(target: str) -> Callable:
    """The function ``package.module:function`` names."""
    module_name, colon, attribute = str(target).partition(":")
    if not colon or not module_name or not attribute:
        raise ValueError(f"victim.target must be written package.module:function, got {target!r}")
    try:
        found = importlib.import_module(module_name)
    except ImportError as error:
        raise ValueError(
            f"victim.target {target!r}: module {module_name!r} cannot be imported ({error})"
        ) from None
    for part in attribute.split("."):
        if not hasattr(found, part):
            raise ValueError(f"victim.target {target!r}: {module_name} has no attribute {attribute!r}")
        found = getattr(found, part)
    if not callable(found):
        raise ValueError(f"victim.target {target!r} names a {type(found).__name__}, not a function")
    return found


def load_callable(
    target: str,
    input_shape: Sequence[int],
    num_classes: int,
    *,
    outputs: str = "probabilities",
    simplex_tolerance: float = 1e-3,
) -> ExternalVictim:
    """A Python function from float32 inputs ``(N, *input_shape)`` to ``(N, num_classes)`` outputs."""
    check_output_kind(outputs)
    shape = tuple(int(size) for size in input_shape)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"victim.num_classes must be an integer >= 2, got {num_classes!r}")
    return ExternalVictim(
        resolve_function(target), shape, num_classes, str(target), outputs, simplex_tolerance
    )


# Flax


def flax_module(spec: DictConfig | dict, num_classes: int) -> nn.Module:
    """The Flax linen module ``spec['_target_']`` names, built with the other keys of ``spec``.

    Lists become tuples (modules must be hashable), and ``num_classes`` is filled in from the data when the
    module has that field and ``spec`` leaves it out.
    """
    options = OmegaConf.to_container(spec, resolve=True) if isinstance(spec, DictConfig) else dict(spec)
    target = options.pop("_target_", None)
    if not target:
        raise ValueError("victim.module needs a `_target_` naming a flax.linen.Module class")
    cls = get_class(target)
    if not (inspect.isclass(cls) and issubclass(cls, nn.Module)):
        raise ValueError(f"victim.module._target_ {target!r} is not a flax.linen.Module class")
    fields = {field.name for field in dataclasses.fields(cls)}
    if "num_classes" in fields and "num_classes" not in options:
        options["num_classes"] = num_classes
    options = {key: tuple(value) if isinstance(value, list) else value for key, value in options.items()}
    return cls(**options)


def check_flax_fits(
    model: nn.Module, data_shape: tuple[int, ...], num_classes: int, declared_shape: Sequence[int] | None
) -> None:
    """Traces ``model`` on one input of the data's shape: it must take it and answer ``num_classes``."""
    source = type(model).__name__
    if declared_shape is not None and tuple(declared_shape) != tuple(data_shape):
        raise VictimShapeError(
            f"the victim {source} takes inputs shaped {shape_text(tuple(declared_shape))} "
            f"(victim.input_shape) but the data are shaped {shape_text(data_shape)}"
        )
    probe = jax.ShapeDtypeStruct((1, *data_shape), jnp.float32)
    try:
        answer = jax.eval_shape(lambda x: model.init_with_output(jax.random.key(0), x)[0], probe)
    except Exception as error:  # any tracing failure means the module cannot take these inputs
        raise VictimShapeError(
            f"the victim {source} cannot take the data's inputs shaped {shape_text(data_shape)}: "
            f"{str(error).splitlines()[0]}"
        ) from error
    if answer.ndim != 2:
        raise VictimShapeError(
            f"the victim {source} answers shape {answer.shape[1:]}; (classes,) logits expected"
        )
    check_classes(int(answer.shape[-1]), num_classes, source)


def read_params(path: Path) -> Any:
    """A parameter tree from a Flax msgpack file (``flax.serialization.to_bytes``) or an Orbax folder."""
    if path.is_dir():
        import orbax.checkpoint as ocp  # installed with flax

        with warnings.catch_warnings():  # restored on this host's devices, as the parameters are used
            warnings.filterwarnings("ignore", message="Sharding info not provided")
            return ocp.PyTreeCheckpointer().restore(str(path.resolve()))
    if path.is_file():
        return serialization.msgpack_restore(path.read_bytes())
    raise FileNotFoundError(
        f"victim.params {path} is neither a checkpoint file nor an Orbax checkpoint folder"
    )


def fitted_params(template: Any, restored: Any, source: str, data_shape: tuple[int, ...]) -> Any:
    """``restored`` in ``template``'s structure, every array's shape checked against the template's.

    A tree without a top-level ``params`` collection is taken as the ``params`` collection itself.
    """
    if not (isinstance(restored, dict) and "params" in restored):
        restored = {"params": restored}
    expected = traverse_util.flatten_dict(serialization.to_state_dict(template), sep="/")
    found = traverse_util.flatten_dict(restored, sep="/")
    missing, extra = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
    if missing or extra:
        raise VictimShapeError(
            f"the checkpoint {source} does not match the module: missing {missing or 'nothing'}, "
            f"unexpected {extra or 'nothing'}"
        )
    for name, array in expected.items():
        if tuple(np.shape(found[name])) != tuple(array.shape):
            raise VictimShapeError(
                f"the checkpoint {source} holds {name} shaped {shape_text(np.shape(found[name]))} but the "
                f"module on the data's inputs {shape_text(data_shape)} needs {shape_text(array.shape)}"
            )
    state = traverse_util.unflatten_dict({name: jnp.asarray(found[name]) for name in expected}, sep="/")
    return serialization.from_state_dict(template, state)


def load_flax(model: nn.Module, params_path: str | Path, data_shape: tuple[int, ...]) -> Victim:
    """``model`` with the parameters of a checkpoint, checked to fit it on inputs of the data's shape."""
    path = Path(params_path).expanduser()
    template = training.init_params(model, data_shape, jax.random.key(0))
    return Victim(model, fitted_params(template, read_params(path), str(path), data_shape), tuple(data_shape))


# From a config


def load_configured(spec: DictConfig, splits: Splits, trains_victim: bool) -> ExternalVictim | Victim | None:
    """The victim ``spec`` describes when it is loaded, not trained; ``None`` when heistlab trains it.

    Loaded victims are checked against the data (shape and classes). ``trains_victim`` says a model-side
    defense (a watermark) must change the victim's training data, which a loaded victim cannot honour.
    """
    kind = spec.family
    loaded = kind in LOADED_KINDS or (kind == "flax" and spec.get("params"))
    if not loaded:
        if kind == "flax":
            model = flax_module(spec.module, splits.num_classes)
            check_flax_fits(model, splits.input_shape, splits.num_classes, spec.get("input_shape"))
        return None
    if trains_victim:
        raise ValueError(
            f"the defense changes the victim's training data (a watermark), but victim={kind} is loaded, "
            "not trained by heistlab; use a built-in victim or victim=flax without victim.params"
        )
    tolerance = float(spec.get("simplex_tolerance", 1e-3))
    if kind == "onnx":
        victim = load_onnx(
            spec.path,
            splits.input_shape,
            outputs=spec.outputs,
            output_name=spec.get("output_name"),
            channels_first=bool(spec.get("channels_first", False)),
            simplex_tolerance=tolerance,
        )
    elif kind == "callable":
        victim = load_callable(
            spec.target, spec.input_shape, spec.num_classes, outputs=spec.outputs, simplex_tolerance=tolerance
        )
        if victim.input_shape != splits.input_shape:
            raise VictimShapeError(
                f"the victim {victim.source} takes inputs shaped {shape_text(victim.input_shape)} "
                f"(victim.input_shape) but the data are shaped {shape_text(splits.input_shape)}"
            )
    else:
        model = flax_module(spec.module, splits.num_classes)
        check_flax_fits(model, splits.input_shape, splits.num_classes, spec.get("input_shape"))
        return load_flax(model, spec.params, splits.input_shape)
    check_classes(victim.num_classes, splits.num_classes, victim.source)
    victim.predict_proba(splits.test.x[:2])
    return victim


def independent_model(victim: Any, num_classes: int) -> tuple[nn.Module, training.TrainConfig | None]:
    """The model family an independent party trains for a watermark test: the victim's own Flax module
    (with the victim's training, ``None`` here), or the default MLP for victims that are not Flax."""
    if isinstance(victim, Victim):
        return victim.model, None
    return MLP(num_classes=num_classes, hidden=INDEPENDENT_HIDDEN), INDEPENDENT_TRAINING
