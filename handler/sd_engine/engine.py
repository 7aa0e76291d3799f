"""The engine: a loaded, optimized, warmed-up pipeline that turns a list of requests into a list of results.

`load_engine()` is the one linear path: pick dtype -> load weights -> move to device -> optimize -> warm up -> ready.
`Engine` itself takes a built pipeline, so tests can hand it a tiny one.

Batching: requests whose shapes match (height, width, steps, guidance) run in one pipeline call, each with its own
seeded generator, so a request's image depends on its seed and not on its batch neighbours. The generators live on the
CPU so that a seed gives the same starting noise on any device.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from .artifacts import ARTIFACTS_DIR, load_compile_artifacts
from .config import EngineConfig
from .errors import EngineError, GenerationError, OutOfMemory
from .loading import load_pipeline
from .loras import load_for_engine
from .native import native_defaults, request_rules
from .jit_caches import compile_caches, fixed_cwd
from .optimize import check_device, optimize, resolve_backend
from .requests import GenerationRequest, RequestRules
from .timing import StageTimer

logger = logging.getLogger(__name__)


@dataclass
class GenerationResult:
    request: GenerationRequest
    image: Image.Image
    seconds: float  # wall time of the pipeline call that produced it (shared by its batch)
    truncated: tuple[str, ...] = ()  # prompt fields longer than the text encoder's window, cut by the pipeline
    # Seconds of its group's call spent in the text encoder, the denoising loop's UNet calls and the VAE decoder,
    # and the peak GPU memory of that call (None on the CPU).
    stage_seconds: dict[str, float] = field(default_factory=dict)
    peak_memory_bytes: int | None = None


class Engine:
    def __init__(self, pipe, config: EngineConfig, device: torch.device, backend: str = "eager",
                 max_batch_size: int | None = None, rules: RequestRules | None = None, adapters=None):
        self.pipe = pipe
        self.config = config
        # Request defaults and limits: the config's explicit keys over the model's own (native.py).
        self.rules = rules or request_rules(config, native_defaults(pipe))
        self.device = device
        self.backend = backend
        self.max_batch_size = max_batch_size  # images per pipeline call at most (what was warmed up); None: any
        self.device_failure: str | None = None  # set when the GPU's context is lost; the worker must restart
        self.tokenizer = pipe.tokenizer
        self.timings: dict[str, float] = {}
        self.startup: dict = {}  # how the start went: compile artifacts loaded, CUDA graph memory
        self.adapters = adapters  # LoRA adapters (loras.Adapters) requests may pick, or None
        self.pipe.set_progress_bar_config(disable=True)
        # SDXL's pipelines guide a request without a negative prompt with zeros, not with the empty prompt's
        # embedding: such requests must not share a call with ones that have one, or a neighbour would change the
        # image. SD 1.x/2.x treat both alike, so they batch together.
        self.split_on_negative_prompt = bool(getattr(pipe, "config", {}).get("force_zeros_for_empty_prompt"))

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult | EngineError]:
        """One result per request, in order. A failing group yields errors for its requests only.

        Runs from / as the warm-up did (jit_caches.fixed_cwd): the CUDA driver's JIT cache entries depend on the
        working directory, and the first call at a shape the warm-up skipped (a new batch size) builds kernels at run
        time (the AOT packages call cuDNN's attention), which a TorchServe worker, started in its model's folder,
        otherwise missed in the shipped cache."""
        results: list[GenerationResult | EngineError | None] = [None] * len(requests)
        with fixed_cwd():
            for indices in self._groups(requests):
                group = [requests[i] for i in indices]
                for i, result in zip(indices, self._run_group(group)):
                    results[i] = result
        return results

    def _groups(self, requests: Sequence[GenerationRequest]) -> list[list[int]]:
        """Indices of requests that can share a pipeline call, at most max_batch_size per call (a KServe body can
        ask for several images, so a TorchServe batch may hold more images than batchSize)."""
        groups: dict[tuple, list[int]] = {}
        for i, request in enumerate(requests):
            key = request.shape_key
            if self.split_on_negative_prompt:
                key += (request.negative_prompt is None,)
            groups.setdefault(key, []).append(i)
        size = self.max_batch_size or len(requests) or 1
        return [group[start:start + size] for group in groups.values() for start in range(0, len(group), size)]

    def _run_group(self, group: list[GenerationRequest]) -> list[GenerationResult | EngineError]:
        first = group[0]
        logger.debug("generating %d image(s) %dx%d, %d steps, prompts %r", len(group), first.width, first.height,
                     first.num_inference_steps, [r.prompt for r in group])
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        start = time.perf_counter()
        try:
            switch_s = self.adapters.apply(first.loras) if self.adapters is not None else 0.0
            if switch_s:
                logger.info("LoRA: switched to %s in %.1f ms", dict(first.loras) or "none", switch_s * 1000)
            with StageTimer(self.pipe, cuda) as timer:
                images = self.pipe(
                    prompt=[r.prompt for r in group],
                    # None when no request has one: the pipeline's own default, as diffusers users get it.
                    negative_prompt=None if all(r.negative_prompt is None for r in group)
                    else [r.negative_prompt or "" for r in group],
                    num_inference_steps=first.num_inference_steps,
                    guidance_scale=first.guidance_scale,
                    height=first.height,
                    width=first.width,
                    generator=[torch.Generator("cpu").manual_seed(r.seed) for r in group],
                    # [0, 1] tensors where they were decoded: NaN from an fp16 overflow survives the pipeline's clamp
                    output_type="pt",
                ).images
            arrays, finite = to_pixels(images)
            truncated = [self._truncated(r) for r in group]
            stages = {("denoise" if k == "unet" else k): sum(v) / 1000 for k, v in timer.calls_ms().items()}
            peak = torch.cuda.max_memory_allocated(self.device) if cuda else None
        except torch.OutOfMemoryError as e:
            error: EngineError = OutOfMemory(f"out of {self.device.type} memory generating {len(group)} image(s) "
                                             f"of {first.width}x{first.height}: {str(e).splitlines()[0]}")
            self._release_memory()
            logger.warning("%s", error)
            return [error] * len(group)
        except Exception as e:  # noqa: BLE001 - one group's failure must not take down the batch or the worker
            logger.exception("generation failed for a group of %d", len(group))
            if cuda and not self._device_usable():
                # A sticky CUDA error (an illegal address, a device-side assert) poisons this process's context:
                # every later call would fail the same way. Say so; the adapter restarts the worker.
                self.device_failure = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                logger.critical("the GPU context of %s is unusable after %s", self.device, self.device_failure)
            return [GenerationError(f"generation failed ({type(e).__name__}); see the server log")] * len(group)
        seconds = time.perf_counter() - start
        logger.info("generated %d image(s) %dx%d x%d steps in %.3f s", len(group), first.width, first.height,
                    first.num_inference_steps, seconds)
        results: list[GenerationResult | EngineError] = []
        for i, (request, pixels, cut, ok) in enumerate(zip(group, arrays, truncated, finite)):
            if not ok:
                logger.error("image for seed %d has non-finite pixels", request.seed)
                results.append(GenerationError("generation produced NaN pixels; see the server log"))
            else:
                image = Image.fromarray(pixels)
                # The adapter switch went before the whole call: it is on the call's first result only, so that
                # fronts count it once per call.
                results.append(GenerationResult(request=request, image=image, seconds=seconds, truncated=cut,
                                                stage_seconds=dict(stages, lora_switch=switch_s) if i == 0 and
                                                switch_s else stages, peak_memory_bytes=peak))
        return results

    def _truncated(self, request: GenerationRequest) -> tuple[str, ...]:
        """Which prompt fields exceed CLIP's window (77 tokens with start/end); the pipeline keeps the first 77."""
        return tuple(name for name in ("prompt", "negative_prompt")
                     if getattr(request, name) and len(self.tokenizer(getattr(request, name)).input_ids)
                     > self.tokenizer.model_max_length)

    def _device_usable(self) -> bool:
        try:
            torch.cuda.synchronize(self.device)
            torch.zeros(1, device=self.device).add_(1).item()
            return True
        except Exception:  # noqa: BLE001 - any failure here means the context is gone
            return False

    def _release_memory(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def warmup(self, max_batch_size: int = 1, torch_compile: bool = False) -> float:
        """Generate with batch 1 and `max_batch_size` (with warmup_all_batch_sizes, every batch between them) at every
        listed size (compiled or graphed; else the default size alone), so JIT builds, compilation and graph capture
        happen now rather than in a request; fail loudly unless every image is finite and of the right size.
        `torch_compile`: torch.compile compiles at this warm-up."""
        start = time.perf_counter()
        rules = self.rules
        sizes = rules.sizes if (self.config.compile or self.config.cuda_graph) else rules.sizes[:1]
        # Largest batch and size first: later, smaller shapes then fit in the memory the first ones reserved (a new
        # high-water mark costs a capture 0.3 s more on an H100), and over DeepSpeed a larger batch would drop the
        # graphs captured before it (see graphs.py). But torch.compile goes batch 1 first, sizes as listed: its
        # second compile, at the larger batch, is then dynamic in the batch and serves every batch between them
        # (compiled for the larger batch first, the batch-1 compile would stay static, torch's 0/1 rule, and a
        # VAE decode of 2..batchSize-1 images would recompile inside a request).
        largest_first = self.backend == "deepspeed" or not torch_compile
        batches = range(1, max_batch_size + 1) if self.config.warmup_all_batch_sizes else {1, max_batch_size}
        for batch in sorted(batches, reverse=largest_first):
            for height, width in (sorted(sizes, key=lambda size: size[0] * size[1], reverse=True) if largest_first
                                  else sizes):
                size_start = time.perf_counter()
                requests = [GenerationRequest(prompt="warm-up", negative_prompt=None,
                                              num_inference_steps=self.config.warmup_steps,
                                              guidance_scale=rules.guidance_scale, height=height, width=width, seed=i)
                            for i in range(batch)]
                for result in self._run_group(requests):  # NaN pixels already come back as errors
                    if isinstance(result, EngineError):
                        raise RuntimeError(f"warm-up generation failed at {width}x{height}: {result}")
                    if result.image.size != (width, height):
                        raise RuntimeError(f"warm-up produced a {result.image.size} image for {width}x{height}")
                logger.info("warm-up: batch %d at %dx%d in %.1f s", batch, width, height,
                            time.perf_counter() - size_start)
        return time.perf_counter() - start


def to_pixels(images: torch.Tensor) -> tuple[np.ndarray, list[bool]]:
    """The pipeline's images in [0, 1] (batch, channel, height, width, on its device) as 8-bit height x width x channel
    arrays, and whether each image was finite. Converted where they are, as diffusers' "pil" output does it on the
    CPU (x 255, rounded half to even, in float32: the same bytes); only the 8-bit pixels then cross to the CPU. Done
    in numpy, as before, it took 12-46 ms an image on the CI machine's CPU (512x512 and 768x768 in float16), about
    what the GPU records leave unexplained beside their stage times (26 and 54 ms, 5-11 % of a generation)."""
    finite = torch.isfinite(images).flatten(1).all(1).tolist()
    # clamp: diffusers has clamped already (NaN passes both); contiguous: the channels interleaved on the device, not
    # by PIL on the CPU (7 ms an image at 1024x1024 there).
    pixels = (images.float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()
    return pixels.cpu().numpy(), finite


def pick_device(gpu_id: int | str | None) -> torch.device:
    """cuda:<gpu_id> when TorchServe assigned a GPU and CUDA is usable, else the CPU."""
    if gpu_id is not None and torch.cuda.is_available():
        return torch.device(f"cuda:{int(gpu_id)}")
    if gpu_id is not None:
        logger.warning("TorchServe assigned gpu_id=%s but CUDA is not available; running on the CPU", gpu_id)
    return torch.device("cpu")


def resolve_dtype(config: EngineConfig, device: torch.device) -> torch.dtype:
    if config.dtype == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return {"float16": torch.float16, "float32": torch.float32}[config.dtype]


def load_engine(config: EngineConfig, source: str | Path, device: torch.device, max_batch_size: int = 1) -> Engine:
    """Load -> optimize -> warm up. `source` is a local diffusers folder (or a hub id, for scripts);
    `max_batch_size` is the largest batch the server will hand over (TorchServe's batchSize), warmed up too."""
    # 1. Decide everything that can fail without weights; the compile caches' folders (the fronts have set them, and
    # the driver's, before the device: jit_caches.py).
    compile_caches(config.cache_dir)
    backend = resolve_backend(config.backend, device.type)
    check_device(config, device)
    dtype = resolve_dtype(config, device)
    if device.type == "cuda":
        torch.cuda.set_device(device)

    # 2. Load the weights and move them to the device; DeepSpeed captures each module's device when it wraps it.
    start = time.perf_counter()
    from diffusers import DiffusionPipeline  # noqa: F401 - timed apart: most of a load (5-10 s) is this import
    import_s = time.perf_counter() - start
    pipe = load_pipeline(source, dtype)
    read_s = time.perf_counter() - start - import_s
    pipe = pipe.to(device)
    load_s = time.perf_counter() - start
    logger.info("loaded %s in %.1f s: %.1f s to import diffusers, %.1f s to read the weights, %.1f s to move them to "
                "%s", source, load_s, import_s, read_s, load_s - import_s - read_s, device)
    rules = request_rules(config, native_defaults(pipe))  # a default the model cannot take fails before optimizing
    # LoRA adapters are read into the plain layers, before compile and graphs see them.
    adapters, loras_unavailable = load_for_engine(pipe, config, source, backend)
    rules = replace(rules, loras=adapters.names if adapters else (), loras_unavailable=loras_unavailable)

    # 3. Optimize, and 4. warm up, from / (jit_caches.fixed_cwd: the driver's JIT cache entries depend on it).
    folder = Path(source).absolute() / ARTIFACTS_DIR if config.compile else None
    with fixed_cwd():
        start = time.perf_counter()
        optimized: dict = {}
        optimize(pipe, config, device, backend, max_batch_size, compiled_sizes=rules.sizes, artifacts=folder,
                 report=optimized, guided=rules.guidance_scale > 1)
        # torch.compile's own artifacts, for what still compiles (it compiles lazily: at warm-up, after this).
        compiling = bool(optimized["torch_compile"])
        artifacts = load_compile_artifacts(folder, device) if folder and compiling else None
        if compiling and optimized["aot"] and not artifacts:  # (packages built before such artifacts were saved)
            logger.warning("compile: %s compile(s) at warm-up beside the AOT packages with no compile artifacts "
                           "(unless cache_dir holds it: SDXL's float32 VAE decoder took 56 s on an H200); "
                           "scripts/compile_artifacts.py --aot, run again, keeps the packages and saves what it "
                           "compiles", ", ".join(optimized["torch_compile"]))
        optimize_s = time.perf_counter() - start

        engine = Engine(pipe, config, device, backend, max_batch_size, rules, adapters)
        warmup_s = engine.warmup(max_batch_size, torch_compile=compiling) if config.warmup else 0.0
    budget = getattr(pipe.unet.forward, "budget", None)  # the CUDA graphs' memory (graphs.GraphBudget), when on
    graph_gib = budget.total_bytes / 2**30 if budget is not None else 0.0
    logger.info("engine ready: %s, torch %s, diffusers %s, device %s, dtype %s, backend %s, cuda_graph %s; "
                "default %dx%d, %d steps, guidance %g; full-speed sizes %s; load %.1f s, optimize %.1f s "
                "(compile artifacts: %s; AOT-compiled: %s), warm-up %.1f s; CUDA graphs %.2f GiB",
                type(pipe).__name__, torch.__version__, _diffusers_version(), device, str(dtype).removeprefix("torch."),
                backend, config.cuda_graph, rules.width, rules.height, rules.num_inference_steps,
                rules.guidance_scale, " ".join(f"{w}x{h}" for h, w in rules.sizes), load_s, optimize_s,
                f"loaded in {artifacts['load_s']:.1f} s" if artifacts else "none loaded",
                ", ".join(optimized.get("aot", [])) or "none", warmup_s, graph_gib)
    engine.timings = {"load_s": load_s, "import_s": import_s, "read_s": read_s, "optimize_s": optimize_s,
                      "warmup_s": warmup_s}
    engine.startup = {"artifacts_loaded": bool(artifacts), "aot": optimized.get("aot", []), "cuda_graph_gib": graph_gib,
                      **({"aot_missing": optimized["aot_missing"]} if "aot_missing" in optimized else {})}
    return engine


def _diffusers_version() -> str:
    import diffusers

    return diffusers.__version__
