"""Faults against the real TorchServe: overload with a tiny job queue, the Python worker killed mid-request, and a
worker that dies while loading.

A server of its own (batchSize 1, jobQueueSize 2), so these faults never disturb the main end-to-end server; the
worker that cannot load gets a server of its own too.
"""

import json
import os
import shutil
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import yaml

from conftest import CPU_MODEL_CONFIG
from query import read_key, request
from ts_server import MODEL, start_server

pytestmark = pytest.mark.e2e
SLOW = {"prompt": "a slow fox", "num_inference_steps": 40}


@pytest.fixture(scope="module")
def small_queue_server(tmp_path_factory, tiny_model_dir):
    work = tmp_path_factory.mktemp("faults")
    config = yaml.safe_load(CPU_MODEL_CONFIG.read_text())
    config.update(batchSize=1, maxBatchDelay=0, jobQueueSize=2)
    (work / "model-config.yaml").write_text(yaml.safe_dump(config))
    with start_server(work, tiny_model_dir, work / "model-config.yaml") as running:
        yield running


def timed(server, payload, token):
    start = time.perf_counter()
    status, _, body = server.predict(payload, token)
    return status, time.perf_counter() - start, body


def test_overload_gets_fast_503s_and_the_server_recovers(small_queue_server):
    server, token = small_queue_server, small_queue_server.token
    with ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(lambda i: timed(server, dict(SLOW, seed=i), token), range(12)))
    statuses = [status for status, _, _ in answers]
    assert set(statuses) <= {200, 503} and statuses.count(200) >= 3 and statuses.count(503) >= 1, statuses
    slowest_ok = max(seconds for status, seconds, _ in answers if status == 200)
    for status, seconds, body in answers:
        if status == 503:  # refused at the door, not after waiting its turn
            assert seconds < slowest_ok and body
    assert server.predict({"prompt": "after the burst"}, token)[0] == 200


def workers(server) -> list[dict]:
    key = read_key(server.work / "key_file.json", "management")
    status, _, body = request(f"{server.management}/models/{MODEL}", key)
    assert status == 200
    return json.loads(body)[0]["workers"]


def inferences_received(server) -> int:
    log = server.work / "logs" / "model_log.log"
    return log.read_text().count("Backend received inference") if log.exists() else 0


def test_killed_worker_fails_the_in_flight_request_and_is_restarted(small_queue_server):
    server, token = small_queue_server, small_queue_server.token
    [worker] = workers(server)
    pid = int(worker["pid"])
    before = inferences_received(server)
    with ThreadPoolExecutor(1) as pool:
        in_flight = pool.submit(timed, server, dict(SLOW, num_inference_steps=50, seed=1), token)
        deadline = time.monotonic() + 60
        while inferences_received(server) == before:  # wait until the worker has the request
            assert time.monotonic() < deadline, "the request never reached the worker"
            time.sleep(0.05)
        os.kill(pid, signal.SIGKILL)
        killed = time.monotonic()
        status, seconds, body = in_flight.result(timeout=120)
    assert status >= 500, (status, body[:200])  # an error, not a hang
    # Until TorchServe notices the death it may still list the old worker as READY: wait for a new one.
    deadline = time.monotonic() + 180
    while not any(w["status"] == "READY" and int(w["pid"]) != pid for w in workers(server)):
        assert time.monotonic() < deadline, f"no new READY worker: {workers(server)}"
        time.sleep(0.2)
    print(f"worker restarted and READY {time.monotonic() - killed:.1f} s after the kill "
          f"(in-flight request answered {status} after {seconds:.1f} s)")
    assert server.predict({"prompt": "after the restart", "seed": 2}, token)[0] == 200


def test_a_worker_that_dies_loading_ends_the_wait_with_its_error(tmp_path, tiny_model_dir):
    """TorchServe retries a worker that fails to load forever and lists the model as loading meanwhile; the wait for
    READY (query.wait_until_ready, which the tests and serve_bench.py use) must fail at once with the worker's error,
    not at its deadline with none. Here the UNet's weights file is cut short before packaging (so the sha256 manifest
    matches it): only loading it fails."""
    from query import ServerUnreachable

    weights = tmp_path / "weights"
    shutil.copytree(tiny_model_dir, weights)
    unet = weights / "unet" / "diffusion_pytorch_model.safetensors"
    unet.write_bytes(unet.read_bytes()[:1000])
    with pytest.raises(ServerUnreachable) as failed:
        with start_server(tmp_path, weights):
            pytest.fail("a worker came up with a cut-short weights file")
    assert "died while loading" in str(failed.value)
    assert "sd_engine.errors.ModelLoadError: " in str(failed.value), str(failed.value)
