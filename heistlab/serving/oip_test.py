"""The Open Inference Protocol's tensors: what is encoded decodes to the same array, and every way a tensor or
an infer body can be wrong is refused with what was wrong."""

from __future__ import annotations

import json

import numpy as np
import pytest

from heistlab.serving.oip import (
    MalformedTensor,
    decode_tensor,
    encode_tensor,
    infer_answer,
    infer_request,
    output_named,
    parse_infer_body,
)
from heistlab.serving.validation import BadRequest, input_schema

SCHEMA = input_schema((2, 2), max_batch=4)


def test_float32_rows_round_trip_exactly_through_flat_data():
    x = np.random.default_rng(0).uniform(size=(3, 2, 2)).astype(np.float32)
    tensor = encode_tensor("input-0", x, "FP32")
    assert tensor["shape"] == [3, 2, 2] and len(tensor["data"]) == 12
    name, decoded = decode_tensor(json.loads(json.dumps(tensor)))
    assert name == "input-0" and decoded.dtype == np.float32 and np.array_equal(decoded, x)


def test_nested_data_is_read_in_row_major_order():
    tensor = {"name": "p", "shape": [2, 2], "datatype": "INT64", "data": [[1, 2], [3, 4]]}
    assert decode_tensor(tensor)[1].tolist() == [[1, 2], [3, 4]]


@pytest.mark.parametrize(
    ("tensor", "message"),
    [
        ({"name": "p", "shape": [2], "datatype": "FP32"}, "lacks data"),
        ({"name": "p", "shape": [2], "datatype": "FP8", "data": [1, 2]}, "datatype must be one of"),
        ({"name": "p", "shape": [3], "datatype": "FP32", "data": [1, 2]}, "holds 3 values, data holds 2"),
        ({"name": "p", "shape": [2], "datatype": "FP32", "data": [1, "2"]}, "numbers only, found str"),
        ({"name": "p", "shape": [-1], "datatype": "FP32", "data": []}, "sizes >= 0"),
        ({"name": "p", "shape": [1], "datatype": "UINT8", "data": [300]}, "do not fit UINT8"),
    ],
)
def test_malformed_tensors_name_what_is_wrong(tensor, message):
    with pytest.raises(MalformedTensor, match=message):
        decode_tensor(tensor)


def test_an_answer_is_searched_for_the_named_output():
    answer = infer_answer("m", "probabilities", np.eye(2, dtype=np.float32))
    assert output_named(answer, "probabilities").tolist() == [[1, 0], [0, 1]]
    with pytest.raises(MalformedTensor, match="no output named 'labels' \\(outputs: 'probabilities'\\)"):
        output_named(answer, "labels")


def body(document) -> bytes:
    return json.dumps(document).encode()


def test_an_infer_body_becomes_float32_inputs_and_the_output_asked_for():
    x = np.full((2, 2, 2), 0.5, np.float32)
    inputs, output = parse_infer_body(
        body(infer_request(x, "any-name", "FP64", ["labels"])), "application/json", SCHEMA
    )
    assert inputs.dtype == np.float32 and np.array_equal(inputs, x) and output == "labels"
    document = infer_request(x, "input-0", "FP32", [])
    assert parse_infer_body(body(document), "application/json", SCHEMA)[1] is None


@pytest.mark.parametrize(
    ("document", "status", "message"),
    [
        ({"inputs": []}, 422, "exactly one tensor"),
        ({"inputs": [], "extra": 1}, 422, "unknown fields"),
        (infer_request(np.zeros((2, 4)), "i", "FP32", []), 422, "shaped"),
        (infer_request(np.zeros((5, 2, 2)), "i", "FP32", []), 422, "exceeds the maximum batch size 4"),
        (infer_request(np.full((1, 2, 2), 2.0), "i", "FP32", []), 422, "must lie in"),
        ({"inputs": [{"name": "i", "shape": [1], "datatype": "BOOL", "data": [True]}]}, 422, "datatype"),
        (infer_request(np.zeros((1, 2, 2)), "i", "FP32", ["a", "b"]), 422, "list of one"),
    ],
)
def test_bad_infer_bodies_are_refused_like_bad_predict_bodies(document, status, message):
    with pytest.raises(BadRequest, match=message) as refused:
        parse_infer_body(body(document), "application/json", SCHEMA)
    assert refused.value.status == status


def test_infer_bodies_must_be_json():
    with pytest.raises(BadRequest) as refused:
        parse_infer_body(b"inputs", "text/plain", SCHEMA)
    assert refused.value.status == 415
