"""Start the KServe front (handler/sd_kserve.py) for a test: package the tiny model like for TorchServe, free
loopback ports, wait until /v2/health/ready answers, stop it with SIGTERM afterwards even on failure."""

import contextlib
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from query import ServerUnreachable, wait_until_healthy
from ts_server import ROOT, free_ports, run_or_explain

MODEL = "stable-diffusion"


@dataclass
class Front:
    process: subprocess.Popen
    url: str
    grpc: str
    api_key: str | None
    log: Path

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}


@contextlib.contextmanager
def start_front(work: Path, weights: Path, api_key: str | None = None,
                model_config: Path = ROOT / "config" / "model-config-cpu.yaml", archive: bool = False):
    """archive: serve the .mar package_model.py writes by default, else its --no-archive folder."""
    store = work / "store"
    run_or_explain([sys.executable, str(ROOT / "scripts" / "package_model.py"), str(weights), str(store),
                    "--config", str(model_config)] + ([] if archive else ["--no-archive"]), work / "package.out")
    http_port, grpc_port = free_ports(2)
    env = {k: v for k, v in os.environ.items() if k != "SD_API_KEY"}
    if api_key:
        env["SD_API_KEY"] = api_key
    log = work / "front.log"
    with open(log, "w") as out:
        process = subprocess.Popen([sys.executable, str(ROOT / "handler" / "sd_kserve.py"), "--model-dir",
                                    str(store / (f"{MODEL}.mar" if archive else MODEL)), "--http-port",
                                    str(http_port), "--grpc-port", str(grpc_port),
                                    "--grace-seconds", "120"], stdout=out, stderr=subprocess.STDOUT, env=env)
    front = Front(process, f"http://127.0.0.1:{http_port}", f"127.0.0.1:{grpc_port}", api_key, log)
    try:
        try:
            wait_until_healthy(f"{front.url}/v2/health/ready", 180, process)
        except ServerUnreachable as e:
            pytest.fail(f"the KServe front did not start ({e}):\n{log.read_text()[-5000:]}")
        yield front
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=120)
            except subprocess.TimeoutExpired:
                process.kill()
