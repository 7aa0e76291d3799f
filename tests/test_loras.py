"""LoRA adapters per request (sd_engine/loras.py): the same images as diffusers' load_lora_weights + set_adapters,
switches that restore the weights exactly and never recompile, unusable files reported and left out, bad requests
answered with the field named. The adapters are made here with PEFT on the tiny model (random weights), saved as
diffusers saves them and in kohya's layout."""

import json
import logging
import shutil

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline
from safetensors.torch import save_file

from sd_engine.config import EngineConfig
from sd_engine.engine import load_engine
from sd_engine.errors import InvalidRequest, ModelLoadError
from sd_engine.loading import MANIFEST, file_digests, verify_manifest
from sd_engine.random_loras import save_random_lora
from sd_engine.random_models import save_pipeline
from sd_engine.requests import parse_request

CPU = torch.device("cpu")
STEPS = 3


@pytest.fixture(scope="module")
def lora_model(tmp_path_factory):
    """The tiny model with adapters in loras/: `style` (diffusers layout), `detail` (kohya layout), `junk` (a
    safetensors file that is no LoRA) and `other-model` (a LoRA of the tiny SDXL: wrong layers and shapes)."""
    root = tmp_path_factory.mktemp("lora-model")
    folder = save_pipeline("tiny", root / "weights")
    pipe = DiffusionPipeline.from_pretrained(folder)
    save_random_lora(pipe, folder / "loras" / "style.safetensors", seed=1, std=0.1)
    save_random_lora(pipe, folder / "loras" / "detail.safetensors", seed=2, layout="kohya", std=0.1)
    save_file({"weight": torch.zeros(3)}, str(folder / "loras" / "junk.safetensors"))
    sdxl = DiffusionPipeline.from_pretrained(save_pipeline("tiny-sdxl", root / "sdxl"))
    save_random_lora(sdxl, folder / "loras" / "other-model.safetensors", seed=3)
    return folder


def config(**overrides) -> EngineConfig:
    return EngineConfig(num_inference_steps=STEPS, warmup=False, **overrides)


@pytest.fixture(scope="module")
def engine(lora_model):
    return load_engine(config(), lora_model, CPU, max_batch_size=4)


def image(engine, seed=0, **fields):
    [result] = engine.generate([parse_request({"prompt": "a red fox", "seed": seed, **fields}, engine.rules)])
    return np.asarray(result.image, dtype=np.float32) / 255


def diffusers_image(pipe, adapters: dict, seed=0):
    pipe.set_adapters(list(adapters), list(adapters.values())) if adapters else pipe.disable_lora()
    out = pipe(prompt="a red fox", num_inference_steps=STEPS, generator=torch.Generator().manual_seed(seed),
               output_type="pil").images[0]
    if not adapters:
        pipe.enable_lora()
    return np.asarray(out, dtype=np.float32) / 255


def test_adapters_give_diffusers_images_alone_and_together(engine, lora_model):
    reference = DiffusionPipeline.from_pretrained(lora_model)
    for name in ("style", "detail"):
        reference.load_lora_weights(str(lora_model / "loras"), weight_name=f"{name}.safetensors", adapter_name=name)
    plain = image(engine)
    for adapters in ({"style": 0.8}, {"detail": 1.0}, {"style": 0.5, "detail": -0.7}, {}):
        ours = image(engine, loras=adapters)
        theirs = diffusers_image(reference, adapters)
        assert np.abs(ours - theirs).max() <= 2 / 255, adapters  # JPEG of the same pixels, up to rounding
        if adapters:
            assert np.abs(ours - plain).mean() > 0.005, adapters  # the adapter changes the picture


def test_switching_restores_the_weights_exactly(engine):
    before = {name: p.detach().clone() for name, p in engine.pipe.unet.named_parameters()}
    plain = image(engine, seed=5)
    image(engine, seed=5, loras={"style": 1.5})
    image(engine, seed=5, loras={"detail": -2, "style": 0.3})
    assert np.array_equal(image(engine, seed=5), plain)
    assert all(torch.equal(p, before[name]) for name, p in engine.pipe.unet.named_parameters())


def test_a_batch_mixing_adapter_sets_gives_each_request_its_own_image(engine):
    bodies = [{"loras": {"style": 0.8}}, {}, {"loras": {"detail": 1.0}}, {"loras": {"style": 0.8}}]
    requests = [parse_request({"prompt": "a red fox", "seed": i, **body}, engine.rules)
                for i, body in enumerate(bodies)]
    together = engine.generate(requests)
    # A switch is reported once per pipeline call: on its first result, not on both of the style group's.
    assert not ("lora_switch" in together[0].stage_seconds and "lora_switch" in together[3].stage_seconds)
    for i, body in enumerate(bodies):  # a batch of two differs from one alone by float rounding only
        assert np.abs(np.asarray(together[i].image, dtype=np.float32) / 255 - image(engine, seed=i, **body)).max() \
            <= 2 / 255, i


def test_unusable_files_are_reported_by_name_and_the_model_serves_without_them(lora_model, caplog):
    with caplog.at_level(logging.WARNING, logger="sd_engine.loras"):
        engine = load_engine(config(), lora_model, CPU)
    assert engine.rules.loras == ("detail", "style")
    lines = [r.getMessage() for r in caplog.records]
    assert any("'junk'" in line and "not served: ValueError: Invalid LoRA checkpoint" in line for line in lines), lines
    assert any("'other-model'" in line and "not served: RuntimeError" in line and "size mismatch" in line
               for line in lines), lines
    with pytest.raises(InvalidRequest) as error:
        parse_request({"prompt": "x", "loras": {"junk": 1}}, engine.rules)
    assert error.value.field == "loras" and "'junk'" not in engine.rules.loras and "known: detail, style" in str(
        error.value)


def test_a_switch_never_recompiles(lora_model, dynamo_compiles):
    """The adapters change the weights in place, so compiled code stays valid: Dynamo traces for real here, with a
    counting backend standing in for inductor (conftest). CUDA graphs, which read the same tensors, cannot run on a
    CPU: the GPU benchmark checks them."""
    compiled = dynamo_compiles
    engine = load_engine(config(compile=True, sizes=()), lora_model, CPU)
    plain = image(engine)
    first = len(compiled)
    styled = image(engine, loras={"style": 1.0})
    image(engine, loras={"style": 0.5, "detail": 0.5})
    assert np.array_equal(image(engine), plain) and not np.array_equal(styled, plain)
    assert len(compiled) == first, "a switch recompiled"


@pytest.mark.parametrize("loras, reason", [
    (["style"], "must be an object of adapter name -> strength"),
    ("{not json", "must be a JSON object of adapter name -> strength"),
    ({"nope": 1}, "names an adapter this model does not have (known: detail, style)"),
    ({"style": "0.5"}, "strength of 'style' must be a finite number in -2..2"),
    ({"style": 2.5}, "strength of 'style' must be a finite number in -2..2"),
    ({"style": True}, "strength of 'style' must be a finite number"),
    ({"style": 10**400}, "strength of 'style' must be a finite number"),
    ({"style": 1, "detail": 1, "a": 1, "b": 1, "c": 1}, "may name at most 4 adapters (has 5)"),
])
def test_bad_loras_get_a_400_naming_the_field(engine, loras, reason):
    with pytest.raises(InvalidRequest) as error:
        parse_request({"prompt": "x", "loras": loras}, engine.rules)
    assert error.value.field == "loras" and reason in str(error.value) and error.value.status == 400


def test_loras_as_json_text_and_zero_strength(engine):
    request = parse_request({"prompt": "x", "loras": json.dumps({"style": 0.5, "detail": 0})}, engine.rules)
    assert request.loras == (("style", 0.5),)  # a v2 BYTES tensor carries JSON text; strength 0 leaves one out
    with pytest.raises(InvalidRequest, match=r"strength of 'style' must be a finite number .* got \{'style': nan\}"):
        parse_request('{"prompt": "x", "loras": {"style": NaN}}', engine.rules)


def test_backends_that_cannot_apply_adapters_say_so(lora_model, caplog):
    with caplog.at_level(logging.WARNING, logger="sd_engine.loras"):
        engine = load_engine(config(fuse_qkv=True), lora_model, CPU)
    assert "not served: fuse_qkv: true" in caplog.records[-1].getMessage()
    with pytest.raises(InvalidRequest, match="`loras` cannot be applied here: fuse_qkv: true fuses q, k and v"):
        parse_request({"prompt": "x", "loras": {"style": 1}}, engine.rules)
    assert image(engine).shape == (64, 64, 3)  # and the model serves without them


def test_an_adapter_folder_outside_the_model(lora_model, tmp_path):
    shutil.copy(lora_model / "loras" / "style.safetensors", tmp_path / "mounted.safetensors")
    engine = load_engine(config(lora_dir=str(tmp_path)), lora_model, CPU)
    assert "mounted" in engine.rules.loras
    assert np.array_equal(image(engine, loras={"mounted": 0.7}), image(engine, loras={"style": 0.7}))


def test_a_changed_adapter_file_refuses_the_whole_model(lora_model, tmp_path):
    folder = tmp_path / "packaged"
    shutil.copytree(lora_model, folder)
    (folder / MANIFEST).write_text(json.dumps({"sha256": file_digests(folder)}))
    verify_manifest(folder)
    with open(folder / "loras" / "style.safetensors", "r+b") as f:
        f.seek(-4, 2)
        f.write(b"\x00\x01\x02\x03")
    with pytest.raises(ModelLoadError, match="loras/style.safetensors"):
        verify_manifest(folder)


def test_generate_py_takes_lora_flags(lora_model, engine, tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    from PIL import Image

    root = Path(__file__).resolve().parent.parent

    def generate(*flags):
        return subprocess.run([sys.executable, str(root / "scripts" / "generate.py"), "--model", str(lora_model),
                               "--config", str(root / "config" / "model-config-cpu.yaml"), "--device", "cpu",
                               "--prompt", "a red fox", "--seed", "0", "--num-inference-steps", str(STEPS),
                               "--format", "png", "--output", str(tmp_path / "out.png"), *flags],
                              capture_output=True, text=True, timeout=300)

    done = generate("--lora", "style=0.8", "--lora", "detail=0.3")
    assert done.returncode == 0, done.stderr[-2000:]
    ours = np.asarray(Image.open(tmp_path / "out.png"), dtype=np.float32) / 255
    assert np.abs(ours - image(engine, loras={"style": 0.8, "detail": 0.3})).max() <= 1 / 255
    done = generate("--lora", "nope=1")
    assert done.returncode == 2 and "`loras` names an adapter this model does not have" in done.stderr
    done = generate("--lora", "style")
    assert done.returncode == 2 and "is not NAME=STRENGTH" in done.stderr


def test_a_switch_that_fails_halfway_leaves_no_half_switched_model(engine, monkeypatch):
    """A fake stands in for running out of GPU memory in the middle of a switch (a CPU run cannot): every layer goes
    back to its own weights, the error reaches the request's group, and the next request switches cleanly."""
    from sd_engine import loras

    plain = image(engine, seed=2)
    styled = image(engine, seed=2, loras={"style": 1.0})
    real_write, calls = loras.Adapters._write, []

    def failing(self, key, terms):  # the 20th layer's write runs out of memory, 19 layers already written
        calls.append(1)
        if len(calls) == 20:
            raise torch.OutOfMemoryError("out of memory (simulated)")
        return real_write(self, key, terms)

    monkeypatch.setattr(loras.Adapters, "_write", failing)
    [result] = engine.generate([parse_request({"prompt": "a red fox", "seed": 2, "loras": {"detail": 1.0}},
                                              engine.rules)])
    assert result.status == 507 and engine.adapters.active == () and len(calls) == 20
    monkeypatch.setattr(loras.Adapters, "_write", real_write)
    assert np.array_equal(image(engine, seed=2), plain)
    assert np.array_equal(image(engine, seed=2, loras={"style": 1.0}), styled)


def test_sdxl_adapters_reach_both_text_encoders_and_match_diffusers(tmp_path):
    """SDXL: its second text encoder too (kohya's lora_te1_/lora_te2_ prefixes), the same image as diffusers."""
    folder = save_pipeline("tiny-sdxl", tmp_path / "sdxl")
    pipe = DiffusionPipeline.from_pretrained(folder)
    save_random_lora(pipe, folder / "loras" / "style.safetensors", seed=4, std=0.1)
    save_random_lora(pipe, folder / "loras" / "detail.safetensors", seed=5, layout="kohya", std=0.1)
    engine = load_engine(config(), folder, CPU)
    touched = {component for fs in engine.adapters.factors.values() for f in fs for component in
               ("unet", "text_encoder", "text_encoder_2") if any(m is f.module for m in getattr(
                   engine.pipe, component).modules())}
    assert touched == {"unet", "text_encoder", "text_encoder_2"}
    reference = DiffusionPipeline.from_pretrained(folder)
    for name in ("style", "detail"):
        reference.load_lora_weights(str(folder / "loras"), weight_name=f"{name}.safetensors", adapter_name=name)
    for adapters in ({"style": 0.8}, {"style": 0.5, "detail": 1.0}):
        assert np.abs(image(engine, loras=adapters) - diffusers_image(reference, adapters)).max() <= 2 / 255, adapters
