"""The DeepSpeed backend: kernel injection (DeepSpeed-Inference v1) into any SD-family pipeline, SDXL included.

`deepspeed.init_inference(pipe, dtype=float16, replace_with_kernel_inject=True)` swaps the UNet's attention and
transformer blocks for DeepSpeed's fused kernels and wraps UNet, VAE and the first text encoder in DSUNet / DSVAE /
DSClipEncoder (DeepSpeed has no kernels for the VAE or for CLIP inside a diffusers pipeline: those wrappers only
hold its optional CUDA graphs). DeepSpeed 0.19.8 was written for SD 1.x and diffusers 0.2x; with diffusers 0.42 and
transformers 5 it needs these repairs, made here in place (sources: ../shared/notes/deepspeed-sd-injection.md):

1. transformers >= 5.6 flattened CLIPTextModel: DSClipEncoder's `enc.text_model` is the encoder itself.
2. DSUNet hides the UNet's attributes, and SDXL's pipeline reads `unet.add_embedding`: lookups fall through.
3. DSUNet._forward drops `added_cond_kwargs` and `timestep_cond` (SDXL's size/crop conditioning and pooled text) and
   passes `return_dict` positionally into `class_labels`: every argument now goes through as given, and its own
   graph replay copies the tensors nested in `added_cond_kwargs` too.
4. Only `text_encoder` is wrapped; SDXL's `text_encoder_2` gets a DSClipEncoder as well.
5. Its Triton flash attention (self-attention, head size <= 128) loads K/V blocks without a boundary check, so a
   token count that is not a multiple of 64 reads past the end (SD 2.1's 12x12 mid-block at 768x768, SDXL's 36x28
   level at 1152x896): such calls run PyTorch's SDPA instead, the same attention.
6. Its cross-attention computes unscaled q.k scores in float16 and ignores the UNet's `upcast_attention` (set by SD
   2.1): the 1/sqrt(d) scale is folded into the query weights, so the stored scores are already scaled, as SDPA's are.

deepspeed is imported inside the functions: it is heavy, GPU-only here, and TorchServe's loader would hide an
ImportError raised at module import time.
"""

from __future__ import annotations

import logging
import os
from collections import Counter

import torch
import torch.nn.functional as F
from torch.utils._pytree import tree_leaves

logger = logging.getLogger(__name__)
FLASH_ALIGNMENT = 64  # DeepSpeed's Triton kernel steps through K/V in blocks of 64 or 128 tokens


def deepspeed_inject(pipe, enable_cuda_graph: bool = False):
    """DeepSpeed kernel injection into the pipeline, in place. `enable_cuda_graph` is DeepSpeed's own one-shape
    graph, kept for benchmarking it against ours."""
    import deepspeed
    from deepspeed.ops.transformer.inference.diffusers_attention import DeepSpeedDiffusersAttention

    # (1) object.__setattr__ keeps the self-reference out of nn.Module's child registry; a registered one would loop
    # in .modules(), .to() and state_dict().
    encoder = pipe.text_encoder
    if not hasattr(encoder, "text_model"):
        object.__setattr__(encoder, "text_model", encoder)

    # DeepSpeed numbers its diffusers attention modules with a class-wide counter, and only number 0 allocates the
    # kernel workspace. Start from 0, so that this pipeline has that module even if an earlier one (a benchmark's,
    # a test's) was injected in this process.
    DeepSpeedDiffusersAttention.layer_id = 0
    # DeepSpeed mutates the pipeline in place (pipe.unet becomes DSUNet, ...); the returned engine is not needed.
    # Its kernels JIT-build on first use: set TORCH_CUDA_ARCH_LIST so they are built for this GPU only.
    deepspeed.init_inference(pipe, dtype=torch.half, replace_with_kernel_inject=True,
                             enable_cuda_graph=enable_cuda_graph)
    if type(pipe.unet).__name__ == "DSUNet":
        pipe.unet.__class__ = _pass_through_class(type(pipe.unet))  # (2), (3)
    if getattr(pipe, "text_encoder_2", None) is not None:  # (4)
        from deepspeed.model_implementations.transformers.clip_encoder import DSClipEncoder

        pipe.text_encoder_2 = DSClipEncoder(pipe.text_encoder_2, enable_cuda_graph=enable_cuda_graph)
    attention = [m for m in pipe.unet.modules() if isinstance(m, DeepSpeedDiffusersAttention)]
    for module in attention:  # (5)
        module.triton_flash_attn_kernel = AlignedFlashAttention(module.triton_flash_attn_kernel)
    # Cross-attention with its own query weights (DeepSpeed fuses q, k, v only where the widths match).
    cross = [block.attn_2 for block in pipe.unet.modules()
             if isinstance(getattr(block, "attn_2", None), DeepSpeedDiffusersAttention)
             and block.attn_2.attn_qkvw is None]
    for module in cross:  # (6)
        fold_query_scale(module)
    replaced = injection_report(pipe)
    logger.info("backend deepspeed %s (its own cuda graph %s, extensions in %s): %s; %d attention modules "
                "fall back to SDPA at token counts not a multiple of %d, %d cross-attention modules have the score "
                "scale folded into their queries", deepspeed.__version__, enable_cuda_graph,
                os.environ.get("TORCH_EXTENSIONS_DIR", "the default cache"), replaced, len(attention),
                FLASH_ALIGNMENT, len(cross))
    if not replaced.get("unet"):
        raise RuntimeError("DeepSpeed kernel injection replaced nothing in the UNet; refusing to serve unoptimized")
    return pipe


def _pass_through_class(ds_unet_class):
    """A subclass of DeepSpeed's DSUNet (same state, swapped in with __class__) that forwards every argument and
    every unknown attribute to the wrapped UNet."""

    class PassThroughDSUNet(ds_unet_class):
        def __getattr__(self, name):
            try:
                return super().__getattr__(name)  # nn.Module's: parameters, buffers, submodules (`unet` itself)
            except AttributeError:
                if name == "unet":
                    raise
                return getattr(self.unet, name)

        def _forward(self, *args, **kwargs):
            return self.unet(*args, **kwargs)

        def _graph_replay(self, *inputs, **kwargs):
            for static, value in zip(tree_leaves((self.static_inputs, self.static_kwargs)),
                                     tree_leaves((inputs, kwargs))):
                if torch.is_tensor(value):
                    static.copy_(value)
            self._cuda_graphs.replay()
            return self.static_output

    PassThroughDSUNet.__name__ = PassThroughDSUNet.__qualname__ = "DSUNet"
    PassThroughDSUNet.__module__ = ds_unet_class.__module__
    return PassThroughDSUNet


class AlignedFlashAttention(torch.nn.Module):
    """DeepSpeed's Triton flash attention where it is safe (token count a multiple of 64), SDPA elsewhere.
    q, k, v: [batch, heads, tokens, head size padded to 32/64/128 with zeros], which add nothing to q.k and give
    zero columns the caller slices off; `sm_scale` is the unpadded head size's."""

    def __init__(self, kernel: torch.nn.Module):
        super().__init__()
        self.kernel = kernel

    def forward(self, q, k, v, sm_scale, block_128=True):
        if k.shape[2] % FLASH_ALIGNMENT == 0:
            return self.kernel(q, k, v, sm_scale, block_128)
        return F.scaled_dot_product_attention(q, k, v, scale=sm_scale)


def fold_query_scale(module) -> None:
    """Scale a DeepSpeed cross-attention's query weights by its 1/sqrt(head size) and make its own scale 1: the same
    attention, with q.k stored already scaled (8x smaller for head size 64) in its float16 score matrix."""
    scale = 1 / module.norm_factor ** 2
    with torch.no_grad():
        module.attn_qw.mul_(scale)
    module.norm_factor = 1.0


def pin_deepspeed_workspace(pipe, device: torch.device, max_batch_size: int) -> None:
    """Allocate DeepSpeed's kernel workspace once, at its largest, before any CUDA graph is captured.

    DeepSpeed 0.19.8 keeps one workspace buffer for its injected kernels (InferenceContext::GenWorkSpace in
    inference_context.h). Every call records the size it needed, and a call that needs more than the last recorded
    size frees the buffer and allocates a new one. The UNet's first attention module (layer_id 0; the text encoder
    and VAE get no kernels) asks on every call, for that call's batch, so serving batches 8, 1, then 3 reallocated
    at the 3, and the graphs captured for 8 and 1 still pointed at the freed buffer: "an illegal memory access" on an
    H200 (bench/results/h200x2-sd15-2026-11-22-serving-ds-bug.json, h200-2026-11-22-pytest-gpu-pin-disabled.log),
    which poisons the worker's CUDA context for good. So that module always asks for the largest batch seen,
    starting at 2 x `max_batch_size` (classifier-free guidance doubles the UNet's batch), and asks once now: the
    buffer never shrinks in DeepSpeed's books, and grows only for a batch larger than any before (which the engine's
    batch cap rules out), when graphs.reset_on_larger_batch drops the UNet's graphs made before.

    The workspace belongs to the process, not the pipeline: pin one live DeepSpeed engine per process (a TorchServe
    worker has one). Two live engines pinned to different sizes would reallocate it under each other's graphs.
    """
    from deepspeed.ops.transformer.inference.diffusers_attention import DeepSpeedDiffusersAttention

    owners = [m for m in pipe.unet.modules() if isinstance(m, DeepSpeedDiffusersAttention) and m.config.layer_id == 0]
    if len(owners) != 1:
        raise RuntimeError(f"expected one DeepSpeed attention module with layer_id 0 in the UNet, found {len(owners)}; "
                           "its workspace cannot be pinned, and CUDA graphs over it would not be safe")
    (owner,) = owners
    largest = [2 * max_batch_size]
    allocate = owner.allocate_workspace

    def allocate_largest(size):
        largest[0] = max(largest[0], size[0])
        allocate(torch.Size((largest[0], *size[1:])))

    owner.allocate_workspace = allocate_largest
    owner.allocate_workspace(torch.Size((2 * max_batch_size, 64, owner.config.hidden_size)))
    logger.info("DeepSpeed workspace pinned for UNet batches up to %d", 2 * max_batch_size)


def injection_report(pipe) -> dict[str, dict[str, int]]:
    """Count DeepSpeed modules inside each component, e.g. {'unet': {'DSUNet': 1, 'DeepSpeedDiffusersAttention': 32},
    ...}."""
    report = {}
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        component = getattr(pipe, name, None)
        if component is None:
            continue
        counts = Counter(type(m).__name__ for m in component.modules() if type(m).__module__.startswith("deepspeed"))
        report[name] = dict(counts)
    return report
