"""The engine on the tiny random model, on the CPU."""

import sys
import types

import numpy as np
import pytest
import torch

from sd_engine.engine import Engine, GenerationResult, load_engine
from sd_engine.errors import ConfigError, GenerationError, OutOfMemory
from sd_engine.optimize import injection_report, optimize, resolve_backend
from sd_engine.random_models import build_tokenizer
from sd_engine.requests import parse_request


def pixels(result):
    assert isinstance(result, GenerationResult), result
    return np.asarray(result.image, dtype=np.int16)


def test_generates_the_requested_size(tiny_engine, cpu_config):
    [result] = tiny_engine.generate([parse_request({"prompt": "x", "height": 128, "width": 96}, cpu_config)])
    assert result.image.size == (96, 128)
    assert pixels(result).std() > 1  # not a blank image


def test_same_seed_same_image_different_seed_different_image(tiny_engine, cpu_config):
    a, b, c = (tiny_engine.generate([parse_request({"prompt": "a fox", "seed": s}, cpu_config)])[0]
               for s in (7, 7, 8))
    assert np.array_equal(pixels(a), pixels(b))
    assert np.abs(pixels(a) - pixels(c)).mean() > 5


def test_image_depends_on_its_seed_not_on_its_batch_neighbours(tiny_engine, cpu_config):
    alone = tiny_engine.generate([parse_request({"prompt": "a fox", "seed": 7}, cpu_config)])[0]
    batch = tiny_engine.generate([parse_request({"prompt": "a cat", "seed": 1}, cpu_config),
                                  parse_request({"prompt": "a fox", "seed": 7}, cpu_config),
                                  parse_request({"prompt": "a dog", "seed": 2}, cpu_config)])
    # Batched matmuls may round differently from batch 1: allow one grey level, not a different image.
    assert np.abs(pixels(batch[1]) - pixels(alone)).max() <= 2


def test_mixed_batch_returns_per_request_results_in_order(tiny_engine, cpu_config, monkeypatch):
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
    results = engine.generate([parse_request(b, cpu_config) for b in bodies])
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
        pixels = np.full((kwargs["height"], kwargs["width"], 3), 0.5 if self.error else np.nan)
        return types.SimpleNamespace(images=[pixels] * len(kwargs["prompt"]))


@pytest.mark.parametrize("error, expected, status", [
    (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20 GiB"), OutOfMemory, 507),
    (RuntimeError("boom"), GenerationError, 500),
])
def test_a_failing_group_fails_only_its_requests(cpu_config, error, expected, status):
    pipe = _FailingPipe(error)
    engine = Engine(pipe, cpu_config, torch.device("cpu"))
    results = engine.generate([parse_request({"prompt": "ok"}, cpu_config),
                               parse_request({"prompt": "big", "height": 128}, cpu_config)])
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


def test_deepspeed_branch_calls_init_inference_with_the_clip_shim(monkeypatch, tiny_model_dir, cpu_config):
    """deepspeed.init_inference needs a GPU; a fake module stands in to check what our branch hands it."""
    from sd_engine.loading import load_pipeline

    pipe = load_pipeline(tiny_model_dir, torch.float32)
    seen = {}

    class DSUNet(torch.nn.Module):  # named like DeepSpeed's wrapper, defined in a "deepspeed" module
        def __init__(self, unet):
            super().__init__()
            self.unet = unet

    DSUNet.__module__ = "deepspeed.model_implementations.diffusers.unet"

    class DeepSpeedDiffusersAttention:  # DeepSpeed numbers these with a class-wide counter
        layer_id = 32  # as left by an earlier pipeline injected in this process

    def init_inference(model, **kwargs):
        seen.update(kwargs, text_model=model.text_encoder.text_model, layer_id=DeepSpeedDiffusersAttention.layer_id)
        model.unet = DSUNet(model.unet)

    monkeypatch.setitem(sys.modules, "deepspeed", types.SimpleNamespace(init_inference=init_inference,
                                                                         __version__="fake"))
    monkeypatch.setitem(sys.modules, "deepspeed.ops.transformer.inference.diffusers_attention",
                        types.SimpleNamespace(DeepSpeedDiffusersAttention=DeepSpeedDiffusersAttention))
    assert optimize(pipe, cpu_config.replace(backend="deepspeed"), torch.device("cpu"), "deepspeed") is pipe
    assert seen["dtype"] is torch.half and seen["replace_with_kernel_inject"] is True
    assert seen["enable_cuda_graph"] is False  # DeepSpeed's one-shape graphs stay off; ours are shape-keyed
    assert seen["text_model"] is pipe.text_encoder  # DSClipEncoder reaches enc.text_model
    assert seen["layer_id"] == 0  # so this pipeline's first attention module owns the kernel workspace
    assert pipe.text_encoder not in list(pipe.text_encoder.children())  # not registered as a submodule
    assert injection_report(pipe)["unet"] == {"DSUNet": 1}


def test_warmup_refuses_a_failed_generation(cpu_config):
    engine = Engine(_FailingPipe(RuntimeError("no")), cpu_config.replace(height=128, width=128),
                    torch.device("cpu"))
    with pytest.raises(RuntimeError, match="warm-up generation failed"):
        engine.warmup()


def test_nan_pixels_are_an_error_not_a_black_image(cpu_config):
    engine = Engine(_FailingPipe(None), cpu_config, torch.device("cpu"))  # None: returns NaN pixels
    [result] = engine.generate([parse_request({"prompt": "x"}, cpu_config)])
    assert isinstance(result, GenerationError) and "NaN" in str(result)
    with pytest.raises(RuntimeError, match="NaN"):
        engine.warmup()


def test_prompts_longer_than_clips_window_are_reported(tiny_engine, cpu_config):
    long_prompt = "a very detailed photo " * 30  # well over 77 tokens
    short, long = tiny_engine.generate([parse_request({"prompt": "a fox", "seed": 1}, cpu_config),
                                        parse_request({"prompt": long_prompt, "negative_prompt": "blurry", "seed": 1},
                                                      cpu_config)])
    assert short.truncated == () and long.truncated == ("prompt",)


def test_prompts_are_logged_only_at_debug(tiny_engine, cpu_config, caplog):
    with caplog.at_level("INFO", logger="sd_engine"):
        tiny_engine.generate([parse_request({"prompt": "secret-prompt-text", "seed": 1}, cpu_config)])
    assert caplog.records and "secret-prompt-text" not in caplog.text
    with caplog.at_level("DEBUG", logger="sd_engine"):
        tiny_engine.generate([parse_request({"prompt": "secret-prompt-text", "seed": 1}, cpu_config)])
    assert "secret-prompt-text" in caplog.text


def test_results_carry_stage_times(tiny_engine, cpu_config):
    [result] = tiny_engine.generate([parse_request({"prompt": "a fox", "seed": 1}, cpu_config)])
    assert set(result.stage_seconds) == {"text_encoder", "denoise", "vae"}
    assert all(v > 0 for v in result.stage_seconds.values())
    assert sum(result.stage_seconds.values()) <= result.seconds
    assert result.peak_memory_bytes is None  # CPU


def test_groups_never_exceed_the_warmed_up_batch(tiny_engine, cpu_config):
    # A KServe body may ask for several images, so one TorchServe batch can hold more images than batchSize.
    requests = [parse_request({"prompt": "p", "seed": i}, cpu_config) for i in range(7)]
    requests.append(parse_request({"prompt": "p", "seed": 9, "num_inference_steps": 2}, cpu_config))
    engine = Engine(tiny_engine.pipe, cpu_config, tiny_engine.device, max_batch_size=3)
    assert [len(g) for g in engine._groups(requests)] == [3, 3, 1, 1]
    assert sorted(i for g in engine._groups(requests) for i in g) == list(range(8))
