"""Model-native request defaults: each family's own size, steps and guidance, unless the config says otherwise."""

import pytest
import torch

from sd_engine.config import EngineConfig
from sd_engine.engine import load_engine
from sd_engine.errors import ConfigError, InvalidRequest
from sd_engine.native import NativeDefaults, native_defaults, native_sizes, request_rules
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


def test_a_compiled_server_runs_listed_sizes_compiled_and_any_other_legal_size_uncompiled(tmp_path, monkeypatch):
    """The size policy: listed sizes (here the tiny model's derived ones, 64x64, 64x96, 96x64) run compiled, another
    legal size runs uncompiled, never refused; an illegal one gets the usual 400 naming the field. Dynamo traces for
    real; its backend is "eager" here, so that no C++ is generated (inductor on the CPU takes a minute)."""
    import functools

    from sd_engine import optimize

    monkeypatch.setattr(optimize.torch, "compile", functools.partial(torch.compile, backend="eager"))
    calls = []
    real_by_size = optimize.by_latent_size

    def recording(compiled, plain, sizes, dims):
        def record(name, fn):
            return lambda sample, *a, **k: calls.append((name, tuple(sample.shape[-2:]))) or fn(sample, *a, **k)
        return real_by_size(record("compiled", compiled), record("plain", plain), sizes, dims)

    monkeypatch.setattr(optimize, "by_latent_size", recording)
    from sd_engine.random_models import save_pipeline

    engine = load_engine(EngineConfig(compile=True, num_inference_steps=2, warmup=False),
                         save_pipeline("tiny", tmp_path / "w"), torch.device("cpu"))
    assert engine.rules.sizes == ((64, 64), (64, 96), (96, 64))
    for height, width, expected in ((64, 64, "compiled"), (96, 64, "compiled"), (64, 96, "compiled"),
                                    (80, 64, "plain"), (96, 96, "plain")):
        calls.clear()
        request = parse_request({"prompt": "x", "height": height, "width": width}, engine.rules)
        [result] = engine.generate([request])
        assert result.image.size == (width, height)
        assert {name for name, _ in calls} == {expected}, (height, width)  # UNet steps and the VAE decode alike
    with pytest.raises(InvalidRequest) as error:
        parse_request({"prompt": "x", "height": 104, "width": 64}, engine.rules)  # above 1.5x native
    assert error.value.field == "height"


@pytest.mark.parametrize("native, expected", [
    ((512, 512), ((512, 512), (512, 768), (768, 512))),
    ((1024, 1024), ((1024, 1024), (1152, 896), (896, 1152), (1216, 832), (832, 1216), (1344, 768), (768, 1344))),
])
def test_sizes_are_derived_from_the_native_size_alone(native, expected):
    assert native_sizes(*native) == expected
    rules = request_rules(EngineConfig(), NativeDefaults(*native, 50, 7.5))
    assert rules.sizes == expected  # all within the default limits (1.5x native)


def test_listed_sizes_keep_the_default_first_and_must_be_legal():
    native = NativeDefaults(512, 512, 50, 7.5)
    rules = request_rules(EngineConfig(height=576, sizes=((512, 512), (768, 512))), native)
    assert rules.sizes == ((576, 512), (512, 512), (768, 512))
    assert request_rules(EngineConfig(sizes=()), native).sizes == ((512, 512),)  # empty: the default size alone
    with pytest.raises(ConfigError, match=r"handler.sizes: \[\[1024, 512\]\] exceed the size limits"):
        request_rules(EngineConfig(sizes=((1024, 512),)), native)
    assert request_rules(EngineConfig(sizes=((1024, 512),), max_height=1024), native).sizes[-1] == (1024, 512)


def test_an_sdxl_engine_defaults_to_its_own_size_and_guidance(tmp_path):
    from sd_engine.random_models import save_pipeline

    folder = save_pipeline("tiny-sdxl", tmp_path / "sdxl")
    engine = load_engine(EngineConfig(num_inference_steps=2), folder, torch.device("cpu"))
    request = parse_request("a red fox", engine.rules)
    assert (request.height, request.width, request.guidance_scale, request.num_inference_steps) == (64, 64, 5.0, 2)
    [result] = engine.generate([request])
    assert result.image.size == (64, 64)


def test_one_compile_covers_every_listed_size_and_batch(tmp_path, monkeypatch):
    """With several sizes, batch, height and width are symbolic: after the first call (batch 1) no listed size or
    batch size compiles the UNet again (its text embeddings' batch is symbolic too), and the VAE decoder compiles once
    more, for its first batch above 1. Dynamo traces for real; a counting backend stands in for inductor, whose C++
    build on the CPU takes minutes."""
    from sd_engine import optimize
    from sd_engine.random_models import save_pipeline

    compiled = []

    def counting(graph_module, example_inputs):
        compiled.append([tuple(x.shape) for x in example_inputs if isinstance(x, torch.Tensor)])
        return graph_module.forward

    torch._dynamo.reset()
    real_compile = torch.compile
    monkeypatch.setattr(optimize.torch, "compile", lambda fn: real_compile(fn, backend=counting))
    engine = load_engine(EngineConfig(compile=True, num_inference_steps=2, warmup=False),
                         save_pipeline("tiny", tmp_path / "w"), torch.device("cpu"), max_batch_size=4)

    def generate(batch, height, width):
        requests = [parse_request({"prompt": "x", "height": height, "width": width, "seed": i}, engine.rules)
                    for i in range(batch)]
        assert [r.image.size for r in engine.generate(requests)] == [(width, height)] * batch

    generate(1, 64, 64)
    first = len(compiled)  # the UNet and the VAE decoder
    generate(2, 64, 96)
    assert len(compiled) == first + 1  # the VAE decoder's first batch above 1: torch specializes a batch of 1
    for batch, height, width in ((3, 96, 64), (1, 64, 96), (4, 64, 64)):
        generate(batch, height, width)
    assert len(compiled) == first + 1, compiled[first + 1:]
    torch._dynamo.reset()
