"""The engine on the tiny random model, on the CPU."""

import dataclasses
import types

import numpy as np
import pytest
import torch

from sd_engine.engine import Engine, GenerationResult, load_engine
from sd_engine.errors import ConfigError, GenerationError, OutOfMemory
from sd_engine.optimize import resolve_backend
from sd_engine.random_models import build_tokenizer
from sd_engine.requests import parse_request


def pixels(result):
    assert isinstance(result, GenerationResult), result
    return np.asarray(result.image, dtype=np.int16)


def test_generates_the_requested_size(tiny_engine, cpu_rules):
    [result] = tiny_engine.generate([parse_request({"prompt": "x", "height": 128, "width": 96}, cpu_rules)])
    assert result.image.size == (96, 128)
    assert pixels(result).std() > 1  # not a blank image


def test_same_seed_same_image_different_seed_different_image(tiny_engine, cpu_rules):
    a, b, c = (tiny_engine.generate([parse_request({"prompt": "a fox", "seed": s}, cpu_rules)])[0]
               for s in (7, 7, 8))
    assert np.array_equal(pixels(a), pixels(b))
    assert np.abs(pixels(a) - pixels(c)).mean() > 5


def test_image_depends_on_its_seed_not_on_its_batch_neighbours(tiny_engine, cpu_rules):
    alone = tiny_engine.generate([parse_request({"prompt": "a fox", "seed": 7}, cpu_rules)])[0]
    batch = tiny_engine.generate([parse_request({"prompt": "a cat", "seed": 1}, cpu_rules),
                                  parse_request({"prompt": "a fox", "seed": 7}, cpu_rules),
                                  parse_request({"prompt": "a dog", "seed": 2}, cpu_rules)])
    # Batched matmuls may round differently from batch 1: allow one grey level, not a different image.
    assert np.abs(pixels(batch[1]) - pixels(alone)).max() <= 2


def test_mixed_batch_returns_per_request_results_in_order(tiny_engine, monkeypatch, cpu_rules):
    calls = []
    pipeline_class = type(tiny_engine.pipe)
    real_call = pipeline_class.__call__

    def counting_call(self, **kwargs):  # counts calls, generates with the real pipeline
        calls.append((kwargs["height"], kwargs["width"], kwargs["num_inference_steps"], len(kwargs["prompt"])))
        return real_call(self, **kwargs)

    monkeypatch.setattr(pipeline_class, "__call__", counting_call)
    engine = tiny_engine
    bodies = [{"prompt": "a", "seed": 1}, {"prompt": "b", "seed": 2, "height": 128},
              {"prompt": "c", "seed": 3}, {"prompt": "d", "seed": 4, "num_inference_steps": 2}]
    results = engine.generate([parse_request(b, cpu_rules) for b in bodies])
    assert [r.request.prompt for r in results] == ["a", "b", "c", "d"]
    assert [r.image.size for r in results] == [(64, 64), (64, 128), (64, 64), (64, 64)]
    assert sorted(calls) == [(64, 64, 2, 1), (64, 64, 4, 2), (128, 64, 4, 1)]  # a and c shared one call


class _FailingPipe:
    """Stands in for the pipeline to reach the error branches; a CPU run cannot exhaust GPU memory on demand."""

    def __init__(self, error):
        self.error = error
        self.tokenizer = build_tokenizer()
        self.text_encoder = self.unet = torch.nn.Identity()  # for StageTimer's hooks; never called
        self.vae = types.SimpleNamespace(decode=None)

    def set_progress_bar_config(self, **kwargs):
        pass

    def __call__(self, **kwargs):
        if kwargs["height"] == 128:
            raise self.error
        images = torch.full((len(kwargs["prompt"]), 3, kwargs["height"], kwargs["width"]),
                            0.5 if self.error else float("nan"))
        return types.SimpleNamespace(images=images)


@pytest.mark.parametrize("error, expected, status", [
    (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20 GiB"), OutOfMemory, 507),
    (RuntimeError("boom"), GenerationError, 500),
])
def test_a_failing_group_fails_only_its_requests(cpu_config, error, expected, status, cpu_rules):
    pipe = _FailingPipe(error)
    engine = Engine(pipe, cpu_config, torch.device("cpu"), rules=cpu_rules)
    results = engine.generate([parse_request({"prompt": "ok"}, cpu_rules),
                               parse_request({"prompt": "big", "height": 128}, cpu_rules)])
    assert isinstance(results[0], GenerationResult)
    assert isinstance(results[1], expected) and results[1].status == status
    # The stage timer took its hooks off and put vae.decode back, although the pipeline raised.
    assert not pipe.unet._forward_hooks and not pipe.unet._forward_pre_hooks and pipe.vae.decode is None


def test_deepspeed_backend_and_cuda_graphs_need_cuda(cpu_config, tiny_model_dir):
    with pytest.raises(ConfigError, match="deepspeed needs a CUDA GPU"):
        load_engine(cpu_config.replace(backend="deepspeed"), tiny_model_dir, torch.device("cpu"))
    with pytest.raises(ConfigError, match="cuda_graph: true needs a CUDA GPU"):
        load_engine(cpu_config.replace(cuda_graph=True), tiny_model_dir, torch.device("cpu"))
    assert resolve_backend("auto", "cpu") == "eager"
    assert resolve_backend("auto", "cuda") == "eager"


def test_warmup_refuses_a_failed_generation(cpu_config, cpu_rules):
    engine = Engine(_FailingPipe(RuntimeError("no")), cpu_config, torch.device("cpu"),
                    rules=dataclasses.replace(cpu_rules, height=128, width=128, sizes=((128, 128),)))
    with pytest.raises(RuntimeError, match="warm-up generation failed at 128x128"):
        engine.warmup()


def test_warmup_runs_the_largest_batch_and_size_first(tiny_engine, monkeypatch, cpu_config, cpu_rules):
    # Later, smaller shapes then fit in the memory (and the CUDA graphs' pool) the first ones reserved.
    calls = []
    pipeline_class = type(tiny_engine.pipe)
    real_call = pipeline_class.__call__

    def recording_call(self, **kwargs):  # records the shape, generates with the real pipeline
        calls.append((len(kwargs["prompt"]), kwargs["height"], kwargs["width"]))
        return real_call(self, **kwargs)

    monkeypatch.setattr(pipeline_class, "__call__", recording_call)
    rules = dataclasses.replace(cpu_rules, sizes=((64, 64), (64, 96), (96, 96), (96, 64)))
    Engine(tiny_engine.pipe, cpu_config.replace(compile=True), tiny_engine.device, max_batch_size=2,
           rules=rules).warmup(2)
    assert calls == [(2, 96, 96), (2, 64, 96), (2, 96, 64), (2, 64, 64),
                     (1, 96, 96), (1, 64, 96), (1, 96, 64), (1, 64, 64)]
    calls.clear()  # torch.compile compiling at warm-up: batch 1 first, the sizes as listed (see the next test)
    Engine(tiny_engine.pipe, cpu_config.replace(compile=True), tiny_engine.device, max_batch_size=2,
           rules=rules).warmup(2, torch_compile=True)
    assert calls == [(1, 64, 64), (1, 64, 96), (1, 96, 96), (1, 96, 64),
                     (2, 64, 64), (2, 64, 96), (2, 96, 96), (2, 96, 64)]


def test_warmup_can_cover_every_batch_size_up_to_the_largest(tiny_engine, monkeypatch, cpu_config, cpu_rules):
    """warmup_all_batch_sizes: the batches between 1 and batchSize are ready at READY too, largest first."""
    calls = []
    pipeline_class = type(tiny_engine.pipe)
    real_call = pipeline_class.__call__

    def recording_call(self, **kwargs):
        calls.append((len(kwargs["prompt"]), kwargs["height"], kwargs["width"]))
        return real_call(self, **kwargs)

    monkeypatch.setattr(pipeline_class, "__call__", recording_call)
    rules = dataclasses.replace(cpu_rules, sizes=((64, 64), (96, 64)))
    config = cpu_config.replace(compile=True, warmup_all_batch_sizes=True)
    Engine(tiny_engine.pipe, config, tiny_engine.device, max_batch_size=3, rules=rules).warmup(3)
    assert calls == [(3, 96, 64), (3, 64, 64), (2, 96, 64), (2, 64, 64), (1, 96, 64), (1, 64, 64)]


def test_after_a_compiled_warm_up_no_batch_size_up_to_the_largest_compiles_again(tiny_model_dir, cpu_config,
                                                                                 dynamo_compiles):
    """Dynamo traces for real (a counting backend stands in for inductor: conftest). Warmed up at batch 1 and 4, a
    batch of 2 or 3 must find compiled code: the VAE decoder's batch is the images' (the UNet's is doubled by
    guidance), and compiled for batch 4 before batch 1 it would recompile here."""
    compiled = dynamo_compiles
    engine = load_engine(cpu_config.replace(compile=True, sizes=()), tiny_model_dir, torch.device("cpu"),
                         max_batch_size=4)
    warmed = len(compiled)
    assert warmed
    for batch in (2, 3):
        results = engine.generate([parse_request({"prompt": "p", "seed": i}, engine.rules) for i in range(batch)])
        assert all(isinstance(r, GenerationResult) for r in results)
    assert len(compiled) == warmed, "a batch within the warmed-up range compiled again"


def test_pixels_are_the_bytes_diffusers_pil_output_gives(cpu_rules):
    """to_pixels converts where the images are; its bytes must be those of diffusers' own "pil" output (numpy, float32,
    x255, round half to even), at every half-way value, for float16 and float32 images, with out-of-range values
    clipped and non-finite images flagged."""
    from diffusers.image_processor import VaeImageProcessor

    from sd_engine.engine import to_pixels

    halves = (torch.arange(0, 255) + 0.5) / 255  # half-way between two grey levels, where rounding rules differ
    values = torch.cat([torch.rand(5000, generator=torch.Generator().manual_seed(0)), halves,
                        torch.tensor([0.0, 1.0, -0.2, 1.5])])
    side = 64
    values = torch.cat([values, torch.zeros(3 * side * side - len(values) % (3 * side * side))])
    for dtype in (torch.float16, torch.float32):
        images = values.to(dtype).reshape(-1, 3, side, side)
        pixels, finite = to_pixels(images)
        expected = VaeImageProcessor.numpy_to_pil(VaeImageProcessor.pt_to_numpy(images.clamp(0, 1)))
        assert finite == [True] * len(images)
        assert all(np.array_equal(got, np.asarray(want)) for got, want in zip(pixels, expected))
    broken = torch.full((2, 3, 8, 8), 0.5)
    broken[1, 0, 0, 0] = float("nan")
    assert to_pixels(broken)[1] == [True, False]


def test_nan_pixels_are_an_error_not_a_black_image(cpu_config, cpu_rules):
    engine = Engine(_FailingPipe(None), cpu_config, torch.device("cpu"), rules=cpu_rules)  # None: NaN pixels
    [result] = engine.generate([parse_request({"prompt": "x"}, cpu_rules)])
    assert isinstance(result, GenerationError) and "NaN" in str(result)
    with pytest.raises(RuntimeError, match="NaN"):
        engine.warmup()


def test_prompts_longer_than_clips_window_are_reported(tiny_engine, cpu_rules):
    long_prompt = "a very detailed photo " * 30  # well over 77 tokens
    short, long = tiny_engine.generate([parse_request({"prompt": "a fox", "seed": 1}, cpu_rules),
                                        parse_request({"prompt": long_prompt, "negative_prompt": "blurry", "seed": 1},
                                                      cpu_rules)])
    assert short.truncated == () and long.truncated == ("prompt",)


def test_prompts_are_logged_only_at_debug(tiny_engine, caplog, cpu_rules):
    with caplog.at_level("INFO", logger="sd_engine"):
        tiny_engine.generate([parse_request({"prompt": "secret-prompt-text", "seed": 1}, cpu_rules)])
    assert caplog.records and "secret-prompt-text" not in caplog.text
    with caplog.at_level("DEBUG", logger="sd_engine"):
        tiny_engine.generate([parse_request({"prompt": "secret-prompt-text", "seed": 1}, cpu_rules)])
    assert "secret-prompt-text" in caplog.text


def test_results_carry_stage_times(tiny_engine, cpu_rules):
    [result] = tiny_engine.generate([parse_request({"prompt": "a fox", "seed": 1}, cpu_rules)])
    assert set(result.stage_seconds) == {"text_encoder", "denoise", "vae"}
    assert all(v > 0 for v in result.stage_seconds.values())
    assert sum(result.stage_seconds.values()) <= result.seconds
    assert result.peak_memory_bytes is None  # CPU


def test_groups_never_exceed_the_warmed_up_batch(tiny_engine, cpu_config, cpu_rules):
    # A KServe body may ask for several images, so one TorchServe batch can hold more images than batchSize.
    requests = [parse_request({"prompt": "p", "seed": i}, cpu_rules) for i in range(7)]
    requests.append(parse_request({"prompt": "p", "seed": 9, "num_inference_steps": 2}, cpu_rules))
    engine = Engine(tiny_engine.pipe, cpu_config, tiny_engine.device, max_batch_size=3)
    assert [len(g) for g in engine._groups(requests)] == [3, 3, 1, 1]
    assert sorted(i for g in engine._groups(requests) for i in g) == list(range(8))
