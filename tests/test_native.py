"""Model-native request defaults: each family's own size, steps and guidance, unless the config says otherwise."""

import pytest
import torch

from sd_engine.config import EngineConfig
from sd_engine.engine import load_engine
from sd_engine.errors import ConfigError
from sd_engine.native import NativeDefaults, native_defaults, request_rules
from sd_engine.random_models import build_pipeline
from sd_engine.requests import parse_request

SD15 = NativeDefaults(height=512, width=512, num_inference_steps=50, guidance_scale=7.5)
SDXL = NativeDefaults(height=1024, width=1024, num_inference_steps=50, guidance_scale=5.0)


@pytest.mark.parametrize("preset, guidance", [("tiny", 7.5), ("tiny-sd2", 7.5), ("tiny-sdxl", 5.0)])
def test_native_defaults_are_read_from_the_pipeline(preset, guidance):
    # The tiny UNets take 32x32 latents and their VAEs scale by 2: 64x64 images.
    assert native_defaults(build_pipeline(preset)) == NativeDefaults(64, 64, 50, guidance)


def test_absent_keys_take_the_model_defaults_and_sides_up_to_one_and_a_half_times_native():
    rules = request_rules(EngineConfig(), SDXL)
    assert (rules.height, rules.width, rules.num_inference_steps, rules.guidance_scale) == (1024, 1024, 50, 5.0)
    assert (rules.max_height, rules.max_width) == (1536, 1536)
    rules = request_rules(EngineConfig(), SD15)
    assert (rules.height, rules.max_height, rules.guidance_scale) == (512, 768, 7.5)


def test_explicit_keys_win():
    config = EngineConfig(height=768, width=640, num_inference_steps=30, guidance_scale=0.0, max_width=2048)
    rules = request_rules(config, SDXL)
    assert (rules.height, rules.width, rules.num_inference_steps, rules.guidance_scale) == (768, 640, 30, 0.0)
    assert (rules.max_height, rules.max_width) == (1536, 2048)
    # A default above the model's own limit raises that limit rather than refusing its own default.
    assert request_rules(EngineConfig(height=1024), SD15).max_height == 1024


def test_a_default_the_limits_refuse_names_both_keys_once_the_model_is_known():
    with pytest.raises(ConfigError, match=r"handler.width: the default must be in 64..1024, got 1536 \(the "
                                          r"model's own; set handler.width or raise handler.max_width\)"):
        request_rules(EngineConfig(max_width=1024), NativeDefaults(1024, 1536, 50, 5.0))


def test_a_unet_without_a_sample_size_needs_the_size_in_the_config():
    with pytest.raises(ConfigError, match="handler.height: this model's UNet config has no sample_size"):
        request_rules(EngineConfig(), NativeDefaults(None, None, 50, 7.5))
    assert request_rules(EngineConfig(height=512, width=768), NativeDefaults(None, None, 50, 7.5)).max_width == 1152


def test_a_rectangular_sample_size_gives_a_rectangular_native_size():
    pipe = build_pipeline("tiny")
    pipe.unet.register_to_config(sample_size=(32, 48))
    assert native_defaults(pipe) == NativeDefaults(64, 96, 50, 7.5)


def test_a_compiled_server_takes_every_legal_size(tmp_path, monkeypatch):
    """compile: true runs the default size compiled and any other legal size uncompiled, never refused. Dynamo traces
    for real; its backend is "eager" here, so that no C++ is generated (inductor on the CPU takes a minute)."""
    import functools

    from sd_engine import optimize

    monkeypatch.setattr(optimize.torch, "compile", functools.partial(torch.compile, backend="eager"))
    calls = []
    real_by_size = optimize.by_latent_size

    def recording(compiled, plain, sizes):
        def record(name, fn):
            return lambda sample, *a, **k: calls.append((name, tuple(sample.shape[-2:]))) or fn(sample, *a, **k)
        return real_by_size(record("compiled", compiled), record("plain", plain), sizes)

    monkeypatch.setattr(optimize, "by_latent_size", recording)
    from sd_engine.random_models import save_pipeline

    engine = load_engine(EngineConfig(compile=True, num_inference_steps=2, warmup=False),
                         save_pipeline("tiny", tmp_path / "w"), torch.device("cpu"))
    for fields in ({"prompt": "x"}, {"prompt": "x", "height": 96, "width": 64}):
        calls.clear()
        request = parse_request(fields, engine.rules)
        [result] = engine.generate([request])
        assert result.image.size == (request.width, request.height)
        expected = "compiled" if (request.height, request.width) == (64, 64) else "plain"
        assert {name for name, _ in calls} == {expected}  # UNet steps and the VAE decode alike


def test_an_sdxl_engine_defaults_to_its_own_size_and_guidance(tmp_path):
    from sd_engine.random_models import save_pipeline

    folder = save_pipeline("tiny-sdxl", tmp_path / "sdxl")
    engine = load_engine(EngineConfig(num_inference_steps=2), folder, torch.device("cpu"))
    request = parse_request("a red fox", engine.rules)
    assert (request.height, request.width, request.guidance_scale, request.num_inference_steps) == (64, 64, 5.0, 2)
    [result] = engine.generate([request])
    assert result.image.size == (64, 64)
