"""Optimization backends: one function, `optimize(pipe, backend, cuda_graph)`, that changes the pipeline in place.

- eager: the plain diffusers pipeline (PyTorch SDPA attention). The only backend on CPU.
- deepspeed: `deepspeed.init_inference(pipe, dtype=float16, replace_with_kernel_inject=True)`. DeepSpeed swaps the
  UNet's attention and transformer blocks for its fused kernels and wraps UNet, VAE and CLIP text encoder in its
  DSUNet / DSVAE / DSClipEncoder (optionally CUDA-graph-captured). deepspeed is imported inside the branch: it is
  heavy, GPU-only here, and TorchServe's loader would hide an ImportError raised at module import time.
"""

from __future__ import annotations

import logging
from collections import Counter

logger = logging.getLogger(__name__)


def resolve_backend(backend: str, device_type: str) -> str:
    """Turn `auto` into a concrete backend and refuse backends the device cannot run."""
    if backend == "auto":
        return "deepspeed" if device_type == "cuda" else "eager"
    if backend == "deepspeed" and device_type != "cuda":
        from .errors import ConfigError

        raise ConfigError(f"handler.backend deepspeed needs a CUDA GPU, but this worker runs on {device_type}")
    return backend


def optimize(pipe, backend: str, cuda_graph: bool = False):
    """Apply `backend` to a pipeline already on its device and in its dtype. Returns the same pipeline object."""
    if backend == "eager":
        logger.info("backend eager: plain diffusers pipeline")
        return pipe
    if backend == "deepspeed":
        return _deepspeed(pipe, cuda_graph)
    raise ValueError(f"unknown backend {backend!r}")


def _deepspeed(pipe, cuda_graph: bool):
    import deepspeed
    import torch

    # transformers >= 5.6 flattened CLIPTextModel: the `text_model` submodule is gone and its layers live on the
    # model itself. DeepSpeed 0.19.8's DSClipEncoder still does `enc.text_model._build_causal_attention_mask = ...`,
    # so give the encoder a `text_model` that is the encoder itself. object.__setattr__ keeps it out of
    # nn.Module's child registry; a registered self-reference would loop in .modules(), .to() and state_dict().
    encoder = pipe.text_encoder
    if not hasattr(encoder, "text_model"):
        object.__setattr__(encoder, "text_model", encoder)

    # DeepSpeed mutates the pipeline in place (pipe.unet becomes DSUNet, ...); the returned engine is not needed.
    # Its kernels JIT-build on first use: set TORCH_CUDA_ARCH_LIST and TORCH_EXTENSIONS_DIR so they are built for
    # the right GPU once and cached across restarts.
    deepspeed.init_inference(pipe, dtype=torch.half, replace_with_kernel_inject=True, enable_cuda_graph=cuda_graph)
    replaced = injection_report(pipe)
    logger.info("backend deepspeed %s (cuda_graph=%s): %s", deepspeed.__version__, cuda_graph, replaced)
    if not replaced.get("unet"):
        raise RuntimeError("DeepSpeed kernel injection replaced nothing in the UNet; refusing to serve unoptimized")
    return pipe


def injection_report(pipe) -> dict[str, dict[str, int]]:
    """Count DeepSpeed modules inside each component, e.g. {'unet': {'DSUNet': 1, 'DeepSpeedDiffusersAttention': 32}}."""
    report = {}
    for name in ("unet", "vae", "text_encoder"):
        component = getattr(pipe, name, None)
        if component is None:
            continue
        counts = Counter(type(m).__name__ for m in component.modules() if type(m).__module__.startswith("deepspeed"))
        report[name] = dict(counts)
    return report
