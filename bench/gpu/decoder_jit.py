"""SDXL's float32 VAE decoder under torch.compile instead of an AOT package (whose packages fault: decoder_fault.py):
what one compile with the batch, height and width dynamic costs cold and from torch's portable cache artifacts, and
what it runs each size in, against the same decoder uncompiled, both under CUDA graphs as a worker runs them.

The decoder is decoder_fault.decoder (the engine's float32 decode and wrapper, channels-last, seeded random weights).
Its latents are marked as optimize.by_latent_size marks them (torch._dynamo.maybe_mark_dynamic on 0, 2 and 3), so the
first size compiles and the others should reuse that graph (`compiles` counts Dynamo's frames; batch 1 stays
specialized: torch's 0/1 rule).

  python3 bench/gpu/decoder_jit.py ARTIFACTS          cold: compile, time, then save the artifacts to ARTIFACTS
  python3 bench/gpu/decoder_jit.py ARTIFACTS --load   a fresh process (empty Inductor and Triton caches, which the
                                                      caller sets): load ARTIFACTS first, then the same

One JSON line: the first (compiling) call of each size, then per size the median ms of 5 replays of a CUDA graph of
the compiled call and of the plain one, and their largest difference.
"""
import argparse
import json
import sys
import time
from pathlib import Path

import torch

# Latents (height, width) / 8: SDXL's four listed sizes (bench/gpu/sdxl-4sizes.yaml), then an unlisted one.
SIZES = [(128, 128), (144, 112), (112, 144), (152, 104), (128, 120)]


def graph_ms(call, z):
    from decoder_fault import timed_ms

    if not z.is_cuda:  # (--device cpu: only to try the script)
        return timed_ms(lambda: call(z), runs=1), call(z)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        call(z)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = call(z)
    return timed_ms(graph.replay), out


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("artifacts", type=Path)
    parser.add_argument("--load", action="store_true")
    parser.add_argument("--device", default="cuda", help="cpu: only to try the script, at --latent")
    parser.add_argument("--latent", type=int, nargs=2, action="append", metavar=("H", "W"),
                        help="latent sizes instead of SIZES (repeatable)")
    args = parser.parse_args()
    device = torch.device(args.device)
    sizes = [tuple(s) for s in args.latent] if args.latent else SIZES
    row = {"load": args.load}
    start = time.perf_counter()
    from decoder_fault import decoder

    if args.load:
        data = args.artifacts.read_bytes()
        t = time.perf_counter()
        row["artifacts_loaded"] = torch.compiler.load_cache_artifacts(data) is not None
        row["artifacts_load_s"] = round(time.perf_counter() - t, 2)
    wrapper = decoder(device)
    compiled = torch.compile(wrapper)

    def dynamic(z):
        for dim in (0, 2, 3):
            torch._dynamo.maybe_mark_dynamic(z, dim)
        return compiled(z)

    row["ready_to_compile_s"] = round(time.perf_counter() - start, 1)
    first = {}
    with torch.no_grad():
        for h, w in sizes:
            z = torch.randn(1, 4, h, w, device=device, dtype=torch.float16)
            t = time.perf_counter()
            dynamic(z)
            if z.is_cuda:
                torch.cuda.synchronize()
            first[f"{w * 8}x{h * 8}"] = round(time.perf_counter() - t, 2)  # (width x height, as the docs write sizes)
            print(f"{w * 8}x{h * 8}: first call {first[f'{w * 8}x{h * 8}']} s", file=sys.stderr)
        row["first_call_s"] = first
        from torch._dynamo.utils import counters

        row["compiles"] = dict(counters["stats"])
        if not args.load:  # saved before the timings, so that a run cut short still leaves them for the warm one
            data, _ = torch.compiler.save_cache_artifacts()
            args.artifacts.write_bytes(data)
            row["artifacts_mb"] = round(len(data) / 2**20, 1)
        # Whether the compile found its work in the caches (Inductor's compiled graph, AOTAutograd's): what the
        # artifacts are for; the rest of a warm first call is Dynamo's tracing.
        row["caches"] = {f"{group}.{key}": n for group in ("inductor", "aot_autograd")
                         for key, n in counters[group].items() if "cache" in key or "autograd_cache" in key}
        row["sizes"] = {}
        for h, w in sizes:
            z = torch.randn(1, 4, h, w, device=device, dtype=torch.float16)
            compiled_ms, got = graph_ms(dynamic, z)
            plain_ms, want = graph_ms(wrapper, z)
            row["sizes"][f"{w * 8}x{h * 8}"] = {"compiled_graph_ms": compiled_ms, "plain_graph_ms": plain_ms,
                                               "max_abs_err": round((got.float() - want.float()).abs().max().item(),
                                                                    4)}
    row["total_s"] = round(time.perf_counter() - start, 1)
    print(json.dumps(row))


if __name__ == "__main__":
    main()
