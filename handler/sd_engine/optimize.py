"""Optimization: one function, `optimize(pipe, config, device)`, that changes a loaded pipeline in place.

A straight run of steps, each an option of EngineConfig:
0. VAE precision: a pipeline that upcasts its float16 VAE to float32 for every decode (SDXL's, when the VAE's config
   sets `force_upcast`, because that VAE overflows in float16) gets a VAE kept in float32 once, decoding exactly as
   diffusers does, but without converting the weights back and forth in every call (which neither compiled code nor
   CUDA graphs could follow). A VAE without `force_upcast` (e.g. the community fp16-fix VAE) stays in float16.
1. channels_last: UNet and VAE weights in NHWC, which cuDNN's tensor-core convolutions prefer.
2. backend
   - eager: the plain diffusers pipeline (PyTorch SDPA attention). The only backend on CPU.
   - deepspeed: DeepSpeed's kernel injection (deepspeed_backend.py), repaired for SDXL. Its own CUDA graphs are
     left off: they are captured once, for the first shape.
3. fuse_qkv: diffusers' fused q/k/v projections (eager backend).
4. fp8: float8 matmuls in the UNet's transformer layers (fp8.py; eager backend, compute capability 8.9+).
5. compile: torch.compile (inductor, default mode) of the UNet and VAE decoder, for the compiled sizes (the listed
   sizes, warmed up at load); a request at any other legal size runs them uncompiled (with CUDA graphs when on),
   because a new size would recompile inside the request (268 s measured for 768x768 on an H200). AOT-compiled
   packages in the model's compile-artifacts folder that fit this worker (aot.py) stand in for torch.compile; an
   upcast VAE decoder (SDXL's float32 one), which gets no package (aot.modules says why), is torch.compiled beside
   them, from the compile artifacts scripts/compile_artifacts.py --aot saves with the packages.
6. cuda_graph: our shape-keyed CUDA graphs (graphs.py) around UNet, text encoder(s) and VAE decoder, for any backend.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch.utils._pytree import tree_leaves

from .errors import ConfigError

logger = logging.getLogger(__name__)


def resolve_backend(backend: str, device_type: str) -> str:
    """Turn `auto` into a concrete backend and refuse backends the device cannot run."""
    if backend == "auto":
        # Measured (bench/results/h200-sd15-2026-11-21.json): with our CUDA graphs DeepSpeed's kernels are within 3%
        # of PyTorch's SDPA at batch 1 (0.411 vs 0.423 s) and 18-20% lower in images/s from batch 4 up, and only eager
        # can add torch.compile (0.227 s); so auto is eager at every batch size. deepspeed stays selectable.
        return "eager"
    if backend == "deepspeed" and device_type != "cuda":
        raise ConfigError(f"handler.backend deepspeed needs a CUDA GPU, but this worker runs on {device_type}")
    return backend


def check_device(config, device: torch.device) -> None:
    if config.cuda_graph and device.type != "cuda":
        raise ConfigError(f"handler.cuda_graph: true needs a CUDA GPU, but this worker runs on {device.type}")
    if config.fp8:
        from .fp8 import check_fp8_device

        problem = check_fp8_device(device)
        if problem:
            raise ConfigError(f"handler.fp8: true {problem}")


def optimize(pipe, config, device: torch.device, backend: str, max_batch_size: int = 1,
             compiled_sizes: tuple[tuple[int, int], ...] = (), artifacts: Path | None = None,
             report: dict | None = None, guided: bool = True):
    """Apply config's optimizations to a pipeline already on `device` and in its dtype. Returns the same pipeline.
    `max_batch_size`: the most images the engine will generate in one call (DeepSpeed's workspace is sized for it).
    `compiled_sizes`: the (height, width) images that run compiled when config.compile is on.
    `artifacts`: the compile-artifacts folder, where AOT-compiled packages (aot.py) may replace torch.compile.
    `report`: filled with what the caller's start-up record shows (`aot`: the modules that run AOT-compiled;
    `torch_compile`: those torch.compile compiles at warm-up).
    `guided`: the default request uses classifier-free guidance, so the warm-up's UNet calls carry twice the images
    (AOT packages are first run at the warm-up's batch)."""
    if keep_vae_in_float32(pipe):
        logger.info("VAE: float32 for decoding (the pipeline upcasts this VAE, whose config sets force_upcast)")
    if config.channels_last:
        pipe.unet.to(memory_format=torch.channels_last)
        pipe.vae.to(memory_format=torch.channels_last)
        logger.info("channels_last: UNet and VAE weights in NHWC")
    if backend == "deepspeed":
        from .deepspeed_backend import deepspeed_inject, pin_deepspeed_workspace

        deepspeed_inject(pipe)
        if config.cuda_graph:
            pin_deepspeed_workspace(pipe, device, max_batch_size)
    else:
        logger.info("backend eager: plain diffusers pipeline")
    if config.fuse_qkv:
        pipe.fuse_qkv_projections()
        logger.info("fuse_qkv: q, k, v projections fused in the UNet's and VAE's attention")
    if config.fp8:
        from .fp8 import fp8_linears

        fp8_linears(pipe.unet)
    dynamo: list[str] = []  # the modules torch.compile compiles (lazily: at warm-up)
    if config.compile:
        scale = pipe.vae_scale_factor
        latents = {(height // scale, width // scale) for height, width in compiled_sizes}
        aot = {}
        if artifacts is not None and backend == "eager" and not (config.fuse_qkv or config.fp8):
            from .aot import load_packages

            # A module the packages leave out (an upcast VAE decoder: aot.modules says why) is torch.compiled below,
            # beside them: from the compile artifacts the packages' build saved (engine.py loads them), a start
            # traces it (torch_compiled) and compiles nothing.
            aot = load_packages(pipe, artifacts, device, latents, max_batch_size, report, guided)
        if report is not None:
            report["aot"] = sorted(aot)
        # AOT packages are made per size (static height and width, the batch dynamic): no shapes to mark for them.
        how = {}
        for module, owner, attr in (("unet", pipe.unet, "forward"), ("vae_decode", pipe.vae, "decode")):
            call = getattr(owner, attr)
            if module in aot:
                setattr(owner, attr, by_latent_size(aot[module], call, latents))
                how[module] = "ahead of time (AOTInductor packages, static per size, batch dynamic)"
            else:
                setattr(owner, attr, torch_compiled(call, latents))
                dynamo.append(module)
                shapes = "dynamic in batch, height and width" if len(latents) > 1 else "static"
                how[module] = f"with torch.compile ({shapes})"
        logger.info("compile: UNet %s, VAE decoder %s, for %s; other sizes run uncompiled", how["unet"],
                    how["vae_decode"], ", ".join(f"{w}x{h}" for h, w in sorted(compiled_sizes)))
    if report is not None:
        report["torch_compile"] = dynamo
    if config.cuda_graph:
        from .graphs import GraphBudget, graph_pipeline

        cap = config.cuda_graph_memory_gib
        budget = GraphBudget(None if cap is None else int(cap * 2**30))
        # Should DeepSpeed's workspace still grow (a batch beyond the pinned size), graphs made before are dropped.
        # Before a capture, one call of each new shape outside the graph does the lazy work (kernels loaded, cuBLAS
        # and cuDNN set up); torch.compile, which compiles in that call, and DeepSpeed get a second, as before.
        warmup_calls = 2 if backend == "deepspeed" or dynamo else 1
        graphed = graph_pipeline(pipe, device, budget, reset_on_larger_batch=backend == "deepspeed",
                                 warmup_calls=warmup_calls)
        logger.info("cuda_graph: %s captured per input shape, %s", ", ".join(graphed),
                    "no memory cap" if cap is None else f"all graphs together capped at {cap:g} GiB")
    return pipe


def torch_compiled(call, latent_sizes: set[tuple[int, int]]):
    """`call` (the UNet's forward or the VAE's decode, its latent first) under torch.compile at `latent_sizes`, plain at
    any other. With several sizes, one compile for all shapes: batch, height and width symbolic from the first call
    on, instead of one compile per shape (150-270 s each). It costs speed: on an H200, SD 1.5 at 512x512 batch 1 took
    0.274 s against 0.225 s static. With one size, shapes stay static (a second batch size recompiles once, with batch
    dynamic: torch's automatic dynamic shapes). The --aot build compiles an upcast VAE decoder through this too, so
    that its graphs are the ones a worker traces (scripts/compile_artifacts.py's compile_unpackaged)."""
    return by_latent_size(torch.compile(call), call, latent_sizes, (0, 2, 3) if len(latent_sizes) > 1 else ())


def by_latent_size(compiled, plain, latent_sizes: set[tuple[int, int]], dynamic_dims: tuple[int, ...] = ()):
    """`compiled` for latents of the compiled sizes, `plain` for any other (the latent is the first argument).
    `dynamic_dims` of the latent are marked dynamic for the compiler (where it can keep them so)."""
    def call(sample, *args, **kwargs):
        if tuple(sample.shape[-2:]) not in latent_sizes:
            return plain(sample, *args, **kwargs)
        if dynamic_dims:
            for dim in dynamic_dims:
                torch._dynamo.maybe_mark_dynamic(sample, dim)
            # The batch of every other tensor too (text embeddings, SDXL's added conditioning): else a new batch size
            # fails their guards and recompiles. A batch of 1 stays specialized (torch's 0/1 rule): one more compile.
            for leaf in tree_leaves((args, kwargs)):
                if isinstance(leaf, torch.Tensor) and leaf.dim() and leaf.shape[0] == sample.shape[0]:
                    torch._dynamo.maybe_mark_dynamic(leaf, 0)
        return compiled(sample, *args, **kwargs)
    return call


def keep_vae_in_float32(pipe) -> bool:
    """Step 0 of optimize(): True when the VAE was moved to float32 for good (see the module docstring). Diffusers'
    pipelines that honour `force_upcast` are those with an `upcast_vae` method (the SDXL family; diffusers means to
    remove the method in 1.0: tests/test_families.py's float16 SDXL test fails if the signal goes while the pipeline
    still upcasts)."""
    vae = pipe.vae
    if not (hasattr(pipe, "upcast_vae") and vae.dtype == torch.float16 and vae.config.get("force_upcast")):
        return False
    vae.to(torch.float32)
    vae.register_to_config(force_upcast=False)  # the pipeline's own check now finds nothing left to upcast
    decode = vae.decode

    def decode_in_float32(z, *args, **kwargs):
        return decode(z.to(torch.float32), *args, **kwargs)

    vae.decode = decode_in_float32
    return True

