"""End to end: package the tiny model, start the real TorchServe (Java) on free loopback ports, send real HTTP."""

import io
import json
import os
import re
import socket
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from query import predict, read_key, request, wait_until_ready

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
MODEL = "stable-diffusion"


@dataclass
class Server:
    work: Path
    inference: str
    management: str

    @property
    def token(self) -> str:
        return read_key(self.work / "key_file.json", "inference")

    def predict(self, payload, token=None):
        return predict(self.inference, MODEL, payload, token or self.token, timeout=120)


def free_ports(count):
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def server_config(work: Path) -> tuple[Path, str, str]:
    """The shipped config.properties with its addresses moved to free ports (everything else unchanged)."""
    inference, management, metrics, grpc_inference, grpc_management, worker = free_ports(6)
    text = (ROOT / "config.properties").read_text()
    for key, port in (("inference_address", inference), ("management_address", management),
                      ("metrics_address", metrics)):
        text, count = re.subn(rf"^{key}=http://127\.0\.0\.1:\d+$", f"{key}=http://127.0.0.1:{port}", text,
                              flags=re.M)
        assert count == 1, key
    text += (f"\ngrpc_inference_port={grpc_inference}\ngrpc_management_port={grpc_management}\n"
             f"initial_worker_port={worker}\n")
    path = work / "config.properties"
    path.write_text(text)
    return path, f"http://127.0.0.1:{inference}", f"http://127.0.0.1:{management}"


def run_or_explain(command, log: Path, **kwargs):
    """Run a set-up command with its output in `log`; if it fails, fail with that output in the test report.
    (A file, not a pipe: `torchserve --start` leaves Java running with this stdout, so a pipe would never close.)"""
    with open(log, "w") as out:
        returncode = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, **kwargs).returncode
    if returncode != 0:
        pytest.fail(f"{command[:2]} exited {returncode}:\n{log.read_text()[-5000:]}")


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_model_dir):
    work = tmp_path_factory.mktemp("torchserve")
    store = work / "model_store"
    run_or_explain([sys.executable, str(ROOT / "scripts" / "package_model.py"), str(tiny_model_dir), str(store),
                    "--config", str(ROOT / "config" / "model-config-cpu.yaml")], work / "package.out")
    config, inference, management = server_config(work)
    # Own TMPDIR/TEMP: TorchServe keeps its pid file and worker sockets there, so runs never collide.
    env = dict(os.environ, TMPDIR=str(work), TEMP=str(work), LOG_LOCATION=str(work / "logs"),
               METRICS_LOCATION=str(work / "logs"))
    start = [str(BIN / "torchserve"), "--start", "--ncs", "--ts-config", str(config), "--model-store", str(store),
             "--models", f"{MODEL}={MODEL}.mar"]
    run_or_explain(start, work / "torchserve.out", cwd=work, env=env)
    try:
        wait_until_ready(management, MODEL, work / "key_file.json", timeout=240)
        yield Server(work, inference, management)
    finally:
        subprocess.run([str(BIN / "torchserve"), "--stop", "--foreground"], cwd=work, env=env, timeout=90,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        log = work / "logs" / "model_log.log"
        if log.exists():
            print(log.read_text()[-5000:])


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
