#!/usr/bin/env python3
"""GPU check of the DeepSpeed backend, through the TorchServe handler, on an SD-1.5-shaped model with random weights.

Steps, all in one process:
1. build the `sd15` preset (random weights, float16) as a diffusers folder, or reuse it;
2. eager float16 reference: load it with backend eager, generate one image per seed, time batch-1 latency;
3. for each cuda_graph setting: initialise the real handler (sd_handler.StableDiffusionHandler) with a TorchServe
   Context and backend deepspeed, report which modules DeepSpeed injected, send a batch through handle() and decode
   the JPEGs, regenerate the seeds with the handler's engine and compare with the eager images (RMSE on [0,1]
   pixels, NaN check), time batch-1 latency.
Writes the record (GPU name, versions, numbers) as JSON to --out after every step and prints it at the end. Progress
bars and logs go to stderr. The preset folder, timing and parity helpers are gpu_common.py's, shared with the other
GPU tools.

Exit codes: 0 all checks passed, 1 a check failed (the record says which), 2 no CUDA GPU.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from PIL import Image

from gpu_common import (NO_GPU, cuda_available, free, json_saver, nan_pixels, pixels, preset_weights, progress,
                        record_header, requests_for, rmse, setup_logging, timed_runs)
from sd_engine.config import EngineConfig
from sd_engine.engine import load_engine
from sd_engine.deepspeed_backend import injection_report

log = logging.getLogger("gpu_check")
RMSE_LIMIT = 0.02


def latency(engine, request, runs: int) -> float:
    """Median seconds of one batch-1 generation."""
    return statistics.median(timed_runs(lambda: engine.generate([request]), runs))


def new_handler(model_dir: str, handler_block: dict):
    """The real handler with the Context TorchServe's worker would pass it (gpu 0, batchSize 1)."""
    from ts.context import Context

    from sd_handler import StableDiffusionHandler

    context = Context("stable-diffusion", model_dir, {"model": {}}, 1, 0, "0.12.0",
                      model_yaml_config={"handler": handler_block})
    handler = StableDiffusionHandler()
    handler.initialize(context)
    return handler, context


def send(handler, context, bodies: list) -> list[dict]:
    """One batch through handle(), as TorchServe hands it over; status, content type and image size per request."""
    from ts.context import RequestProcessor

    context.request_processor = [RequestProcessor({}) for _ in bodies]
    outputs = handler.handle([{"body": b} for b in bodies], context)
    answers = []
    for i, output in enumerate(outputs):
        content_type = context.get_response_content_type(i)
        size = Image.open(io.BytesIO(output)).size if content_type == "image/jpeg" else None
        answers.append({"status": context.get_response_status(i)[0], "content_type": content_type, "size": size})
    return answers


def check_handler(weights: Path, base: dict, cuda_graph: bool, requests, references, runs: int) -> dict:
    row = {"backend": "deepspeed", "cuda_graph": cuda_graph}
    with tempfile.TemporaryDirectory() as model_dir:
        start = time.perf_counter()
        handler, context = new_handler(model_dir, dict(base, backend="deepspeed", cuda_graph=cuda_graph))
        row["initialize_s"] = round(time.perf_counter() - start, 2)
        row["engine_timings_s"] = {k: round(v, 2) for k, v in handler.engine.timings.items()}
        row["injected"] = injection_report(handler.engine.pipe)
        log.info("cuda_graph=%s injected: %s", cuda_graph, row["injected"])

        # A batch through the handler: JSON and plain-text bodies, as TorchServe hands them over.
        bodies = [{"prompt": r.prompt, "seed": r.seed} for r in requests] + ["a plain-text prompt"]
        row["handler_responses"] = send(handler, context, bodies)

        # Parity with eager float16, one image per seed at batch 1 (the shape the graphs were captured for).
        images = [pixels(handler.engine.generate([request]))[0] for request in requests]
        row["rmse_vs_eager"] = [round(rmse([image], [reference]), 5) for image, reference in zip(images, references)]
        row["nan_pixels"] = nan_pixels(images)
        row["latency_s_batch1"] = round(latency(handler.engine, requests[0], runs), 4)
        del handler
    free()
    return row


def check_oom(weights: Path, memory_gib: float) -> dict:
    """Cap this process's GPU memory (a smaller card), send a batch that cannot fit, then a normal request."""
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(memory_gib * 2**30 / total)
    record = {"check": "out-of-memory-through-handler", "memory_cap_gib": memory_gib, "rows": []}
    big = [{"prompt": f"big {i}", "seed": i, "height": 1024, "width": 1024, "num_inference_steps": 2}
           for i in range(8)]
    for cuda_graph in (False, True):
        with tempfile.TemporaryDirectory() as model_dir:
            handler, context = new_handler(model_dir, {"weights": str(weights), "backend": "eager",
                                                       "cuda_graph": cuda_graph, "num_inference_steps": 2,
                                                       "max_height": 1024, "max_width": 1024})
            before = torch.cuda.memory_allocated()
            oom = send(handler, context, big)
            after = torch.cuda.memory_allocated()
            next_ok = send(handler, context, [{"prompt": "small", "seed": 1}])
            again = send(handler, context, [{"prompt": "small again", "seed": 2}])
            record["rows"].append({
                "cuda_graph": cuda_graph, "big_batch_statuses": [a["status"] for a in oom],
                "allocated_gib_before": round(before / 2**30, 2), "allocated_gib_after": round(after / 2**30, 2),
                "next_requests": next_ok + again})
            log.info("oom check %s", record["rows"][-1])
            del handler, context
        free()
    record["failures"] = [f"cuda_graph={r['cuda_graph']}: {what}" for r in record["rows"] for what, bad in (
        ("the big batch was not answered 507", any(s != 507 for s in r["big_batch_statuses"])),
        ("the next requests failed", any(a["status"] != 200 for a in r["next_requests"])),
        ("memory was not given back", r["allocated_gib_after"] > r["allocated_gib_before"] + 0.5)) if bad]
    return record


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="JSON record to write (default: print only)")
    parser.add_argument("--weights", type=Path, help="where to build the random SD 1.5 folder, or reuse it "
                        "(default: /tmp/bench-weights-sd15, shared with the other GPU tools)")
    parser.add_argument("--steps", type=int, default=30, help="denoising steps (default: %(default)s)")
    parser.add_argument("--size", type=int, default=512, help="image height and width (default: %(default)s)")
    parser.add_argument("--runs", type=int, default=5, help="timed runs per latency median (default: %(default)s)")
    parser.add_argument("--graph-modes", default="false,true", help="cuda_graph settings to check, comma-separated")
    parser.add_argument("--oom", type=float, metavar="GIB",
                        help="instead: cap GPU memory at GIB and check that a batch too big to fit gets 507s "
                             "while the worker keeps serving")
    args = parser.parse_args(argv)
    setup_logging()
    if not cuda_available():
        return NO_GPU

    record = {"check": "deepspeed-through-handler", "preset": "sd15", "date": datetime.now(timezone.utc).isoformat(),
              "steps": args.steps, "height": args.size, "width": args.size, "guidance_scale": 7.5,
              **record_header(), "rows": []}
    save = json_saver(args.out, record, indent=2)
    log.info("versions: %s", {k: record[k] for k in ("gpu", "torch", "diffusers", "transformers", "deepspeed")})

    start = time.perf_counter()
    args.weights = preset_weights("sd15", args.weights)
    record["build_s"] = round(time.perf_counter() - start, 1)
    if args.oom:
        record.update(check_oom(args.weights, args.oom))
        return finish(record, save)

    base = {"weights": str(args.weights), "num_inference_steps": args.steps, "height": args.size,
            "width": args.size, "warmup_steps": 2}
    requests = requests_for(2, args.steps, args.size)
    modes = args.graph_modes.split(",")
    with progress(1 + len(modes), "gpu_check", unit="engine") as bar:
        bar.set_postfix_str("eager reference")
        eager = load_engine(EngineConfig(**base, backend="eager"), args.weights, torch.device("cuda:0"))
        references = [pixels(eager.generate([r]))[0] for r in requests]
        batched = pixels(eager.generate(requests))  # both seeds in one call: images must not depend on neighbours
        record["rows"].append({"backend": "eager", "cuda_graph": False,
                               "latency_s_batch1": round(latency(eager, requests[0], args.runs), 4),
                               "rmse_batch2_vs_batch1": round(rmse(batched, references), 5),
                               "nan_pixels": nan_pixels(references)})
        del eager, batched
        free()
        save()
        bar.update()
        for mode in modes:
            bar.set_postfix_str(f"deepspeed, cuda_graph={mode.strip()}")
            record["rows"].append(check_handler(args.weights, base, mode.strip() == "true", requests, references,
                                                args.runs))
            save()
            bar.update()

    failures = []
    for row in record["rows"]:
        if row["nan_pixels"]:
            failures.append(f"{row['backend']} cuda_graph={row['cuda_graph']}: NaN pixels")
        if row["backend"] == "deepspeed":
            if not row["injected"].get("unet", {}).get("DeepSpeedDiffusersTransformerBlock"):
                failures.append(f"cuda_graph={row['cuda_graph']}: no DeepSpeed transformer blocks in the UNet")
            if any(r["status"] != 200 or r["content_type"] != "image/jpeg" for r in row["handler_responses"]):
                failures.append(f"cuda_graph={row['cuda_graph']}: handler did not return JPEGs")
            if max(row["rmse_vs_eager"]) > RMSE_LIMIT:
                failures.append(f"cuda_graph={row['cuda_graph']}: RMSE {max(row['rmse_vs_eager'])} > {RMSE_LIMIT}")
    record["failures"] = failures
    return finish(record, save)


def finish(record: dict, save) -> int:
    save()
    print(json.dumps(record, indent=2))
    return 1 if record["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
