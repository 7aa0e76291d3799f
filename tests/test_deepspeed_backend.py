"""The DeepSpeed backend's repairs for SDXL, with DeepSpeed's real wrapper classes on the CPU.

deepspeed.init_inference needs a CUDA GPU (its kernels JIT-build for it), so a stand-in does what its diffusers
injection does apart from the kernels: it wraps the UNet, VAE and first text encoder in DeepSpeed's own DSUNet, DSVAE
and DSClipEncoder. What our backend does around that is real. tests/test_gpu.py runs the real injection.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import deepspeed
from deepspeed.model_implementations.diffusers.unet import DSUNet
from deepspeed.model_implementations.diffusers.vae import DSVAE
from deepspeed.model_implementations.transformers.clip_encoder import DSClipEncoder
from deepspeed.ops.transformer.inference.diffusers_attention import DeepSpeedDiffusersAttention
from sd_engine.config import EngineConfig
from sd_engine.deepspeed_backend import AlignedFlashAttention, fold_query_scale, injection_report
from sd_engine.loading import load_pipeline
from sd_engine.optimize import optimize
from sd_engine.random_models import build_pipeline, save_pipeline


@pytest.fixture(scope="module")
def sdxl_dir(tmp_path_factory):
    return save_pipeline("tiny-sdxl", tmp_path_factory.mktemp("tiny-sdxl") / "weights", seed=3)


def generate(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe(prompt=["a red fox", "a cat"], negative_prompt=["blurry", "dark"], num_inference_steps=2,
                generator=[torch.Generator().manual_seed(s) for s in (1, 2)], output_type="np").images


def ds_attention(fused: bool, norm_factor: float = 8 ** 0.5) -> DeepSpeedDiffusersAttention:
    """DeepSpeed's attention module as its injection leaves it, without its __init__ (which JIT-builds CUDA ops)."""
    module = DeepSpeedDiffusersAttention.__new__(DeepSpeedDiffusersAttention)
    torch.nn.Module.__init__(module)
    module.triton_flash_attn_kernel = torch.nn.Module()
    module.attn_qkvw = torch.nn.Parameter(torch.ones(8, 24)) if fused else None
    module.attn_qw = torch.nn.Parameter(torch.ones(8, 8))
    module.norm_factor = norm_factor
    return module


class DSBlock(torch.nn.Module):  # DeepSpeedDiffusersTransformerBlock keeps its attention modules as attn_1, attn_2
    def __init__(self):
        super().__init__()
        self.attn_1, self.attn_2 = ds_attention(fused=True), ds_attention(fused=False)


def test_sdxl_runs_through_deepspeeds_wrappers_and_gives_the_plain_image(sdxl_dir, monkeypatch):
    seen = {}

    def init_inference(pipe, dtype, replace_with_kernel_inject, enable_cuda_graph):
        seen.update(dtype=dtype, inject=replace_with_kernel_inject, graph=enable_cuda_graph,
                    layer_id=DeepSpeedDiffusersAttention.layer_id)
        pipe.text_encoder = DSClipEncoder(pipe.text_encoder, enable_cuda_graph=enable_cuda_graph)
        pipe.unet.ds_block = DSBlock()  # where injection would put its blocks; never called by the UNet's forward
        pipe.unet = DSUNet(pipe.unet, enable_cuda_graph=enable_cuda_graph)
        pipe.vae = DSVAE(pipe.vae, enable_cuda_graph=enable_cuda_graph)

    monkeypatch.setattr(deepspeed, "init_inference", init_inference)
    DeepSpeedDiffusersAttention.layer_id = 32  # as left by an earlier pipeline injected in this process
    expected = generate(load_pipeline(sdxl_dir, torch.float32))
    pipe = load_pipeline(sdxl_dir, torch.float32)
    text_encoder = pipe.text_encoder
    assert optimize(pipe, EngineConfig(backend="deepspeed"), torch.device("cpu"), "deepspeed") is pipe

    assert seen == {"dtype": torch.half, "inject": True, "graph": False, "layer_id": 0}
    assert text_encoder.text_model is text_encoder  # the transformers >= 5.6 shim DSClipEncoder needs
    assert text_encoder not in list(text_encoder.children())  # not registered as a submodule
    assert injection_report(pipe) == {"unet": {"DSUNet": 1, "DeepSpeedDiffusersAttention": 2}, "vae": {"DSVAE": 1},
                                      "text_encoder": {"DSClipEncoder": 1}, "text_encoder_2": {"DSClipEncoder": 1}}
    block = pipe.unet.unet.ds_block
    # Every attention module's flash kernel is guarded; only the cross-attention with its own query weights has the
    # score scale folded in.
    assert all(isinstance(m.triton_flash_attn_kernel, AlignedFlashAttention) for m in (block.attn_1, block.attn_2))
    assert block.attn_2.norm_factor == 1.0 and torch.allclose(block.attn_2.attn_qw, torch.full((8, 8), 1 / 8))
    assert block.attn_1.norm_factor == 8 ** 0.5 and torch.equal(block.attn_1.attn_qw, torch.ones(8, 8))
    assert type(pipe.unet).__name__ == "DSUNet" and isinstance(pipe.unet, DSUNet)
    assert pipe.unet.add_embedding is pipe.unet.unet.add_embedding  # SDXL's pipeline reads it
    # added_cond_kwargs (pooled text, size and crop) reach the UNet (without them SDXL's UNet raises): the images
    # are the plain pipeline's, up to DSUNet's channels-last weights' rounding.
    np.testing.assert_allclose(generate(pipe), expected, atol=1e-5)


def test_deepspeeds_own_graph_replay_copies_the_added_conditioning():
    """DSUNet's replay copied top-level tensors only; SDXL's time_ids and pooled text live in a dict."""
    from sd_engine.deepspeed_backend import _pass_through_class

    unet = DSUNet(build_pipeline("tiny-sdxl").unet, enable_cuda_graph=False)
    unet.__class__ = _pass_through_class(DSUNet)
    static = {"text_embeds": torch.zeros(2), "time_ids": torch.zeros(3)}
    unet.static_inputs, unet.static_kwargs, unet.static_output = (torch.zeros(1),), {"added_cond_kwargs": static}, "out"
    unet._cuda_graphs = type("Graph", (), {"replay": lambda self: None})()  # a graph can only be captured on a GPU
    assert unet._graph_replay(torch.ones(1), added_cond_kwargs={"text_embeds": torch.full((2,), 2.0),
                                                                "time_ids": torch.full((3,), 3.0)}) == "out"
    assert unet.static_inputs[0].tolist() == [1.0]
    assert static["text_embeds"].tolist() == [2.0, 2.0] and static["time_ids"].tolist() == [3.0] * 3


@pytest.mark.parametrize("tokens, head, padded", [(144, 64, 64), (1008, 40, 64), (4096, 64, 64), (77, 80, 128)])
def test_flash_attention_falls_back_to_sdpa_where_deepspeeds_kernel_would_read_past_the_end(tokens, head, padded):
    calls = []

    def triton_kernel(q, k, v, sm_scale, block_128):  # DeepSpeed's Triton kernel runs only on a GPU
        calls.append(k.shape[2])
        return torch.zeros_like(q)

    attention = AlignedFlashAttention(torch.nn.Module())
    attention.kernel.forward = triton_kernel
    q, k, v = (torch.randn(2, 3, tokens, head) for _ in range(3))
    padded_qkv = [F.pad(x, (0, padded - head)) for x in (q, k, v)]  # DeepSpeed pads heads with zeros
    out = attention(*padded_qkv, head ** -0.5, tokens % 128 == 0)
    if tokens % 64 == 0:
        assert calls == [tokens]
    else:
        assert calls == []
        torch.testing.assert_close(out[..., :head], F.scaled_dot_product_attention(q, k, v), atol=1e-5, rtol=1e-5)


def test_folding_the_score_scale_into_the_queries_keeps_the_attention():
    x, context, weight = torch.randn(2, 16, 64), torch.randn(2, 7, 96), torch.randn(64, 64)
    keys = torch.randn(96, 64)
    module = type("CrossAttention", (), {"attn_qw": weight.clone(), "norm_factor": 64 ** 0.25})()

    def attend(m):  # DeepSpeed's non-flash path: (q @ k^T) * (1 / norm_factor^2), softmax
        return ((x @ m.attn_qw) @ (context @ keys).transpose(-1, -2) * (1 / m.norm_factor ** 2)).softmax(-1)

    before = attend(module)
    fold_query_scale(module)
    assert module.norm_factor == 1.0
    torch.testing.assert_close(attend(module), before)
