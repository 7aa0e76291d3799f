"""The OpenAI Images API body -> requests: OpenAI's field names, our extras, errors naming OpenAI's field."""

import pytest

from sd_engine.errors import InvalidRequest
from sd_engine.openai_images import error_response, parse_generation
from sd_engine.requests import RequestRules

RULES = RequestRules(height=64, width=64, num_inference_steps=4, max_height=256, max_width=256)


def test_size_is_width_first_and_seeds_count_up_per_image():
    requests = parse_generation({"prompt": "a fox", "n": 3, "size": "128x64", "seed": 10, "output_format": "png",
                                 "model": "anything", "quality": "hd"}, RULES, max_images=4)
    assert [(r.width, r.height, r.seed, r.format) for r in requests] == [(128, 64, 10, "png"), (128, 64, 11, "png"),
                                                                         (128, 64, 12, "png")]


def test_defaults_are_the_models_and_each_image_draws_its_own_seed():
    requests = parse_generation({"prompt": "a fox", "n": 2, "size": "auto", "response_format": None}, RULES, 4)
    assert [(r.width, r.height, r.num_inference_steps) for r in requests] == [(64, 64, 4)] * 2
    assert requests[0].seed != requests[1].seed


@pytest.mark.parametrize("body, field", [
    ({"prompt": "x", "n": 5}, "n"), ({"prompt": "x", "n": 0}, "n"), ({"prompt": "x", "n": True}, "n"),
    ({"prompt": "x", "size": "64"}, "size"), ({"prompt": "x", "size": "100x64"}, "size"),
    ({"prompt": "x", "size": "1024x1024"}, "size"), ({"prompt": "x", "response_format": "url"}, "response_format"),
    ({"prompt": "x", "output_format": "webp"}, "output_format"),
    ({"prompt": "x", "output_compression": 101}, "output_compression"), ({"prompt": "x", "steps": 3}, "steps"),
    ({"n": 1}, "prompt"), (["x"], "body"), ({"prompt": "x", "seed": 2**63 - 1, "n": 2}, "seed"),
])
def test_each_bad_field_is_named_as_openai_calls_it(body, field):
    with pytest.raises(InvalidRequest) as caught:
        parse_generation(body, RULES, max_images=4)
    assert caught.value.field == field
    error = error_response(caught.value, 400)["error"]
    assert error["param"] == field and error["type"] == "invalid_request_error" and f"`{field}`" in error["message"]
