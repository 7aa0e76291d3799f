"""Ahead-of-time compiled UNet and VAE decoder (torch.export + AOTInductor), made once per GPU type and software stack,
shipped with the weights and loaded by a worker in about a second.

Why: torch.compile's cache artifacts (artifacts.py) spare a new worker Inductor's and Triton's work but not the
tracing: a warm start still spent 45 s (SD 1.5, 3 sizes) and 62 s (SDXL, 7 sizes) of its warm-up re-tracing the
models on an H200 (bench/results/h200-2026-12-04-sizes-and-start.json). An AOTInductor package is the compiled code
itself; loading it traces nothing.

What a package holds: code, not weights (`package_constants_in_so` off). The worker hands each package its own live
parameters (`load_constants(..., user_managed=True)`: no copy), so LoRA adapters fused into the weights in place
(loras.py) reach the compiled code, and the weights are stored once. Shapes: the batch is dynamic (1 up to twice the
largest batch size for the UNet, which sees both halves of classifier-free guidance); height and width are static for
one listed size and dynamic over the listed sizes' range otherwise, as with torch.compile (optimize.py).

Files: WEIGHTS/compile-artifacts/aot/<module>-<platform>.pt2, described in aot/index.json (the platform as in
artifacts.py, plus what the code was made for: module, dtype, channels_last, sizes, largest batch). A worker uses a
package whose description fits its own config and falls back to torch.compile, with one log line saying why, when
none does. scripts/compile_artifacts.py --aot makes them; the package's sha256 manifest covers them (they are code).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch

from .artifacts import file_name, platform, read_index

logger = logging.getLogger(__name__)

AOT_DIR = "aot"
INDEX = "index.json"
MODULES = ("unet", "vae_decode")


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
    return {**platform(device), "module": module, "dtype": str(part.dtype).removeprefix("torch."),
            "input_dtype": str(pipe.unet.dtype).removeprefix("torch."),
            "channels_last": next(part.parameters()).is_contiguous(memory_format=torch.channels_last),
            "model": json.dumps(config, sort_keys=True, default=str),
            "latent_sizes": sorted([list(s) for s in latent_sizes]), "max_batch": max_batch}


def _examples(pipe, module: str, device: torch.device, latent_sizes, max_batch: int):
    """Example inputs (at the largest listed size, batch 2) and their dynamic shapes for torch.export."""
    from torch.export import Dim

    sizes = sorted(latent_sizes)
    height, width = sizes[-1]
    batch = Dim("batch", min=1, max=2 * max_batch if module == "unet" else max_batch)
    dims = {0: batch}
    if len(sizes) > 1:  # several sizes: height and width symbolic, in steps the UNet's downsampling keeps whole
        step = 2 ** (len(pipe.unet.config.down_block_types) - 1)
        if any(h % step or w % step for h, w in sizes):
            raise ValueError(f"handler.sizes: for AOT packages of several sizes each side must be a multiple of "
                             f"{step * pipe.vae_scale_factor} pixels (what the UNet's downsampling keeps whole)")
        low_h, high_h = min(s[0] for s in sizes), max(s[0] for s in sizes)
        low_w, high_w = min(s[1] for s in sizes), max(s[1] for s in sizes)
        dims = {0: batch, 2: step * Dim("h", min=low_h // step, max=high_h // step),
                3: step * Dim("w", min=low_w // step, max=high_w // step)}
    if module == "vae_decode":  # the latents come in the UNet's dtype (a float32 VAE casts them itself: optimize.py)
        latents = torch.randn(2, pipe.vae.config.latent_channels, height, width, device=device, dtype=pipe.unet.dtype)
        return (latents,), ({"latents": dims},)
    unet = pipe.unet
    sample = torch.randn(2, unet.config.in_channels, height, width, device=device, dtype=unet.dtype)
    timestep = torch.tensor(999.0, device=device)
    text = torch.randn(2, 77, unet.config.cross_attention_dim, device=device, dtype=unet.dtype)
    args, shapes = [sample, timestep, text], [dims, None, {0: batch}]
    if unet.config.addition_embed_type == "text_time":  # SDXL: pooled text embeddings and the six size/crop ids
        args += [torch.randn(2, pipe.text_encoder_2.config.projection_dim, device=device, dtype=unet.dtype),
                 torch.zeros(2, 6, device=device, dtype=unet.dtype)]
        shapes += [{0: batch}, {0: batch}]
    return tuple(args), (dict(zip(("sample", "timestep", "encoder_hidden_states", "text_embeds", "time_ids"),
                                  shapes)),)


def build_packages(pipe, folder: Path, device: torch.device, latent_sizes, max_batch: int) -> list[Path]:
    """Export and AOT-compile the UNet and the VAE decoder of an optimized pipeline (dtype, channels-last and the VAE
    precision already as the worker will have them); write the packages and their index into `folder`."""
    folder = folder / AOT_DIR
    folder.mkdir(parents=True, exist_ok=True)
    index, written = read_index(folder), []
    for module in MODULES:
        wrapper = _wrapper(pipe, module)
        args, (shapes,) = _examples(pipe, module, device, latent_sizes, max_batch)
        start = time.perf_counter()
        with torch.no_grad():
            exported = torch.export.export(wrapper, args, dynamic_shapes=shapes, strict=False)
            info = description(pipe, module, device, latent_sizes, max_batch)
            path = folder / f"{module}-{file_name(info).removesuffix('.bin')}.pt2"
            torch._inductor.aoti_compile_and_package(
                exported, package_path=str(path), inductor_configs={"aot_inductor.package_constants_in_so": False})
        index[path.name] = info
        written.append(path)
        logger.info("AOT: %s compiled to %s (%.1f MB) in %.0f s", module, path.name, path.stat().st_size / 2**20,
                    time.perf_counter() - start)
    (folder / INDEX).write_text(json.dumps(index, indent=1, sort_keys=True) + "\n")
    return written


def load_packages(pipe, folder: Path, device: torch.device, latent_sizes, max_batch: int) -> dict:
    """The compiled calls of the packages in `folder` that fit this worker, by module ({} when none do): each takes the
    module's arguments as the pipeline passes them. One log line per module says what was loaded, or why not."""
    folder = folder / AOT_DIR
    index = read_index(folder)
    if not index:
        return {}
    loaded = {}
    for module in MODULES:
        mine = description(pipe, module, device, latent_sizes, max_batch)
        # An exact match of sizes first (static shapes where the worker compiles one size), then any superset.
        fits = sorted((name for name, info in index.items() if isinstance(info, dict) and _fits(info, mine)),
                      key=lambda name: index[name].get("latent_sizes") != mine["latent_sizes"])
        if not fits:
            differ = {name: [k for k in mine if info.get(k) != mine[k]] for name, info in index.items()
                      if isinstance(info, dict) and info.get("module") == module}
            logger.info("AOT: no %s package fits this worker (latent sizes %s, batch up to %d); %s; torch.compile "
                        "instead", module, mine["latent_sizes"], max_batch, f"the listed ones differ in {differ}"
                        if differ else "there is none")
            continue
        start = time.perf_counter()
        try:
            runner = torch._inductor.aoti_load_package(str(folder / fits[0]), run_single_threaded=True)
            wrapper = _wrapper(pipe, module)
            live = {**dict(wrapper.named_parameters()), **dict(wrapper.named_buffers())}
            # user_managed: the package reads these very tensors (no copy), so in-place writes (LoRA fusion) reach
            # it; a parameter replaced by another tensor after this would not.
            runner.load_constants({name: live[name] for name in runner.get_constant_fqns()}, check_full_update=True,
                                  user_managed=True)
            call = (_unet_call if module == "unet" else _decode_call)(runner, pipe, max_batch)
            error = _check(call, wrapper, pipe, module, device, latent_sizes)
        except Exception as e:  # noqa: BLE001 - a package that does not load or run costs a compile, never the worker
            logger.warning("AOT: %s could not be used (%s: %s); torch.compile instead", fits[0], type(e).__name__, e)
            continue
        if error is not None:
            logger.warning("AOT: %s differs from the plain %s by %.3g (relative); torch.compile instead", fits[0],
                           module, error)
            continue
        loaded[module] = call
        logger.info("AOT: %s from %s in %.1f s (checked against the plain module at batch 1)", module, fits[0],
                    time.perf_counter() - start)
    return loaded


@torch.no_grad()
def _check(call, wrapper, pipe, module: str, device: torch.device, latent_sizes, tolerance: float = 0.02):
    """One call at batch 1 and the smallest size through the package and through the plain module: None when they
    agree (largest difference within `tolerance` of the largest value), else that relative difference. Batch 1 is the
    end of the exported range, the edge a compiler's assumptions meet first."""
    args, _ = _examples(pipe, module, device, [min(latent_sizes)], 2)  # (its shapes for export unused here)
    args = tuple(a[:1] if a.dim() else a for a in args)
    want = wrapper(*args).float()
    if module == "unet":
        extra = {"added_cond_kwargs": {"text_embeds": args[3], "time_ids": args[4]}} if len(args) > 3 else {}
        got = call(args[0], args[1], args[2], return_dict=False, **extra)[0].float()
    else:
        got = call(args[0], return_dict=False)[0].float()
    error = float((got - want).abs().max() / want.abs().max().clamp(min=1e-6))
    return None if error <= tolerance and torch.isfinite(got).all() else error


def _fits(info: dict, mine: dict) -> bool:
    """Same platform and model; made for every size this worker compiles and at least its largest batch."""
    same = all(info.get(key) == value for key, value in mine.items() if key not in ("latent_sizes", "max_batch"))
    sizes = {tuple(s) for s in info.get("latent_sizes", [])}
    return same and {tuple(s) for s in mine["latent_sizes"]} <= sizes and info.get("max_batch", 0) >= mine["max_batch"]


def _on_device(runner, args):
    """The runner's call on the inputs' device (its stream is the calling thread's current one), on contiguous
    inputs (the compiled code assumes the examples' layout and, unless asked to, does not check)."""
    args = [a.contiguous() for a in args]
    if args[0].is_cuda:
        with torch.cuda.device(args[0].device):
            return runner(*args)
    return runner(*args)


def _unet_call(runner, pipe, max_batch: int):
    plain = pipe.unet.forward
    dtype = pipe.unet.dtype

    def call(sample, timestep, encoder_hidden_states=None, timestep_cond=None, cross_attention_kwargs=None,
             added_cond_kwargs=None, return_dict=True, **rest):
        if timestep_cond is not None or cross_attention_kwargs or rest or not torch.is_tensor(timestep) or \
                timestep.dim() != 0 or set(added_cond_kwargs or {}) - {"text_embeds", "time_ids"} or \
                sample.shape[0] > 2 * max_batch:  # what the package was not made for: the plain UNet
            return plain(sample, timestep, encoder_hidden_states, timestep_cond=timestep_cond, return_dict=return_dict,
                         cross_attention_kwargs=cross_attention_kwargs, added_cond_kwargs=added_cond_kwargs, **rest)
        # The UNet embeds the timestep as float32 whatever its type (an integer step is exact in float32).
        args = [sample.to(dtype), timestep.to(sample.device, torch.float32), encoder_hidden_states.to(dtype)]
        if added_cond_kwargs:
            args += [added_cond_kwargs["text_embeds"].to(dtype), added_cond_kwargs["time_ids"].to(dtype)]
        out = _on_device(runner, args)
        if return_dict:
            from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

            return UNet2DConditionOutput(sample=out)
        return (out,)
    return call


def _decode_call(runner, pipe, max_batch: int):
    dtype, plain = pipe.unet.dtype, pipe.vae.decode  # the latents' dtype the package was made for (_examples)

    def call(z, return_dict=True, generator=None):
        if z.shape[0] > max_batch:
            return plain(z, return_dict=return_dict)
        out = _on_device(runner, [z.to(dtype)])
        if return_dict:
            from diffusers.models.autoencoders.vae import DecoderOutput

            return DecoderOutput(sample=out)
        return (out,)
    return call
