"""A server left running keeps serving its clients: TorchServe's inference key expires (here after 3 s instead of
60 min), and query.py renews it through key_file.json's API key, without clients locking each other out."""

import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from PIL import Image

from query import is_token_failure, read_key, request
from ts_server import ROOT, start_server

pytestmark = pytest.mark.e2e
LIFETIME_MIN = 0.05  # 3 s


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_model_dir):
    with start_server(tmp_path_factory.mktemp("tokens"), tiny_model_dir,
                      extra=f"token_expiration_min={LIFETIME_MIN}") as running:
        yield running


def wait_until_refused(server, key: str, timeout: float = 60) -> None:
    """Poll until TorchServe itself refuses `key` (its clock decides expiry, not ours)."""
    deadline = time.monotonic() + timeout
    while True:
        status, _, body = request(f"{server.inference}/ping", key, timeout=10)
        if is_token_failure(status, body):
            return
        assert time.monotonic() < deadline, f"key still accepted after {timeout} s"
        time.sleep(0.2)  # polling an external condition, bounded by the deadline


def query(server, out, seed):
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "query.py"), "--url", server.inference,
                           "--management-url", server.management, "--key-file", str(server.work / "key_file.json"),
                           "--prompt", "a lighthouse", "--seed", str(seed), "--output", str(out)],
                          capture_output=True, text=True, timeout=120)


def test_query_py_succeeds_after_the_key_expired(server, tmp_path):
    key_file = server.work / "key_file.json"
    expired = read_key(key_file)
    wait_until_refused(server, expired)
    completed = query(server, tmp_path / "out.jpg", 1)
    assert completed.returncode == 0, completed.stderr
    assert Image.open(tmp_path / "out.jpg").size == (64, 64)
    assert read_key(key_file) != expired  # renewed in the file, for every other client of it


def test_concurrent_clients_renew_without_locking_each_other_out(server, tmp_path):
    wait_until_refused(server, read_key(server.work / "key_file.json"))
    with ThreadPoolExecutor(4) as pool:
        runs = list(pool.map(lambda i: query(server, tmp_path / f"out-{i}.jpg", i), range(4)))
    for completed in runs:
        assert completed.returncode == 0, completed.stderr


def test_a_load_test_outliving_several_keys_loses_nothing(server, tmp_path):
    """16 requests, two at a time, take longer than a key lives: loadtest.py reads and renews the key per request."""
    summary = tmp_path / "load.json"
    completed = subprocess.run([sys.executable, str(ROOT / "scripts" / "loadtest.py"), "--url", server.inference,
                                "--management-url", server.management, "--key-file", str(server.work / "key_file.json"),
                                "--requests", "16", "--concurrency", "2", "--rate", "2", "--payload",
                                '{"prompt": "a fox", "num_inference_steps": 2}', "--json", str(summary)],
                               capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stdout[-2000:] + completed.stderr[-2000:]
    assert json.loads(summary.read_text())["status_counts"] == {"200": 16}
