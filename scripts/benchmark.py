#!/usr/bin/env python3
"""Side-by-side GPU benchmark of the engine's backends on an SD-family architecture (SD 1.5, SD 2.1, SDXL) with random
weights, in one process.

For each backend and batch size: end-to-end latency (median of --runs after a warm-up), images/s, mean UNet step
(one UNet call at batch 2B under classifier-free guidance), text-encoder and VAE-decode time per pipeline call
(CUDA events around the modules during the timed runs), peak GPU memory, and parity (RMSE on [0,1] pixels and NaN
count) against eager float16 on the same seeds and batch. Speed equals real weights; quality is parity. Each preset
runs at its native size with its pipeline's own guidance (7.5 for SD, 5.0 for SDXL) and scheduler.

Backends form a ladder: eager fp32 -> eager fp16 -> + our CUDA graphs -> DeepSpeed kernels -> DeepSpeed + its own
graph (stock) -> DeepSpeed + our graphs -> ours (eager + compile + channels_last + our graphs), and ours with the
further levers (fused QKV, FP8 matmuls). It also records a shape-safety check (batch 1 -> 3 -> 1 and 512 -> 768 -> 512
through one graphed engine, compared with eager) and the cold start (fresh process -> engine ready). For a pipeline
that upcasts its VAE (SDXL) it times one VAE decode in float32 and in float16, with channels-last and contiguous
weights (`vae_decode_ms`).

Writes <out-dir>/<gpu>-<preset>-<date>.json (a list of rows under "rows") and a .png plot next to it, after every row,
so a run cut short keeps what it measured. Progress bars and logs on stderr. The random-weight folder, timing, parity
and result files are gpu_common.py's, shared with the other GPU tools. Exit codes: 0 done; 1 a backend failed; 2 no
CUDA GPU.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import torch

from gpu_common import (NO_GPU, cuda_available, free, json_saver, nan_pixels, pixels, preset_weights, progress, pyplot,
                        record_header, requests_for, result_stem, rmse, setup_logging, timed_runs)
from sd_engine.config import EngineConfig
from sd_engine.engine import Engine, GenerationResult, load_engine
from sd_engine.loading import load_pipeline
from sd_engine.optimize import keep_vae_in_float32
from sd_engine.deepspeed_backend import deepspeed_inject
from sd_engine.random_models import native_size
from sd_engine.timing import StageTimer

log = logging.getLogger("benchmark")
PRESETS = ("sd15", "sd21", "sdxl")
BACKENDS = {  # name -> handler: block overrides; None marks stock DeepSpeed, built by hand below
    "eager-fp16": {"backend": "eager"},
    "eager-fp32": {"backend": "eager", "dtype": "float32"},
    "eager-fp16+graph": {"backend": "eager", "cuda_graph": True},
    "deepspeed": {"backend": "deepspeed"},
    "deepspeed+stock-graph": None,
    "deepspeed+graph": {"backend": "deepspeed", "cuda_graph": True},
    # The recommended GPU config (config/model-config.yaml).
    "ours": {"backend": "eager", "cuda_graph": True, "compile": True, "channels_last": True},
    # Further levers, on top of ours (and one without compile, to see FP8's speed and parity in seconds).
    "ours+fuse_qkv": {"backend": "eager", "cuda_graph": True, "compile": True, "channels_last": True,
                      "fuse_qkv": True},
    "ours+fp8": {"backend": "eager", "cuda_graph": True, "compile": True, "channels_last": True, "fuse_qkv": True,
                 "fp8": True},
    "eager-fp16+graph+fp8": {"backend": "eager", "cuda_graph": True, "channels_last": True, "fp8": True},
}
LADDER_ONLY = {"eager-fp32": (1,), "deepspeed": (1, 8), "deepspeed+stock-graph": (1, 8)}  # fewer batch sizes


def measure(engine: Engine, batch: int, args, references: dict) -> dict:
    requests = requests_for(batch, args.steps, args.size, engine.rules.guidance_scale)  # the model's own guidance
    images = pixels(engine.generate(requests))  # warm-up: captures graphs for this shape
    peaks = []

    def run():
        results = engine.generate(requests)
        peaks.append(max(r.peak_memory_bytes for r in results if isinstance(r, GenerationResult)))

    with StageTimer(engine.pipe, cuda=True) as timer:  # per-call means; the engine's own timer gives totals
        times = timed_runs(run, args.runs)
    components = {stage: round(statistics.mean(calls), 3) if calls else None  # mean milliseconds per call
                  for stage, calls in timer.calls_ms().items()}
    latency = statistics.median(times)
    reference = references.setdefault(batch, images)
    return {"batch": batch, "latency_s": round(latency, 4), "images_per_s": round(batch / latency, 3),
            "unet_step_ms": components["unet"], "text_encoder_ms": components["text_encoder"],
            "vae_ms": components["vae"], "peak_mem_gib": round(max(peaks) / 2**30, 2),
            "rmse_vs_eager": round(rmse(images, reference), 5),
            "nan_pixels": nan_pixels(images),
            "runs_s": [round(t, 4) for t in times]}


def build_engine(name: str, base: dict, weights: Path, max_batch_size: int = 1) -> Engine:
    """Load one backend; warm-up covers batch 1 and max_batch_size, as the handler does for TorchServe's batchSize."""
    overrides = BACKENDS[name]
    device = torch.device("cuda:0")
    if overrides is not None:
        return load_engine(EngineConfig.from_mapping({**base, **overrides}), weights, device, max_batch_size)
    # Stock DeepSpeed: kernel injection + DeepSpeed's own graphs, captured at the first call (one shape only).
    pipe = load_pipeline(weights, torch.float16).to(device)
    keep_vae_in_float32(pipe)  # as optimize() does: DeepSpeed's VAE wrapper hides what diffusers' upcast reads
    deepspeed_inject(pipe, enable_cuda_graph=True)
    return Engine(pipe, EngineConfig.from_mapping({**base, "backend": "deepspeed"}), device, "deepspeed")


def shape_safety(name: str, base: dict, weights: Path, steps: int, eager_images: dict) -> dict:
    """One graphed engine through batch 1 -> 3 -> 1 and 512 -> 768 -> 512; each result against eager."""
    engine = build_engine(name, base, weights)
    sequence = [(1, 512), (3, 512), (1, 512), (1, 768), (1, 512)]
    out = []
    for batch, size in sequence:
        requests = requests_for(batch, steps, size)
        images = pixels(engine.generate(requests))
        out.append({"batch": batch, "size": size, "rmse_vs_eager": round(rmse(images, eager_images[(batch, size)]), 5)})
    del engine
    free()
    return {"backend": name, "sequence": out}


def cold_start(name: str, base: dict, weights: Path) -> float:
    """Seconds from a fresh Python process to a ready engine (imports, load, optimize, warm-up at batch 1)."""
    config = json.dumps({**base, **BACKENDS[name]})
    code = ("import json, torch; from sd_engine.config import EngineConfig; from sd_engine.engine import load_engine; "
            f"load_engine(EngineConfig.from_mapping(json.loads({config!r})), {str(weights)!r}, torch.device('cuda:0'))")
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
    return round(time.perf_counter() - start, 1)


def check_shape_safety(args, base: dict, record: dict, save) -> None:
    names = ("ours", "deepspeed+graph", "eager-fp16+graph")
    with progress(1 + len(names), "shape-safety", unit="engine") as bar:
        bar.set_postfix_str("eager-fp16 references")
        eager = build_engine("eager-fp16", base, args.weights)
        eager_images = {(b, s): pixels(eager.generate(requests_for(b, args.steps, s))) for b, s in
                        ((1, 512), (3, 512), (1, 768))}
        del eager
        free()
        bar.update()
        record["shape_safety"] = []
        for name in names:
            bar.set_postfix_str(name)
            record["shape_safety"].append(shape_safety(name, base, args.weights, args.steps, eager_images))
            save()
            bar.update()


def check_cold_start(base: dict, weights: Path, record: dict, save, names=None) -> None:
    """Process start -> ready, first with an empty cache_dir (JIT builds, compilation), then again with it warm."""
    record["cold_start_s"] = {}
    names = names or ("ours", "deepspeed+graph", "eager-fp16+graph")
    with progress(2 * len(names), "cold-start", unit="start") as bar:
        for name in names:
            cache = Path(tempfile.mkdtemp(prefix="sd-cache-"))
            with_cache = {**base, "cache_dir": str(cache)}
            # Each engine its own empty cache: "first" pays every build, "restart_with_cache" what a restart pays.
            bar.set_postfix_str(f"{name}, empty cache")
            first = cold_start(name, with_cache, weights)
            bar.update()
            bar.set_postfix_str(f"{name}, warm cache")
            record["cold_start_s"][name] = {"first_start": first,
                                            "restart_with_cache": cold_start(name, with_cache, weights)}
            bar.update()
            log.info("cold start %s: %s", name, record["cold_start_s"][name])
            save()


def check_loras(args, base: dict, record: dict, save, names=("a", "b", "c", "d")) -> None:
    """LoRA adapters on ours (compile + graphs): the cost of switching the fused set, images/s at the largest batch
    size with no adapter, one adapter, and requests spread over four (the engine splits such a batch by adapter
    set), the same two through the engine's batcher (which batches by adapter set), parity against eager fp16 with
    the same adapter, and the compiles and graph captures during the switching runs (there must be none)."""
    from dataclasses import replace

    from torch._dynamo.utils import counters

    from sd_engine.random_loras import save_random_lora

    folder = args.weights / "loras"
    if not all((folder / f"{name}.safetensors").is_file() for name in names):
        pipe = load_pipeline(args.weights, torch.float16).to("cuda")
        for i, name in enumerate(names):
            save_random_lora(pipe, folder / f"{name}.safetensors", seed=i, rank=args.lora_rank, std=0.01)
        del pipe
        free()
    batch = max(int(b) for b in args.batch_sizes.split(","))
    base_requests = requests_for(batch, args.steps, args.size)

    def spread(sets):  # the model's own guidance, as measure() uses
        return [replace(r, guidance_scale=guidance, loras=sets[i % len(sets)]) for i, r in enumerate(base_requests)]

    def images_per_s(engine, requests):  # the untimed first run captures the group sizes' graphs
        return round(batch / statistics.median(timed_runs(lambda: pixels(engine.generate(requests)), args.runs,
                                                          warmup=1)), 3)

    def served_images_per_s(engine, sets):  # the first run untimed, as above
        from sd_engine.batching import Batcher

        requests = [replace(r, guidance_scale=guidance, loras=sets[i % len(sets)])
                    for i, r in enumerate(requests_for(4 * batch, args.steps, args.size))]
        batcher = Batcher(engine, max_images=batch, max_delay_s=0.01)

        def serve():
            futures = [batcher.submit([request]) for request in requests]
            for future in futures:
                [result] = future.result()
                if not isinstance(result, GenerationResult):
                    raise RuntimeError(f"generation failed: {result}")
        try:
            return round(len(requests) / statistics.median(timed_runs(serve, args.runs, warmup=1)), 3)
        finally:
            batcher.close()

    with progress(6, "loras") as bar:
        bar.set_postfix_str("loading ours")
        engine = build_engine("ours", base, args.weights, batch)
        guidance = engine.rules.guidance_scale
        one, four = (("a", 0.8),), [((name, 0.8),) for name in names]
        row = {"check": "loras", "preset": args.preset, "batch": batch, "steps": args.steps, "height": args.size,
               "width": args.size, "lora_rank": args.lora_rank, "adapters": list(engine.rules.loras)}
        bar.update()
        row["images_per_s_no_adapter"] = images_per_s(engine, spread([()]))
        row["images_per_s_one_adapter"] = images_per_s(engine, spread([one]))
        bar.update()
        pixels(engine.generate(spread(four)))  # the groups' batch size captured before counting
        graphs = engine.pipe.unet.forward.budget
        before = (counters["stats"]["unique_graphs"], len(graphs.held))
        row["images_per_s_four_adapters"] = images_per_s(engine, spread(four))
        row["four_over_one"] = round(row["images_per_s_four_adapters"] / row["images_per_s_one_adapter"], 3)
        bar.update()
        # Through the engine's batcher (the KServe front's), 4 batches' worth of one-image submissions queued at once:
        # it batches by adapter set, so spread requests still fill whole batches.
        row["served_images_per_s_one_adapter"] = served_images_per_s(engine, [one])
        row["served_images_per_s_four_adapters"] = served_images_per_s(engine, four)
        row["served_four_over_one"] = round(row["served_images_per_s_four_adapters"]
                                            / row["served_images_per_s_one_adapter"], 3)
        bar.update()
        switches = [engine.adapters.apply(s) * 1000 for _ in range(3)
                    for s in (one, (("b", 0.5),), (("a", 0.5), ("b", 0.5), ("c", 0.5)), (), (("d", 1.0),))]
        row["switch_ms_median"], row["switch_ms_max"] = round(statistics.median(switches), 2), round(max(switches), 2)
        row["compiles_while_switching"] = counters["stats"]["unique_graphs"] - before[0]
        row["graph_captures_while_switching"] = len(graphs.held) - before[1]
        styled = pixels(engine.generate(spread([one])))
        del engine
        free()
        bar.update()
        bar.set_postfix_str("eager-fp16 parity")
        engine = build_engine("eager-fp16", base, args.weights, batch)
        row["rmse_vs_eager_one_adapter"] = round(rmse(styled, pixels(engine.generate(spread([one])))), 5)
        del engine
        free()
        bar.update()
    record["rows"].append(row)
    log.info("loras: %s", row)
    save()


def vae_decode_ms(weights: Path, size: int, runs: int = 5) -> dict | None:
    """For a pipeline that upcasts its VAE (SDXL): one eager decode of a batch-1 latent in float32 (what the engine
    does, as diffusers does) and in float16 (what a VAE without force_upcast, e.g. the fp16-fix one, costs), each with
    channels-last weights (as the engine keeps them) and contiguous ones (`_nchw`: the layout for a decoder that runs
    uncompiled, should it be faster). Median milliseconds of `runs` after an untimed one."""
    import diffusers
    from diffusers import AutoencoderKL

    index = json.loads((weights / "model_index.json").read_text())
    if not hasattr(getattr(diffusers, index["_class_name"]), "upcast_vae"):
        return None
    timings = {}
    for dtype in (torch.float32, torch.float16):
        for layout, suffix in ((torch.channels_last, ""), (torch.contiguous_format, "_nchw")):
            vae = AutoencoderKL.from_pretrained(weights / "vae", dtype=dtype).to("cuda", memory_format=layout)
            latent = torch.randn(1, 4, size // 8, size // 8, device="cuda", dtype=dtype)
            with torch.no_grad():
                times = timed_runs(partial(vae.decode, latent), runs, warmup=1)
            timings[str(dtype).removeprefix("torch.") + suffix] = round(statistics.median(times) * 1000, 2)
            del vae
            free()
    log.info("VAE decode at %dx%d, batch 1, eager: %s ms", size, size, timings)
    return timings


def plot(record: dict, path: Path) -> None:
    plt = pyplot()
    if plt is None:
        return
    rows = [r for r in record["rows"] if "error" not in r]
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5))
    batch1 = [r for r in rows if r["batch"] == 1]
    left.barh([r["backend"] for r in batch1], [r["latency_s"] for r in batch1], color="tab:blue")
    for i, r in enumerate(batch1):
        left.text(r["latency_s"], i, f" {r['latency_s']:.3f} s", va="center")
    left.set_xlabel("latency, batch 1 (s, lower is better)")
    left.invert_yaxis()
    for name in dict.fromkeys(r["backend"] for r in rows):
        points = sorted((r["batch"], r["images_per_s"]) for r in rows if r["backend"] == name)
        right.plot(*zip(*points), marker="o", label=name)
    right.set_xlabel("batch size")
    right.set_ylabel("images/s (higher is better)")
    right.set_xscale("log", base=2)
    right.legend(fontsize=8)
    fig.suptitle(f"{record['gpu']}: {record['preset']} architecture, {record['height']}x{record['width']}, "
                 f"{record['steps']} steps, CFG {record['guidance_scale']} (torch {record['torch']}, "
                 f"deepspeed {record['deepspeed']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_table(args, base: dict, record: dict, save) -> bool:
    """Every backend at every batch size, one row each (saved as it comes); whether any failed."""
    batches = [int(b) for b in args.batch_sizes.split(",")]
    references: dict[int, list] = {}  # eager fp16 images per batch size; eager-fp16 runs first to fill it
    names = ["eager-fp16"] + [n for n in args.backends.split(",") if n != "eager-fp16"]
    plans = {}
    for name in names:
        sizes = [b for b in batches if b in LADDER_ONLY.get(name, batches)]
        # Stock DeepSpeed captures its graph once, so it needs a fresh engine per batch size; the others share one.
        plans[name] = [[b] for b in sizes] if BACKENDS[name] is None else [sizes]
    failed = False
    with progress(sum(len(g) for plan in plans.values() for g in plan), "benchmark", unit="row") as bar:
        for name, plan in plans.items():
            for group in plan:
                failed |= run_group(name, group, args, base, record, references, save, bar)
    return failed


def run_group(name: str, group: list[int], args, base: dict, record: dict, references: dict, save, bar) -> bool:
    """One engine through the group's batch sizes, one row each (saved as it comes); whether any failed."""
    failed = False
    engine, ready_s = None, None
    for batch in group:
        bar.set_postfix_str(f"{name} batch {batch}")
        row = {"backend": name, "preset": args.preset, "steps": args.steps, "height": args.size,
               "width": args.size, "gpu": record["gpu"], "torch": record["torch"],
               "deepspeed": record["deepspeed"], "diffusers": record["diffusers"], "batch": batch}
        try:
            if engine is None:
                engine = build_engine(name, base, args.weights, max(group))
                ready_s = round(sum(engine.timings.values()), 2) if engine.timings else None
            row["ready_s"] = ready_s
            row.update(measure(engine, batch, args, references))
            record["guidance_scale"] = engine.rules.guidance_scale
        except Exception as e:  # noqa: BLE001 - record the failure, keep measuring the others
            log.exception("%s batch %d failed", name, batch)
            row["error"] = f"{type(e).__name__}: {e}"[:500]
            failed = True
        record["rows"].append(row)
        log.info("%s", {k: row.get(k) for k in ("backend", "batch", "latency_s", "images_per_s",
                                                 "unet_step_ms", "rmse_vs_eager", "error")})
        save()
        bar.update()
    del engine
    free()
    return failed


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=PRESETS, default="sd15",
                        help="architecture, run at its native size (default: sd15)")
    parser.add_argument("--steps", type=int, default=30, help="denoising steps (default: %(default)s)")
    parser.add_argument("--batch-sizes", default="1,4,8,16", help="comma-separated (default: %(default)s)")
    parser.add_argument("--runs", type=int, default=3, help="timed runs per row, median reported (default: 3)")
    parser.add_argument("--backends", default=",".join(BACKENDS),
                        help="comma-separated subset of: " + ", ".join(BACKENDS) + " (default: all)")
    parser.add_argument("--weights", type=Path, help="where to build the random-weight folder, or reuse it "
                        "(default: /tmp/bench-weights-<preset>, shared with the other GPU tools)")
    parser.add_argument("--out-dir", type=Path, default=Path("bench/results"), help="where the JSON and PNG go")
    parser.add_argument("--tag", help="appended to the result files' names, e.g. the part of a ladder a run holds")
    parser.add_argument("--lora-rank", type=int, default=16, help="rank of the random adapters (--check loras)")
    parser.add_argument("--check", choices=("shape-safety", "cold-start", "loras"),
                        help="instead of the table, run one check and write <name>-<check>.json")
    args = parser.parse_args(argv)
    args.backends_given = args.backends != parser.get_default("backends")
    setup_logging()
    if not cuda_available():
        return NO_GPU

    args.size = native_size(args.preset)
    record = {**record_header(), "preset": args.preset, "steps": args.steps, "height": args.size, "width": args.size,
              "guidance_scale": None, "runs": args.runs, "rows": []}
    stem = result_stem(record["gpu"], args.preset, args.check, args.tag)
    out_json, out_png = args.out_dir / f"{stem}.json", args.out_dir / f"{stem}.png"
    save = json_saver(out_json, record, then=None if args.check else lambda: plot(record, out_png))
    args.weights = preset_weights(args.preset, args.weights)
    # One listed size: the single-size engine (static shapes, the fastest at that size; docs/configuration.md).
    base = {"weights": str(args.weights), "num_inference_steps": args.steps, "warmup_steps": 2,
            "sizes": [[args.size, args.size]]}
    if args.check == "shape-safety":
        check_shape_safety(args, base, record, save)
    elif args.check == "loras":
        check_loras(args, base, record, save)
    elif args.check == "cold-start":
        check_cold_start(base, args.weights, record, save, args.backends.split(",") if args.backends_given else None)
    if args.check:
        print(json.dumps({k: record.get(k) for k in ("shape_safety", "cold_start_s", "rows")}, indent=1))
        print(f"wrote {out_json}")
        return 0

    record["vae_decode_ms"] = vae_decode_ms(args.weights, args.size)
    save()
    failed = run_table(args, base, record, save)
    table = [f"{'backend':24} {'batch':>5} {'latency_s':>9} {'img/s':>7} {'unet_ms':>8} {'rmse':>8} {'mem_gib':>7}"]
    for r in record["rows"]:
        table.append(f"{r['backend']:24} {r['batch']:5d} " + (f"{r['latency_s']:9.3f} {r['images_per_s']:7.2f} "
                     f"{r['unet_step_ms'] or 0:8.2f} {r['rmse_vs_eager']:8.5f} {r['peak_mem_gib']:7.2f}"
                     if "error" not in r else f"ERROR {r['error'][:80]}"))
    print("\n".join(table))
    print(f"wrote {out_json} and {out_png}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
