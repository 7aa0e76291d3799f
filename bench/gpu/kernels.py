"""Where SDXL's UNet step could still get faster: its transformer layers' attention and matmuls, timed alone.

The compiled SDXL step (batch 1 with guidance, so 2 samples) is 31.9 ms on an H200, about 424 TFLOP/s; the latency
goal needs about 24 ms. This times, at the step's own shapes, each attention backend PyTorch offers, and the matmuls
in float16 against FP8 (e4m3, per-row scales, as `fp8: true` does) with and without quantizing the activation
(eager, and compiled apart), each timed inside a CUDA graph, and sums them over SDXL's 70 transformer layers (10 at
width 640 on 4096 tokens, 60 at 1280 on 1024). Prints one JSON object. Usage: python3 bench/gpu/kernels.py [--batch
2] > record.json
"""
import argparse
import json
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from sd_engine.fp8 import _output_dtype, quantize_rows as quantize  # the engine's own per-row quantization

LEVELS = ({"width": 640, "tokens": 4096, "layers": 10}, {"width": 1280, "tokens": 1024, "layers": 60})
TEXT_TOKENS, TEXT_WIDTH, HEAD_DIM = 77, 2048, 64


def timed(fn, iters=20, replays=5):
    """ms per call of `fn`, from a CUDA graph of `iters` calls replayed `replays` times: the GPU's time alone. Calls
    launched one by one from Python would measure the launches instead (tens of microseconds each, as long as many of
    these kernels), which the compiled engine's graphs do not pay."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(iters):
            fn()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / (iters * replays)


def safely(timer):
    """`timer`, or None where the op could not be run or captured (the record then shows null)."""
    def run(fn):
        try:
            return timer(fn)
        except RuntimeError as e:
            print(f"not timed: {str(e).splitlines()[0][:160]}", file=sys.stderr)
            return None
    return run


def attention(batch):
    rows = []
    for level in LEVELS:
        heads = level["width"] // HEAD_DIM
        q = torch.randn(batch, heads, level["tokens"], HEAD_DIM, device="cuda", dtype=torch.half)
        text = torch.randn(batch, heads, TEXT_TOKENS, HEAD_DIM, device="cuda", dtype=torch.half)
        for kind, kv in (("self", q), ("cross", text)):
            for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION):
                try:
                    with sdpa_kernel(backend):
                        ms = timed(lambda: F.scaled_dot_product_attention(q, kv, kv))
                except RuntimeError as e:  # a backend that does not take these shapes
                    rows.append({"width": level["width"], "kind": kind, "backend": backend.name,
                                 "error": str(e).splitlines()[0][:160]})
                    continue
                rows.append({"width": level["width"], "kind": kind, "backend": backend.name, "ms": round(ms, 4),
                             "ms_all_layers": round(ms * level["layers"], 3)})
    return rows


def matmuls(batch, out):
    """`out`: the FP8 matmuls' output dtype, as the engine's FP8 layers use it on this stack."""
    compiled_quantize = torch.compile(quantize, dynamic=False)
    try_timed = safely(timed)
    rows = []
    for level in LEVELS:
        d, m = level["width"], batch * level["tokens"]
        # Per layer: self-attention q, k, v, out; cross-attention q, out; GEGLU in (d -> 8d), out (4d -> d); proj_in
        # and proj_out of the block shared by its layers (counted per layer here, a small overcount).
        shapes = [(d, d)] * 8 + [(d, 8 * d), (4 * d, d)]
        for k, n in sorted(set(shapes)):
            count = shapes.count((k, n)) * level["layers"]
            x = torch.randn(m, k, device="cuda", dtype=torch.half)
            w = torch.randn(n, k, device="cuda", dtype=torch.half)
            xq, xs = quantize(x)
            wq, ws = quantize(w)
            fp16 = timed(lambda: x @ w.t())
            fp8 = try_timed(lambda: torch._scaled_mm(xq, wq.t(), scale_a=xs, scale_b=ws.t(), out_dtype=out))

            def quantized(quantizer):
                q, s = quantizer(x)
                return torch._scaled_mm(q, wq.t(), scale_a=s, scale_b=ws.t(), out_dtype=out)
            fp8q = try_timed(lambda: quantized(quantize))  # eager: several kernels
            fp8c = try_timed(lambda: quantized(compiled_quantize))  # compiled apart (the engine fuses it into more)
            flop = 2 * m * k * n
            rows.append({"width": d, "m": m, "k": k, "n": n, "per_step": count,
                         "fp16_ms": rounded(fp16), "fp8_ms": rounded(fp8), "fp8_with_quantize_ms": rounded(fp8q),
                         "fp8_with_compiled_quantize_ms": rounded(fp8c),
                         "fp16_tflops": round(flop / fp16 / 1e9, 1), "fp8_tflops": fp8 and round(flop / fp8 / 1e9, 1)})
    return rows


def rounded(ms, digits=4):
    return None if ms is None else round(ms, digits)


def per_step(rows, key):
    """ms a step summed over the layers, or None when any row could not be timed."""
    values = [r[key] for r in rows]
    return None if None in values else round(sum(v * r["per_step"] for v, r in zip(values, rows)), 2)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=2, help="samples per UNet call (2: batch 1 with guidance)")
    args = parser.parse_args()
    torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = True
    out = _output_dtype(torch.half, torch.device("cuda"))
    att, mm = attention(args.batch), matmuls(args.batch, out)
    best = {}
    for r in att:
        if "ms" in r:
            key = (r["width"], r["kind"])
            best[key] = min(best.get(key, 1e9), r["ms_all_layers"])
    flash = sum(r["ms_all_layers"] for r in att if r.get("backend") == "FLASH_ATTENTION" and "ms" in r)
    totals = {
        "attention_flash_ms_per_step": round(flash, 2),
        "attention_best_ms_per_step": round(sum(best.values()), 2),
        **{f"matmul_{key.removesuffix('_ms')}_ms_per_step": per_step(mm, key)
           for key in ("fp16_ms", "fp8_ms", "fp8_with_quantize_ms", "fp8_with_compiled_quantize_ms")},
    }
    print(json.dumps({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "batch": args.batch,
                      "timing": "each op 20 times in a CUDA graph, replayed 5 times (GPU time, no launches)",
                      "fp8_out_dtype": str(out),
                      "totals": totals, "attention": att, "matmuls": mm}, indent=1))


if __name__ == "__main__":
    main()
