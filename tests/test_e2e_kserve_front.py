"""End to end: the KServe front (KServe's own model server over the engine) on the tiny model, with the clients
users already have: tritonclient (HTTP with its binary-tensor defaults and with JSON, and gRPC), kserve's REST (v1,
v2) and gRPC clients, the openai SDK, and plain HTTP. It runs with an API key, so every call carries it."""

import base64
import io
import json
import signal
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from kserve_front import MODEL, start_front
from ts_server import ROOT
from query import request

pytestmark = pytest.mark.e2e
KEY = "test-key-1234"


@pytest.fixture(scope="module")
def front(tmp_path_factory, tiny_model_dir):
    with start_front(tmp_path_factory.mktemp("kserve-front"), tiny_model_dir, api_key=KEY) as running:
        yield running


def jpeg_size(data: bytes) -> tuple[int, int]:
    image = Image.open(io.BytesIO(data))
    assert image.format == "JPEG"
    return image.size


def call(front, path, body=None, token=KEY, content_type="application/json"):
    data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
    status, _, answer = request(f"{front.url}{path}", token, data, content_type if data is not None else None, 120)
    return status, answer


def test_health_readiness_and_metadata(front):
    assert call(front, "/v2/health/live", token=None)[0] == 200
    assert call(front, "/v2/health/ready", token=None)[0] == 200
    status, body = call(front, f"/v2/models/{MODEL}")
    metadata = json.loads(body)
    assert status == 200 and metadata["name"] == MODEL
    types = {i["name"]: i["datatype"] for i in metadata["inputs"]}
    assert types["prompt"] == types["loras"] == "BYTES" and types["seed"] == "INT64"
    assert [o["name"] for o in metadata["outputs"]] == ["image", "content_type", "seed"]


def test_every_other_route_needs_the_key(front):
    body = {"instances": ["a cat"]}
    assert call(front, f"/v1/models/{MODEL}:predict", body, token=None)[0] == 401
    assert call(front, f"/v1/models/{MODEL}:predict", body, token="wrong")[0] == 401
    assert call(front, f"/v2/models/{MODEL}", token=None)[0] == 401
    assert call(front, "/v1/images/generations", {"prompt": "x"}, token=None)[0] == 401
    import tritonclient.grpc as triton_grpc

    client = triton_grpc.InferenceServerClient(front.grpc)
    prompt = triton_grpc.InferInput("prompt", [1], "BYTES")
    prompt.set_data_from_numpy(np.array([b"a cat"], dtype=object))
    with pytest.raises(Exception, match="UNAUTHENTICATED|API key"):
        client.infer(MODEL, [prompt])


def triton_inputs(module, binary):
    prompt = module.InferInput("prompt", [2], "BYTES")
    prompt.set_data_from_numpy(np.array([b"a cat", b"a dog"], dtype=object), **({"binary_data": binary}
                                                                               if binary is not None else {}))
    seed = module.InferInput("seed", [2], "INT64")
    seed.set_data_from_numpy(np.array([11, 12], dtype=np.int64), **({"binary_data": binary}
                                                                   if binary is not None else {}))
    return [prompt, seed]


def test_tritonclient_http_with_its_binary_defaults(front):
    import tritonclient.http as triton_http

    client = triton_http.InferenceServerClient(front.url.removeprefix("http://"))
    answer = client.infer(MODEL, triton_inputs(triton_http, None), headers=front.auth)  # binary in and out
    assert [jpeg_size(bytes(image)) for image in answer.as_numpy("image")] == [(64, 64), (64, 64)]
    assert answer.as_numpy("seed").tolist() == [11, 12]


def test_tritonclient_http_with_json_tensors(front):
    import tritonclient.http as triton_http

    client = triton_http.InferenceServerClient(front.url.removeprefix("http://"))
    outputs = [triton_http.InferRequestedOutput(name, binary_data=False) for name in ("image", "content_type", "seed")]
    answer = client.infer(MODEL, triton_inputs(triton_http, False), outputs=outputs, headers=front.auth)
    images = [base64.b64decode(image) for image in answer.as_numpy("image")]  # JSON: base64, as TorchServe's front
    assert [jpeg_size(image) for image in images] == [(64, 64), (64, 64)]
    assert answer.as_numpy("content_type").tolist() == ["image/jpeg", "image/jpeg"]


def test_tritonclient_grpc(front):
    import tritonclient.grpc as triton_grpc

    client = triton_grpc.InferenceServerClient(front.grpc)
    answer = client.infer(MODEL, triton_inputs(triton_grpc, None), headers={"authorization": f"Bearer {KEY}"})
    assert [jpeg_size(bytes(image)) for image in answer.as_numpy("image")] == [(64, 64), (64, 64)]
    assert answer.as_numpy("seed").tolist() == [11, 12]


def test_a_bad_value_is_a_400_naming_it_through_each_client(front):
    import tritonclient.grpc as triton_grpc
    import tritonclient.http as triton_http
    from tritonclient.utils import InferenceServerException

    for module, address, headers in ((triton_http, front.url.removeprefix("http://"), front.auth),
                                     (triton_grpc, front.grpc, {"authorization": f"Bearer {KEY}"})):
        height = module.InferInput("height", [1], "INT64")
        height.set_data_from_numpy(np.array([65], dtype=np.int64))
        with pytest.raises(InferenceServerException, match=r"`inputs\[1\].data\[0\]` \(height\) must be a multiple "
                                                           r"of 8, got 65"):
            module.InferenceServerClient(address).infer(MODEL, triton_inputs(module, None)[:1] + [height],
                                                        headers=headers)


KSERVE_CLIENTS = """
import asyncio, base64, json, sys
from kserve import InferenceGRPCClient, InferenceRESTClient, InferInput, InferRequest, RESTConfig

url, grpc_address, model, key = sys.argv[1:]
auth = {"Authorization": "Bearer " + key}


async def run():
    v1 = InferenceRESTClient(RESTConfig(protocol="v1"))
    answer_v1 = await v1.infer(url, {"instances": [{"prompt": "a cat", "seed": 3}]}, model_name=model, headers=auth)
    prompt = InferInput("prompt", [1], "BYTES", ["a cat"])
    v2 = InferenceRESTClient(RESTConfig(protocol="v2"))
    answer_v2 = await v2.infer(url, InferRequest(model, [prompt], request_id="r-7"), model_name=model, headers=auth)
    answer_grpc = await InferenceGRPCClient(grpc_address).infer(InferRequest(model, [prompt]),
                                                               headers=[("authorization", "Bearer " + key)])
    print(json.dumps({"v1": answer_v1["predictions"][0], "v2_id": answer_v2.id,
                      "v2_image": answer_v2.outputs[0].data[0],
                      "grpc_image": base64.b64encode(bytes(answer_grpc.outputs[0].as_numpy()[0])).decode()}))


asyncio.run(run())
"""


def test_kserve_clients_rest_v1_v2_and_grpc(front):
    # Its own process: kserve's and tritonclient's gRPC modules define the same protobuf file and cannot be imported
    # into one Python process (a user has one or the other).
    completed = subprocess.run([sys.executable, "-c", KSERVE_CLIENTS, front.url, front.grpc, MODEL, KEY],
                               capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    answers = json.loads(completed.stdout.strip().splitlines()[-1])
    assert answers["v1"]["seed"] == 3 and jpeg_size(base64.b64decode(answers["v1"]["image"]["b64"])) == (64, 64)
    assert answers["v2_id"] == "r-7" and jpeg_size(base64.b64decode(answers["v2_image"])) == (64, 64)
    assert jpeg_size(base64.b64decode(answers["grpc_image"])) == (64, 64)


@pytest.mark.parametrize("prefix", ["/v1", "/openai/v1"])
def test_the_openai_sdk_at_either_prefix(front, prefix):
    from openai import BadRequestError, OpenAI

    client = OpenAI(base_url=front.url + prefix, api_key=KEY)
    answer = client.images.generate(model=MODEL, prompt="a lighthouse", n=2, size="64x64",
                                    extra_body={"seed": 40, "num_inference_steps": 3})
    assert [jpeg_size(base64.b64decode(image.b64_json)) for image in answer.data] == [(64, 64), (64, 64)]
    assert [image.model_extra["seed"] for image in answer.data] == [40, 41]
    with pytest.raises(BadRequestError) as caught:
        client.images.generate(model=MODEL, prompt="a lighthouse", size="100x64")
    assert caught.value.body["param"] == "size" and "multiple of 8" in caught.value.body["message"]
    with pytest.raises(BadRequestError) as caught:
        client.images.generate(model=MODEL, prompt="a lighthouse", response_format="url")
    assert caught.value.body["param"] == "response_format"
    styled = client.images.generate(model=MODEL, prompt="a lighthouse", size="64x64",
                                    extra_body={"seed": 40, "num_inference_steps": 3, "loras": {"style": 1.0}})
    assert styled.data[0].b64_json != answer.data[0].b64_json  # the same seed, another picture
    with pytest.raises(BadRequestError) as caught:
        client.images.generate(model=MODEL, prompt="a lighthouse", extra_body={"loras": {"style": 9}})
    assert caught.value.body["param"] == "loras" and "'style'" in caught.value.body["message"]


def test_concurrent_requests_batch_and_a_bad_one_fails_alone(front):
    bodies = [{"instances": [{"prompt": f"a fox {i}", "seed": i}]} for i in range(3)]
    bodies.append({"instances": [{"prompt": "bad", "width": 100}]})
    with ThreadPoolExecutor(len(bodies)) as pool:
        answers = list(pool.map(lambda body: call(front, f"/v1/models/{MODEL}:predict", body), bodies))
    assert [status for status, _ in answers] == [200, 200, 200, 400]
    assert [json.loads(body)["predictions"][0]["seed"] for _, body in answers[:3]] == [0, 1, 2]
    assert "`instances[0].width` must be a multiple of 8" in json.loads(answers[3][1])["error"]


def test_sigterm_finishes_the_request_in_flight_then_exits(tmp_path, tiny_model_dir):
    with start_front(tmp_path, tiny_model_dir, archive=True) as running:  # the .mar, as `make serve-kserve` serves
        answers = []
        body = {"instances": [{"prompt": "a slow one", "num_inference_steps": 40, "height": 128, "width": 128}]}
        sender = threading.Thread(target=lambda: answers.append(call(running, f"/v1/models/{MODEL}:predict", body,
                                                                     token=None)))
        sender.start()
        while "batch of 1 image" not in running.log.read_text():  # logged as the engine starts on it
            assert sender.is_alive(), answers
            sender.join(0.05)
        running.process.send_signal(signal.SIGTERM)
        sender.join(120)
        assert answers and answers[0][0] == 200, answers
        assert running.process.wait(timeout=120) == 0
        assert "stopped" in running.log.read_text()


def test_metrics_count_images_by_status_beside_kserves_own(front):
    assert call(front, "/v1/images/generations", {"prompt": "a fox", "size": "64x64"})[0] == 200
    assert call(front, "/v1/images/generations", {"prompt": "a fox", "size": "65x64"})[0] == 400
    assert call(front, "/v1/images/generations", {"prompt": "a fox", "loras": {"detail": 0.4}})[0] == 200
    assert call(front, f"/v1/models/{MODEL}:predict", {"instances": ["a fox"]})[0] == 200  # KServe's own metrics
    status, body = call(front, "/metrics", token=None)  # Prometheus scrapes without the key
    samples = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in body.decode().splitlines()
               if line and not line.startswith("#")}
    assert status == 200
    assert samples['ImagesGenerated_total{Status="ok"}'] >= 1
    assert samples['ImagesGenerated_total{Status="invalid"}'] >= 1
    assert samples["GenerationSeconds_count"] >= 1 and samples["QueueSeconds_count"] >= 1
    assert samples["BatchSize_count"] >= 1 and samples["LoraSwitchSeconds_count"] >= 1
    assert any(name.startswith("request_predict_seconds") for name in samples)  # KServe's own


def test_an_oversized_body_gets_a_readable_413_from_every_client(front):
    """A 20 MB body, sent whole by requests and curl (without Expect: 100-continue), and chunked with no length."""
    import requests

    url, big = f"{front.url}/v1/images/generations", b"a" * 20_000_000
    headers = dict(front.auth, **{"Content-Type": "application/json"})
    answers = [requests.post(url, data=big, headers=headers, timeout=60),
               requests.post(url, data=(big[i:i + 1_000_000] for i in range(0, len(big), 1_000_000)),
                             headers=headers, timeout=60)]
    for answer in answers:
        assert answer.status_code == 413 and "`body` must be at most 1048576 bytes" in answer.json()["error"]
    curl = subprocess.run(["curl", "-s", "-H", "Expect:", "-H", f"Authorization: Bearer {KEY}", "-H",
                           "Content-Type: application/json", "--data-binary", "@-", "-w", "\\n%{http_code}", url],
                          input=big, capture_output=True, timeout=60)
    body, code = curl.stdout.rsplit(b"\n", 1)
    assert code == b"413" and b"must be at most" in body


def test_the_load_test_drives_the_kserve_front_too(front, tmp_path):
    summary = tmp_path / "load.json"
    completed = subprocess.run([sys.executable, str(ROOT / "scripts" / "loadtest.py"), "--front", "kserve", "--url",
                                front.url, "--token", KEY, "--requests", "8", "--concurrency", "4", "--payload",
                                '{"prompt": "a fox", "num_inference_steps": 2}', "--json", str(summary)],
                               capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stdout[-2000:] + completed.stderr[-2000:]
    assert json.loads(summary.read_text())["status_counts"] == {"200": 8}


def test_the_model_repository_api_is_off_on_rest_and_grpc(front):
    """KServe's load/unload would take the model away from a pod that stays listed ready."""
    import tritonclient.grpc as triton_grpc

    status, body = call(front, f"/v2/repository/models/{MODEL}/unload", {})
    assert status == 403 and "repository API is off" in json.loads(body)["error"]
    with pytest.raises(Exception, match="PERMISSION_DENIED|repository API is off"):
        triton_grpc.InferenceServerClient(front.grpc).unload_model(MODEL, headers={"authorization": f"Bearer {KEY}"})
    assert call(front, f"/v1/models/{MODEL}:predict", {"instances": ["still here"]})[0] == 200


def test_malformed_bodies_are_400s_naming_where_and_chunked_oversized_ones_413s(front):
    import requests

    url = f"{front.url}/v2/models/{MODEL}/infer"
    headers = dict(front.auth, **{"Inference-Header-Content-Length": "abc"})
    answer = requests.post(url, data=b'{"inputs": []}', headers=headers, timeout=60)
    assert answer.status_code == 400
    assert "`inference-header-content-length` must be an integer" in answer.json()["error"]
    header = json.dumps({"inputs": [{"name": "prompt", "datatype": "BYTES", "shape": [1],
                                     "parameters": {"binary_data_size": 100}}]}).encode()
    answer = requests.post(url, data=header + b"\x03\x00\x00\x00abc", timeout=60,
                           headers=dict(front.auth, **{"Inference-Header-Content-Length": str(len(header))}))
    assert answer.status_code == 400 and "binary_data_size" in answer.json()["error"]
    chunks = (b"a" * 500_000 for _ in range(6))  # no Content-Length: chunked
    answer = requests.post(url, data=chunks, headers=front.auth, timeout=60)
    assert answer.status_code == 413 and "must be at most" in answer.json()["error"]
    answer = requests.post(f"{front.url}/v1/images/generations", data=b"[" * 200_000, timeout=60,
                           headers=dict(front.auth, **{"Content-Type": "application/json"}))
    assert answer.status_code == 400 and answer.json()["error"]["param"] == "body"


def test_the_bearer_scheme_is_case_insensitive(front):
    import requests

    assert requests.get(f"{front.url}/v2/models/{MODEL}", headers={"Authorization": f"bearer {KEY}"},
                        timeout=30).status_code == 200


def test_an_empty_api_key_refuses_to_start(tmp_path):
    (tmp_path / "key").write_text("  \n")
    completed = subprocess.run([sys.executable, str(ROOT / "handler" / "sd_kserve.py"), "--model-dir",
                                str(tmp_path), "--api-key-file", str(tmp_path / "key")],
                               capture_output=True, text=True, timeout=120)
    assert completed.returncode == 2 and "is empty" in completed.stderr
