"""A loaded AOTInductor package as the pipeline calls it: loading one (without torch's platform probe), binding it to
the live weights, and the UNet's and VAE decoder's calls that route each latent size to its package (aot.py finds,
checks and builds the packages)."""

from __future__ import annotations

from pathlib import Path

import torch


def load_package(path: Path):
    """torch._inductor.aoti_load_package's runner (single-threaded: CUDA graphs capture its calls) without its
    platform comparison, which only warns, after probing the host CPU's vector ISA by compiling and loading a C++
    program per ISA into the Inductor cache: the first package's load took 48.9 s of a 74.7 s start on an H200 with a
    fresh cache (bench/results/h200-sd15-2026-12-06-aot-4sizes.log; a profile showed the probe's compiles); without it,
    0.1 s on an H100 (h100-sd15-2026-12-06-aot-4sizes.log). aot.py's index has already matched the platform and the
    CPU's level."""
    from torch._inductor.package.package import AOTICompiledModel

    return AOTICompiledModel(torch._C._aoti.AOTIModelPackageLoader(str(path), "model", True, 1, -1))


def bind(runner, wrapper):
    """The package `runner` reading `wrapper`'s live parameters and buffers. user_managed: these very tensors, no
    copy, so in-place writes (LoRA fusion) reach it; a parameter replaced by another tensor after this would not."""
    live = {**dict(wrapper.named_parameters()), **dict(wrapper.named_buffers())}
    runner.load_constants({fqn: live[fqn] for fqn in runner.get_constant_fqns()}, check_full_update=True,
                          user_managed=True)
    return runner


def on_device(runner, args):
    """The runner's call on the inputs' device (its stream is the calling thread's current one), on contiguous
    inputs (the compiled code assumes the examples' layout and, unless asked to, does not check)."""
    args = [a.contiguous() for a in args]
    if args[0].is_cuda:
        with torch.cuda.device(args[0].device):
            return runner(*args)
    return runner(*args)


def largest_batch(module: str, max_batch: int) -> int:
    """The largest batch `module` sees in a worker of batch size `max_batch`, what its packages are made for: the UNet
    gets both halves of classifier-free guidance."""
    return 2 * max_batch if module == "unet" else max_batch


def unet_call(runners: dict, pipe, max_batch: int):
    plain = pipe.unet.forward
    dtype = pipe.unet.dtype

    def call(sample, timestep, encoder_hidden_states=None, timestep_cond=None, cross_attention_kwargs=None,
             added_cond_kwargs=None, return_dict=True, **rest):
        runner = runners.get(tuple(sample.shape[-2:]))
        if runner is None or timestep_cond is not None or cross_attention_kwargs or rest or \
                not torch.is_tensor(timestep) or timestep.dim() != 0 or \
                set(added_cond_kwargs or {}) - {"text_embeds", "time_ids"} or \
                sample.shape[0] > largest_batch("unet", max_batch):  # what the packages were not made for: plain
            return plain(sample, timestep, encoder_hidden_states, timestep_cond=timestep_cond, return_dict=return_dict,
                         cross_attention_kwargs=cross_attention_kwargs, added_cond_kwargs=added_cond_kwargs, **rest)
        # The UNet embeds the timestep as float32 whatever its type (an integer step is exact in float32).
        args = [sample.to(dtype), timestep.to(sample.device, torch.float32), encoder_hidden_states.to(dtype)]
        if added_cond_kwargs:
            args += [added_cond_kwargs["text_embeds"].to(dtype), added_cond_kwargs["time_ids"].to(dtype)]
        out = on_device(runner, args)
        if return_dict:
            from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

            return UNet2DConditionOutput(sample=out)
        return (out,)
    return call


def decode_call(runners: dict, pipe, max_batch: int):
    dtype, plain = pipe.unet.dtype, pipe.vae.decode  # the latents' dtype the packages were made for (_examples)

    def call(z, return_dict=True, generator=None):
        runner = runners.get(tuple(z.shape[-2:]))
        if runner is None or z.shape[0] > largest_batch("vae_decode", max_batch):
            return plain(z, return_dict=return_dict)
        out = on_device(runner, [z.to(dtype)])
        if return_dict:
            from diffusers.models.autoencoders.vae import DecoderOutput

            return DecoderOutput(sample=out)
        return (out,)
    return call
