"""Ahead-of-time compiled UNet and VAE decoder (torch.export + AOTInductor), made once per GPU type and software stack,
shipped with the weights and loaded by a worker in well under a second each (SD 1.5's 8 packages in 5.4 s on an
H100, when the worker still compared each with the plain module: bench/results/h100-sd15-2026-12-06-aot-4sizes.log).

Why: torch.compile's cache artifacts (artifacts.py) spare a new worker Inductor's and Triton's work but not the
tracing: a warm start still spent 45 s (SD 1.5, 3 sizes) and 62 s (SDXL, 7 sizes) of its warm-up re-tracing the
models on an H200 (bench/results/h200-2026-12-04-sizes-and-start.json). An AOTInductor package is the compiled code
itself; loading it traces nothing.

What a package holds: code, not weights (`package_constants_in_so` off; no parameter inlined: _inductor_configs). The
worker hands each package its own live parameters (`load_constants(..., user_managed=True)`: no copy), so LoRA
adapters fused into the weights in place (loras.py) reach the compiled code, and the weights are stored once. Shapes:
one package per module and listed size, height and width static (one package dynamic over several sizes measured 30%
slower on an H200: SD 1.5 512x512 batch 1 0.292 s against 0.225 s static,
bench/results/h200-sd15-2026-12-04-aot-dynamic.json), the batch dynamic (1 up to twice the largest batch size for the
UNet, which sees both halves of classifier-free guidance).

Files: WEIGHTS/compile-artifacts/aot/<module>-<platform>-<hash>.pt2, described in aot/index.json (the platform as in
artifacts.py, the host CPU's architecture and instruction-set level, since the package's host code is compiled for the
CPU it was built on, plus what the code was made for: module, dtype, channels_last, size, largest batch). A worker uses
the packages that fit its own config, runs a listed size without one uncompiled, and falls back to torch.compile, with
one log line saying why, when none fits. An upcast (float32) VAE decoder gets no package (`modules` says why).
scripts/compile_artifacts.py --aot makes them (the sizes in parallel processes) and compares each with the plain module
in a fresh process before indexing it (validate_packages); the package's sha256 manifest covers them (they are code)."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from platform import machine

import torch

from .aot_runtime import bind, decode_call, largest_batch, load_package, on_device, unet_call
from .artifacts import file_name, platform, read_index
from .graphs import GraphCache

logger = logging.getLogger(__name__)

AOT_DIR = "aot"
INDEX = "index.json"
MODULES = ("unet", "vae_decode")
# What a package reads from the worker: every parameter (_inductor_configs). Packages made before, which hold the
# smallest ones as literals, lack the key and so fit no worker.
PARAMETERS = "all from the worker"


def modules(pipe) -> tuple[str, ...]:
    """The modules packaged for `pipe`: the UNet, and the VAE decoder unless it is upcast (float32 under a float16
    UNet: SDXL's, optimize.py), or float32 on a GPU (`dtype: float32`: never tried, so treated alike). Packages of
    SDXL's float32 decoder hit CUDA illegal memory accesses on an H100: two of four faulted in their build-time
    checks, and one that had passed them faulted at a fresh start's first call of it
    (bench/results/h100-sdxl-2026-12-06-aot-4sizes-checked.log; a worker's warm-up faulted at the same size the
    session before). Not its attention kernel: packages made under PyTorch's math backend (branch decoder-math), whose
    code calls no attention kernel of PyTorch's, faulted too, 3 of 4 at their first check call
    (h100-sdxl-2026-12-07-aot-4sizes-math-decoder.log; bench/gpu/decoder_fault.py looks further). A fault ends the
    worker, so such a decoder gets no package: optimize.py torch.compiles it, from the compile artifacts that
    scripts/compile_artifacts.py --aot saves beside the packages (the single-size engine's torch.compile of it has
    not faulted). No UNet package and no float16 decoder (SD 1.5's) has faulted; on a CPU, where everything is
    float32, both modules are packaged."""
    float32 = pipe.vae.dtype == torch.float32
    if float32 and (pipe.unet.dtype != torch.float32 or pipe.vae.device.type != "cpu"):
        return MODULES[:1]
    return MODULES


class _UNet(torch.nn.Module):
    """The UNet as the pipelines call it, with tensors only: SDXL's added conditioning as two more arguments."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, encoder_hidden_states, text_embeds=None, time_ids=None):
        added = None if text_embeds is None else {"text_embeds": text_embeds, "time_ids": time_ids}
        return self.unet(sample, timestep, encoder_hidden_states, added_cond_kwargs=added, return_dict=False)[0]


class _Decode(torch.nn.Module):
    """The VAE decoder's call (vae.decode as the pipeline has it, e.g. the float32 one of optimize.py)."""

    def __init__(self, vae, decode):
        super().__init__()
        self.vae, self.decode = vae, decode

    def forward(self, latents):
        return self.decode(latents, return_dict=False)[0]


def _wrapper(pipe, module: str) -> torch.nn.Module:
    """What is exported for `module`, and what a loaded package is checked against: the plain call."""
    return _UNet(pipe.unet) if module == "unet" else _Decode(pipe.vae, pipe.vae.decode)


def description(pipe, module: str, device: torch.device, latent_sizes, max_batch: int) -> dict:
    """What a package for `module` depends on: the platform, and what its code was made for."""
    part = pipe.unet if module == "unet" else pipe.vae
    # The architecture, not where it was loaded from: diffusers' private keys (_name_or_path: the folder, which
    # TorchServe and KServe put elsewhere on every machine; _diffusers_version) are left out.
    config = {key: value for key, value in dict(part.config).items() if not key.startswith("_")}
    # Inductor compiles a package's host code for the building machine's CPU (-march=native), GPU packages included.
    cpu = {"cpu_machine": machine(), "cpu_capability": torch.backends.cpu.get_cpu_capability()}
    return {**platform(device), **cpu, "module": module, "dtype": str(part.dtype).removeprefix("torch."),
            "input_dtype": str(pipe.unet.dtype).removeprefix("torch."),
            "channels_last": next(part.parameters()).is_contiguous(memory_format=torch.channels_last),
            "model": json.dumps(config, sort_keys=True, default=str),
            "latent_sizes": sorted([list(s) for s in latent_sizes]), "max_batch": max_batch,
            "parameters": PARAMETERS}


def _examples(pipe, module: str, device: torch.device, latent_size, max_batch: int, n: int = 2):
    """Example inputs (at `latent_size`, batch `n`) and their dynamic shapes (the batch) for torch.export."""
    from torch.export import Dim

    height, width = latent_size
    # (torch.export wants a range, not one value: at least 1..2, also for a worker of batch size 1.)
    batch = {0: Dim("batch", min=1, max=max(2, largest_batch(module, max_batch)))}
    if module == "vae_decode":  # the latents come in the UNet's dtype (a float32 VAE casts them itself: optimize.py)
        latents = torch.randn(n, pipe.vae.config.latent_channels, height, width, device=device, dtype=pipe.unet.dtype)
        return (latents,), ({"latents": batch},)
    unet = pipe.unet
    sample = torch.randn(n, unet.config.in_channels, height, width, device=device, dtype=unet.dtype)
    timestep = torch.tensor(999.0, device=device)
    text = torch.randn(n, 77, unet.config.cross_attention_dim, device=device, dtype=unet.dtype)
    args, shapes = [sample, timestep, text], [batch, None, batch]
    if unet.config.addition_embed_type == "text_time":  # SDXL: pooled text embeddings and the six size/crop ids
        args += [torch.randn(n, pipe.text_encoder_2.config.projection_dim, device=device, dtype=unet.dtype),
                 torch.zeros(n, 6, device=device, dtype=unet.dtype)]
        shapes += [batch, batch]
    return tuple(args), (dict(zip(("sample", "timestep", "encoder_hidden_states", "text_embeds", "time_ids"),
                                  shapes)),)


def package_name(info: dict) -> str:
    """The file name of the package `info` (a description) describes: the same on every build of it."""
    return f"{info['module']}-{file_name(info).removesuffix('.bin')}.pt2"


def size_entries(pipe, device: torch.device, latent_size, max_batch: int) -> dict[str, dict]:
    """{package file name: description} of the packages made for one latent size: what build_packages writes and
    indexes, and what the build's parent (to remove a failed size's files) and its fresh check expect."""
    infos = [description(pipe, module, device, [latent_size], max_batch) for module in modules(pipe)]
    return {package_name(info): info for info in infos}


def build_packages(pipe, folder: Path, device: torch.device, latent_size, max_batch: int) -> dict[str, dict]:
    """Export and AOT-compile the UNet and the VAE decoder of an optimized pipeline (dtype, channels-last and the VAE
    precision already as the worker will have them) for one latent size; write the packages into `folder`/aot and
    return their index entries (write_index records them: processes building other sizes may run alongside)."""
    folder = folder / AOT_DIR
    folder.mkdir(parents=True, exist_ok=True)
    entries = size_entries(pipe, device, latent_size, max_batch)
    for name, info in entries.items():
        module = info["module"]
        wrapper = _wrapper(pipe, module)
        args, (shapes,) = _examples(pipe, module, device, latent_size, max_batch)
        start = time.perf_counter()
        path = folder / name
        before = _phase_seconds()
        with torch.no_grad():
            exported = torch.export.export(wrapper, args, dynamic_shapes=shapes, strict=False)
            exported_at = time.perf_counter()
            torch._inductor.aoti_compile_and_package(exported, package_path=str(path),
                                                     inductor_configs=_inductor_configs(device))
        # (torch._dynamo.reset() empties torch's timers: a total below the one before counts from that reset.)
        phases = {k: s - before.get(k, 0.0) if s >= before.get(k, 0.0) else s for k, s in _phase_seconds().items()}
        logger.info("AOT: %s for latents %dx%d compiled to %s (%.1f MB) in %.0f s: export %.0f s, %s", module,
                    *latent_size, path.name, path.stat().st_size / 2**20, time.perf_counter() - start,
                    exported_at - start, ", ".join(f"{what} {phases[key]:.0f} s" for key, what in PHASES.items()
                                                    if key in phases))
    return entries


def _inductor_configs(device: torch.device) -> dict:
    """AOTInductor's options for a package: code only (the worker hands it its weights), all of them: Inductor would
    otherwise write 1-D parameters of up to 8 values (the UNet's last bias, the VAE decoder's and its post-quant
    convolution's) into the code as literals, so a worker with other weights of the same model, which the index lets
    use the package, would run with the build's (`always_keep_tensor_constants`; `PARAMETERS` marks such packages). On
    a GPU, the C++ wrapper (host code that launches the Triton kernels, which are compiled apart) is compiled at -O0
    instead of torch's -O1 unless AOT_INDUCTOR_COMPILE_WRAPPER_OPT_LEVEL says otherwise: on an H200, SDXL's C++
    compiles took 27-38 s per size (bench/results/h200-wrapper-o0-sdxl-2026-12-07-aot-4sizes.log) against 95-106 s at
    -O1 on another, whose builds were slower in their other phases too (h200-sdxl-2026-12-07-aot-4sizes.log), and
    under CUDA graphs at batch 1 the packages ran 1024x1024 in 1.166 s against 1.163 s for -O1's on the same host
    (h200-sdxl-2026-12-07-aot-4sizes-fresh-machine.json). On a CPU, where the kernels are C++ as well, -O0 is not
    measured, so torch's default stays there."""
    configs = {"aot_inductor.package_constants_in_so": False, "always_keep_tensor_constants": True}
    if device.type == "cuda" and not os.environ.get("AOT_INDUCTOR_COMPILE_WRAPPER_OPT_LEVEL"):
        configs["aot_inductor.compile_wrapper_opt_level"] = "O0"
    return configs


# The phases of torch's compiler build_packages logs, as torch times them (torch._dynamo.utils.dynamo_timed).
PHASES = {"GraphLowering.run": "lowering", "GraphLowering.codegen": "codegen",
          "async_compile.wait": "waiting for the Triton kernels' compiles", "compile_file": "C++ compiles"}


def _phase_seconds() -> dict[str, float]:
    """Seconds torch has spent so far in each timed phase of its compiler, by its name for it (none where this torch
    keeps no such timers: they are private, and only a log line depends on them)."""
    try:
        from torch._dynamo.utils import compilation_time_metrics
    except ImportError:
        return {}
    return {key: sum(times) for key, times in list(compilation_time_metrics.items())}


def write_index(folder: Path, entries: dict[str, dict]) -> None:
    """Add packages' entries to `folder`/aot/index.json (those of other platforms and sizes stay)."""
    folder = folder / AOT_DIR
    index = read_index(folder)
    index.update(entries)
    # Whole or not at all (a build cut by a time limit may be killed here): a new file, then renamed over the old.
    partial = folder / f"{INDEX}.partial"
    partial.write_text(json.dumps(index, indent=1, sort_keys=True) + "\n")
    partial.replace(folder / INDEX)


def missing_sizes(pipe, folder: Path, device: torch.device, latent_sizes, max_batch: int) -> list:
    """The latent sizes among `latent_sizes` for which a module has no package in `folder` made for that size alone
    that fits this worker: what is left to build (the others' packages are code for this very platform and model, so
    they are kept; one made for several sizes, slower, is replaced)."""
    folder = folder / AOT_DIR
    index = {name: info for name, info in read_index(folder).items()
             if isinstance(info, dict) and len(info.get("latent_sizes", [])) == 1 and (folder / name).is_file()}
    return sorted({size for module in modules(pipe)
                   for size in _choose(index, description(pipe, module, device, sorted(latent_sizes), max_batch),
                                       latent_sizes)[1]})


def _choose(index: dict, mine: dict, latent_sizes) -> tuple[dict, list]:
    """{size: the package's file name} for the sizes that have a package fitting `mine`, and the sizes that have none.
    The package made for a size alone comes first (static shapes), then one made for several."""
    chosen, missing = {}, []
    for size in sorted(latent_sizes):
        fits = sorted((name for name, info in index.items() if isinstance(info, dict) and _fits(info, mine, size)),
                      key=lambda name: len(index[name].get("latent_sizes", [])))
        if fits:
            chosen[size] = fits[0]
        else:
            missing.append(size)
    return chosen, missing


def load_packages(pipe, folder: Path, device: torch.device, latent_sizes, max_batch: int,
                  report: dict | None = None, guided: bool = True) -> dict:
    """The compiled calls of the packages in `folder` that fit this worker, by module ({} when none do): each takes the
    module's arguments as the pipeline passes them and runs the package made for the latents' size. A module with no
    fitting package is left to torch.compile; one with packages for some of `latent_sizes` only runs the others
    uncompiled, as sizes not listed are (compiling them would take minutes at start: what the packages are for), and
    `report["aot_missing"]` names them by module. A module that `modules` leaves out (an upcast VAE decoder) is not
    looked for. One log line per module says what was loaded, or why not. Each package is run once, at the batch the
    warm-up starts with (`guided`: the default request's guidance doubles the UNet's batch; _load_runners says why)."""
    folder = folder / AOT_DIR
    index = read_index(folder)
    if not index:
        return {}
    loaded = {}
    for module in modules(pipe):
        mine = description(pipe, module, device, sorted(latent_sizes), max_batch)
        chosen, missing = _choose(index, mine, latent_sizes)
        if not chosen:
            differ = {name: [k for k in mine if k != "latent_sizes" and info.get(k) != mine[k]]
                      for name, info in index.items() if isinstance(info, dict) and info.get("module") == module}
            logger.info("AOT: no %s package fits this worker for latents %s (batch up to %d); %s; torch.compile "
                        "instead", module, ", ".join(f"{h}x{w}" for h, w in missing), max_batch,
                        f"the listed ones differ in {differ} (an empty list: made for other sizes)" if differ
                        else "there is none")
            continue
        start = time.perf_counter()
        batch = largest_batch(module, max_batch) if guided else max_batch
        try:
            runners = _load_runners(pipe, module, folder, chosen, device, batch)
        except Exception as e:  # noqa: BLE001 - a package that does not load or run costs a compile, never the worker
            logger.warning("AOT: the %s packages could not be used (%s: %s); torch.compile instead", module,
                           type(e).__name__, e)
            continue
        if runners is None:
            continue
        loaded[module] = (unet_call if module == "unet" else decode_call)(runners, pipe, max_batch)
        if missing:
            logger.warning("AOT: no %s package fits latents %s (their build failed or has not run: "
                           "scripts/compile_artifacts.py --aot builds what is missing); those sizes run uncompiled",
                           module, ", ".join(f"{h}x{w}" for h, w in missing))
            if report is not None:
                report.setdefault("aot_missing", {})[module] = [f"{h}x{w}" for h, w in missing]
        logger.info("AOT: %s from %d package(s) for latents %s in %.1f s (each run once at batch %d)", module,
                    len(set(chosen.values())), ", ".join(f"{h}x{w}" for h, w in sorted(chosen)),
                    time.perf_counter() - start, batch)
    return loaded


def _load_runners(pipe, module: str, folder: Path, chosen: dict, device: torch.device, batch: int):
    """{latent size: loaded package} for `module`, each file loaded once and run once at its size and `batch`; None
    (with a log line) when one gives a non-finite output. `batch`: the module's batch in the warm-up's first call,
    which goes largest batch and size first when nothing is torch.compiled (engine.py). cuDNN chooses its
    convolution engines and builds its attention kernels (NVRTC) for each new shape it meets in a process: most of
    the packages' first runs on an H100 (bench/results/h100-sd15-2026-12-07-start-profile.raw.gz, summarized under
    the packages' calls in .txt). At the warm-up's shape that work is the warm-up's own; at batch 1, which the UNet
    meets only without guidance, it went to shapes no warm-up uses."""
    wrapper = _wrapper(pipe, module)
    by_file, runners = {}, {}
    # Largest first, as the warm-up: smaller sizes then run in the memory it reserved (a new high-water mark cost a
    # first run 0.4 s more on an H100).
    for size, name in sorted(chosen.items(), key=lambda item: (-item[0][0] * item[0][1], item[0])):
        if name not in by_file:
            start = time.perf_counter()
            runner = bind(load_package(folder / name), wrapper)
            loaded_s = time.perf_counter() - start
            # After the build, each was compared with the plain module at batch 1, 2 and its largest, and from a CUDA
            # graph, in a fresh process (validate_packages); the index matched platform, CPU level, model, dtype and
            # layout. Here one call says the package runs on these weights; comparing it again would add the plain
            # module's first run to the start (SD 1.5, 4 sizes, H100: the packages' step took 5.4 s with it, 2.2 s
            # without: bench/results/h100-sd15-2026-12-06-aot-4sizes-largest-first.log).
            logger.info("AOT: first run of %s (a fault ends this process: this line names the package)", name)
            error = _check(runner, wrapper, pipe, module, device, size, batch, compare=False)
            logger.info("AOT: %s loaded in %.1f s, first run in %.1f s", name, loaded_s,
                        time.perf_counter() - start - loaded_s)
            if error is not None:
                logger.warning("AOT: %s gave a non-finite output at latents %dx%d, batch %d; torch.compile instead",
                               name, *size, batch)
                return None
            by_file[name] = runner
        runners[size] = by_file[name]
    return runners


@torch.no_grad()
def _check(runner, wrapper, pipe, module: str, device: torch.device, latent_size, batch: int = 1,
           in_graph: bool = False, compare: bool = True, tolerance: float = 0.02):
    """One call at `batch` and `latent_size` through the package (`in_graph`: through graphs.py's GraphCache, as a
    worker's graphs run it: a warm-up call on a side stream, capture, replay) and, with `compare`, through the plain
    module: None when the output is finite and agrees (largest difference within `tolerance` of the largest value),
    else that relative difference (inf: not finite). Batch 1 (validate_packages) is the end of the exported range, the
    edge a compiler's assumptions meet first."""
    args, _ = _examples(pipe, module, device, latent_size, batch, n=batch)  # (its shapes for export unused here)
    def call(*inputs):
        return on_device(runner, list(inputs))

    got = (GraphCache(call, f"check {module}", device, warmup_calls=1) if in_graph else call)(*args).float()
    if not torch.isfinite(got).all():
        return float("inf")
    if not compare:
        return None
    want = wrapper(*args).float()
    error = float((got - want).abs().max() / want.abs().max().clamp(min=1e-6))
    return None if error <= tolerance else error


def validate_packages(pipe, folder: Path, device: torch.device, entries: dict[str, dict], max_batch: int) -> None:
    """Each package just built (`entries`, as build_packages returns them), loaded as a worker loads it and run against
    the plain module at batch 1, 2 and its largest, and on a GPU also replayed from a CUDA graph: RuntimeError naming
    the package, size and batch that differs. Run by compile_artifacts.py in a fresh process after the build, before
    they are indexed: a package whose code faults on the GPU (SDXL's float32 VAE decoder packages did on an H100:
    `modules`) takes that process down with it, so its size is never indexed. A run that finds the GPU out of memory
    (--jobs builds share it) is logged as not checked, not as a failure, unless no run of a package was checked."""
    for name, info in entries.items():
        module, size = info["module"], tuple(info["latent_sizes"][0])
        logger.info("AOT: checking %s (a fault ends this process: the last such line names the package)", name)
        wrapper = _wrapper(pipe, module)
        runner = bind(load_package(folder / AOT_DIR / name), wrapper)
        largest = largest_batch(module, max_batch)
        runs = [(batch, False) for batch in sorted({1, min(2, largest), largest})]
        runs += [(min(2, largest), True)] if device.type == "cuda" else []
        checked = []
        for batch, in_graph in runs:
            out_of_memory, error = False, None
            try:
                error = _check(runner, wrapper, pipe, module, device, size, batch, in_graph)
            except torch.OutOfMemoryError:
                out_of_memory = True
            if out_of_memory:  # (outside the except, whose traceback would keep _check's tensors alive)
                logger.warning("AOT: %s not checked at batch %d: the GPU is out of memory", name, batch)
                torch.cuda.empty_cache()
                continue
            if error is not None:
                raise RuntimeError(f"the {module} package for latents {size[0]}x{size[1]} differs from the plain "
                                   f"module by {error:.3g} (relative) at batch {batch}" + (" in a CUDA graph"
                                                                                          if in_graph else ""))
            checked.append(f"{batch}{' (CUDA graph)' if in_graph else ''}")
        if not checked:  # (then this fresh process is the only check there is: a size unchecked is not indexed)
            raise RuntimeError(f"the {module} package for latents {size[0]}x{size[1]} could not be checked: the GPU "
                               "was out of memory at every batch (fewer --jobs leave it more)")
        logger.info("AOT: %s checked at batch %s", name, ", ".join(checked))


def _fits(info: dict, mine: dict, size) -> bool:
    """Same platform and model; made for `size` (among others, perhaps) and at least this worker's largest batch."""
    same = all(info.get(key) == value for key, value in mine.items() if key not in ("latent_sizes", "max_batch"))
    sizes = {tuple(s) for s in info.get("latent_sizes", [])}
    return same and tuple(size) in sizes and info.get("max_batch", 0) >= mine["max_batch"]
