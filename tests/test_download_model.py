"""scripts/download_model.py on local folders (the hub is not reachable from tests; diffusers loads a local folder
through the same from_pretrained path): a weights variant, and a replacement VAE such as SDXL's fp16-fix one."""

import json
import subprocess
import sys

import torch
from safetensors.torch import load_file

from sd_engine.random_models import build_pipeline
from ts_server import ROOT


def test_variant_and_replacement_vae(tmp_path):
    source = tmp_path / "hub-like"
    pipe = build_pipeline("tiny-sdxl")
    pipe.save_pretrained(str(source), variant="fp16")  # files named *.fp16.safetensors, as on the hub
    assert list((source / "unet").glob("*.fp16.safetensors"))
    vae_source = tmp_path / "fp16-fix-vae"
    vae = build_pipeline("tiny-sdxl", seed=1).vae
    vae.register_to_config(force_upcast=False)  # as madebyollin/sdxl-vae-fp16-fix's config says
    vae.save_pretrained(str(vae_source))

    out = tmp_path / "weights"
    completed = subprocess.run([sys.executable, str(ROOT / "scripts" / "download_model.py"), "--model", str(source),
                                "--variant", "fp16", "--vae", str(vae_source), "--out", str(out)],
                               capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-2000:]
    assert json.loads((out / "vae" / "config.json").read_text())["force_upcast"] is False
    unet = load_file(out / "unet" / "diffusion_pytorch_model.safetensors")  # plain names: the engine's layout
    assert {t.dtype for t in unet.values()} == {torch.float16}
    saved_vae = load_file(out / "vae" / "diffusion_pytorch_model.safetensors")
    assert torch.equal(saved_vae["decoder.conv_out.weight"], vae.decoder.conv_out.weight.half())


def test_a_missing_model_exits_1_with_the_reason(tmp_path):
    completed = subprocess.run([sys.executable, str(ROOT / "scripts" / "download_model.py"), "--model",
                                str(tmp_path / "nothing-here"), "--out", str(tmp_path / "out")],
                               capture_output=True, text=True, timeout=120, env={"HF_HUB_OFFLINE": "1",
                                                                                 "PATH": "/usr/bin:/bin"})
    assert completed.returncode == 1 and "could not download" in completed.stderr
