"""Optimization: one function, `optimize(pipe, config, device)`, that changes a loaded pipeline in place.

A straight run of steps, each an option of EngineConfig:
1. channels_last: UNet and VAE weights in NHWC, which cuDNN's tensor-core convolutions prefer.
2. backend
   - eager: the plain diffusers pipeline (PyTorch SDPA attention). The only backend on CPU.
   - deepspeed: `deepspeed.init_inference(pipe, dtype=float16, replace_with_kernel_inject=True)`. DeepSpeed swaps
     the UNet's attention and transformer blocks for its fused kernels and wraps UNet, VAE and CLIP text encoder in
     DSUNet / DSVAE / DSClipEncoder. Its own CUDA graphs are left off: they are captured once, for the first shape.
     deepspeed is imported inside the branch: it is heavy, GPU-only here, and TorchServe's loader would hide an
     ImportError raised at module import time.
3. compile: torch.compile (inductor, default mode) of the UNet and VAE decoder forward functions.
4. cuda_graph: our shape-keyed CUDA graphs (graphs.py) around UNet, text encoder and VAE decoder, for any backend.
"""

from __future__ import annotations

import logging
import os
from collections import Counter

import torch

from .errors import ConfigError

logger = logging.getLogger(__name__)


def resolve_backend(backend: str, device_type: str) -> str:
    """Turn `auto` into a concrete backend and refuse backends the device cannot run."""
    if backend == "auto":
        # Measured (bench/results/h200-sd15-2026-11-21.json): with our CUDA graphs DeepSpeed's kernels are within 3%
        # of PyTorch's SDPA at batch 1 (0.411 vs 0.423 s) and 18-20% lower in images/s from batch 4 up, and only eager can add
        # torch.compile (0.227 s); so auto is eager at every batch size. deepspeed stays selectable.
        return "eager"
    if backend == "deepspeed" and device_type != "cuda":
        raise ConfigError(f"handler.backend deepspeed needs a CUDA GPU, but this worker runs on {device_type}")
    return backend


def check_device(config, device: torch.device) -> None:
    if config.cuda_graph and device.type != "cuda":
        raise ConfigError(f"handler.cuda_graph: true needs a CUDA GPU, but this worker runs on {device.type}")


def optimize(pipe, config, device: torch.device, backend: str, max_batch_size: int = 1):
    """Apply config's optimizations to a pipeline already on `device` and in its dtype. Returns the same pipeline.
    `max_batch_size`: the most images the engine will generate in one call (DeepSpeed's workspace is sized for it)."""
    if config.cache_dir:
        set_cache_dirs(config.cache_dir)
    if config.channels_last:
        pipe.unet.to(memory_format=torch.channels_last)
        pipe.vae.to(memory_format=torch.channels_last)
        logger.info("channels_last: UNet and VAE weights in NHWC")
    if backend == "deepspeed":
        deepspeed_inject(pipe)
        if config.cuda_graph:
            pin_deepspeed_workspace(pipe, device, max_batch_size)
    else:
        logger.info("backend eager: plain diffusers pipeline")
    if config.compile:
        pipe.unet.forward = torch.compile(pipe.unet.forward)
        pipe.vae.decode = torch.compile(pipe.vae.decode)
        logger.info("compile: UNet and VAE decoder compiled with torch.compile (inductor), on first use per shape")
    if config.cuda_graph:
        from .graphs import graph_pipeline

        # Should DeepSpeed's workspace still grow (a batch beyond the pinned size), graphs made before are dropped.
        graph_pipeline(pipe, device, config.max_cuda_graphs, reset_on_larger_batch=backend == "deepspeed")
        logger.info("cuda_graph: UNet, text encoder and VAE decoder captured per input shape (up to %d each)",
                    config.max_cuda_graphs)
    return pipe


def set_cache_dirs(cache_dir: str) -> None:
    """Point DeepSpeed's, Inductor's and Triton's JIT caches into one folder. The config wins over the environment:
    importing torch already sets TORCHINDUCTOR_CACHE_DIR to its /tmp default, so a default could not be told apart."""
    for variable, sub in (("TORCH_EXTENSIONS_DIR", "torch_extensions"), ("TORCHINDUCTOR_CACHE_DIR", "inductor"),
                          ("TRITON_CACHE_DIR", "triton")):
        os.environ[variable] = os.path.join(cache_dir, sub)
    logger.info("JIT caches: %s", {v: os.environ[v] for v in ("TORCH_EXTENSIONS_DIR", "TORCHINDUCTOR_CACHE_DIR",
                                                              "TRITON_CACHE_DIR")})


def deepspeed_inject(pipe, enable_cuda_graph: bool = False):
    """DeepSpeed kernel injection into the pipeline, in place. `enable_cuda_graph` is DeepSpeed's own one-shape
    graph, kept for benchmarking it against ours."""
    import deepspeed

    # transformers >= 5.6 flattened CLIPTextModel: the `text_model` submodule is gone and its layers live on the
    # model itself. DeepSpeed 0.19.8's DSClipEncoder still does `enc.text_model._build_causal_attention_mask = ...`,
    # so give the encoder a `text_model` that is the encoder itself. object.__setattr__ keeps it out of
    # nn.Module's child registry; a registered self-reference would loop in .modules(), .to() and state_dict().
    encoder = pipe.text_encoder
    if not hasattr(encoder, "text_model"):
        object.__setattr__(encoder, "text_model", encoder)

    # DeepSpeed numbers its diffusers attention modules with a class-wide counter, and only number 0 allocates the
    # kernel workspace. Start from 0, so that this pipeline has that module even if an earlier one (a benchmark's,
    # a test's) was injected in this process.
    from deepspeed.ops.transformer.inference.diffusers_attention import DeepSpeedDiffusersAttention

    DeepSpeedDiffusersAttention.layer_id = 0
    # DeepSpeed mutates the pipeline in place (pipe.unet becomes DSUNet, ...); the returned engine is not needed.
    # Its kernels JIT-build on first use: set TORCH_CUDA_ARCH_LIST so they are built for this GPU only.
    deepspeed.init_inference(pipe, dtype=torch.half, replace_with_kernel_inject=True,
                             enable_cuda_graph=enable_cuda_graph)
    replaced = injection_report(pipe)
    logger.info("backend deepspeed %s (its own cuda graph %s, extensions in %s): %s", deepspeed.__version__,
                enable_cuda_graph, os.environ.get("TORCH_EXTENSIONS_DIR", "the default cache"), replaced)
    if not replaced.get("unet"):
        raise RuntimeError("DeepSpeed kernel injection replaced nothing in the UNet; refusing to serve unoptimized")
    return pipe


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
    """Count DeepSpeed modules inside each component, e.g. {'unet': {'DSUNet': 1, 'DeepSpeedDiffusersAttention': 32}}."""
    report = {}
    for name in ("unet", "vae", "text_encoder"):
        component = getattr(pipe, name, None)
        if component is None:
            continue
        counts = Counter(type(m).__name__ for m in component.modules() if type(m).__module__.startswith("deepspeed"))
        report[name] = dict(counts)
    return report
