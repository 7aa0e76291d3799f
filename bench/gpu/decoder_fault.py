"""Why AOTInductor packages of SDXL's float32 VAE decoder hit CUDA illegal memory accesses (aot.modules leaves such a
decoder unpackaged since an H100 run faulted: bench/results/h100-sdxl-2026-12-06-aot-4sizes-checked.log).

Not the attention kernel: packages made under PyTorch's math backend, which call no attention kernel of PyTorch's,
faulted as well, 3 of 4 at their first check call (h100-sdxl-2026-12-07-aot-4sizes-math-decoder.log).
compute-sanitizer's memcheck (run.sh decoder) is to name the kernel that faults; the variants test two other suspects.

The decoder is exported as the engine does it (aot._Decode around optimize.py's float32 decode, float16 latents in,
channels-last weights, the batch dynamic 1..2, aot._inductor_configs), from SDXL's VAE architecture with seeded
random weights, in one of these variants:
- efficient: as the engine did; PyTorch picks the attention kernel for the mid-block's one head of 512 channels over
  the latent's tokens (16,384 at 1024x1024), which in float32 is the memory-efficient one.
- math: the same under torch.nn.attention.sdpa_kernel(MATH), so Inductor compiles the attention itself (matmuls and a
  softmax) and no attention kernel of PyTorch's runs.
- nopad: as efficient, with Inductor's stride padding off (comprehensive_padding, which pads float32 buffers'
  strides differently from float16 ones).
- static: as efficient, for batch 1 alone (no dynamic batch).

  python3 bench/gpu/decoder_fault.py build VARIANT PACKAGE [--latent H W]
  python3 bench/gpu/decoder_fault.py check VARIANT PACKAGE [--latent H W] [--once]

`check`, in a fresh process as a worker meets a package: loads and binds it (aot_runtime), runs batch 1, 2, 1 (static:
1 only) and a CUDA graph of batch 1, compares each with the plain decoder, times the package against the plain decoder
and prints one JSON line. A fault ends the process (its status is then non-zero). --once: one batch-1 call only (for
compute-sanitizer, run with PYTORCH_NO_CUDA_MEMORY_CACHING=1 so every tensor is its own allocation).
"""
import argparse
import contextlib
import json
import sys
import time

import torch


def decoder(device):
    """SDXL's VAE as optimize.py leaves it (float16 weights kept in float32 by keep_vae_in_float32, whose decode casts
    the latents, then channels-last), in the wrapper aot.py exports and checks."""
    from types import SimpleNamespace

    from diffusers import AutoencoderKL

    from sd_engine.aot import _wrapper
    from sd_engine.optimize import keep_vae_in_float32
    from sd_engine.random_models import preset_config

    torch.manual_seed(0)
    vae = AutoencoderKL(**preset_config("sdxl")["vae"]).to(device, torch.float16).eval()
    pipe = SimpleNamespace(vae=vae, upcast_vae=None)  # (upcast_vae: what marks a pipeline that honours force_upcast)
    assert keep_vae_in_float32(pipe)
    vae.to(memory_format=torch.channels_last)
    return _wrapper(pipe, "vae_decode")


def attention(variant):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.MATH]) if variant == "math" else contextlib.nullcontext()


def build(args, device):
    from torch.export import Dim

    from sd_engine.aot import _inductor_configs

    wrapper = decoder(device)
    static = args.variant == "static"
    latents = torch.randn(1 if static else 2, 4, *args.latent, device=device, dtype=torch.float16)
    configs = {**_inductor_configs(device), **({"comprehensive_padding": False} if args.variant == "nopad" else {})}
    start = time.perf_counter()
    with torch.no_grad(), attention(args.variant):
        exported = torch.export.export(wrapper, (latents,), strict=False,
                                       dynamic_shapes=None if static else ({0: Dim("batch", min=1, max=2)},))
        torch._inductor.aoti_compile_and_package(exported, package_path=args.package, inductor_configs=configs)
    print(json.dumps({"variant": args.variant, "built_s": round(time.perf_counter() - start, 1),
                      "attention_calls": attention_calls(args.package)}))


def attention_calls(package):
    """The attention kernels of PyTorch's that the package's wrapper code calls (the exported graph cannot say: it
    keeps aten.scaled_dot_product_attention whatever the backend, which Inductor picks when it lowers it)."""
    import re
    import zipfile

    with zipfile.ZipFile(package) as archive:
        code = "".join(archive.read(name).decode(errors="replace") for name in archive.namelist()
                       if name.endswith(".wrapper.cpp"))
    return sorted(set(re.findall(r"aoti_torch_\w*_scaled_dot_product_\w+", code)))


def timed_ms(call, runs=5):
    """Median ms of `runs` calls after one untimed (gpu_common.timed_runs)."""
    from statistics import median

    from gpu_common import timed_runs

    return round(median(timed_runs(call, runs, warmup=1)) * 1000, 1)


def check(args, device):
    from sd_engine.aot_runtime import bind, load_package, on_device

    wrapper = decoder(device)
    runner = bind(load_package(args.package), wrapper)
    row = {"variant": args.variant}
    batches = (1,) if args.once or args.variant == "static" else (1, 2, 1)
    with torch.no_grad():
        for i, batch in enumerate(batches):
            z = torch.randn(batch, 4, *args.latent, device=device, dtype=torch.float16)
            got = on_device(runner, [z])
            if device.type == "cuda":
                torch.cuda.synchronize()
            row[f"call{i}_batch{batch}_max_abs_err"] = (got.float() - wrapper(z).float()).abs().max().item()
            print(f"call {i} at batch {batch} ran", file=sys.stderr)
        if args.once or device.type != "cuda":
            print(json.dumps(row))
            return
        z = torch.randn(1, 4, *args.latent, device=device, dtype=torch.float16)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = on_device(runner, [z])
        graph.replay()
        torch.cuda.synchronize()
        row["graph_max_abs_err"] = (out.float() - wrapper(z).float()).abs().max().item()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profile:
            on_device(runner, [z])
            torch.cuda.synchronize()
        # Which attention kernel the package runs: PyTorch's (fmha: memory-efficient; flash) or none of them.
        words = ("fmha", "flash", "attention")
        row["attention_kernels"] = sorted({event.name[:80] for event in profile.events()
                                           if any(word in event.name.lower() for word in words)})
        row["package_ms"] = timed_ms(lambda: on_device(runner, [z]))
        row["graph_ms"] = timed_ms(graph.replay)
        row["plain_ms"] = timed_ms(lambda: wrapper(z))
    print(json.dumps(row))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=("build", "check"))
    parser.add_argument("variant", choices=("efficient", "math", "nopad", "static"))
    parser.add_argument("package")
    parser.add_argument("--latent", type=int, nargs=2, default=(128, 128), metavar=("H", "W"))
    parser.add_argument("--once", action="store_true")
    parser.add_argument("--device", default="cuda", help="cpu: only to try the script (no graph, no timing)")
    args = parser.parse_args()
    (build if args.action == "build" else check)(args, torch.device(args.device))


if __name__ == "__main__":
    main()
