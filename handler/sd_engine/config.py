"""Engine configuration: the `handler:` block of model-config.yaml, parsed into a frozen dataclass.

Unknown keys and wrong types are rejected with a ConfigError naming the key, so a typo never silently falls back to a
default. Impossible combinations (compile with DeepSpeed, DeepSpeed in fp32) fail here, before any weights are loaded.
Request defaults and size limits left out (None) are the model's own (native.request_rules, once it is loaded).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, fields
from typing import Any, Mapping

from .errors import ConfigError

BACKENDS = ("auto", "deepspeed", "eager")
DTYPES = ("auto", "float16", "float32")
FORMATS = ("jpeg", "png")


@dataclass(frozen=True)
class EngineConfig:
    # Where the weights are, relative to the model dir (or absolute): a `.zip` of a diffusers folder, extracted once
    # next to it, or a diffusers folder itself (the no-archive layout for multi-GB weights).
    weights: str = "model.zip"
    # eager: diffusers with PyTorch's SDPA attention. deepspeed: kernel injection into UNet, VAE and CLIP (CUDA, fp16
    # only). auto: eager, which measured fastest once CUDA graphs are on (optimize.resolve_backend).
    backend: str = "auto"
    # CUDA graphs for UNet, text encoder and VAE decoder, one per input shape (see graphs.py); CUDA only.
    cuda_graph: bool = False
    # A cap in GiB on the memory pool all captured graphs share (every size x batch size x guidance on/off, every
    # module); once it is reached, each new capture first drops the least recently used graph (graphs.GraphBudget).
    # None: no cap (every legal size a client asks for then keeps a graph).
    cuda_graph_memory_gib: float | None = 16.0
    # Store UNet and VAE weights channels-last (NHWC), which cuDNN's tensor-core convolutions prefer.
    channels_last: bool = False
    # torch.compile (inductor) the UNet and the VAE decoder; with cuda_graph the compiled code runs inside the graphs.
    # Compiles on first use of each shape family (tens of seconds to minutes): the warm-up pays for the listed sizes.
    # Compile artifacts made once per GPU type and stack (scripts/compile_artifacts.py, stored in the weights folder
    # under compile-artifacts/) are loaded first when they match this worker, so the warm-up finds the work done.
    compile: bool = False
    # Fuse each attention's q, k, v projections into one matmul (diffusers' fuse_qkv_projections), UNet and VAE.
    # The same arithmetic, fewer and larger kernels. Eager backend only (DeepSpeed replaces the attention).
    fuse_qkv: bool = False
    # FP8 (e4m3) matmuls for the UNet's transformer layers (fp8.py): CUDA GPUs of compute capability 8.9+ (Hopper),
    # eager backend only. Lossy: its parity against float16 is in the benchmark records.
    fp8: bool = False
    # One persistent folder for every JIT cache: DeepSpeed's built CUDA ops (torch_extensions/), torch.compile's
    # Inductor artifacts (inductor/) and Triton kernels (triton/). Point it at a volume so a restart skips the builds.
    # Set, it overrides TORCH_EXTENSIONS_DIR, TORCHINDUCTOR_CACHE_DIR and TRITON_CACHE_DIR; empty: their defaults.
    cache_dir: str = ""
    # auto: float16 on CUDA, float32 on CPU.
    dtype: str = "auto"
    # LoRA adapters (loras.py): every <name>.safetensors in the weights folder's loras/ (shipped, checksummed) and in
    # lora_dir (a mounted volume: no repackaging; read at start), at most max_loras of them, kept on the device. A
    # request picks up to max_loras_per_request, each with a strength in -max_lora_scale..max_lora_scale.
    lora_dir: str = ""
    max_loras: int = 16
    max_loras_per_request: int = 4
    max_lora_scale: float = 2.0
    # Run one generation at load time so the first request does not pay for JIT builds and graph capture.
    warmup: bool = True
    warmup_steps: int = 2
    # The warm-up's batch sizes: 1 and TorchServe's batchSize; a batch of another size captures its CUDA graphs (and
    # cuDNN builds its kernels for the shape) in its first request, up to 0.2-1.3 s more then on an H100. true: every
    # batch size from 1 to batchSize at every listed size, ready at READY (SD 1.5, 4 sizes, batchSize 8: 19 s more
    # start; the extra graphs count against cuda_graph_memory_gib).
    warmup_all_batch_sizes: bool = False

    # Request defaults (a request may override each). None: the model's own, read from the loaded pipeline: its
    # native size (UNet sample size x VAE scale factor) and its pipeline's defaults for steps and guidance.
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    height: int | None = None
    width: int | None = None
    # The sizes served at full speed: [[height, width], ...], each compiled and graphed at warm-up (the default size
    # always among them, first). None: derived from the model's native size (native.native_sizes); empty: the default
    # size alone, compiled with static shapes (the fastest at that size; several sizes share one compile with dynamic
    # shapes, see optimize.py). Any other legal size is served too, uncompiled (with CUDA graphs when on): slower,
    # never refused.
    sizes: tuple | None = None
    format: str = "jpeg"
    quality: int = 90

    # Request limits. None for a side: 1.5x the model's native side (768 for SD 1.5, 1536 for SDXL).
    max_num_inference_steps: int = 150
    max_height: int | None = None
    max_width: int | None = None
    max_prompt_chars: int = 2000
    max_guidance_scale: float = 50.0

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any] | None) -> "EngineConfig":
        """Build from the YAML `handler:` block (None or {} gives the defaults)."""
        mapping = dict(mapping or {})
        known = {f.name: f for f in fields(cls)}
        if "max_cuda_graphs" in mapping:
            raise ConfigError("handler.max_cuda_graphs (a count of graphs per module, sized for one image size) was "
                              "replaced by handler.cuda_graph_memory_gib, a cap in GiB on the graphs of all sizes "
                              "together: remove max_cuda_graphs and set cuda_graph_memory_gib (or leave it out: no "
                              "cap)")
        unknown = sorted(set(mapping) - set(known))
        if unknown:
            raise ConfigError(f"handler: unknown key(s) {unknown}; known keys are {sorted(known)}")
        values = {}
        for name, value in mapping.items():
            values[name] = _coerce(name, known[name].type, value)
        return cls(**values)

    def replace(self, **changes: Any) -> "EngineConfig":
        return dataclasses.replace(self, **changes)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        _choice("backend", self.backend, BACKENDS)
        _choice("dtype", self.dtype, DTYPES)
        _choice("format", self.format, FORMATS)
        if self.compile and self.backend == "deepspeed":
            raise ConfigError("handler.compile: true works with backend eager (DeepSpeed's kernels break the graph)")
        for name in ("fuse_qkv", "fp8"):
            if getattr(self, name) and self.backend == "deepspeed":
                raise ConfigError(f"handler.{name}: true works with backend eager (DeepSpeed replaces the attention "
                                  "and transformer layers it would change)")
        if self.fp8 and self.dtype == "float32":
            raise ConfigError("handler.fp8: true needs dtype auto or float16 (the unquantized layers run in float16)")
        if self.backend == "deepspeed" and self.dtype == "float32":
            raise ConfigError("handler.backend deepspeed runs in float16 only; set dtype: auto or float16")
        bad = [list(size) for size in self.sizes or () if min(size) < 64 or size[0] % 8 or size[1] % 8]
        if bad:
            raise ConfigError(f"handler.sizes: each side must be a multiple of 8 and at least 64, got {bad}")
        if self.cuda_graph_memory_gib is not None and self.cuda_graph_memory_gib <= 0:
            raise ConfigError(f"handler.cuda_graph_memory_gib must be > 0 (or null: no cap), got "
                              f"{self.cuda_graph_memory_gib}")
        if not (math.isfinite(self.max_lora_scale) and self.max_lora_scale > 0):
            raise ConfigError(f"handler.max_lora_scale must be finite and > 0, got {self.max_lora_scale}")
        for name in ("warmup_steps", "num_inference_steps", "max_num_inference_steps", "max_prompt_chars",
                     "max_loras", "max_loras_per_request"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"handler.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("height", "width", "max_height", "max_width"):
            value = getattr(self, name)
            if value is not None and (value < 64 or value % 8):
                raise ConfigError(f"handler.{name} must be a multiple of 8 and at least 64, got {value}")
        if self.guidance_scale is not None and self.guidance_scale < 0:
            raise ConfigError(f"handler.guidance_scale must be >= 0, got {self.guidance_scale}")
        if not 1 <= self.quality <= 100:
            raise ConfigError(f"handler.quality must be in 1..100, got {self.quality}")
        if not (math.isfinite(self.max_guidance_scale) and self.max_guidance_scale >= 0):
            raise ConfigError(f"handler.max_guidance_scale must be finite and >= 0, got {self.max_guidance_scale}")
        # Defaults against limits where both are set here; native.request_rules checks the rest once the model's
        # own values are known.
        for name, limit in (("num_inference_steps", "max_num_inference_steps"), ("guidance_scale",
                            "max_guidance_scale"), ("height", "max_height"), ("width", "max_width")):
            value, high = getattr(self, name), getattr(self, limit)
            if value is not None and high is not None and value > high:
                raise ConfigError(f"handler.{name}: the default {value} is above handler.{limit} ({high})")


def _coerce(name: str, annotation: str, value: Any) -> Any:
    # Annotations are strings under `from __future__ import annotations`; "int | None" also takes null (the model's).
    if value is None and annotation.endswith(" | None"):
        return None
    annotation = annotation.removesuffix(" | None")
    if annotation == "bool":
        if isinstance(value, bool):
            return value
    elif annotation == "int":
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif annotation == "float":
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
    elif annotation == "str":
        if isinstance(value, str):
            return value
    elif annotation == "tuple":  # sizes: a list of [height, width] pairs; empty: the default size alone
        pairs = value if isinstance(value, (list, tuple)) else None
        if pairs is not None and all(isinstance(p, (list, tuple)) and len(p) == 2 and all(
                isinstance(v, int) and not isinstance(v, bool) for v in p) for p in pairs):
            return tuple(dict.fromkeys(tuple(p) for p in pairs))
        raise ConfigError(f"handler.{name} must be a list of [height, width] pairs, got {value!r}")
    raise ConfigError(f"handler.{name} must be a {annotation}, got {value!r}")


def _choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"handler.{name} must be one of {', '.join(choices)}, got {value!r}")
