"""The Open Inference Protocol's REST tensors (the KServe V2 protocol: MLServer, KServe, Triton and others).

A request ``POST /v2/models/{model}/infer`` carries ``{"inputs": [{"name", "shape", "datatype", "data"}],
"outputs": [{"name"}]}``; the answer carries ``{"model_name", "outputs": [{"name", "shape", "datatype",
"data"}]}``, ``data`` in row-major order, flat or nested. Both sides of heistlab speak it: the client
(``heistlab.serving.oip_client``) encodes its batches and decodes the answers here, and the server's ``/v2``
routes (``heistlab.serving.app``) decode requests and encode answers here.

Every decoding step checks what it reads and raises ``MalformedTensor`` naming the tensor and what was
wrong (a missing field, an unknown datatype, a shape that does not match the data), never a bare KeyError.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

# The protocol's numeric datatypes (BOOL and BYTES, strings, are not tensors of numbers: not accepted).
DATATYPES = {
    "UINT8": np.uint8,
    "UINT16": np.uint16,
    "UINT32": np.uint32,
    "UINT64": np.uint64,
    "INT8": np.int8,
    "INT16": np.int16,
    "INT32": np.int32,
    "INT64": np.int64,
    "FP16": np.float16,
    "FP32": np.float32,
    "FP64": np.float64,
}
INTEGER_TYPES = tuple(name for name in DATATYPES if "INT" in name)


class MalformedTensor(ValueError):
    """A tensor (or the document holding it) that does not follow the protocol."""


def check_datatype(datatype: Any, what: str = "datatype") -> str:
    if datatype not in DATATYPES:
        raise MalformedTensor(f"{what} must be one of {', '.join(DATATYPES)}; got {datatype!r}")
    return datatype


def encode_tensor(name: str, array: np.ndarray, datatype: str) -> dict:
    """One tensor of the protocol: ``array`` cast to ``datatype``, its data flat in row-major order."""
    values = np.asarray(array).astype(DATATYPES[check_datatype(datatype)])
    return {
        "name": name,
        "shape": list(values.shape),
        "datatype": datatype,
        "data": values.ravel().tolist(),
    }


def infer_request(inputs: np.ndarray, input_name: str, datatype: str, output_names: list[str]) -> dict:
    """The body of ``POST /v2/models/{model}/infer`` for one batch, asking for ``output_names``."""
    return {
        "inputs": [encode_tensor(input_name, inputs, datatype)],
        "outputs": [{"name": name} for name in output_names],
    }


def _flat_numbers(data: Any, where: str) -> list:
    """The numbers of a flat or nested ``data`` list, in row-major order."""
    if not isinstance(data, list):
        raise MalformedTensor(f"{where}: data must be a list of numbers, got {type(data).__name__}")
    flat: list = []
    pending = [iter(data)]
    while pending:
        for item in pending[-1]:
            if isinstance(item, list):
                pending.append(iter(item))
                break
            if isinstance(item, bool) or not isinstance(item, int | float):
                raise MalformedTensor(f"{where}: data must hold numbers only, found {type(item).__name__}")
            flat.append(item)
        else:
            pending.pop()
    return flat


def decode_tensor(tensor: Any, where: str = "tensor") -> tuple[str, np.ndarray]:
    """The name and array of one protocol tensor, checked: name, shape, datatype and data agree."""
    if not isinstance(tensor, dict):
        raise MalformedTensor(f"{where} must be an object, got {type(tensor).__name__}")
    missing = [field for field in ("name", "shape", "datatype", "data") if field not in tensor]
    if missing:
        raise MalformedTensor(f"{where} lacks {', '.join(missing)}")
    name, shape = tensor["name"], tensor["shape"]
    where = f"{where} {name!r}"
    if not isinstance(name, str):
        raise MalformedTensor(f"{where}: name must be a string")
    if not isinstance(shape, list) or not all(
        isinstance(size, int) and not isinstance(size, bool) and size >= 0 for size in shape
    ):
        raise MalformedTensor(f"{where}: shape must be a list of sizes >= 0, got {shape!r}")
    datatype = check_datatype(tensor["datatype"], f"{where}: datatype")
    flat = _flat_numbers(tensor["data"], where)
    if len(flat) != math.prod(shape):
        raise MalformedTensor(
            f"{where}: shape {shape} holds {math.prod(shape)} values, data holds {len(flat)}"
        )
    try:
        values = np.asarray(flat, dtype=np.float64 if "FP" in datatype else object)
        array = values.astype(DATATYPES[datatype]).reshape(shape)
    except (OverflowError, ValueError, TypeError) as error:
        raise MalformedTensor(f"{where}: data do not fit {datatype} ({error})") from None
    return name, array


def output_named(document: Any, name: str) -> np.ndarray:
    """The output tensor ``name`` of an inference answer."""
    if not isinstance(document, dict) or not isinstance(document.get("outputs"), list):
        raise MalformedTensor("the answer must be an object with an 'outputs' list")
    decoded = [decode_tensor(tensor, f"output {index}") for index, tensor in enumerate(document["outputs"])]
    for found, array in decoded:
        if found == name:
            return array
    names = ", ".join(repr(found) for found, _ in decoded) or "none"
    raise MalformedTensor(f"the answer has no output named {name!r} (outputs: {names})")


# The server's side: heistlab's /v2 routes answer one input tensor and at most one output per request.
SERVED_INPUT = "input-0"
LABELS_DATATYPE = "INT32"


def parse_infer_body(body: bytes, content_type: str | None, schema) -> tuple[np.ndarray, str | None]:
    """The float32 inputs and the requested output name (None: the role's default) of a ``/v2`` infer body,
    checked as ``/v1/predict`` checks its inputs (``heistlab.serving.validation``: 4xx ``BadRequest``)."""
    from heistlab.serving.validation import (
        BadRequest,
        check_inputs,
        check_json_content_type,
        parse_json,
    )

    def invalid(message: str) -> BadRequest:
        return BadRequest(422, "invalid_input", message)

    if len(body) > schema.max_body_bytes:
        raise BadRequest(
            413, "body_too_large", f"body of {len(body)} bytes exceeds the limit of {schema.max_body_bytes}"
        )
    if content_type is not None:  # OIP clients (tritonclient) may send JSON without a content type
        check_json_content_type(content_type)
    document = parse_json(body)
    if not isinstance(document, dict):
        raise invalid(f"body must be a JSON object with 'inputs', got {type(document).__name__}")
    unknown = sorted(set(document) - {"id", "parameters", "inputs", "outputs"})
    if unknown:
        raise invalid(f"unknown fields {unknown}; an infer request has id, parameters, inputs, outputs")
    tensors = document.get("inputs")
    if not isinstance(tensors, list) or len(tensors) != 1:
        raise invalid("inputs must be a list of exactly one tensor (the model takes one input)")
    try:
        _, array = decode_tensor(tensors[0], "input")
    except MalformedTensor as error:
        raise invalid(str(error)) from None
    expected = [-1, *schema.input_shape]
    if array.ndim != len(expected) or not len(array):
        raise invalid(f"input must be shaped {expected} (batch first), got {list(array.shape)}")
    inputs = check_inputs(array.tolist(), schema)
    outputs = document.get("outputs")
    if outputs is None or outputs == []:
        return inputs, None
    if not isinstance(outputs, list) or len(outputs) != 1 or not isinstance(outputs[0], dict):
        raise invalid("outputs must be a list of one {'name': ...} (probabilities, top_k or labels)")
    name = outputs[0].get("name")
    if not isinstance(name, str):
        raise invalid("outputs[0].name must be a string: probabilities, top_k or labels")
    return inputs, name


def infer_answer(model_name: str, output: str, answers: np.ndarray) -> dict:
    """The ``/v2`` answer: one output tensor named after what it holds (labels are INT32, scores FP32)."""
    datatype = LABELS_DATATYPE if output == "labels" else "FP32"
    return {"model_name": model_name, "outputs": [encode_tensor(output, answers, datatype)]}


def model_metadata(model_name: str, input_shape, num_classes: int, outputs) -> dict:
    """``GET /v2/models/{name}``: the input tensor and the outputs this key may ask for."""
    return {
        "name": model_name,
        "versions": [],
        "platform": "heistlab",
        "inputs": [{"name": SERVED_INPUT, "datatype": "FP32", "shape": [-1, *input_shape]}],
        "outputs": [
            {
                "name": output,
                "datatype": LABELS_DATATYPE if output == "labels" else "FP32",
                "shape": [-1] if output == "labels" else [-1, num_classes],
            }
            for output in outputs
        ],
    }


def infer_body_schema(schema) -> dict:
    """The JSON schema of a ``/v2`` infer body for the OpenAPI document: the protocol's structure. That
    ``shape`` matches the model and ``data`` matches ``shape`` is checked by ``parse_infer_body`` (422)."""
    tensor = {
        "type": "object",
        "required": ["name", "shape", "datatype", "data"],
        "properties": {
            "name": {"type": "string"},
            "shape": {
                "type": "array",
                "items": {"type": "integer", "minimum": 1},
                "minItems": len(schema.input_shape) + 1,
                "maxItems": len(schema.input_shape) + 1,
            },
            "datatype": {"type": "string", "enum": list(DATATYPES)},
            "data": {"type": "array"},
            "parameters": {"type": "object"},
        },
    }
    output = {
        "type": "object",
        "required": ["name"],
        "properties": {
            "name": {"type": "string", "enum": ["probabilities", "top_k", "labels"]},
            "parameters": {"type": "object"},
        },
    }
    return {
        "type": "object",
        "required": ["inputs"],
        "additionalProperties": False,
        "properties": {
            "id": {"type": "string"},
            "parameters": {"type": "object"},
            "inputs": {"type": "array", "items": tensor, "minItems": 1, "maxItems": 1},
            "outputs": {"type": "array", "items": output, "maxItems": 1},
        },
    }
