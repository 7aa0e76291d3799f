"""scripts/package_model.py: the MAR and --no-archive layouts, secrets never packaged, and configs the engine
refuses refused at packaging."""

import io
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import yaml

from sd_engine.loading import MANIFEST, prepare_weights

ROOT = Path(__file__).resolve().parent.parent
SECRET = "hf_SECRETtokenNEVERpackaged1234567890"


def package(weights, store, *extra, env=None):
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "package_model.py"), str(weights), str(store),
                             "--config", str(ROOT / "config" / "model-config-cpu.yaml"), *extra],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    return Path(result.stdout.strip().splitlines()[-1])


def all_member_bytes(archive: zipfile.ZipFile):
    """Every file's bytes, descending into nested zips (model.zip inside the MAR)."""
    for name in archive.namelist():
        data = archive.read(name)
        yield name, data
        if name.endswith(".zip"):
            yield from all_member_bytes(zipfile.ZipFile(io.BytesIO(data)))


def test_mar_holds_handler_engine_weights_and_config(tmp_path, tiny_model_dir):
    mar = package(tiny_model_dir, tmp_path / "store")
    with zipfile.ZipFile(mar) as archive:
        names = set(archive.namelist())
        manifest = json.loads(archive.read("MAR-INF/MANIFEST.json"))
        inner = zipfile.ZipFile(io.BytesIO(archive.read("model.zip"))).namelist()
    assert {"sd_handler.py", "model.zip", "sd_engine/engine.py", manifest["model"]["configFile"]} <= names
    assert not [n for n in names if "__pycache__" in n]
    assert manifest["model"]["modelName"] == "stable-diffusion" and manifest["model"]["handler"] == "sd_handler.py"
    assert "model_index.json" in inner and "unet/diffusion_pytorch_model.safetensors" in inner and MANIFEST in inner


def test_no_archive_layout_points_the_config_at_the_copied_weights(tmp_path, tiny_model_dir):
    folder = package(tiny_model_dir, tmp_path / "store", "--no-archive")
    assert folder == tmp_path / "store" / "stable-diffusion"
    assert (folder / "MAR-INF" / "MANIFEST.json").is_file() and (folder / "sd_engine" / "engine.py").is_file()
    config = yaml.safe_load((folder / "model-config.yaml").read_text())
    assert config["handler"]["weights"] == "model"
    assert prepare_weights(folder, "model") == folder / "model"  # passes the manifest check
    assert not (folder / "model.zip").exists()


def test_an_hf_token_in_the_environment_is_never_packaged(tmp_path, tiny_model_dir):
    env = dict(os.environ, HF_TOKEN=SECRET, HUGGING_FACE_HUB_TOKEN=SECRET)
    mar = package(tiny_model_dir, tmp_path / "store", env=env)
    assert SECRET.encode() not in mar.read_bytes()
    with zipfile.ZipFile(mar) as archive:
        for name, data in all_member_bytes(archive):
            assert SECRET.encode() not in data, name
    folder = package(tiny_model_dir, tmp_path / "store2", "--no-archive", env=env)
    for path in folder.rglob("*"):
        assert not path.is_file() or SECRET.encode() not in path.read_bytes(), path


def test_a_config_the_engine_refuses_is_refused_when_packaging(tmp_path, tiny_model_dir):
    config = yaml.safe_load((ROOT / "config" / "model-config-cpu.yaml").read_text())
    config["handler"].update(backend="deepspeed", compile=True)
    (tmp_path / "model-config.yaml").write_text(yaml.safe_dump(config))
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "package_model.py"), str(tiny_model_dir),
                             str(tmp_path / "store"), "--config", str(tmp_path / "model-config.yaml")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert "handler.compile: true works with backend eager" in result.stderr
    assert not (tmp_path / "store").exists()  # nothing written
