"""Start the real TorchServe (Java) for a test: package the tiny model, pick free loopback ports, wait for READY,
stop it afterwards even on failure. Used by the end-to-end test modules."""

import contextlib
import os
import re
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from query import predict, read_key, wait_until_ready

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
MODEL = "stable-diffusion"


@dataclass
class Server:
    work: Path
    inference: str
    management: str
    metrics: str

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


def server_config(work: Path, properties: Path = ROOT / "config.properties", extra: str = "") -> tuple[Path, str, str]:
    """`properties` (the shipped config.properties by default) with its addresses moved to free loopback ports and
    its metrics declaration pointed at this repo's; everything else unchanged, plus the `extra` lines."""
    inference, management, metrics, grpc_inference, grpc_management, worker = free_ports(6)
    text = properties.read_text()
    for key, port in (("inference_address", inference), ("management_address", management),
                      ("metrics_address", metrics)):
        text, count = re.subn(rf"^{key}=http://[0-9.]+:\d+$", f"{key}=http://127.0.0.1:{port}", text, flags=re.M)
        assert count == 1, key
    text += (f"\ngrpc_inference_port={grpc_inference}\ngrpc_management_port={grpc_management}\n"
             f"initial_worker_port={worker}\n{extra}\n")
    # The shipped paths are relative to the repo root (or /mnt/models in a KServe pod); tests start elsewhere.
    text, count = re.subn(r"^metrics_config=.*$", f"metrics_config={ROOT / 'config' / 'metrics.yaml'}", text,
                          flags=re.M)
    assert count == 1
    text = re.sub(r"^model_store=.*$", f"model_store={work / 'model_store'}", text, flags=re.M)
    path = work / "config.properties"
    path.write_text(text)
    return path, *(f"http://127.0.0.1:{port}" for port in (inference, management, metrics))


def run_or_explain(command, log: Path, **kwargs):
    """Run a set-up command with its output in `log`; if it fails, fail with that output in the test report.
    (A file, not a pipe: `torchserve --start` leaves Java running with this stdout, so a pipe would never close.)"""
    with open(log, "w") as out:
        returncode = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, **kwargs).returncode
    if returncode != 0:
        pytest.fail(f"{command[:2]} exited {returncode}:\n{log.read_text()[-5000:]}")


@contextlib.contextmanager
def start_server(work: Path, weights: Path, model_config: Path = ROOT / "config" / "model-config-cpu.yaml",
                 properties: Path = ROOT / "config.properties", extra: str = "", as_kserve: bool = False):
    """Package `weights` with `model_config`, start TorchServe in `work`, yield a Server once a worker is READY.
    as_kserve: start it as KServe's TorchServe runtime does: the no-archive folder, loaded by the model_snapshot in
    `properties`, and no --ncs/--models."""
    store = work / "model_store"
    run_or_explain([sys.executable, str(ROOT / "scripts" / "package_model.py"), str(weights), str(store),
                    "--config", str(model_config)] + (["--no-archive"] if as_kserve else []), work / "package.out")
    config, inference, management, metrics = server_config(work, properties, extra)
    # Own TMPDIR/TEMP: TorchServe keeps its pid file and worker sockets there, so runs never collide.
    env = dict(os.environ, TMPDIR=str(work), TEMP=str(work), LOG_LOCATION=str(work / "logs"),
               METRICS_LOCATION=str(work / "logs"))
    start = [str(BIN / "torchserve"), "--start", "--ts-config", str(config), "--model-store", str(store)]
    if not as_kserve:
        start += ["--ncs", "--models", f"{MODEL}={MODEL}.mar"]
    run_or_explain(start, work / "torchserve.out", cwd=work, env=env)
    try:
        wait_until_ready(management, MODEL, work / "key_file.json", timeout=240,
                         model_log=work / "logs" / "model_log.log")
        yield Server(work, inference, management, metrics)
    finally:
        subprocess.run([str(BIN / "torchserve"), "--stop", "--foreground"], cwd=work, env=env, timeout=90,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        log = work / "logs" / "model_log.log"
        if log.exists():
            print(log.read_text()[-5000:])
