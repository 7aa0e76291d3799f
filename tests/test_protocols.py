"""KServe v1 / v2 (Open Inference Protocol) bodies -> requests, and the response documents."""

import base64
import re
from pathlib import Path

import pytest

from sd_engine.errors import InvalidRequest
from sd_engine.protocols import (MAX_ANSWER_BYTES, MAX_IMAGES_PER_BODY, PLAIN, V1, V2, EncodedImage, decode,
                                 from_envelope_tensors, is_envelope_tensor, v1_response, v2_response)
from sd_engine.requests import RequestRules, parse_request

RULES = RequestRules(num_inference_steps=4, height=64, width=64)


def prompt_tensor(*prompts, shape=None):
    return {"name": "prompt", "datatype": "BYTES", "shape": shape or [len(prompts)], "data": list(prompts)}


def field_of(body):
    with pytest.raises(InvalidRequest) as caught:
        decode(body, RULES)
    return caught.value.field


def test_plain_body_is_one_request():
    decoded = decode({"prompt": "a cat", "seed": 1}, RULES)
    assert decoded.protocol == PLAIN and [r.seed for r in decoded.requests] == [1]


def test_v1_instances_are_objects_or_prompt_strings():
    decoded = decode({"instances": [{"prompt": "a cat", "seed": 1, "num_inference_steps": 2}, "a dog"]}, RULES)
    assert decoded.protocol == V1
    first, second = decoded.requests
    assert (first.prompt, first.seed, first.num_inference_steps) == ("a cat", 1, 2)
    assert (second.prompt, second.num_inference_steps) == ("a dog", 4)


@pytest.mark.parametrize("body, field", [
    ({"instances": []}, "instances"),
    ({"instances": "a cat"}, "instances"),
    ({"instances": ["ok", {"prompt": "x", "seed": -1}]}, "instances[1].seed"),
    ({"instances": ["ok", 7]}, "instances[1]"),
    ({"instances": [{"prompt": "x", "colour": "red"}]}, "instances[0].colour"),
    ({"instances": ["x"], "signature_name": "y"}, "signature_name"),
    ({"instances": ["x"] * (MAX_IMAGES_PER_BODY + 1)}, "instances"),
])
def test_v1_errors_name_the_path_into_the_body(body, field):
    assert field_of(body) == field


def test_v2_one_value_per_image_or_one_for_all_and_parameters_for_all():
    decoded = decode({"id": "r-1", "parameters": {"num_inference_steps": 3}, "inputs": [
        prompt_tensor("a cat", "a dog"),
        {"name": "seed", "datatype": "INT64", "shape": [2, 1], "data": [[5], [6]]},
        {"name": "guidance_scale", "datatype": "FP32", "shape": [1], "data": [2.5]},
    ]}, RULES)
    assert decoded.protocol == V2 and decoded.request_id == "r-1"
    assert [(r.prompt, r.seed, r.guidance_scale, r.num_inference_steps) for r in decoded.requests] == [
        ("a cat", 5, 2.5, 3), ("a dog", 6, 2.5, 3)]


@pytest.mark.parametrize("inputs, field", [
    ([], "inputs"),
    ([{"name": "seed", "datatype": "INT64", "shape": [1], "data": [1]}], "inputs"),  # no prompt
    ([prompt_tensor("x"), {"name": "colour", "datatype": "BYTES", "shape": [1], "data": ["red"]}], "inputs[1].name"),
    ([prompt_tensor("x"), prompt_tensor("y")], "inputs[1].name"),
    ([{"name": "prompt", "datatype": "INT64", "shape": [1], "data": ["x"]}], "inputs[0].datatype"),
    ([prompt_tensor("x", shape=[3])], "inputs[0].shape"),
    ([prompt_tensor("x", "y"), {"name": "seed", "datatype": "INT64", "shape": [3], "data": [1, 2, 3]}],
     "inputs[0].data"),  # 2 prompts for 3 seeds: only 1 value or one per image (3) can be matched up
    ([prompt_tensor("x", "y"), {"name": "seed", "datatype": "INT64", "shape": [2], "data": [1, -2]}],
     "inputs[1].data[1]"),
    ([prompt_tensor("")], "inputs[0].data[0]"),
    ([prompt_tensor(*["x"] * (MAX_IMAGES_PER_BODY + 1))], "inputs"),
    ("not a list", "inputs"),
])
def test_v2_errors_name_the_tensor(inputs, field):
    assert field_of({"inputs": inputs}) == field


def test_v2_bad_parameter_is_named_as_a_parameter():
    assert field_of({"inputs": [prompt_tensor("x")], "parameters": {"height": 65}}) == "parameters.height"


def test_torchserve_envelope_tensors_arrive_unpacked_and_ask_for_one_image():
    # TorchServe's kservev2 envelope replaces each BYTES tensor's data by its first value and passes the tensors.
    tensors = [{"name": "prompt", "datatype": "BYTES", "shape": [1], "data": "a cat"},
               {"name": "seed", "datatype": "INT64", "shape": [1], "data": [7]}]
    assert all(is_envelope_tensor(t) for t in tensors) and not is_envelope_tensor({"body": b"{}"})
    (request,) = from_envelope_tensors(tensors, RULES).requests
    assert (request.prompt, request.seed) == ("a cat", 7)
    with pytest.raises(InvalidRequest, match="one image"):
        from_envelope_tensors(tensors[:1] + [{"name": "seed", "datatype": "INT64", "shape": [2], "data": [1, 2]}],
                              RULES)


def test_responses_carry_base64_images_in_request_order():
    images = [EncodedImage(b"\xff\xd8one\xff\xd9", "image/jpeg", parse_request({"prompt": "a", "seed": 1}, RULES),
                           ("prompt",)),
              EncodedImage(b"\x89PNGtwo", "image/png", parse_request({"prompt": "b", "seed": 2}, RULES))]
    v1 = v1_response(images)["predictions"]
    assert [base64.b64decode(p["image"]["b64"]) for p in v1] == [b"\xff\xd8one\xff\xd9", b"\x89PNGtwo"]
    assert [p["seed"] for p in v1] == [1, 2] and v1[0]["truncated"] == ["prompt"] and "truncated" not in v1[1]

    v2 = v2_response(images, "stable-diffusion", "1.0", "r-1")
    assert (v2["model_name"], v2["model_version"], v2["id"]) == ("stable-diffusion", "1.0", "r-1")
    outputs = {o["name"]: o for o in v2["outputs"]}
    assert outputs["image"]["datatype"] == "BYTES" and outputs["image"]["shape"] == [2]
    assert base64.b64decode(outputs["image"]["data"][1]) == b"\x89PNGtwo"
    assert outputs["content_type"]["data"] == ["image/jpeg", "image/png"] and outputs["seed"]["data"] == [1, 2]


@pytest.mark.parametrize("body, field", [
    ({"inputs": [{"name": "prompt", "datatype": ["BYTES"], "shape": [1], "data": ["x"]}]}, "inputs[0].datatype"),
    ({"inputs": [{"name": "prompt", "datatype": "BYTES", "shape": [10**4000] * 250, "data": ["x"]}]},
     "inputs[0].shape"),  # each size is checked before multiplying
    ({"inputs": [{"name": "prompt", "datatype": "BYTES", "shape": [-1, -1], "data": ["x"]}]}, "inputs[0].shape"),
    ({"inputs": [{"name": "prompt", "datatype": "BYTES", "shape": "1", "data": ["x"]}]}, "inputs[0].shape"),
    ({"inputs": [prompt_tensor("x")], "parameters": []}, "parameters"),
    ({"inputs": [prompt_tensor("x")], "id": 7}, "id"),
])
def test_hostile_v2_bodies_are_invalid_requests(body, field):
    assert field_of(body) == field


def test_deeply_nested_values_are_reported_without_overflowing():
    nested = []
    for _ in range(5000):
        nested = [nested]
    with pytest.raises(InvalidRequest) as caught:
        decode({"instances": [{"prompt": nested}]}, RULES)
    assert caught.value.field == "instances[0].prompt" and "[[[" in str(caught.value)
    assert len(str(caught.value.to_dict())) < 400


def test_a_body_may_ask_for_at_most_max_images():
    body = {"instances": ["a", "b", "c"]}
    assert len(decode(body, RULES, max_images=3).requests) == 3
    with pytest.raises(InvalidRequest, match="at most 2 images"):
        decode(body, RULES, max_images=2)


def test_form_fields_named_like_a_tensor_are_not_taken_for_torchserves_envelope():
    assert not is_envelope_tensor({"name": b"x", "datatype": b"BYTES"})  # form values arrive as bytes
    assert is_envelope_tensor({"name": "prompt", "datatype": "BYTES", "data": "x"})  # the envelope allows no shape


@pytest.mark.parametrize("properties", ["config.properties", "config/kserve/config.properties"])
def test_the_answer_cap_fits_torchserves_max_response_size(properties):
    # Above max_response_size TorchServe's frontend drops the worker's whole message (every request of the batch).
    text = (Path(__file__).resolve().parent.parent / properties).read_text()
    (limit,) = re.findall(r"^max_response_size=(\d+)$", text, flags=re.M)
    assert MAX_ANSWER_BYTES + 64 * 1024 <= int(limit)


def test_a_shape_with_many_dimensions_is_refused_without_multiplying_it_out():
    values = ["x"] * 2000
    body = {"inputs": [{"name": "prompt", "datatype": "BYTES", "shape": [2000] * 160000, "data": values}]}
    assert field_of(body) == "inputs[0].shape"  # multiplied out, this 0.9 MiB body took 8 s of CPU


def test_null_parameters_are_no_parameters():
    assert len(decode({"inputs": [prompt_tensor("x")], "parameters": None}, RULES).requests) == 1


def test_v2_loras_as_a_parameter_or_a_bytes_tensor_per_image():
    rules = RequestRules(num_inference_steps=4, height=64, width=64, loras=("detail", "style"))
    decoded = decode({"parameters": {"loras": {"style": 0.5}}, "inputs": [prompt_tensor("a cat", "a dog")]}, rules)
    assert [r.loras for r in decoded.requests] == [(("style", 0.5),)] * 2
    decoded = decode({"inputs": [prompt_tensor("a cat", "a dog"), {
        "name": "loras", "datatype": "BYTES", "shape": [2], "data": ['{"style": 0.5}', '{"detail": -1, "style": 1}']}]},
        rules)
    assert [r.loras for r in decoded.requests] == [(("style", 0.5),), (("detail", -1.0), ("style", 1.0))]
    with pytest.raises(InvalidRequest) as caught:
        decode({"inputs": [prompt_tensor("a cat"), {"name": "loras", "datatype": "BYTES", "shape": [1],
                                                     "data": ['{"nope": 1}']}]}, rules)
    assert caught.value.field == "inputs[1].data[0]" and "(loras)" in str(caught.value)
