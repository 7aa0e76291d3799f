"""The v2 binary tensor extension, checked against tritonclient's own encoder and decoder."""

import json

import numpy as np
import pytest
import tritonclient.http as triton_http

from sd_engine.binary_tensors import decode_body, encode_answer, wanted_binary
from sd_engine.errors import InvalidRequest


def triton_body(binary=True):
    prompt = triton_http.InferInput("prompt", [2], "BYTES")
    prompt.set_data_from_numpy(np.array(["a cat".encode(), "ein Bär".encode()], dtype=object), binary_data=binary)
    guidance = triton_http.InferInput("guidance_scale", [1], "FP32")
    guidance.set_data_from_numpy(np.array([6.5], dtype=np.float32), binary_data=binary)
    body, json_length = triton_http.InferenceServerClient.generate_request_body([prompt, guidance])
    return body, json_length


def test_tritonclients_binary_body_decodes_to_the_json_document():
    body, json_length = triton_body()
    document = decode_body(body, str(json_length))
    assert [(t["name"], t["data"]) for t in document["inputs"]] == [("prompt", ["a cat", "ein Bär"]),
                                                                    ("guidance_scale", [6.5])]
    assert wanted_binary(document) == ("*",)  # tritonclient asks for binary outputs by default


def test_json_requests_choose_per_output():
    document = {"inputs": [], "outputs": [{"name": "image", "parameters": {"binary_data": True}}, {"name": "seed"}]}
    assert wanted_binary(document) == ("image",)
    assert wanted_binary({"inputs": [], "parameters": {"binary_data_output": False}}) == ()


@pytest.mark.parametrize("mangle, field", [
    (lambda body, n: (body, "abc"), "inference-header-content-length"),
    (lambda body, n: (body, len(body) + 1), "inference-header-content-length"),
    (lambda body, n: (body + b"x", n), "body"),
    (lambda body, n: (body[:-2], n), "inputs[1].parameters.binary_data_size"),
    (lambda body, n: (b"[" + body[1:], n), "body"),
])
def test_a_malformed_body_is_a_400_naming_where(mangle, field):
    body, json_length = triton_body()
    with pytest.raises(InvalidRequest) as caught:
        decode_body(*mangle(body, json_length))
    assert caught.value.field == field


def test_answers_read_back_with_tritonclient():
    document = {"model_name": "m", "id": "r", "outputs": [
        {"name": "image", "datatype": "BYTES", "shape": [2], "data": ["YWJj", "ZGVm"]},
        {"name": "content_type", "datatype": "BYTES", "shape": [2], "data": ["image/png", "image/jpeg"]},
        {"name": "seed", "datatype": "INT64", "shape": [2], "data": [3, 2**62]}]}
    body, header_length = encode_answer(json.loads(json.dumps(document)), ("*",), [b"\x89PNG...", b"\xff\xd8..."])
    result = triton_http.InferResult.from_response_body(body, header_length=header_length)
    assert [bytes(x) for x in result.as_numpy("image")] == [b"\x89PNG...", b"\xff\xd8..."]
    assert result.as_numpy("seed").tolist() == [3, 2**62]
    assert [bytes(x) for x in result.as_numpy("content_type")] == [b"image/png", b"image/jpeg"]
