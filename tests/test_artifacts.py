"""Compile artifacts (sd_engine/artifacts.py): made in one process, loaded by a fresh one whose compile then comes
from them; artifacts made for another platform, or damaged, are skipped with a log line and the worker compiles."""

import json
import logging
import subprocess
import sys
from pathlib import Path

import torch

from sd_engine.artifacts import INDEX, file_name, load_compile_artifacts, platform

CPU = torch.device("cpu")
# Each step runs in a fresh interpreter with its own empty Inductor cache, as a new worker on a new machine would.
# A small function stands in for the UNet: Inductor compiles it to C++ on the CPU in seconds, the UNet in minutes.
STEP = """
import json, os, sys, tempfile
from pathlib import Path
os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp()
import torch
from torch._dynamo.utils import counters
from sd_engine.artifacts import load_compile_artifacts, save_compile_artifacts
folder, mode = Path(sys.argv[1]), sys.argv[2]
loaded = load_compile_artifacts(folder, torch.device("cpu")) if mode == "load" else None
f = torch.compile(lambda x: torch.nn.functional.gelu(x @ x.T) + 1)
f(torch.randn(8, 8))
if mode == "save":
    save_compile_artifacts(folder, torch.device("cpu"))
print(json.dumps({"loaded": loaded is not None, **{k: v for k, v in counters["inductor"].items()
                                                    if k.startswith("fxgraph_cache")}}))
"""


def run_step(folder: Path, mode: str) -> dict:
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run([sys.executable, "-c", STEP, str(folder), mode], capture_output=True, text=True,
                          timeout=300, env={"PYTHONPATH": str(root / "handler"), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_artifacts_made_once_let_a_fresh_process_skip_compiling(tmp_path):
    folder = tmp_path / "compile-artifacts"
    made = run_step(folder, "save")
    assert made.get("fxgraph_cache_miss", 0) >= 1  # compiled here
    [name] = json.loads((folder / INDEX).read_text())
    assert (folder / name).stat().st_size > 0 and name == file_name(platform(CPU))
    fresh = run_step(folder, "load")
    assert fresh["loaded"] and fresh.get("fxgraph_cache_hit", 0) >= 1 and "fxgraph_cache_miss" not in fresh


def test_artifacts_of_another_platform_are_skipped_with_the_reason(tmp_path, caplog):
    other = dict(platform(CPU), torch="2.0.0", device="NVIDIA H100 80GB HBM3", capability="9.0")
    (tmp_path / "x.bin").write_bytes(b"not for this worker")
    (tmp_path / INDEX).write_text(json.dumps({"x.bin": other}))
    with caplog.at_level(logging.INFO, logger="sd_engine.artifacts"):
        assert load_compile_artifacts(tmp_path, CPU) is None
    line = caplog.records[-1].getMessage()
    assert "none of the 1" in line and "compiling at warm-up" in line
    assert "'torch': '2.0.0'" in line and "'device': 'NVIDIA H100 80GB HBM3'" in line


def test_damaged_artifacts_cost_a_compile_not_the_worker(tmp_path, caplog):
    name = file_name(platform(CPU))
    (tmp_path / name).write_bytes(b"\x00garbage")
    (tmp_path / INDEX).write_text(json.dumps({name: platform(CPU)}))
    with caplog.at_level(logging.WARNING, logger="sd_engine.artifacts"):
        assert load_compile_artifacts(tmp_path, CPU) is None
    assert "could not be loaded" in caplog.records[-1].getMessage()


def test_no_artifacts_is_said_once(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="sd_engine.artifacts"):
        assert load_compile_artifacts(tmp_path / "compile-artifacts", CPU) is None
    assert "none in" in caplog.records[-1].getMessage()


def test_a_rebuild_leaves_the_manifest_listing_the_artifact_files_as_they_are(tmp_path):
    """compile_artifacts.py on a packaged folder: files removed since (a rebuild, a failed size's cleanup) leave its
    manifest, new ones enter it, the weights' entries stay, and the folder passes the load's integrity check."""
    from compile_artifacts import add_to_manifest
    from package_model import manifest_text

    from sd_engine.loading import MANIFEST, file_digests, verify_manifest

    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "weights.safetensors").write_bytes(b"weights")
    aot = tmp_path / "compile-artifacts" / "aot"
    aot.mkdir(parents=True)
    (aot / "old.pt2").write_bytes(b"old")
    (tmp_path / MANIFEST).write_text(manifest_text(file_digests(tmp_path)))
    (aot / "old.pt2").unlink()
    (aot / "new.pt2").write_bytes(b"new")
    (aot / "index.json").write_text("{}")
    add_to_manifest(tmp_path, aot)
    listed = json.loads((tmp_path / MANIFEST).read_text())["sha256"]
    assert sorted(listed) == ["compile-artifacts/aot/index.json", "compile-artifacts/aot/new.pt2",
                              "unet/weights.safetensors"]
    verify_manifest(tmp_path)  # raises on a listed file that is missing, or a file not listed
