"""Which attention kernel the UNet packages should be built with: what each of PyTorch's backends costs a step, and what
it costs a new process the first time it meets each shape (the packages' first runs and the warm-up's captures).

AOT packages built with PyTorch's default choice call cuDNN's attention (aoti_torch_cuda__scaled_dot_product_cudnn_
attention), which builds a kernel for every new shape (batch, tokens) with NVRTC: under py-spy that was 56% of an H100
start's package calls (bench/results/h100-sd15-2026-12-07-start-profile.txt), and a batch size the warm-up skipped
pays it in its first request.

  python3 bench/gpu/attention_choice.py first BACKEND   (in a fresh process: every SD 1.5 attention shape of the 4
                                                         sizes at UNet batch 16 and 2, as a worker's start meets them)
  python3 bench/gpu/attention_choice.py steady          (ms per UNet step of each backend, SD 1.5 and SDXL)

BACKEND: flash, efficient or cudnn. Prints one JSON line.
"""
import argparse
import json
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
            "cudnn": SDPBackend.CUDNN_ATTENTION}
TEXT = 77


def sd15_levels(latent):
    """(tokens, heads, head dim, transformer blocks) of SD 1.5's UNet at a latent size: 8 heads throughout."""
    h, w = latent
    return [(h * w, 8, 40, 5), (h * w // 4, 8, 80, 5), (h * w // 16, 8, 160, 5), (h * w // 64, 8, 160, 1)]


def sdxl_levels(latent):
    h, w = latent
    return [(h * w // 4, 10, 64, 10), (h * w // 16, 20, 64, 60)]


def tensors(batch, tokens, heads, dim):
    """q (or k, v) as diffusers' attention makes them: (batch, tokens, heads, dim) viewed as (batch, heads, ...)."""
    return torch.randn(batch, tokens, heads, dim, device="cuda", dtype=torch.half).transpose(1, 2)


def step_calls(levels, batch):
    """Each attention call of one UNet step: (q, kv, count)."""
    calls = []
    for tokens, heads, dim, blocks in levels:
        q = tensors(batch, tokens, heads, dim)
        calls += [(q, q, blocks), (q, tensors(batch, TEXT, heads, dim), blocks)]
    return calls


def first(backend):
    start = time.perf_counter()
    torch.zeros(1, device="cuda")
    init_s = time.perf_counter() - start
    seen, refused, spent = 0, 0, 0.0
    with sdpa_kernel(BACKENDS[backend]):
        for batch in (16, 2):
            for latent in ((96, 96), (64, 96), (96, 64), (64, 64)):
                for q, kv, _ in step_calls(sd15_levels(latent), batch):
                    torch.cuda.synchronize()
                    start = time.perf_counter()
                    try:
                        F.scaled_dot_product_attention(q, kv, kv)
                        torch.cuda.synchronize()
                    except RuntimeError:  # a shape this backend does not take
                        refused += 1
                        continue
                    spent += time.perf_counter() - start
                    seen += 1
    return {"backend": backend, "cuda_init_s": round(init_s, 2), "calls": seen, "refused": refused,
            "first_calls_s": round(spent, 2)}


def graph_ms(calls, backend):
    """ms of one step's attention calls (each `count` times), replayed from a CUDA graph: GPU time alone
    (kernels.timed)."""
    from kernels import timed

    def step():
        for q, kv, count in calls:
            for _ in range(count):
                F.scaled_dot_product_attention(q, kv, kv)
    with sdpa_kernel(BACKENDS[backend]):  # (the backend is chosen as the graph is captured)
        return round(timed(step, iters=1), 3)


def steady():
    rows = []
    for preset, levels, latent, batch in (("sd15", sd15_levels, (64, 64), 2), ("sd15", sd15_levels, (96, 96), 2),
                                          ("sd15", sd15_levels, (64, 64), 16), ("sdxl", sdxl_levels, (128, 128), 2)):
        calls = step_calls(levels(latent), batch)
        row = {"preset": preset, "latent": list(latent), "unet_batch": batch}
        for backend in BACKENDS:
            try:
                row[f"{backend}_ms_per_step"] = graph_ms(calls, backend)
            except RuntimeError as e:
                row[f"{backend}_ms_per_step"] = None
                row[f"{backend}_error"] = str(e).splitlines()[0][:160]
        rows.append(row)
    return {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "steps": rows}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=("first", "steady"))
    parser.add_argument("backend", nargs="?", choices=tuple(BACKENDS))
    args = parser.parse_args()
    if args.what == "first" and args.backend is None:
        parser.error("first needs a BACKEND")
    print(json.dumps(first(args.backend) if args.what == "first" else steady()))


if __name__ == "__main__":
    main()
