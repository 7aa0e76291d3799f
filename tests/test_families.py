"""Every SD family through the engine gives diffusers' own image for the same seed: SD 1.x, SD 2.x (v-prediction,
DDIM) and SDXL (two text encoders, micro-conditioning, Euler). Tiny random pipelines, saved with save_pretrained and
loaded back as a user's folder would be."""

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline

from sd_engine.config import EngineConfig
from sd_engine.engine import load_engine
from sd_engine.random_models import save_pipeline
from sd_engine.requests import parse_request

FAMILIES = ["tiny", "tiny-sd2", "tiny-sdxl"]


@pytest.fixture(scope="module", params=FAMILIES)
def family_dir(request, tmp_path_factory):
    return request.param, save_pipeline(request.param, tmp_path_factory.mktemp(request.param) / "weights", seed=3)


def diffusers_image(folder, dtype, **kwargs):
    pipe = DiffusionPipeline.from_pretrained(str(folder), dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    seed = kwargs.pop("seed")
    pixels = pipe(generator=[torch.Generator("cpu").manual_seed(seed)], output_type="np", **kwargs).images[0]
    return (np.clip(pixels, 0, 1) * 255).round().astype(np.uint8)


@pytest.mark.parametrize("fields", [{"prompt": "a red fox", "seed": 11},
                                    {"prompt": "a red fox", "seed": 11, "negative_prompt": "blurry",
                                     "guidance_scale": 6.0, "height": 96, "width": 64}])
def test_engine_image_is_diffusers_image(family_dir, fields):
    name, folder = family_dir
    engine = load_engine(EngineConfig(num_inference_steps=3, warmup=False), folder, torch.device("cpu"))
    request = parse_request(fields, engine.rules)
    [result] = engine.generate([request])
    expected = diffusers_image(folder, torch.float32, prompt=request.prompt, negative_prompt=fields.get(
        "negative_prompt"), num_inference_steps=3, guidance_scale=request.guidance_scale, height=request.height,
        width=request.width, seed=request.seed)
    assert np.array_equal(np.asarray(result.image), expected), name


def test_sdxl_vae_stays_in_float32_and_decodes_as_diffusers_upcast_does(tmp_path):
    """In float16, SDXL's pipeline upcasts a VAE whose config sets force_upcast to float32 for every decode and back;
    the engine keeps it in float32 once. The CPU runs float16 here too, so both paths are the real ones. The one
    difference: diffusers casts the latents to float32 before dividing them by the VAE's scaling factor, the engine's
    VAE receives them divided in float16 (one float16 rounding, at most a grey level here)."""
    folder = save_pipeline("tiny-sdxl", tmp_path / "weights", seed=3)
    engine = load_engine(EngineConfig(num_inference_steps=2, dtype="float16", warmup=False), folder,
                         torch.device("cpu"))
    assert engine.pipe.vae.dtype == torch.float32 and engine.pipe.unet.dtype == torch.float16
    assert not engine.pipe.vae.config.force_upcast
    request = parse_request({"prompt": "a red fox", "seed": 5}, engine.rules)
    [result] = engine.generate([request])
    expected = diffusers_image(folder, torch.float16, prompt=request.prompt, num_inference_steps=2,
                               guidance_scale=request.guidance_scale, seed=5)
    difference = np.abs(np.asarray(result.image).astype(int) - expected)
    assert difference.max() <= 1 and difference.mean() < 0.05
    assert engine.pipe.vae.dtype == torch.float32  # still: nothing converted it back


@pytest.mark.parametrize("preset, calls", [("tiny", 1), ("tiny-sdxl", 2)])
def test_requests_with_and_without_a_negative_prompt_share_a_call_only_where_that_changes_nothing(
        tmp_path, preset, calls):
    """SD 1.x/2.x encode a missing negative prompt as the empty prompt; SDXL guides with zeros instead."""
    engine = load_engine(EngineConfig(num_inference_steps=2, warmup=False), save_pipeline(preset, tmp_path / "w"),
                         torch.device("cpu"), max_batch_size=2)
    requests = [parse_request({"prompt": "a fox", "seed": 1}, engine.rules),
                parse_request({"prompt": "a cat", "seed": 2, "negative_prompt": "dark"}, engine.rules)]
    assert len(engine._groups(requests)) == calls


def test_a_neighbours_negative_prompt_does_not_change_an_sdxl_image(tmp_path):
    """Without a negative prompt SDXL guides with zeros, with one it encodes it: such requests run in separate calls,
    so batching never changes what a request gets."""
    folder = save_pipeline("tiny-sdxl", tmp_path / "weights", seed=3)
    engine = load_engine(EngineConfig(num_inference_steps=2, warmup=False), folder, torch.device("cpu"))
    alone = engine.generate([parse_request({"prompt": "a fox", "seed": 1}, engine.rules)])[0]
    together = engine.generate([parse_request({"prompt": "a fox", "seed": 1}, engine.rules),
                                parse_request({"prompt": "a cat", "seed": 2, "negative_prompt": "dark"},
                                              engine.rules)])[0]
    assert np.array_equal(np.asarray(alone.image), np.asarray(together.image))
