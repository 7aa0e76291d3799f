"""scripts/generate.py, the engine with no server, as a user runs it on a model folder made elsewhere."""

import subprocess
import sys

from PIL import Image

from sd_engine.random_models import save_pipeline
from ts_server import ROOT

SCRIPT = [sys.executable, str(ROOT / "scripts" / "generate.py")]


def test_an_sdxl_folder_gives_an_image_of_its_native_size(tmp_path):
    folder = save_pipeline("tiny-sdxl", tmp_path / "sdxl")
    out = tmp_path / "out.png"
    config = ROOT / "config" / "model-config-cpu.yaml"
    completed = subprocess.run(SCRIPT + ["--model", str(folder), "--config", str(config), "--prompt", "a red fox",
                                         "--seed", "3", "--format", "png", "--output", str(out)],
                               capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert completed.returncode == 0, completed.stderr[-2000:]
    assert "64x64" in completed.stdout and Image.open(out).size == (64, 64)


def test_a_bad_field_fails_before_any_weights_are_loaded(tmp_path):
    completed = subprocess.run(SCRIPT + ["--model", str(tmp_path / "no-such-model"), "--prompt", "x",
                                         "--height", "500"], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert completed.returncode == 2 and "`height` must be a multiple of 8, got 500" in completed.stderr
