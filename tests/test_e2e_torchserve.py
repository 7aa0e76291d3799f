"""End to end: package the tiny model, start the real TorchServe (Java) on free loopback ports, send real HTTP."""

import http.client
import io
import json
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from query import read_key, request
from ts_server import MODEL, ROOT, start_server

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_model_dir):
    with start_server(tmp_path_factory.mktemp("torchserve"), tiny_model_dir) as running:
        yield running


def image_of(status, headers, body, content_type="image/jpeg"):
    assert status == 200, body[:300]
    assert headers.get("content-type") == content_type
    return Image.open(io.BytesIO(body))


def test_plain_text_prompt_returns_a_jpeg_of_the_default_size(server):
    image = image_of(*server.predict("a photo of an astronaut riding a horse on mars"))
    assert image.format == "JPEG" and image.size == (64, 64)


def test_json_request_returns_the_requested_size_and_seed(server):
    status, headers, body = server.predict({"prompt": "a fox", "height": 128, "width": 96, "seed": 7,
                                            "num_inference_steps": 3})
    assert image_of(status, headers, body).size == (96, 128)
    assert headers.get("X-Seed") == "7"


def test_png_on_request(server):
    assert image_of(*server.predict({"prompt": "a fox", "format": "png"}), content_type="image/png").format == "PNG"


def test_same_seed_gives_the_same_image(server):
    a, b = (np.asarray(image_of(*server.predict({"prompt": "a fox", "seed": 11}))) for _ in range(2))
    assert np.array_equal(a, b)


def test_bad_request_gets_400_naming_the_field_while_concurrent_good_ones_succeed(server):
    token = server.token
    payloads = [{"prompt": f"good {i}", "seed": i} for i in range(3)] + [{"prompt": "bad", "width": 100}]
    with ThreadPoolExecutor(len(payloads)) as pool:
        answers = list(pool.map(lambda p: server.predict(p, token), payloads))
    for status, headers, body in answers[:3]:
        assert image_of(status, headers, body).size == (64, 64)
    status, headers, body = answers[3]
    assert status == 400 and json.loads(body)["field"] == "width"
    # The worker is alive and serving after the bad request.
    assert image_of(*server.predict("still alive")).size == (64, 64)


def test_invalid_json_is_a_400_naming_the_body(server):
    status, _, body = request(f"{server.inference}/predictions/{MODEL}", server.token, b'{"prompt": ',
                              "application/json")
    assert status == 400 and json.loads(body)["field"] == "body"


@pytest.mark.parametrize("token", [None, "wrong-token"])
def test_requests_without_a_valid_token_are_rejected(server, token):
    status, _, body = request(f"{server.inference}/predictions/{MODEL}", token, b"a fox", "text/plain")
    assert status in (400, 401) and b"Token Authorization failed" in body


def test_model_registration_over_http_is_off(server):
    management_key = read_key(server.work / "key_file.json", "management")
    status, _, _ = request(f"{server.management}/models?url=stable-diffusion.mar", management_key, b"",
                           "application/json")
    assert status == 405


def test_query_script_writes_output_timestamp_jpg(server, tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "query.py"), "--prompt", "a red fox",
                             "--url", server.inference, "--key-file", str(server.work / "key_file.json"),
                             "--seed", "5"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    [written] = list(tmp_path.glob("output-*.jpg"))
    assert re.fullmatch(r"output-\d{8}-\d{6}\.jpg", written.name)
    assert Image.open(written).size == (64, 64)


def test_loras_through_torchserve_with_query_py_and_json(server, tmp_path):
    """Adapters picked per request: query.py --lora gives the engine's image for that set (same seed), a request
    without them the plain one, and an unknown adapter a 400 naming `loras` and the adapter."""
    def query(*flags):
        result = subprocess.run([sys.executable, str(ROOT / "scripts" / "query.py"), "--prompt", "a red fox",
                                 "--url", server.inference, "--key-file", str(server.work / "key_file.json"),
                                 "--seed", "9", "--format", "png", *flags, "--output", str(tmp_path / "out.png")],
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        return np.asarray(Image.open(tmp_path / "out.png"), dtype=np.int16)

    styled, plain = query("--lora", "style=0.9", "--lora", "detail=-0.5"), query()
    assert np.abs(styled - plain).mean() > 1  # the adapters change the picture
    status, _, body = server.predict({"prompt": "a red fox", "seed": 9, "format": "png",
                                      "loras": {"detail": -0.5, "style": 0.9}})
    assert status == 200 and np.array_equal(np.asarray(Image.open(io.BytesIO(body)), dtype=np.int16), styled)
    status, _, body = server.predict({"prompt": "a red fox", "loras": {"nope": 1}})
    answer = json.loads(body)
    assert status == 400 and answer["field"] == "loras" and answer["value"] == "nope", answer


def test_the_playground_learns_the_model_and_generates_through_torchserve(server):
    """The playground's server side against TorchServe (the browser test runs it against the KServe front): the
    handler's describe answer on the management API, a v1 body of n images, and a 400's message."""
    import argparse

    from playground import Server as Playground

    playground = Playground(argparse.Namespace(front="torchserve", url=server.inference, model=MODEL, api_key_file=None,
                                               management_url=server.management,
                                               key_file=str(server.work / "key_file.json")))
    status, described = playground.describe()
    assert status == 200 and described["loras"] == ["detail", "style"] and described["max_images"] == 4
    assert described["sizes"] == [[64, 64], [64, 96], [96, 64]] and described["max_height"] == 256
    status, answer = playground.generate({"prompt": "a red fox", "n": 2, "seed": 3, "loras": {"style": 0.5}})
    assert status == 200 and [image["seed"] for image in answer["images"]] == [3, 4]
    assert answer["images"][0]["src"].startswith("data:image/jpeg;base64,")
    status, answer = playground.generate({"prompt": "a red fox", "height": 100})
    assert status == 400 and "`instances[0].height` must be a multiple of 8" in answer["error"]


def test_query_script_exits_1_with_the_servers_message_on_http_errors(server, tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "query.py"), "--prompt", "x", "--height", "100",
                             "--url", server.inference, "--key-file", str(server.work / "key_file.json")],
                            cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "height" in result.stderr and "HTTP 400" in result.stderr
    assert not list(tmp_path.glob("output-*"))


def test_loadtest_every_request_gets_its_own_image(server, tmp_path):
    out = tmp_path / "load.json"
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "loadtest.py"), "--url", server.inference,
                             "--key-file", str(server.work / "key_file.json"), "--requests", "24", "--concurrency", "6",
                             "--max-seconds", "120", "--payload", '{"prompt": "a fox", "num_inference_steps": 2}',
                             "--json", str(out)], capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stdout + result.stderr
    summary = json.loads(out.read_text())
    assert summary["status_counts"] == {"200": 24} and summary["own_images"] == 24
    assert summary["latency_s"]["p50"] <= summary["latency_s"]["p99"]
    assert summary["server_engine_ms_p50"] > 0 and summary["client_minus_server_ms"]["p50"] is not None


BAD_REQUESTS = [  # (body bytes, content type, field the 400 must name)
    (b'{"prompt": "x",', "application/json", "body"),
    (b"[1, 2, 3]", "application/json", "body"),
    (b'"just a string"', "application/json", "body"),
    (b"{}", "application/json", "prompt"),
    (b'{"prompt": 42}', "application/json", "prompt"),
    (b'{"prompt": "x", "colour": "red"}', "application/json", "colour"),
    (b'{"prompt": "x", "num_inference_steps": 0}', "application/json", "num_inference_steps"),
    (b'{"prompt": "x", "num_inference_steps": 100000}', "application/json", "num_inference_steps"),
    (b'{"prompt": "x", "guidance_scale": "high"}', "application/json", "guidance_scale"),
    (b'{"prompt": "x", "guidance_scale": NaN}', "application/json", "guidance_scale"),
    (b'{"prompt": "x", "guidance_scale": Infinity}', "application/json", "guidance_scale"),
    (b'{"prompt": "x", "height": 100}', "application/json", "height"),
    (b'{"prompt": "x", "height": 0}', "application/json", "height"),
    (b'{"prompt": "x", "width": -64}', "application/json", "width"),
    (b'{"prompt": "x", "width": 4096}', "application/json", "width"),
    (b'{"prompt": "x", "seed": -1}', "application/json", "seed"),
    (b'{"prompt": "x", "seed": 9223372036854775808}', "application/json", "seed"),
    (b'{"prompt": "x", "format": "gif"}', "application/json", "format"),
    (b'{"prompt": "x", "quality": 101}', "application/json", "quality"),
    (b"\xff\xfe not utf-8", "text/plain", "body"),
    (b"", "text/plain", "prompt"),
]


@pytest.mark.parametrize("body, content_type, field", BAD_REQUESTS)
def test_bad_input_is_a_400_naming_the_field(server, body, content_type, field):
    status, headers, answer = request(f"{server.inference}/predictions/{MODEL}", server.token, body, content_type)
    assert status == 400, answer[:300]
    assert headers.get("content-type") == "application/json"
    assert json.loads(answer)["field"] == field


def test_body_above_max_request_size_is_refused_and_the_server_keeps_serving(server):
    # Only the headers are sent: TorchServe refuses on the declared Content-Length. Sending the 2 MiB body too raced
    # with the server closing the connection after its 413 (a connection reset instead of a status, now and then).
    host, port = server.inference.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=60)
    connection.putrequest("POST", f"/predictions/{MODEL}")
    for name, value in (("Authorization", f"Bearer {server.token}"), ("Content-Type", "text/plain"),
                        ("Content-Length", str(2 * 2**20))):
        connection.putheader(name, value)
    connection.endheaders()
    status = connection.getresponse().status
    connection.close()
    assert status == 413
    assert image_of(*server.predict("still serving")).size == (64, 64)


def test_long_prompt_is_served_and_the_truncation_is_reported(server):
    status, headers, body = server.predict({"prompt": "a very detailed photo " * 30})
    assert image_of(status, headers, body).size == (64, 64)
    assert headers.get("X-Prompt-Truncated") == "prompt"


def test_500_requests_at_concurrency_32_each_get_their_own_image(server, tmp_path):
    out = tmp_path / "load.json"
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "loadtest.py"), "--url", server.inference,
                             "--key-file", str(server.work / "key_file.json"), "--requests", "500",
                             "--concurrency", "32", "--max-seconds", "600",
                             "--payload", '{"prompt": "a fox", "num_inference_steps": 1}', "--json", str(out)],
                            capture_output=True, text=True, timeout=900)
    summary = json.loads(out.read_text())
    # 200, or 503 when the queue is full; nothing lost, nothing duplicated, every 200 its own seed's JPEG.
    assert set(summary["status_counts"]) <= {"200", "503"}, summary["status_counts"]
    assert sum(summary["status_counts"].values()) == 500
    assert summary["own_images"] == summary["status_counts"].get("200")
    assert result.returncode == (0 if summary["own_images"] == 500 else 1)
    assert image_of(*server.predict("healthy after the load")).size == (64, 64)


def test_workflow_registration_needs_the_management_key_and_an_allowed_url(server):
    url = f"{server.management}/workflows?url=http://example.com/evil.war"
    status, _, body = request(url, None, b"", "application/json")
    assert status in (400, 401) and b"Token Authorization failed" in body
    management_key = read_key(server.work / "key_file.json", "management")
    status, _, body = request(url, management_key, b"", "application/json")
    assert status >= 400 and b"evil.war" not in request(f"{server.management}/workflows", management_key)[2]


def scrape(server) -> dict[str, float]:
    """Prometheus text -> {'name{label="v",...}': value}, labels sorted, TorchServe's hostname label dropped."""
    status, _, body = request(f"{server.metrics}/metrics")
    assert status == 200
    samples = {}
    for line in body.decode().splitlines():
        match = re.fullmatch(r'(\w+)(?:\{(.*)\})?\s+(\S+)', line.strip())
        if line.startswith("#") or not match:
            continue
        labels = sorted(p for p in re.findall(r'(\w+)="([^"]*)"', match.group(2) or "") if p[0] != "Hostname")
        samples[match.group(1) + "{" + ",".join(f'{k}="{v}"' for k, v in labels) + "}"] = float(match.group(3))
    return samples


def metric(samples, name, **labels) -> float:
    wanted = {f'{k}="{v}"' for k, v in labels.items()}
    return sum(v for key, v in samples.items() if key.split("{")[0] == name and wanted <= set(
        key[key.index("{") + 1:-1].split(",")))


def test_metrics_endpoint_counts_images_by_status_and_times_each_stage(server):
    before = scrape(server)
    token = server.token
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda p: server.predict(p, token), [{"prompt": f"m{i}", "seed": i} for i in range(2)]
                                + [{"prompt": "m2", "loras": {"style": 0.3}}, {"prompt": "bad", "quality": 0}]))
    assert [a[0] for a in answers] == [200, 200, 200, 400]

    def delta(name, **labels):
        return metric(after, name, **labels) - metric(before, name, **labels)

    # The worker's metric lines reach the frontend after the responses: poll until all four are counted.
    deadline = time.monotonic() + 30
    while True:
        after = scrape(server)
        if delta("ImagesGenerated") >= 4 and delta("EncodeSeconds_count") >= 3 or time.monotonic() > deadline:
            break
        time.sleep(0.2)

    assert delta("ImagesGenerated", Status="ok") == 3
    assert delta("ImagesGenerated", Status="invalid") == 1
    for name in ("GenerationSeconds", "TextEncoderSeconds", "DenoiseSeconds", "VaeSeconds", "EncodeSeconds"):
        assert delta(f"{name}_count") == 3, name
        assert delta(f"{name}_sum") > 0, name
    assert delta("BatchSize_sum") == 4 and delta("BatchSize_count") >= 1  # 4 requests, in however many batches
    assert delta("LoraSwitchSeconds_count") >= 1 and delta("LoraSwitchSeconds_sum") > 0  # to style 0.3 (and back)
