"""The request contract: parse_request turns a body into a GenerationRequest or an InvalidRequest naming the field."""

import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sd_engine.errors import InvalidRequest
from sd_engine.requests import MAX_SEED, GenerationRequest, RequestRules, parse_request

RULES = RequestRules(height=64, width=64, num_inference_steps=4, max_height=256, max_width=256,
                     max_num_inference_steps=50)


def test_plain_text_is_the_prompt_with_config_defaults():
    request = parse_request("  a red fox \n", RULES)
    assert request.prompt == "a red fox"
    assert (request.height, request.width, request.num_inference_steps) == (64, 64, 4)
    assert request.guidance_scale == RULES.guidance_scale
    assert request.format == "jpeg" and request.quality == RULES.quality
    assert 0 <= request.seed <= MAX_SEED


def test_bytes_and_json_text_and_dict_are_equivalent():
    body = {"prompt": "a fox", "seed": 5, "num_inference_steps": 3, "height": 128, "width": 96,
            "guidance_scale": 5, "negative_prompt": "blurry", "format": "PNG", "quality": 80}
    expected = GenerationRequest(prompt="a fox", negative_prompt="blurry", num_inference_steps=3, guidance_scale=5.0,
                                 height=128, width=96, seed=5, format="png", quality=80)
    assert parse_request(body, RULES) == expected
    assert parse_request(json.dumps(body), RULES) == expected
    assert parse_request(bytearray(json.dumps(body).encode()), RULES) == expected


@pytest.mark.parametrize("body", ["just a string", ["a", "list"], 42, b"[1]", b"a plain prompt"])
def test_declared_json_must_be_an_object(body):
    with pytest.raises(InvalidRequest, match="`body`") as caught:
        parse_request(body, RULES, declared_json=True)
    assert caught.value.field == "body"
    assert parse_request(b'{"prompt": "x"}', RULES, declared_json=True).prompt == "x"


def test_seed_null_is_drawn_at_random():
    seeds = {parse_request({"prompt": "x", "seed": None}, RULES).seed for _ in range(5)}
    assert len(seeds) > 1


def test_jpg_is_an_alias_of_jpeg():
    assert parse_request({"prompt": "x", "format": "jpg"}, RULES).format == "jpeg"


@pytest.mark.parametrize("body, field", [
    (b"\xff\xfe\x00bad", "body"),
    ('{"prompt": "x",', "body"),
    ("[1, 2]", "body"),
    (42, "body"),
    ({}, "prompt"),
    ({"prompt": 7}, "prompt"),
    ({"prompt": "   "}, "prompt"),
    ({"prompt": "x" * 2001}, "prompt"),
    ({"prompt": "x", "negative_prompt": ["a"]}, "negative_prompt"),
    ({"prompt": "x", "steps": 3}, "steps"),
    ({"prompt": "x", "num_inference_steps": 0}, "num_inference_steps"),
    ({"prompt": "x", "num_inference_steps": 51}, "num_inference_steps"),
    ({"prompt": "x", "num_inference_steps": 3.0}, "num_inference_steps"),
    ({"prompt": "x", "num_inference_steps": True}, "num_inference_steps"),
    ({"prompt": "x", "guidance_scale": "7"}, "guidance_scale"),
    ({"prompt": "x", "guidance_scale": -1}, "guidance_scale"),
    ({"prompt": "x", "guidance_scale": 51}, "guidance_scale"),
    ({"prompt": "x", "guidance_scale": math.inf}, "guidance_scale"),
    ({"prompt": "x", "guidance_scale": math.nan}, "guidance_scale"),
    ({"prompt": "x", "height": 100}, "height"),
    ({"prompt": "x", "height": 0}, "height"),
    ({"prompt": "x", "height": -64}, "height"),
    ({"prompt": "x", "height": 264}, "height"),
    ({"prompt": "x", "width": 56}, "width"),
    ({"prompt": "x", "seed": -1}, "seed"),
    ({"prompt": "x", "seed": 2**63}, "seed"),
    ({"prompt": "x", "seed": "7"}, "seed"),
    ({"prompt": "x", "format": "gif"}, "format"),
    ({"prompt": "x", "format": 1}, "format"),
    ({"prompt": "x", "quality": 0}, "quality"),
    ({"prompt": "x", "quality": 101}, "quality"),
])
def test_each_invalid_field_is_named(body, field):
    with pytest.raises(InvalidRequest) as caught:
        parse_request(body, RULES)
    assert caught.value.field == field
    assert f"`{field}`" in str(caught.value)
    assert caught.value.status == 400
    json.dumps(caught.value.to_dict())  # the error body is always serialisable


def test_error_body_names_field_and_value():
    with pytest.raises(InvalidRequest) as caught:
        parse_request({"prompt": "x", "height": 100}, RULES)
    assert caught.value.to_dict() == {"error": "InvalidRequest", "field": "height", "value": 100,
                                      "message": "`height` must be a multiple of 8, got 100"}


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                                                       max_size=3), max_leaves=8)
field_names = st.sampled_from(["prompt", "negative_prompt", "num_inference_steps", "guidance_scale", "height",
                               "width", "seed", "format", "quality", "other"])


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.dictionaries(field_names, json_values, max_size=6), st.binary(max_size=64),
                 st.text(max_size=64), json_values))
def test_any_input_parses_or_raises_invalid_request(body):
    try:
        request = parse_request(body, RULES)
    except InvalidRequest as error:
        assert isinstance(error.field, str) and f"`{error.field}`" in str(error)
        return
    assert request.prompt.strip()
    assert 1 <= request.num_inference_steps <= RULES.max_num_inference_steps
    assert 64 <= request.height <= 256 and request.height % 8 == 0
    assert 64 <= request.width <= 256 and request.width % 8 == 0
    assert math.isfinite(request.guidance_scale) and 0 <= request.guidance_scale <= RULES.max_guidance_scale
    assert 0 <= request.seed <= MAX_SEED and request.format in ("jpeg", "png") and 1 <= request.quality <= 100


def test_integers_beyond_float_range_are_a_400_not_an_overflow():
    with pytest.raises(InvalidRequest) as caught:
        parse_request({"prompt": "x", "guidance_scale": 10**400}, RULES)
    assert caught.value.field == "guidance_scale"
