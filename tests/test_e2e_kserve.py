"""KServe's protocols against the real TorchServe: started from config/kserve/config.properties the way KServe's
TorchServe runtime starts it, and once with TorchServe's own kservev2 envelope switched on."""

import base64
import io
import json
from concurrent.futures import ThreadPoolExecutor

import pytest
import yaml
from PIL import Image

from query import request
from ts_server import MODEL, ROOT, start_server

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def kserve(tmp_path_factory, tiny_model_dir):
    """Tokens are off in this config (KServe's wrapper sends none): requests below carry no token."""
    with start_server(tmp_path_factory.mktemp("kserve"), tiny_model_dir,
                      properties=ROOT / "config" / "kserve" / "config.properties", as_kserve=True) as running:
        yield running


def post(url, document):
    status, headers, body = request(url, None, json.dumps(document).encode(), "application/json", timeout=120)
    return status, {k.lower(): v for k, v in headers.items()}, json.loads(body)


def jpeg(b64):
    image = Image.open(io.BytesIO(base64.b64decode(b64)))
    assert image.format == "JPEG"
    return image


def prompts(*texts):
    return {"name": "prompt", "datatype": "BYTES", "shape": [len(texts)], "data": list(texts)}


def test_v2_infer_returns_one_base64_jpeg_per_prompt(kserve):
    status, headers, document = post(f"{kserve.inference}/v2/models/{MODEL}/infer", {"id": "req-7", "inputs": [
        prompts("a red cube", "a blue ball"), {"name": "seed", "datatype": "INT64", "shape": [2], "data": [1, 2]}]})
    assert status == 200, document
    assert (document["id"], document["model_name"]) == ("req-7", MODEL)
    outputs = {o["name"]: o for o in document["outputs"]}
    assert outputs["image"]["datatype"] == "BYTES" and outputs["image"]["shape"] == [2]
    images = [jpeg(data) for data in outputs["image"]["data"]]
    assert [image.size for image in images] == [(64, 64)] * 2 and images[0].tobytes() != images[1].tobytes()
    assert outputs["seed"]["data"] == [1, 2] and outputs["content_type"]["data"] == ["image/jpeg"] * 2


def test_same_seed_gives_the_same_image_through_v1_and_v2(kserve):
    _, _, v1 = post(f"{kserve.inference}/v1/models/{MODEL}:predict", {"instances": [{"prompt": "a cat", "seed": 5}]})
    _, _, v2 = post(f"{kserve.inference}/v2/models/{MODEL}/infer", {"inputs": [
        prompts("a cat"), {"name": "seed", "datatype": "INT64", "shape": [1], "data": [5]}]})
    (prediction,) = v1["predictions"]
    assert prediction["seed"] == 5
    assert jpeg(prediction["image"]["b64"]).tobytes() == jpeg(v2["outputs"][0]["data"][0]).tobytes()


def test_bad_v2_request_is_a_400_in_the_protocols_error_shape_and_its_neighbours_succeed(kserve):
    bad = {"inputs": [prompts("x"), {"name": "height", "datatype": "INT64", "shape": [1], "data": [65]}]}
    good = {"inputs": [prompts("a dog")]}
    with ThreadPoolExecutor(4) as pool:  # sent together, so TorchServe may batch them into one handler call
        answers = list(pool.map(lambda d: post(f"{kserve.inference}/v2/models/{MODEL}/infer", d),
                                [bad, good, good, bad]))
    for status, headers, document in (answers[0], answers[3]):
        assert status == 400 and headers["content-type"] == "application/json"
        assert list(document) == ["error"]
        assert "inputs[1].data[0]" in document["error"] and "height" in document["error"]
    for status, _, document in answers[1:3]:
        assert status == 200 and jpeg(document["outputs"][0]["data"][0]).size == (64, 64)


def test_bad_v1_request_is_a_400_naming_the_instance_field(kserve):
    status, _, document = post(f"{kserve.inference}/v1/models/{MODEL}:predict",
                               {"instances": ["fine", {"prompt": "x", "num_inference_steps": 0}]})
    assert status == 400 and list(document) == ["error"] and "instances[1].num_inference_steps" in document["error"]


def test_the_wrapper_can_poll_readiness_without_a_token(kserve):
    # KServe's wrapper polls management_address/models/<name> with no token before it routes traffic.
    status, _, body = request(f"{kserve.management}/models/{MODEL}?customized=false", None, timeout=30)
    assert status == 200 and json.loads(body)[0]["workers"][0]["status"] == "READY"


@pytest.fixture(scope="module")
def envelope(tmp_path_factory, tiny_model_dir):
    """TorchServe's own kservev2 envelope on: it reads only a batch's first request, so batchSize 1."""
    work = tmp_path_factory.mktemp("envelope")
    config = yaml.safe_load((ROOT / "config" / "model-config-cpu.yaml").read_text())
    config["batchSize"] = 1
    (work / "model-config.yaml").write_text(yaml.safe_dump(config))
    with start_server(work, tiny_model_dir, model_config=work / "model-config.yaml",
                      extra="service_envelope=kservev2") as running:
        yield running


def test_under_torchserves_kservev2_envelope_v2_gets_an_image_and_a_bad_request_a_400(envelope):
    url = f"{envelope.inference}/v2/models/{MODEL}/infer"
    status, _, body = request(url, envelope.token, json.dumps({"inputs": [prompts("a cat")]}).encode(),
                              "application/json", timeout=120)
    document = json.loads(body)
    assert status == 200, document
    assert document["outputs"][0]["datatype"] == "BYTES" and jpeg(document["outputs"][0]["data"][0]).size == (64, 64)

    status, _, body = request(url, envelope.token, json.dumps({"inputs": [
        prompts("a cat"), {"name": "seed", "datatype": "INT64", "shape": [1], "data": [-3]}]}).encode(),
        "application/json", timeout=120)
    assert status == 400 and b"inputs[1].data[0]" in body


def test_tritonclient_with_its_defaults_binary_tensors_in_and_out(kserve):
    """tritonclient sends binary input tensors and asks for binary outputs unless told otherwise; TorchServe hands the
    handler the raw body and its headers."""
    import numpy as np
    import tritonclient.http as triton_http
    from tritonclient.utils import InferenceServerException

    client = triton_http.InferenceServerClient(kserve.inference.removeprefix("http://"))
    prompt = triton_http.InferInput("prompt", [2], "BYTES")
    prompt.set_data_from_numpy(np.array([b"a red cube", "une boule bleue".encode()], dtype=object))
    seed = triton_http.InferInput("seed", [2], "INT64")
    seed.set_data_from_numpy(np.array([1, 2], dtype=np.int64))
    answer = client.infer(MODEL, [prompt, seed])
    images = [Image.open(io.BytesIO(bytes(data))) for data in answer.as_numpy("image")]  # the JPEG bytes themselves
    assert [(image.format, image.size) for image in images] == [("JPEG", (64, 64))] * 2
    assert answer.as_numpy("seed").tolist() == [1, 2]
    # The same seed through JSON tensors gives the same image; a bad value is a 400 naming it.
    _, _, document = post(f"{kserve.inference}/v2/models/{MODEL}/infer", {"inputs": [
        prompts("a red cube"), {"name": "seed", "datatype": "INT64", "shape": [1], "data": [1]}]})
    assert jpeg(document["outputs"][0]["data"][0]).tobytes() == images[0].tobytes()
    width = triton_http.InferInput("width", [1], "INT64")
    width.set_data_from_numpy(np.array([100], dtype=np.int64))
    with pytest.raises(InferenceServerException, match=r"\(width\) must be a multiple of 8"):
        client.infer(MODEL, [prompt, width])
