"""The TorchServe handler driven in-process with TorchServe's own Context and RequestProcessor.

TorchServe 0.12's MockContext has no per-request response API (set_response_status, content type, headers), so these
tests build the real ts.context.Context the worker passes, as ts/service.py does.
"""

import base64
import io
import json
import re
from pathlib import Path

import pytest
from PIL import Image
from ts.context import Context, RequestProcessor

from conftest import cpu_handler_block
from package_model import zip_weights
from sd_handler import StableDiffusionHandler


@pytest.fixture(scope="module")
def handler_and_context(tmp_path_factory, tiny_model_dir):
    model_dir = tmp_path_factory.mktemp("model_dir")
    zip_weights(tiny_model_dir, model_dir / "model.zip")
    context = Context("stable-diffusion", str(model_dir), {"model": {}}, 4, None, "0.12.0",
                      model_yaml_config={"minWorkers": 1, "handler": cpu_handler_block()})
    handler = StableDiffusionHandler()
    handler.initialize(context)
    return handler, context


def handle(handler, context, bodies):
    context.request_processor = [RequestProcessor({}) for _ in bodies]
    outputs = handler.handle([{"body": b} for b in bodies], context)
    assert len(outputs) == len(bodies)
    return [(context.get_response_status(i)[0], context.get_response_content_type(i),
             context.get_response_headers(i), out) for i, out in enumerate(outputs)]


def test_initialize_extracts_the_zip_and_loads_the_engine(handler_and_context):
    handler, context = handler_and_context
    assert handler.initialized
    assert handler.engine.backend == "eager" and handler.engine.device.type == "cpu"
    assert (Path(context.system_properties["model_dir"]) / "model" / "model_index.json").is_file()


def test_batch_with_one_bad_request_answers_each_on_its_own(handler_and_context):
    handler, context = handler_and_context
    results = handle(handler, context, [
        "a plain text prompt",
        {"prompt": "bad", "height": 100},
        {"prompt": "png please", "format": "png", "seed": 9, "width": 96},
        bytearray(b'{"prompt": "json bytes", "seed": 3}'),
    ])
    status, content_type, _, body = results[1]
    assert (status, content_type) == (400, "application/json")
    assert json.loads(body)["field"] == "height" and json.loads(body)["value"] == 100

    expected = ((0, "image/jpeg", (64, 64)), (2, "image/png", (96, 64)), (3, "image/jpeg", (64, 64)))
    for i, expected_type, size in expected:
        status, content_type, headers, body = results[i]
        assert (status, content_type) == (200, expected_type)
        image = Image.open(io.BytesIO(body))
        assert image.format == ("PNG" if expected_type == "image/png" else "JPEG") and image.size == size
    assert results[2][2]["X-Seed"] == "9" and results[3][2]["X-Seed"] == "3"
    assert re.fullmatch(r"engine;dur=\d+\.\d, encode;dur=\d+\.\d", results[0][2]["Server-Timing"])


def test_form_encoded_or_empty_body_is_a_400_naming_body(handler_and_context):
    handler, context = handler_and_context
    context.request_processor = [RequestProcessor({}), RequestProcessor({})]
    outputs = handler.handle([{'{"prompt": "x"}': b""}, {}], context)
    for i, out in enumerate(outputs):
        assert context.get_response_status(i)[0] == 400
        assert json.loads(out)["field"] == "body"


def test_generation_failure_is_a_per_request_500_and_the_handler_lives_on(handler_and_context, monkeypatch):
    handler, context = handler_and_context
    pipeline_class = type(handler.engine.pipe)
    real_call = pipeline_class.__call__

    def failing_on_tall_images(self, **kwargs):  # a fault the tiny CPU model cannot produce by itself
        if kwargs["height"] == 128:
            raise RuntimeError("simulated kernel failure")
        return real_call(self, **kwargs)

    monkeypatch.setattr(pipeline_class, "__call__", failing_on_tall_images)
    results = handle(handler, context, [{"prompt": "tall", "height": 128}, {"prompt": "fine"}])
    assert results[0][0] == 500 and "RuntimeError" in json.loads(results[0][3])["message"]
    assert results[1][0] == 200
    monkeypatch.undo()
    assert handle(handler, context, [{"prompt": "tall again", "height": 128}])[0][0] == 200


def test_an_unexpected_engine_exception_still_answers_every_request(handler_and_context, monkeypatch):
    handler, context = handler_and_context

    def broken_generate(requests):  # a bug that escapes the engine's own per-group handling
        raise KeyError("unexpected")

    monkeypatch.setattr(handler.engine, "generate", broken_generate)
    results = handle(handler, context, [{"prompt": "a"}, {"prompt": "bad", "quality": 0}, {"prompt": "c"}])
    assert [r[0] for r in results] == [500, 400, 500]
    assert all(r[1] == "application/json" for r in results)


@pytest.mark.parametrize("body, field", [
    ("[" * 100000, "body"),
    ('{"prompt": "x", "seed": ' + "9" * 5000 + "}", "body"),
    ('{"prompt": "\\ud800 unpaired"}', "prompt"),
    ({"prompt": "x", "guidance_scale": float("nan")}, "guidance_scale"),
    ({"prompt": "x", "guidance_scale": 10**400}, "guidance_scale"),  # a dict, as TorchServe decodes JSON bodies
])
def test_hostile_bodies_are_400s_with_valid_json(handler_and_context, body, field):
    handler, context = handler_and_context
    [(status, content_type, _, answer)] = handle(handler, context, [body])
    assert (status, content_type) == (400, "application/json")
    error = json.loads(answer, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
    assert error["field"] == field and len(answer) < 1000


def test_an_encoding_failure_fails_only_its_request(handler_and_context, monkeypatch):
    from sd_engine import protocols

    handler, context = handler_and_context
    real_encode = protocols.encode_image

    def encode_failing_for_png(image, fmt, quality):  # PIL cannot be made to fail on demand
        if fmt == "png":
            raise OSError("simulated encoder failure")
        return real_encode(image, fmt, quality)

    monkeypatch.setattr(protocols, "encode_image", encode_failing_for_png)
    results = handle(handler, context, [{"prompt": "a", "format": "png"}, {"prompt": "b"}])
    assert [r[0] for r in results] == [500, 200]
    assert json.loads(results[0][3])["error"] == "GenerationError"


def test_kserve_bodies_share_the_batch_and_fail_on_their_own(handler_and_context):
    handler, context = handler_and_context
    context.manifest = {"model": {"modelName": "stable-diffusion", "modelVersion": "1.0"}}
    v2 = {"id": "r-1", "inputs": [{"name": "prompt", "datatype": "BYTES", "shape": [2], "data": ["a", "b"]},
                                  {"name": "seed", "datatype": "INT64", "shape": [2], "data": [3, 4]}]}
    results = handle(handler, context, [
        {"instances": [{"prompt": "a cat", "seed": 1}, "a dog"]},
        v2,
        {"inputs": [{"name": "prompt", "datatype": "BYTES", "shape": [1], "data": ["x"]},
                    {"name": "height", "datatype": "INT64", "shape": [1], "data": [65]}]},
        "a plain prompt",
    ])
    status, content_type, _, body = results[0]
    assert (status, content_type) == (200, "application/json")
    predictions = json.loads(body)["predictions"]
    assert [p["seed"] for p in predictions][0] == 1 and len(predictions) == 2
    for p in predictions:
        assert Image.open(io.BytesIO(base64.b64decode(p["image"]["b64"]))).size == (64, 64)

    status, content_type, _, body = results[1]
    document = json.loads(body)
    assert (status, document["id"], document["model_name"]) == (200, "r-1", "stable-diffusion")
    outputs = {o["name"]: o for o in document["outputs"]}
    assert outputs["seed"]["data"] == [3, 4] and outputs["image"]["shape"] == [2]
    images = [base64.b64decode(data) for data in outputs["image"]["data"]]
    assert all(image[:2] == b"\xff\xd8" for image in images) and images[0] != images[1]

    status, content_type, _, body = results[2]
    assert (status, content_type) == (400, "application/json")
    assert json.loads(body) == {"error": json.loads(body)["error"]} and "inputs[1].data[0]" in json.loads(body)["error"]
    assert results[3][0] == 200 and results[3][1] == "image/jpeg"


def test_under_torchserves_kservev2_envelope_the_answer_is_a_base64_string(handler_and_context):
    # What TorchServe's kservev2 envelope hands the handler: the first request's tensors, BYTES data unpacked.
    handler, context = handler_and_context
    context.request_processor = [RequestProcessor({})]
    (answer,) = handler.handle([{"name": "prompt", "datatype": "BYTES", "shape": [1], "data": "a cat"}], context)
    assert context.get_response_status(0)[0] == 200
    assert Image.open(io.BytesIO(base64.b64decode(answer))).format == "JPEG"
    (answer,) = handler.handle([{"name": "prompt", "datatype": "BYTES", "shape": [1], "data": "a cat"},
                                {"name": "seed", "datatype": "INT64", "shape": [1], "data": [-1]}], context)
    assert context.get_response_status(0)[0] == 400 and "inputs[1].data[0]" in json.loads(answer)["error"]


def test_a_lost_gpu_context_makes_the_worker_exit_so_torchserve_restarts_it(handler_and_context, monkeypatch):
    # A sticky CUDA error cannot be produced on the CPU: the engine's flag is set by hand here, as
    # Engine._run_group sets it when a failed call leaves the device unusable (seen on an H200, see optimize.py).
    handler, context = handler_and_context
    exits = []
    monkeypatch.setattr("sd_handler.exit_worker", exits.append)
    handle(handler, context, ["a fine prompt"])
    assert exits == []
    monkeypatch.setattr(handler.engine, "device_failure", "AcceleratorError: an illegal memory access")
    handle(handler, context, ["a fine prompt"])
    assert exits == [1]


def test_hostile_kserve_bodies_fail_alone_and_an_oversized_answer_is_a_413(handler_and_context, monkeypatch):
    handler, context = handler_and_context
    nested = []
    for _ in range(900):
        nested = [nested]
    results = handle(handler, context, [
        {"inputs": [{"name": "prompt", "datatype": {"a": 1}, "shape": [1], "data": ["x"]}]},
        {"prompt": nested},
        {"inputs": [{"name": "prompt", "datatype": "BYTES", "shape": [10**300] * 50, "data": ["x"]}]},
        "a good prompt",
    ])
    assert [r[0] for r in results] == [400, 400, 400, 200]
    monkeypatch.setattr("sd_handler.MAX_ANSWER_BYTES", 1000)  # a 64x64 JPEG is ~3 kB as base64
    ((status, content_type, _, body),) = handle(handler, context, [{"instances": ["a cat"]}])
    assert (status, content_type) == (413, "application/json") and "MiB limit" in json.loads(body)["error"]
