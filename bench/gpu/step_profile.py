"""Where a compiled pipeline's GPU time goes, by kind of kernel: the UNet step and the VAE decode, each alone.

The engine as shipped (`ours`: compile + channels-last; CUDA graphs off here, so that the profiler sees each kernel:
the kernels are the same, only their launches differ) is loaded for the preset at its native size and warmed up.
One generation records the UNet's and the VAE decoder's real inputs; each module is then called again with them
under torch.profiler, and its kernels are summed by kind: matmul (cuBLAS/cuBLASLt/CUTLASS), convolution (cuDNN),
attention, Inductor's fused Triton kernels (norms, activations, residual adds) and the rest. That says which lever
can move a step at all: FP8 matmuls only shorten the matmul share, for example. Prints one JSON object.

    python3 bench/gpu/step_profile.py --preset sdxl [--batch 1] [--calls 5] [--out record.json]

First run, on an H200 (2026-12-07, bench/results/h200-sdxl-2026-12-07-step-profile.log), with two faults since fixed:
its replays ran with grad on, so the modules most likely compiled again (Dynamo guards on grad mode; the VAE
decoder's part did not finish within the call), and its classifier put Inductor's kernels named after a convolution,
an attention or a cast ("convert") under those kinds. Its matmul total (no Inductor kernel name matched those words)
and its sum, 31.35 ms against 31.68 ms for the graphed inference step, stand; its other kinds do not.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

from gpu_common import preset_weights, record_header, requests_for
from sd_engine.config import EngineConfig
from sd_engine.engine import load_engine
from sd_engine.random_models import native_size

OURS = {"backend": "eager", "compile": True, "channels_last": True, "cuda_graph": False, "sizes": []}
KINDS = (  # first match wins: cuDNN's attention kernels also say "fprop", its convolutions "implicit_gemm"
    ("attention", ("fmha", "flash", "attention", "sdpa", "attn")),
    ("convolution", ("fprop", "dgrad", "implicit", "winograd", "convolve", "conv2d", "convolution")),
    ("matmul", ("gemm", "nvjet", "cutlass", "xmma", "matmul")),
)


def kind_of(kernel: str) -> str:
    """Inductor's kernels first: they are named after the ops they fuse (triton_poi_fused_convolution_0 is the bias
    add after a cuDNN convolution, ..._convert_element_type_... a cast), so their names would match the others."""
    name = kernel.lower()
    if name.startswith("triton_"):
        return "matmul" if name.startswith("triton_tem_") else "inductor_triton"  # tem: a max-autotune mm template
    return next((kind for kind, words in KINDS if any(word in name for word in words)), "other")


def recorded_inputs(owner, attr: str, run) -> tuple:
    """The first call's arguments of `owner.<attr>` (an instance attribute: the engine's compiled wrapper) in `run`."""
    original, seen = getattr(owner, attr), []

    def record(*args, **kwargs):
        if not seen:
            seen.append((args, kwargs))
        return original(*args, **kwargs)

    setattr(owner, attr, record)
    try:
        run()
    finally:
        setattr(owner, attr, original)
    return seen[0]


def profile(call, calls: int) -> dict:
    """Per call: wall time, kernel time by kind, and the kernels that took longest."""
    for _ in range(2):
        call()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        call()
    torch.cuda.synchronize()
    wall_ms = (time.perf_counter() - start) * 1000 / calls
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            call()
        torch.cuda.synchronize()
    by_kind, kernels = defaultdict(float), {}
    for event in prof.key_averages():
        us = event.self_device_time_total
        if us <= 0 or event.self_cpu_time_total > 0:  # CPU-side ops carry their kernels' time too: kernels only
            continue
        by_kind[kind_of(event.key)] += us / 1000 / calls
        kernels[event.key] = (us / 1000 / calls, event.count // calls)
    total = sum(by_kind.values())
    top = sorted(kernels.items(), key=lambda item: -item[1][0])[:25]
    return {"wall_ms": round(wall_ms, 2), "kernel_ms": round(total, 2),
            "by_kind_ms": {k: round(v, 2) for k, v in sorted(by_kind.items(), key=lambda item: -item[1])},
            "by_kind_share": {k: round(v / total, 3) for k, v in sorted(by_kind.items(), key=lambda item: -item[1])},
            "kernels_per_call": sum(count for _, count in kernels.values()),
            "top": [{"kernel": name[:160], "kind": kind_of(name), "ms": round(ms, 3), "count": count}
                    for name, (ms, count) in top]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=("sd15", "sd21", "sdxl"), default="sdxl")
    parser.add_argument("--batch", type=int, default=1, help="images per call (guidance doubles the UNet's batch)")
    parser.add_argument("--calls", type=int, default=5, help="profiled calls per module (default: %(default)s)")
    parser.add_argument("--out", type=Path, help="also write the record here, after each module")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA GPU", file=sys.stderr)
        return 2
    weights = preset_weights(args.preset)
    device = torch.device("cuda:0")
    start = time.perf_counter()
    engine = load_engine(EngineConfig.from_mapping(OURS), weights, device, args.batch)
    ready_s = time.perf_counter() - start
    side = native_size(args.preset)
    requests = requests_for(args.batch, 2, side, engine.rules.guidance_scale)
    record = {**record_header(), "preset": args.preset, "batch": args.batch, "height": side, "width": side,
              "config": OURS, "ready_s": round(ready_s, 1)}
    pipe = engine.pipe
    for module, owner, attr in (("unet", pipe.unet, "forward"), ("vae_decode", pipe.vae, "decode")):
        inputs, kwargs = recorded_inputs(owner, attr, lambda: engine.generate(requests))
        call = getattr(owner, attr)
        # Without grad, as the pipeline calls it: with grad on, the compiled code's guards fail and it compiles
        # again, for training (minutes for SDXL).
        with torch.no_grad():
            record[module] = profile(lambda: call(*inputs, **kwargs), args.calls)
        print(module, json.dumps({k: record[module][k] for k in ("wall_ms", "kernel_ms", "by_kind_ms")}),
              file=sys.stderr)
        if args.out:  # after each module: a run cut short keeps what it measured
            args.out.write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps(record, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
